"""End to end on a tiny corpus and model: artifacts, resume, provenance, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest

from nncift.config import load_config
from nncift.errors import ProvenanceError
from nncift.runner import Runner
from tests.conftest import recomputed, stamp_blocks

LOCAL = ["ray.executor=local"]


def _run(run_dir, corpus, overrides, **kw):
    cfg = load_config(None, [f"data.input={corpus}", *overrides])
    return Runner(cfg, run_dir, **kw).run()


def test_end_to_end_local(tmp_path, corpus, tiny_overrides):
    run = tmp_path / "run"
    stages = _run(run, corpus, tiny_overrides + LOCAL)
    assert all(isinstance(v, float) for v in stages.values())
    labels = pq.read_table(run / "label" / "labels.parquet")
    assert labels.column_names[:4] == ["kernel", "quadrant", "row_id", "col_id"]
    assert set(labels.column("kernel").to_pylist()) == {"ff", "ft"}
    sel = pq.read_table(run / "select" / "selection.parquet")
    assert sel.column_names[:3] == ["id", "rank", "gain"]
    assert sel.num_rows == int(0.2 * 120) == len(set(sel.column("id").to_pylist()))
    gains = sel.column("gain").to_numpy()
    assert np.all(np.diff(gains) <= 1e-9)  # greedy gains never increase (submodularity)
    selected = [json.loads(x) for x in (run / "select" / "selected.jsonl").read_text().splitlines()]
    pool_ids = set(pq.read_table(run / "data" / "pool.parquet").column("id").to_pylist())
    assert [r["id"] for r in selected] == sel.column("id").to_pylist() and set(sel.column("id").to_pylist()) <= pool_ids
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["data"] == {"M": 120, "N": 40}
    assert rep["label"]["total_pairs"] == 120 * 120 + 120 * 40
    assert set(rep["network"]["ff"]["quadrants"]) == {"q1", "q2", "q3", "q4"}
    for q in rep["network"]["ft"]["quadrants"].values():
        assert set(q) == {"pairs", "network", "baseline_mean", "baseline_zero", "baseline_uniform"}
    assert (run / "report" / "pred_vs_true_q4.png").stat().st_size > 1000
    assert "MSE" in (run / "report" / "report.md").read_text()
    # the SE teacher's full kernel is cheap: fidelity is measured; its kernel *is* the embedding cosine, so the
    # zero-label baseline selects exactly the teacher's subset
    fid = rep["fidelity"]
    assert fid["measured"] and fid["objective"] == "fl" and fid["budget"] == 24
    assert fid["zero_label"]["jaccard"] == 1.0 and fid["zero_label"]["gap_closed"] == pytest.approx(1.0)
    assert isinstance(fid["gap_closed"], float) and 0.0 <= fid["jaccard"] <= 1.0
    assert fid["f_exact"] >= fid["f"] - 1e-6 or fid["gap_closed"] > 1.0
    assert (run / "report" / "fidelity.png").stat().st_size > 1000
    assert "gap closed" in (run / "report" / "report.md").read_text()
    assert rep["label"]["design"] == "spread" and rep["label"]["diag_pairs"] == 120
    assert rep["network"]["kind"] == "bilinear" and rep["network"]["symmetric"] is True
    assert (run / "config.yaml").is_file()


def test_resume_skips_and_changed_config_is_refused(tmp_path, corpus, tiny_overrides):
    run = tmp_path / "run"
    _run(run, corpus, tiny_overrides + LOCAL)
    before = (run / "select" / "selection.parquet").stat().st_mtime_ns
    stages = _run(run, corpus, tiny_overrides + LOCAL + ["label.concurrency=3"])  # runtime knob: still same run
    assert set(stages.values()) == {"skipped"}
    assert (run / "select" / "selection.parquet").stat().st_mtime_ns == before
    with pytest.raises(ProvenanceError, match=r"stage 'fit' .*\(fit\.rank: 16 -> 8\)"):
        _run(run, corpus, tiny_overrides + LOCAL + ["fit.rank=8"])
    stages = _run(run, corpus, tiny_overrides + LOCAL + ["fit.rank=8"], overwrite=True)
    assert stages["label"] == "skipped" and isinstance(stages["fit"], float)
    assert json.loads((run / "fit" / "network_ff.json").read_text())["rank"] == 8
    stages = _run(run, corpus, tiny_overrides + LOCAL + ["fit.rank=8", "select.objective=flmi"], overwrite=True)
    # the held-out choice reads the objective: choose (and so estimate) reruns, the fit does not
    assert stages["fit"] == "skipped" and isinstance(stages["choose"], float) and isinstance(stages["select"], float)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_paper_network_and_block_design_through_every_stage(tmp_path, corpus, tiny_overrides, layout):
    run = tmp_path / "run"
    paper = ["fit.kind=mlp", "label.design=block", "label.diagonal=false", "fit.cosine_prior=false"]
    sparse = ["estimate.layout=sparse", "estimate.topk=120"] if layout == "sparse" else []
    _run(run, corpus, [*tiny_overrides, *LOCAL, *paper, *sparse])
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["network"]["kind"] == "mlp" and rep["label"]["design"] == "block" and rep["label"]["diag_pairs"] == 0
    assert json.loads((run / "fit" / "network_ff.json").read_text())["kind"] == "mlp"
    assert rep["label"]["train_pairs"] == 24 * 24 + 24 * 8  # 20% of 120 pool and of 40 target items
    assert pq.read_table(run / "select" / "selection.parquet").num_rows == 24
    assert rep["fidelity"]["measured"]


def test_objectives_run(tmp_path, corpus, tiny_overrides):
    run = tmp_path / "run"
    for obj in ("flmi", "flcg", "topk"):
        _run(run, corpus, tiny_overrides + LOCAL + [f"select.objective={obj}"], overwrite=True)
        assert pq.read_table(run / "select" / "selection.parquet").num_rows == 24


def _cli(run_dir, corpus, overrides):
    return [
        sys.executable,
        "-m",
        "nncift.cli",
        "run",
        "-q",
        "--input",
        str(corpus),
        "--run-dir",
        str(run_dir),
        *[x for o in overrides for x in ("--set", o)],
    ]


@pytest.mark.parametrize(
    "watch",
    [
        # CI time: a label stage resumed from its finished blocks (test_icl_label_resume_recomputes_only_missing_blocks),
        # an actor killed mid-stage and truncated blocks (tests/test_trust.py) are in CI
        pytest.param("label/blocks/*.parquet", marks=pytest.mark.slow),
        pytest.param("estimate/blocks/ff_*.parquet", marks=pytest.mark.slow),
        "fit/_STARTED.json",
    ],
)
def test_kill_9_and_resume_gives_the_same_selection(tmp_path, corpus, tiny_overrides, watch, request):
    overrides = [*tiny_overrides, *LOCAL, "label.block_size=4", "estimate.block_size=10"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted reference runs beside the run to be killed (CI time); the kill waits for a file, not a time
    ref_err = (tmp_path / "ref.stderr").open("wb")  # a file, not a pipe nobody reads until the end
    ref_proc = subprocess.Popen(_cli(ref, corpus, overrides), stdout=subprocess.DEVNULL, stderr=ref_err)
    request.addfinalizer(lambda: (ref_proc.kill(), ref_proc.wait(), ref_err.close()))  # never left running
    proc = subprocess.Popen(_cli(run, corpus, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(run.glob(watch)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "report" / "_DONE.json").exists(), "the run finished before it could be killed"
    folders = [run / "label" / "blocks", run / "estimate" / "blocks"]
    finished = stamp_blocks(*folders)  # the blocks the killed run had finished
    if "blocks" in watch:
        assert any(p.match(watch) for p in finished), "the run was killed before any watched block landed"
    subprocess.run(_cli(run, corpus, overrides), check=True, timeout=300, capture_output=True)
    assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.stderr").read_text()[-2000:]
    a = pq.read_table(ref / "select" / "selection.parquet")
    b = pq.read_table(run / "select" / "selection.parquet")
    assert a.equals(b)
    assert not list(run.rglob("*.tmp"))
    # the resumed run computed exactly the blocks the killed one had not finished: recomputing every block
    # (or none) fails here, not only a wrong selection
    for folder in folders:
        names = {p.name for p in folder.glob("*.parquet")}
        assert names == {p.name for p in (ref / folder.relative_to(run)).glob("*.parquet")}
        done_before = {p.name for p in finished if p.parent == folder}
        assert recomputed(finished, folder) == names - done_before, folder


@pytest.mark.ray
@pytest.mark.slow  # 40 s of Ray startups; each fan-out's own twin test (tests/exec) runs in CI
@pytest.mark.timeout(600)
def test_end_to_end_ray_equals_the_local_twin(ray_session, tmp_path, corpus, tiny_overrides):
    """Every stage on the Ray executor (Ray Data reads, embedding actors, label actors, Ray Train on 2
    workers, estimate actors) gives the local run's selection and fidelity."""
    ray_run, local_run = tmp_path / "ray", tmp_path / "local"
    _run(ray_run, corpus, [*tiny_overrides, "fit.num_workers=2", "embed.concurrency=1"])
    _run(local_run, corpus, [*tiny_overrides, *LOCAL])
    rep, twin = (json.loads((r / "report" / "report.json").read_text()) for r in (ray_run, local_run))
    assert rep["selection"]["budget"] == twin["selection"]["budget"] == 24
    assert rep["network"]["ff"]["epochs"] >= 1
    assert rep["choice"]["chosen"] == twin["choice"]["chosen"]
    assert isinstance(twin["fidelity"]["gap_closed"], float)
    assert rep["fidelity"]["gap_closed"] == pytest.approx(twin["fidelity"]["gap_closed"], abs=1e-6)
    ids = [pq.read_table(r / "select" / "selection.parquet").column("id").to_pylist() for r in (ray_run, local_run)]
    assert ids[0] == ids[1]


def test_end_to_end_delift_icl_tiny_lm(tmp_path, corpus, tiny_overrides, tiny_lm):
    run = tmp_path / "run"
    icl = [
        "label.function=delift_icl",
        f"delift_icl.model={tiny_lm}",
        "delift_icl.max_prompt_tokens=24",
        "delift_icl.max_response_tokens=16",
        "label.eval_pairs=36",
        "label.min_count=6",
        "label.fraction=0.05",
        "label.design=block",
    ]
    _run(run, corpus, tiny_overrides + LOCAL + icl)
    labels = pq.read_table(run / "label" / "labels.parquet")
    quadrant = np.asarray(labels.column("quadrant").to_pylist())
    assert (quadrant == "q1").sum() == 6 * 6 + 6 * 6  # 6 labeled pool rows x (6 pool + 6 target) columns
    diag = labels.filter(pa.compute.equal(labels.column("quadrant"), "diag"))
    assert diag.num_rows == 120 and diag.column("row").to_pylist() == diag.column("col").to_pylist()
    # label.probes=auto on DELIFT ICL: 4 probe examples, each the in-context example of every other pool item
    probe = labels.filter(pa.compute.equal(labels.column("quadrant"), "probe"))
    cols = np.asarray(probe.column("col").to_pylist())
    assert probe.num_rows == 4 * 119 and len(np.unique(cols)) == 4
    assert np.isfinite(labels.column("value").to_numpy()).all()
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["label"]["function"] == "delift_icl" and rep["label"]["probe_pairs"] == 4 * 119
    assert rep["selection"]["budget"] == 24
    assert rep["fidelity"]["measured"] is False and "fidelity.truth_table" in rep["fidelity"]["reason"]
    assert rep["network"]["symmetric"] is False  # the ICL utility is not symmetric: two towers


def _icl(tiny_lm):
    return [
        "label.function=delift_icl",
        f"delift_icl.model={tiny_lm}",
        "delift_icl.max_prompt_tokens=24",
        "delift_icl.max_response_tokens=16",
        "label.eval_pairs=36",
        "label.min_count=6",
        "label.fraction=0.05",
        "label.block_size=4",
    ]


def test_icl_label_resume_recomputes_only_missing_blocks(tmp_path, corpus, tiny_overrides, tiny_lm, monkeypatch):
    from nncift.labels.label_worker import LabelWorker

    run = tmp_path / "run"
    cfg = load_config(None, [f"data.input={corpus}", *tiny_overrides, *LOCAL, *_icl(tiny_lm)])
    Runner(cfg, run).run("label")
    full = pq.read_table(run / "label" / "labels.parquet")
    blocks = sorted((run / "label" / "blocks").glob("*.parquet"))
    dropped = blocks[::3]
    for b in dropped:  # as if the run had died before these blocks finished
        b.unlink()
    (run / "label" / "_DONE.json").unlink()
    calls = []
    orig = LabelWorker.run_block
    monkeypatch.setattr(LabelWorker, "run_block", lambda self, spec: calls.append(spec["block_id"]) or orig(self, spec))
    Runner(cfg, run).run("label")
    assert sorted(calls) == sorted(int(b.stem) for b in dropped)
    again = pq.read_table(run / "label" / "labels.parquet")
    assert again.drop(["value"]).equals(full.drop(["value"]))
    # a recomputed block may batch its no-example losses differently: equal up to float32 rounding of losses
    # near 5 (a utility is a difference of two of them)
    np.testing.assert_allclose(again.column("value").to_numpy(), full.column("value").to_numpy(), rtol=0, atol=2e-6)


def test_full_labeling_mode_labels_every_pair(tmp_path, corpus, tiny_overrides):
    run = tmp_path / "run"
    _run(run, corpus, [*tiny_overrides, *LOCAL, "label.fraction=1.0", "label.diagonal=false"])
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["label"]["pairs_labeled"] == rep["label"]["total_pairs"] == 120 * 120 + 120 * 40
    assert list(rep["network"]["ff"]["quadrants"]) == ["q1"]


@pytest.mark.parametrize(  # CI: fl and flmi; flcg and topk marked slow (CI time)
    "objective",
    ["fl", "flmi", pytest.param("flcg", marks=pytest.mark.slow), pytest.param("topk", marks=pytest.mark.slow)],
)
def test_sparse_layout_with_full_topk_equals_dense(tmp_path, corpus, tiny_overrides, objective):
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    _run(dense, corpus, [*tiny_overrides, *LOCAL, f"select.objective={objective}"])
    _run(
        sparse,
        corpus,
        [*tiny_overrides, *LOCAL, "estimate.layout=sparse", "estimate.topk=120", "estimate.col_chunk=50",
         f"select.objective={objective}"],
    )  # fmt: skip
    assert json.loads((sparse / "estimate" / "kernels.json").read_text())["layout"] == "sparse"
    a = pq.read_table(dense / "select" / "selection.parquet")
    b = pq.read_table(sparse / "select" / "selection.parquet")
    # the same objective on the same kernel: equal values (tiles and stripes round differently, so a
    # near-tie may order two picks differently on another CPU; the objective reached may not differ)
    va = json.loads(a.schema.metadata[b"value"])
    vb = json.loads(b.schema.metadata[b"value"])
    assert vb == pytest.approx(va, rel=1e-5)
    ids_a, ids_b = a.column("id").to_pylist(), b.column("id").to_pylist()
    assert len(set(ids_a) & set(ids_b)) >= len(ids_a) - 2


@pytest.mark.parametrize("algorithm", ["lazy", "stochastic", "greedi"])
def test_auto_sparse_layout_and_algorithms(tmp_path, corpus, tiny_overrides, algorithm):
    run = tmp_path / "run"
    _run(
        run,
        corpus,
        [
            *tiny_overrides,
            *LOCAL,
            "estimate.dense_max_pairs=1000",
            "estimate.topk=8",
            f"select.algorithm={algorithm}",
            "select.parts=3",
        ],
    )
    meta = json.loads((run / "estimate" / "kernels.json").read_text())
    assert meta["layout"] == "sparse" and meta["topk"] == 8
    sel = pq.read_table(run / "select" / "selection.parquet")
    assert sel.num_rows == 24 == len(set(sel.column("id").to_pylist()))


def test_table_teacher_round_trip_through_export(tmp_path, corpus, tiny_overrides):
    # a full-label SE run exported as a table, then used as the teacher (and as fidelity ground truth)
    full = tmp_path / "full"
    cfg = load_config(None, [f"data.input={corpus}", *tiny_overrides, *LOCAL, "label.fraction=1.0"])
    Runner(cfg, full).run("label")
    table = tmp_path / "table.parquet"
    prov = Runner(cfg, full).export_table(table)
    assert prov["pairs"] == 120 * 120 + 120 * 40 and (tmp_path / "table.json").is_file()
    run = tmp_path / "run"
    _run(run, corpus, [*tiny_overrides, *LOCAL, "label.function=table", f"table.path={table}"])
    se = tmp_path / "se"
    _run(se, corpus, [*tiny_overrides, *LOCAL])
    a, b = pq.read_table(run / "label" / "labels.parquet"), pq.read_table(se / "label" / "labels.parquet")
    assert a.column("row_id").equals(b.column("row_id")) and a.column("col_id").equals(b.column("col_id"))
    np.testing.assert_allclose(a.column("value").to_numpy(), b.column("value").to_numpy(), rtol=1e-6)
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["fidelity"]["measured"] and rep["fidelity"]["truth"] == "table"
    # the table teacher declares no symmetry: two towers, unlike the SE run
    assert rep["network"]["symmetric"] is False


def test_table_missing_pair_stops_the_label_stage(tmp_path, corpus, tiny_overrides):
    from nncift.errors import DataError

    table = tmp_path / "t.parquet"
    pa.parquet.write_table(pa.table({"example_id": ["x"], "target_id": ["y"], "value": [0.5]}), table)
    with pytest.raises(DataError, match=r"no value for .* pairs needed"):
        _run(tmp_path / "run", corpus, [*tiny_overrides, *LOCAL, "label.function=table", f"table.path={table}"])


def test_export_table_cli(tmp_path, corpus, tiny_overrides, capsys):
    from nncift.cli import main

    sets = [x for o in [*tiny_overrides, *LOCAL, "label.fraction=1.0"] for x in ("--set", o)]
    args = ["--input", str(corpus), "--run-dir", str(tmp_path / "run"), *sets]
    out = tmp_path / "t.parquet"
    assert main(["export-table", *args, "--out", str(out)]) == 2  # nothing labeled yet: one-line error
    assert "the label stage is not finished" in capsys.readouterr().err
    assert main(["label", "-q", *args]) == 0
    assert main(["export-table", *args, "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["example_id", "target_id", "value"]
    assert t.num_rows == 120 * 120 + 120 * 40  # the diagonal is labeled twice but kept once


def test_active_design_labels_a_second_round_and_resumes_it(tmp_path, corpus, tiny_overrides, monkeypatch):
    run = tmp_path / "run"
    over = [*tiny_overrides, *LOCAL, "label.design=active", "label.partners=6"]
    _run(run, corpus, over)
    labels = pq.read_table(run / "label" / "labels.parquet")
    chosen = pq.read_table(run / "label" / "active_pairs.parquet")
    assert chosen.num_rows > 0
    from collections import Counter

    def keys(t):
        return list(zip(t.column("kernel").to_pylist(), t.column("row").to_pylist(), t.column("col").to_pylist(),
                        strict=True))  # fmt: skip

    counts = Counter(keys(labels))
    assert all(counts[k] == 1 for k in keys(chosen))  # every second-round pair labeled, exactly once
    plan = json.loads((run / "label" / "plan.json").read_text())
    labeled = set(plan["pool_labeled"])
    assert set(chosen.column("row").to_pylist()) <= labeled  # held-out items never get a training pair
    # a resumed label stage reuses the saved second round instead of refitting
    import nncift.labels.active

    (run / "label" / "_DONE.json").unlink()
    monkeypatch.setattr(nncift.labels.active, "second_round", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    cfg = load_config(None, [f"data.input={corpus}", *over])
    Runner(cfg, run).run("label")
    assert pq.read_table(run / "label" / "labels.parquet").equals(labels)


def test_sparse_layout_scales_like_dense_and_topk_uses_full_row_means(tmp_path, corpus, tiny_overrides):
    # with only 8 of 120 columns kept per row, the sparse kernel must still be scaled by the whole kernel's
    # extent (not by its kept values' minimum), and the top-k objective must use each row's full mean
    from nncift.kernels.kernel_io import assemble_dense, read_row_means, sparse_extent

    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    _run(dense, corpus, [*tiny_overrides, *LOCAL, "select.objective=topk"])
    _run(sparse, corpus, [*tiny_overrides, *LOCAL, "select.objective=topk", "estimate.layout=sparse",
                          "estimate.topk=8", "estimate.col_chunk=50"])  # fmt: skip
    k_ff = assemble_dense(dense / "estimate" / "blocks", "ff", (120, 120))
    k_ft = assemble_dense(dense / "estimate" / "blocks", "ft", (120, 40))
    lo, hi = sparse_extent(sparse / "estimate" / "blocks", "ff")
    assert (lo, hi) == pytest.approx((float(k_ff.min()), float(k_ff.max())), abs=1e-5)
    means = read_row_means(sparse / "estimate" / "blocks", "ft", 120)
    np.testing.assert_allclose(means, k_ft.mean(axis=1), rtol=1e-4, atol=1e-5)
    chosen = pq.read_table(sparse / "select" / "selection.parquet").column("index").to_numpy()
    true_means = k_ft.mean(axis=1)
    assert len(chosen) == 24 and true_means[chosen].min() >= np.sort(true_means)[-24] - 1e-5  # the top 24 rows
