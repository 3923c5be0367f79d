"""``nncift score``: new rows scored against a finished run without relabeling, and ``select --scored``.

The runs use precomputed embeddings (``embed.source=column``: no encoder) and the cheap DELIFT-SE teacher; one
test runs the tiny encoder to check the new rows are embedded as the pool was.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nncift.cli import main
from nncift.config import load_config
from nncift.kernels.kernel_io import assemble_dense, dense_kernels, read_row_means, read_sparse, sparse_extent
from nncift.runner import Runner
from nncift.stages.base import Context
from nncift.store import RunDir
from nncift.surrogate.predict import predict_factors
from tests.conftest import make_rows, write_jsonl

M, N, NEW = 90, 30, 24
BASE = ["data.test_size=0", "label.fraction=0.2", "label.min_count=8", "label.eval_pairs=400", "label.block_size=16",
        "label.partners=6", "fit.hidden=16", "fit.rank=16", "fit.epochs=4", "estimate.block_size=40",
        "select.fraction=0.2", "ray.executor=local", "choose.mode=surrogate"]  # fmt: skip
COLUMN = ["data.embedding_field=emb", "embed.source=column"]
SPARSE = ["estimate.layout=sparse", "estimate.topk=8", "estimate.col_chunk=30"]


def _corpora(root: Path) -> dict[str, Path]:
    """Pool, target and a second file (its rows held back from the pool) with clustered precomputed vectors."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16))
    rows = make_rows(M + N + 40, seed=1)
    for i, r in enumerate(rows):
        r["emb"] = (centers[i % 4] + 0.3 * rng.normal(size=16)).tolist()
    second = rows[M + N :]
    for i, r in enumerate(second):
        r["id"] = f"s{i}"
    root.mkdir(parents=True, exist_ok=True)
    return {
        "pool": write_jsonl(root / "pool.jsonl", rows[:M]),
        "target": write_jsonl(root / "target.jsonl", rows[M : M + N]),
        "second": write_jsonl(root / "second.jsonl", second),
        "new": write_jsonl(root / "new.jsonl", second[:NEW]),  # some rows of the second file
    }


def _run(root: Path, extra: list[str]) -> tuple[Runner, dict[str, Path]]:
    files = _corpora(root)
    over = [f"data.input={files['pool']}", f"data.target={files['target']}", *BASE, *extra]
    runner = Runner(load_config(None, over), root / "run")
    runner.run("select")
    return runner, files


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dense"), COLUMN)


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("sparse"), [*COLUMN, *SPARSE])


def _err(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("nncift: error: ")]


def _new_embeddings(path: Path) -> np.ndarray:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    e = np.asarray([r["emb"] for r in rows], np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _surrogate(run: Path, kernel: str, e_rows: np.ndarray, e_cols: np.ndarray) -> np.ndarray:
    """(R, C) float32: the fitted network's estimate in raw label units (no diagonal overwrite)."""
    import torch

    from nncift.surrogate.network import load_network

    net, scaler, _ = load_network(run / "fit" / f"network_{kernel}")
    f = net.estimator(torch.as_tensor(e_rows), torch.as_tensor(e_cols))
    return predict_factors(f) * np.float32(scaler.hi - scaler.lo) + np.float32(scaler.lo)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- the key tests
def test_dense_score_keeps_the_estimate_and_adds_the_surrogates_rows(dense_run):
    runner, files = dense_run
    run = runner.store.root
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"])]) == 0
    out = run / "score" / "new"
    assert (out / "_DONE.json").is_file()
    rows = pq.read_table(out / "rows.parquet")
    assert rows.column_names[:3] == ["id", "prompt", "response"] and "idx" in rows.column_names
    np.testing.assert_array_equal(rows.column("idx").to_numpy(), np.arange(M, M + NEW))
    assert rows.column("id").to_pylist() == [f"s{i}" for i in range(NEW)]
    from nncift.store import read_safetensors

    e_new = read_safetensors(out / "embeddings.safetensors")["new"]
    np.testing.assert_allclose(e_new, _new_embeddings(files["new"]), rtol=1e-5, atol=1e-6)

    meta = json.loads((out / "kernels.json").read_text())
    assert meta["layout"] == "dense" and meta["ff"]["shape"] == [M + NEW] * 2 and meta["ft"]["shape"] == [M + NEW, N]
    k_ff = assemble_dense(out / "blocks", "ff", (M + NEW, M + NEW))
    k_ft = assemble_dense(out / "blocks", "ft", (M + NEW, N))
    old_ff, old_ft = dense_kernels(runner.ctx.store.stage_dir("estimate"))
    # the rows that were in the pool all along: the estimate stage's values (its teacher diagonal included)
    np.testing.assert_allclose(k_ff[:M, :M], old_ff, rtol=1e-5)
    np.testing.assert_allclose(k_ft[:M], old_ft, rtol=1e-5)
    np.testing.assert_allclose(np.diag(k_ff)[:M], runner.ctx.diagonal(), rtol=1e-5)
    # the new rows and columns: the fitted networks on the embeddings, scaled back (new diagonal: the surrogate's)
    e_pool, e_target = runner.ctx.embeddings()
    e_all = np.concatenate([e_pool, e_new])
    np.testing.assert_allclose(k_ff[M:], _surrogate(run, "ff", e_new, e_all), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k_ff[:M, M:], _surrogate(run, "ff", e_pool, e_new), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k_ft[M:], _surrogate(run, "ft", e_new, e_target), rtol=1e-5, atol=1e-6)

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["run_dir"] == str(run.resolve()) and prov["input"] == str(files["new"].resolve())
    assert prov["input_sha256"] == _sha(files["new"])
    assert prov["config_fingerprint"] == runner.store.done_info("estimate")["fingerprint"]
    nets = {Path(p).name: h for p, h in prov["networks"].items()}
    for k in ("ff", "ft"):
        assert nets[f"network_{k}.safetensors"] == _sha(run / "fit" / f"network_{k}.safetensors")
    assert "estimate's own" in prov["diagonal"] and prov["estimate"] == "surrogate"
    assert not (out / "embed_in").exists() and not (out / "embed_parts").exists()


def test_sparse_score_merges_each_pool_rows_topk_with_the_new_columns(sparse_run):
    runner, files = sparse_run
    run = runner.store.root
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"])]) == 0
    out, base = run / "score" / "new" / "blocks", run / "estimate" / "blocks"
    k = 8
    cols, vals = read_sparse(out, "ff", M + NEW)
    old_cols, old_vals = read_sparse(base, "ff", M)
    assert cols.shape == (M + NEW, k)
    from nncift.store import read_safetensors

    e_new = read_safetensors(run / "score" / "new" / "embeddings.safetensors")["new"]
    e_pool, e_target = runner.ctx.embeddings()
    to_new = _surrogate(run, "ff", e_pool, e_new)  # (M, M') pool rows x new columns
    assert (cols[:M] >= M).any(axis=1).sum() > M // 2  # the merge is exercised: new columns enter pool rows
    kth = vals[:M].min(axis=1)
    tol = 1e-4 * (np.abs(old_vals).max() + 1.0)
    for i in range(M):
        # every old top-k entry still above the combined row's k-th value is kept, with its value
        above = old_vals[i] > kth[i] + tol
        assert set(old_cols[i][above]) <= set(cols[i])
        # the kept new columns carry the surrogate's values, and no dropped new column beats the k-th value
        new_kept = cols[i] >= M
        np.testing.assert_allclose(vals[i][new_kept], to_new[i, cols[i][new_kept] - M], rtol=1e-5, atol=1e-6)
        assert (np.delete(to_new[i], cols[i][new_kept] - M) <= kth[i] + tol).all()
    # the new rows: the top-k of the surrogate's row over every combined item
    e_all = np.concatenate([e_pool, e_new])
    full = _surrogate(run, "ff", e_new, e_all)
    np.testing.assert_allclose(vals[M:], -np.sort(-full, axis=1)[:, :k], rtol=1e-5, atol=1e-6)
    # row means and extents are those of the combined (M + M') x (M + M') kernel
    means = read_row_means(out, "ff", M + NEW)
    old_means = read_row_means(base, "ff", M)
    np.testing.assert_allclose(means[:M], (old_means * M + to_new.sum(axis=1)) / (M + NEW), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(means[M:], full.mean(axis=1), rtol=1e-5, atol=1e-6)
    lo, hi = sparse_extent(out, "ff")
    old_lo, old_hi = sparse_extent(base, "ff")
    assert lo == pytest.approx(min(old_lo, to_new.min(), full.min()), rel=1e-5)
    assert hi == pytest.approx(max(old_hi, to_new.max(), full.max()), rel=1e-5)
    # K_FT: the pool's stripes unchanged (linked), the new rows' top-k over the targets
    np.testing.assert_array_equal(read_sparse(out, "ft", M + NEW)[1][:M], read_sparse(base, "ft", M)[1])
    ft_full = _surrogate(run, "ft", e_new, e_target)
    np.testing.assert_allclose(read_sparse(out, "ft", M + NEW)[1][M:], -np.sort(-ft_full, axis=1)[:, :k], rtol=1e-5)


class _FreshContext(Context):
    """The run's context seen as if pool + NEW had been the pool all along (same fitted networks)."""

    def __init__(self, base: Context, root: Path, e_new: np.ndarray):
        super().__init__(base.cfg, RunDir(root), base.executor, base.runner)
        self._base, self._e_new = base, e_new

    def size(self) -> tuple[int, int]:
        m, n = self._base.size()
        return m + len(self._e_new), n

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        e_pool, e_target = self._base.embeddings()
        return np.concatenate([e_pool, self._e_new]), e_target

    def diagonal(self) -> np.ndarray | None:
        return self._base.diagonal()  # (M,): the new items have no teacher label, as in score


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_interrupted_score_recomputes_only_its_missing_blocks(dense_run, sparse_run, layout, tmp_path):
    """A score that lost blocks (one deleted, one truncated, its completion marker gone: a killed or damaged
    run) recomputes exactly those two on the rerun, not the blocks it had finished nor the estimate stage's
    linked ones, and gives the same blocks. A resume that recomputes every block fails here."""
    from tests.conftest import recomputed, stamp_blocks

    runner, files = dense_run if layout == "dense" else sparse_run
    run = tmp_path / "run"
    shutil.copytree(runner.store.root, run, ignore=shutil.ignore_patterns("score", ".lock"))
    args = ["score", "-q", "--run-dir", str(run), "--input", str(files["new"]), "--name", "new"]
    assert main(args) == 0
    out, base = run / "score" / "new", run / "estimate" / "blocks"
    blocks = out / "blocks"
    before = {p.name: pq.read_table(p) for p in blocks.glob("*.parquet")}
    # the blocks the score computed itself (the others are hard links to the estimate stage's)
    computed = sorted(
        p for p in blocks.glob("*.parquet") if not (base / p.name).exists() or not p.samefile(base / p.name)
    )
    assert 4 <= len(computed) < len(before)  # some blocks are the estimate's, linked
    lost, cut = computed[0], computed[-1]
    lost.unlink()
    cut.write_bytes(cut.read_bytes()[:100])
    (out / "_DONE.json").unlink()
    stamped = stamp_blocks(blocks)
    assert main(args) == 0
    assert recomputed(stamped, blocks) == {lost.name, cut.name}
    after = {p.name: pq.read_table(p) for p in blocks.glob("*.parquet")}
    assert after.keys() == before.keys() and all(after[k].equals(before[k]) for k in before)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_score_equals_a_fresh_estimate_over_pool_plus_new(dense_run, sparse_run, layout, tmp_path):
    """The estimate stage itself, run over pool + NEW with the same fitted networks, gives the same kernels."""
    from nncift.stages.estimate import EstimateStage
    from nncift.store import read_safetensors

    runner, files = dense_run if layout == "dense" else sparse_run
    run = runner.store.root
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"]), "--name", "fresh"]) == 0
    scored = run / "score" / "fresh" / "blocks"
    e_new = read_safetensors(run / "score" / "fresh" / "embeddings.safetensors")["new"]
    shutil.copytree(run / "fit", tmp_path / "fit")
    shutil.copytree(run / "choose", tmp_path / "choose")
    ctx = _FreshContext(runner.ctx, tmp_path, e_new)
    EstimateStage().run(ctx)
    fresh, t = tmp_path / "estimate" / "blocks", M + NEW
    if layout == "dense":
        for kernel, shape in (("ff", (t, t)), ("ft", (t, N))):
            np.testing.assert_allclose(
                assemble_dense(scored, kernel, shape), assemble_dense(fresh, kernel, shape), rtol=1e-5, atol=1e-6
            )
        return
    for kernel in ("ff", "ft"):  # values, not tie order: each row's kept values sorted
        a, b = read_sparse(scored, kernel, t)[1], read_sparse(fresh, kernel, t)[1]
        np.testing.assert_allclose(np.sort(a, axis=1), np.sort(b, axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(read_row_means(scored, kernel, t), read_row_means(fresh, kernel, t), rtol=1e-5)
        np.testing.assert_allclose(sparse_extent(scored, kernel), sparse_extent(fresh, kernel), rtol=1e-5)


@pytest.mark.parametrize(("mode", "lexical"), [("diag_lexical", "word"), ("diag_lexical", "word,char"),
                                               ("metric_lexical", "word,char"), ("additive", "word")])  # fmt: skip
def test_score_with_a_free_or_additive_estimate_extends_it_to_new_rows(tmp_path, mode, lexical, capsys):
    """A chosen estimate that is not the network: new rows get its bilinear form on their own view vectors (the
    lexical view through the run's fitted transform) and, for per-item effects, their ridge predictions."""
    from nncift.store import read_safetensors
    from nncift.surrogate.recipes import chosen_recipes
    from nncift.surrogate.views import LexicalView, item_texts

    runner, files = _run(tmp_path, [*COLUMN, f"choose.mode={mode}", f"choose.lexical={lexical}"])
    run = runner.store.root
    assert json.loads((run / "choose" / "choice.json").read_text())["chosen"] == mode
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"])]) == 0
    out = run / "score" / "new"
    k_ff = assemble_dense(out / "blocks", "ff", (M + NEW, M + NEW))
    k_ft = assemble_dense(out / "blocks", "ft", (M + NEW, N))
    old_ff, old_ft = dense_kernels(runner.ctx.store.stage_dir("estimate"))
    np.testing.assert_allclose(k_ff[:M, :M], old_ff, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k_ft[:M], old_ft, rtol=1e-5, atol=1e-6)
    rec = chosen_recipes(runner.ctx)
    new_rows = pq.read_table(out / "rows.parquet")
    if rec["ff"].view == "lexical":
        pool, target = runner.ctx.tables(["prompt", "response"])
        lex = LexicalView.load(run / "choose" / "lexical.safetensors")
        assert ",".join(lex.analyzers) == lexical
        v_pool = lex.transform(item_texts(pool.column("prompt").to_pylist(), pool.column("response").to_pylist()))
        v_t = lex.transform(item_texts(target.column("prompt").to_pylist(), target.column("response").to_pylist()))
        v_new = lex.transform(
            item_texts(new_rows.column("prompt").to_pylist(), new_rows.column("response").to_pylist())
        )
    else:
        (v_pool, v_t), v_new = runner.ctx.embeddings(), read_safetensors(out / "embeddings.safetensors")["new"]

    def aug(v):
        return np.concatenate([v, np.ones((len(v), 1), np.float32)], 1)

    for kernel, got, cols in (("ff", k_ff[M:], np.concatenate([v_pool, v_new])), ("ft", k_ft[M:], v_t)):
        r = rec[kernel]
        want = aug(v_new) @ r.W @ aug(cols).T
        if r.r is not None:
            want = want + (aug(v_new) @ r.r_w)[:, None]
        if r.c is not None:
            c_all = np.concatenate([r.c, aug(v_new) @ r.c_w]) if kernel == "ff" else r.c
            want = want + c_all[None, :]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if rec["ff"].view == "lexical" and lexical == "word":  # a lexical transform saved before its blocks existed
        from nncift.store import write_safetensors

        old = {k.split(".", 1)[1]: v for k, v in read_safetensors(run / "choose" / "lexical.safetensors").items()}
        write_safetensors(run / "choose" / "lexical.safetensors", old, metadata={"view": "lexical"})
        args = ["score", "-q", "--run-dir", str(run), "--input", str(files["new"]), "--name", "again"]
        capsys.readouterr()
        assert main(args) == 2
        assert "lexical.safetensors: a lexical view saved before its blocks" in capsys.readouterr().err
        assert not (run / "score" / "again").exists()


# ----------------------------------------------------------------------------------------- select --scored
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_select_scored_picks_from_old_and_new_and_leaves_the_runs_selection(dense_run, sparse_run, layout, capsys):
    runner, files = dense_run if layout == "dense" else sparse_run
    run = runner.store.root
    own = {p.name: _sha(p) for p in (run / "select").iterdir()}
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"]), "--name", "sel"]) == 0
    assert main(["select", "-q", "--run-dir", str(run), "--scored", "sel"]) == 0
    assert "selection: " in capsys.readouterr().out
    assert {p.name: _sha(p) for p in (run / "select").iterdir()} == own  # the run's own selection untouched
    out = run / "score" / "sel" / "select"
    sel = pq.read_table(out / "selection.parquet")
    assert sel.column_names == ["id", "rank", "gain", "index"]
    idx = sel.column("index").to_numpy()
    budget = int(0.2 * (M + NEW))
    assert len(idx) == budget and len(set(idx.tolist())) == budget and idx.max() < M + NEW
    assert (idx < M).any() and (idx >= M).any()  # old and new items (9 of 22 new here, not a near call)
    pool_ids = pq.read_table(run / "data" / "pool.parquet").column("id").to_pylist()
    all_ids = pool_ids + pq.read_table(out.parent / "rows.parquet").column("id").to_pylist()
    assert sel.column("id").to_pylist() == [all_ids[i] for i in idx]
    chosen = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in chosen] == sel.column("id").to_pylist() and [r["idx"] for r in chosen] == idx.tolist()
    # the same selection as the configured objective on the combined kernels
    if layout == "dense":
        from nncift.selection.greedy import greedy_select

        k_ff = assemble_dense(out.parent / "blocks", "ff", (M + NEW, M + NEW))
        expect, _ = greedy_select(k_ff, budget, objective="fl")
    else:
        from nncift.selection import sparse as ss

        cols, vals = read_sparse(out.parent / "blocks", "ff", M + NEW)
        kern, _ = ss.fl_kernel_from_topk(cols, vals, sparse_extent(out.parent / "blocks", "ff"), None, None, "fl")
        expect, _ = ss.sparse_lazy_greedy(kern, budget)
    np.testing.assert_array_equal(idx, expect)
    before = (out / "_DONE.json").read_text()
    assert main(["select", "-q", "--run-dir", str(run), "--scored", "sel"]) == 0  # finished: skipped
    assert (out / "_DONE.json").read_text() == before


# ----------------------------------------------------------------------------------------- bad input, reruns
def test_bad_inputs_exit_2_and_write_nothing(dense_run, tmp_path, capsys):
    runner, files = dense_run
    run = runner.store.root
    pool_rows = [json.loads(x) for x in files["pool"].read_text().splitlines()]
    clash = write_jsonl(tmp_path / "clash.jsonl", [{**pool_rows[0], "id": "x0"}, pool_rows[3]])
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(clash)]) == 2
    err = _err(capsys)
    assert len(err) == 1 and re.search(r"clash.jsonl: id 'r3' is already in the run's pool", err[0]), err
    assert not (run / "score" / "clash").exists()
    target_rows = [json.loads(x) for x in files["target"].read_text().splitlines()]
    clash_t = write_jsonl(tmp_path / "clash_t.jsonl", [target_rows[1]])
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(clash_t)]) == 2
    assert re.search(r"id 'r\d+' is already in the run's target", _err(capsys)[0])
    assert not (run / "score" / "clash_t").exists()
    # an unknown --scored name
    assert main(["select", "-q", "--run-dir", str(run), "--scored", "nope"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "no scored data named 'nope'" in err[0]
    assert not (run / "score" / "nope").exists()
    # another configuration than the run's
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"]), "--set", "fit.hidden=8"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "fit.hidden: 16 -> 8" in err[0] and "estimated with" in err[0]
    # a run that is not estimated yet (its estimate marker gone), and one that does not exist
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("score", ".lock"))
    (copy / "estimate" / "_DONE.json").unlink()
    assert main(["score", "-q", "--run-dir", str(copy), "--input", str(files["new"])]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "no finished estimate stage" in err[0] and not (copy / "score").exists()
    assert main(["score", "-q", "--run-dir", str(tmp_path / "none"), "--input", str(files["new"])]) == 2
    assert "no finished estimate stage" in _err(capsys)[0] and not (tmp_path / "none").exists()
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"]), "--name", "../x"]) == 2
    assert "--name '../x'" in _err(capsys)[0]


def test_rerun_is_skipped_and_a_changed_input_is_refused_without_overwrite(dense_run, tmp_path, capsys):
    from jobs.__main__ import main as jobs_main

    runner, files = dense_run
    run = runner.store.root
    new = tmp_path / "again.jsonl"
    shutil.copy(files["new"], new)
    assert jobs_main(["score", "-q", "--run-dir", str(run), "--input", str(new)]) == 0  # python -m jobs score
    done = (run / "score" / "again" / "_DONE.json").read_text()
    capsys.readouterr()
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(new)]) == 0
    assert "already scored, skipped" in capsys.readouterr().out
    assert (run / "score" / "again" / "_DONE.json").read_text() == done
    rows = [json.loads(x) for x in new.read_text().splitlines()]
    write_jsonl(new, rows[:-2])  # the input changed
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(new)]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "input_sha256" in err[0] and "--overwrite" in err[0]
    assert (run / "score" / "again" / "_DONE.json").read_text() == done  # untouched
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(new), "--overwrite"]) == 0
    assert pq.read_table(run / "score" / "again" / "rows.parquet").num_rows == NEW - 2


# ----------------------------------------------------------------------------------------- other runs
def test_pointwise_run_scores_new_items_with_the_pointwise_network(tmp_path):
    import torch  # noqa: F401 -- the network

    from nncift.kernels.kernel_io import item_scores
    from nncift.store import read_safetensors
    from nncift.surrogate.network import load_network
    from tests.stages.test_stages import ProbeScore  # noqa: F401 -- registers the pointwise test teacher

    runner, files = _run(tmp_path, [*COLUMN, "label.function=probe", "label.fraction=0.5", "label.eval_pairs=30"])
    run = runner.store.root
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(files["new"])]) == 0
    out = run / "score" / "new"
    assert json.loads((out / "kernels.json").read_text())["layout"] == "items"
    t = pq.read_table(out / "scores.parquet")
    np.testing.assert_array_equal(t.column("idx").to_numpy(), np.arange(M + NEW))
    scores = t.column("score").to_numpy()
    np.testing.assert_array_equal(scores[:M], item_scores(runner.ctx.store.stage_dir("estimate")))
    net, scaler, _ = load_network(run / "fit" / "network_item")
    e_new = read_safetensors(out / "embeddings.safetensors")["new"]
    np.testing.assert_allclose(scores[M:], scaler.inverse(net.score_items(e_new)), rtol=1e-5, atol=1e-6)
    assert main(["select", "-q", "--run-dir", str(run), "--scored", "new"]) == 0
    idx = pq.read_table(out / "select" / "selection.parquet").column("index").to_numpy()
    expect = np.lexsort((np.arange(M + NEW), -scores))[: int(0.2 * (M + NEW))]
    np.testing.assert_array_equal(idx, expect)


def test_new_rows_are_embedded_as_the_pool_was(tmp_path, tiny_st_model):
    """The run's encoder and template: a new row with a pool row's text (and an id of its own) gets that row's
    embedding."""
    runner, files = _run(tmp_path, [f"embed.model={tiny_st_model}"])
    run = runner.store.root
    pool_rows = [json.loads(x) for x in files["pool"].read_text().splitlines()]
    second = [json.loads(x) for x in files["second"].read_text().splitlines()]
    new = write_jsonl(tmp_path / "enc.jsonl", [*second[:5], {**pool_rows[7], "id": "copy7"}])
    assert main(["score", "-q", "--run-dir", str(run), "--input", str(new)]) == 0
    from nncift.store import read_safetensors

    e_new = read_safetensors(run / "score" / "enc" / "embeddings.safetensors")["new"]
    e_pool, _ = runner.ctx.embeddings()
    pool_ids = pq.read_table(run / "data" / "pool.parquet").column("id").to_pylist()
    np.testing.assert_allclose(e_new[5], e_pool[pool_ids.index("r7")], rtol=1e-4, atol=1e-5)
    assert e_new.shape == (6, e_pool.shape[1]) and not (run / "score" / "enc" / "embed_parts").exists()


@pytest.mark.ray
@pytest.mark.slow  # CI time: its two fan-outs' Ray twins (embedding, estimate blocks) run in CI (tests/exec)
@pytest.mark.timeout(600)
def test_score_on_ray_equals_local(ray_session, tmp_path, tiny_st_model):
    """The embedding and the block fan-out run on the run's executor: Ray gives the local artifacts."""
    from nncift.stages.score import score
    from nncift.store import read_safetensors

    runner, files = _run(tmp_path, [f"embed.model={tiny_st_model}", *SPARSE])
    run = runner.store.root
    cfg_yaml = run / "config.yaml"
    outs = {}
    for executor in ("local", "ray"):
        r = Runner(load_config(cfg_yaml, [f"ray.executor={executor}", "embed.concurrency=1"]), run)
        outs[executor] = Path(score(r, files["new"], executor)["folder"])
    a, b = outs["local"], outs["ray"]
    e_a, e_b = (read_safetensors(p / "embeddings.safetensors")["new"] for p in (a, b))
    np.testing.assert_allclose(e_a, e_b, rtol=1e-5, atol=1e-6)
    for kernel in ("ff", "ft"):
        va, vb = (read_sparse(p / "blocks", kernel, M + NEW)[1] for p in (a, b))
        np.testing.assert_allclose(np.sort(va, axis=1), np.sort(vb, axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            read_row_means(a / "blocks", kernel, M + NEW), read_row_means(b / "blocks", kernel, M + NEW), rtol=1e-5
        )


@pytest.mark.slow  # CI time: the local refusal is in CI (test_score_with_a_free_or_additive_estimate...[diag_lexical-word])
def test_an_old_lexical_transform_is_refused_on_ray(ray_session, tmp_path, tiny_st_model):
    """A lexical transform saved before its blocks existed is refused on Ray as locally (nothing written)."""
    from nncift.errors import ProvenanceError
    from nncift.stages.score import score
    from nncift.store import read_safetensors, write_safetensors

    runner, files = _run(tmp_path, [f"embed.model={tiny_st_model}", *SPARSE])
    run = runner.store.root
    cfg_yaml = run / "config.yaml"
    lex = run / "choose" / "lexical.safetensors"
    old = {k.split(".", 1)[1]: v for k, v in read_safetensors(lex).items() if k.startswith("word.")}
    write_safetensors(lex, old, metadata={"view": "lexical"})
    r = Runner(load_config(cfg_yaml, ["ray.executor=ray", "embed.concurrency=1"]), run)
    with pytest.raises(ProvenanceError, match=r"lexical\.safetensors: a lexical view saved before its blocks"):
        score(r, files["new"], "again")
    assert not (run / "score" / "again").exists()
