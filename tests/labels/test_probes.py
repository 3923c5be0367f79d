"""``label.probes=auto`` for a teacher of unknown nature: the decision on the pairs labeled both ways, and the
label stage's probe round (recorded, resumable, and recomputed by later stages' plan)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from nncift.labels.probes import AUTO_PROBES, MIN_MIRRORS, decide_probes, mirrored_values, probe_round


def test_mirrored_values_by_hand():
    # (0,1) and (1,0) both ways; (2,0) one way only; (3,3) a self pair; (1,0) repeated: its first label counts
    rows = np.array([0, 1, 2, 3, 1, 4, 0])
    cols = np.array([1, 0, 0, 3, 0, 0, 4])
    vals = np.array([0.1, 0.2, 0.3, 0.9, 0.7, 0.5, 0.6])
    a, b = mirrored_values(rows, cols, vals)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0.1, 0.2), (0.6, 0.5)]
    assert mirrored_values(np.array([2]), np.array([2]), np.array([1.0]))[0].size == 0


def _both_ways(n: int, rng: np.random.Generator):
    i = rng.choice(1000, size=n, replace=False)
    j = rng.choice(np.setdiff1d(np.arange(1000, 2000), i), size=n, replace=False)
    return np.concatenate([i, j]), np.concatenate([j, i])


def test_a_symmetric_teacher_gets_no_probes_and_an_asymmetric_one_gets_them():
    rng = np.random.default_rng(0)
    rows, cols = _both_ways(40, rng)
    base = rng.random(40)
    sym = np.concatenate([base, base + 0.01 * rng.random(40)])  # U(i -> j) ~ U(j -> i)
    dec = decide_probes(rows, cols, sym)
    assert dec["probes"] == 0 and dec["mirror_pairs"] == 40 and dec["symmetry"] > 0.9
    assert "symmetric" in dec["reason"]
    asym = np.concatenate([base, rng.random(40)])  # U(j -> i) unrelated to U(i -> j)
    dec = decide_probes(rows, cols, asym)
    assert dec["probes"] == AUTO_PROBES and abs(dec["symmetry"]) < 0.5 and "asymmetric" in dec["reason"]
    anti = np.concatenate([base, -base])  # the most asymmetric: U(j -> i) = -U(i -> j)
    assert decide_probes(rows, cols, anti, probes=2)["probes"] == 2


def test_too_few_pairs_both_ways_or_constant_labels_get_no_probes():
    rng = np.random.default_rng(1)
    rows, cols = _both_ways(MIN_MIRRORS - 1, rng)
    dec = decide_probes(rows, cols, rng.random(len(rows)))
    assert dec["probes"] == 0 and dec["symmetry"] is None and f"< {MIN_MIRRORS}" in dec["reason"]
    rows, cols = _both_ways(MIN_MIRRORS, rng)
    dec = decide_probes(rows, cols, np.ones(len(rows)))
    assert dec == {"mirror_pairs": MIN_MIRRORS, "symmetry": None, "probes": 0, "reason": "constant labels"}


def test_probe_round_adds_the_decided_columns_within_the_pair_cap():
    from nncift.labels.plan import plan_labels

    m = 60
    plan = plan_labels(m, 10, 0.5, 2, 0, 3, design="spread", partners=8, diagonal=False, probes=0)
    q1 = [s for s in plan.sets if s.kernel == "ff" and s.quadrant == "q1"]
    rows = np.concatenate([np.repeat(s.rows, len(s.cols)) for s in q1])
    cols = np.concatenate([np.tile(s.cols, len(s.rows)) for s in q1])
    have = sum(s.num_pairs for s in plan.sets)
    asym = np.sin(rows * 1.7 + cols * 0.3) + np.cos(cols * 2.9)  # U(j -> i) unrelated to U(i -> j)
    dec, sets = probe_round(m, plan, rows, cols, asym, seed=3)
    assert dec["probes"] == AUTO_PROBES == len(sets) and "asymmetric" in dec["reason"]
    assert all(s.quadrant == "probe" and s.num_pairs == m - 1 and s.cols[0] in plan.pool_labeled for s in sets)
    assert len({int(s.cols[0]) for s in sets}) == AUTO_PROBES
    dec_fit, sets_fit = probe_round(m, plan, rows, cols, asym, seed=3, max_pairs=have + AUTO_PROBES * (m - 1))
    assert dec_fit["probes"] == AUTO_PROBES and [s.cols[0] for s in sets_fit] == [s.cols[0] for s in sets]
    dec_cap, sets_cap = probe_round(m, plan, rows, cols, asym, seed=3, max_pairs=have + AUTO_PROBES * (m - 1) - 1)
    assert dec_cap["probes"] == 0 and sets_cap == [] and "label.max_pairs" in dec_cap["reason"]
    dec_sym, sets_sym = probe_round(m, plan, rows, cols, np.cos(rows) * np.cos(cols), seed=3)  # symmetric
    assert dec_sym["probes"] == 0 and sets_sym == [] and "symmetric" in dec_sym["reason"]
    assert sum(s.num_pairs for s in plan.sets) == have  # the caller adds the sets: the plan is not changed


def _table_run(tmp_path, symmetric_values: bool, extra: list[str] = ()):
    """A plain table teacher (no provenance) over generated items with column embeddings: (config, run dir, ids)."""
    import pyarrow as pa

    from nncift.config import load_config
    from tests.conftest import make_rows, write_jsonl

    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    m, n = 90, 20
    rows = make_rows(m + n, seed=4)
    for r in rows:
        r["emb"] = rng.normal(size=4).tolist()
    full = rng.random((m + n, m + n)).astype(np.float32)  # K[i, j] = U(j -> i)
    if symmetric_values:
        full = (full + full.T) / 2
    ids = [r["id"] for r in rows]
    ex, tg = np.meshgrid(np.arange(m + n), np.arange(m + n), indexing="ij")
    table = pa.table({"example_id": [ids[i] for i in ex.ravel()], "target_id": [ids[j] for j in tg.ravel()],
                      "value": full.T.ravel()})  # fmt: skip
    pq.write_table(table, tmp_path / "teacher.parquet")
    over = [f"data.input={write_jsonl(tmp_path / 'pool.jsonl', rows[:m])}",
            f"data.target={write_jsonl(tmp_path / 'target.jsonl', rows[m:])}", "data.test_size=0",
            "data.embedding_field=emb", "embed.source=column", "label.function=table",
            f"table.path={tmp_path / 'teacher.parquet'}", "label.fraction=0.3", "label.eval_pairs=100",
            "label.block_size=16", "ray.executor=local", *extra]  # fmt: skip
    return load_config(None, over), tmp_path / "run", m


@pytest.mark.parametrize("symmetric_values", [False, True])
def test_the_label_stage_decides_records_and_labels_the_probe_columns(tmp_path, symmetric_values):
    from nncift.labels.fanout import label_plan
    from nncift.runner import Runner

    cfg, run, m = _table_run(tmp_path, symmetric_values)
    runner = Runner(cfg, run)
    runner.run("label")
    decision = json.loads((run / "label" / "probes.json").read_text())
    labels = pq.read_table(run / "label" / "labels.parquet")
    probe = labels.filter(pc.equal(labels.column("quadrant"), "probe"))
    summary = json.loads((run / "label" / "_DONE.json").read_text())  # the stage's summary
    if symmetric_values:
        assert decision["probes"] == 0 and decision["symmetry"] > 0.9 and probe.num_rows == 0
        assert not (run / "label" / "blocks_probe").exists()
    else:
        assert decision["probes"] == 4 and abs(decision["symmetry"]) < 0.5
        assert probe.num_rows == 4 * (m - 1) and len(set(probe.column("col").to_pylist())) == 4
    assert summary["probe_decision"] == decision and summary["probe_pairs"] == probe.num_rows
    # later stages recompute the plan: with the recorded decision it holds exactly the labeled probe pairs
    plan = label_plan(runner.ctx)
    planned = {(int(r), int(c)) for s in plan.sets if s.quadrant == "probe" for r in s.rows for c in s.cols}
    assert planned == set(zip(probe.column("row").to_pylist(), probe.column("col").to_pylist(), strict=True))
    sets = json.loads((run / "label" / "plan.json").read_text())["sets"]
    assert sum(s["pairs"] for s in sets if s["quadrant"] == "probe") == probe.num_rows


def test_an_interrupted_probe_round_resumes_only_its_missing_blocks(tmp_path):
    from nncift.runner import Runner
    from tests.conftest import recomputed, stamp_blocks

    cfg, run, _ = _table_run(tmp_path, symmetric_values=False)
    Runner(cfg, run).run("label")
    full = pq.read_table(run / "label" / "labels.parquet")
    first, probes = run / "label" / "blocks", run / "label" / "blocks_probe"
    dropped = sorted(probes.glob("*.parquet"))[::2]
    assert len(dropped) >= 2
    for b in dropped:  # as if the run had died in the probe round
        b.unlink()
    (run / "label" / "_DONE.json").unlink()
    stamped = stamp_blocks(first, probes)
    Runner(cfg, run).run("label")
    assert recomputed(stamped, first, probes) == {b.name for b in dropped}
    assert pq.read_table(run / "label" / "labels.parquet").equals(full)


def test_max_pairs_too_small_for_the_probe_columns_skips_them_and_says_why(tmp_path):
    from nncift.runner import Runner

    cfg, run, m = _table_run(tmp_path, symmetric_values=False)
    Runner(cfg, run).run("label")
    planned = json.loads((run / "label" / "_DONE.json").read_text())
    first_round = planned["pairs_labeled"] - planned["probe_pairs"]
    cfg2, run2, _ = _table_run(tmp_path / "b", False, [f"label.max_pairs={first_round + 4 * (m - 1) - 1}"])
    Runner(cfg2, run2).run("label")
    decision = json.loads((run2 / "label" / "probes.json").read_text())
    assert decision["probes"] == 0 and "label.max_pairs" in decision["reason"] and "asymmetric" in decision["reason"]


@pytest.mark.ray
@pytest.mark.slow  # the probe round maps the same label fan-out as the first round, whose Ray twin runs in CI
@pytest.mark.timeout(600)
def test_the_probe_round_on_ray_equals_the_local_twin(ray_session, tmp_path):
    import dataclasses

    from nncift.runner import Runner

    cfg, run, m = _table_run(tmp_path, symmetric_values=False)
    Runner(cfg, run).run("label")
    ray_cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, executor="ray"))
    Runner(ray_cfg, tmp_path / "ray").run("label")
    local, remote = (pq.read_table(r / "label" / "labels.parquet") for r in (run, tmp_path / "ray"))
    assert remote.equals(local) and pc.sum(pc.equal(local.column("quadrant"), "probe")).as_py() == 4 * (m - 1)
    assert (tmp_path / "ray" / "label" / "probes.json").read_text() == (run / "label" / "probes.json").read_text()
