"""Silent wrong answers are refused: non-finite kernels and labels, non-UTF-8 input."""

import numpy as np
import pytest

from nncift import select_subset
from nncift.errors import DataError, TeacherError
from nncift.selection.greedy import greedy_select, lazy_greedy
from nncift.surrogate.network import Scaler


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_selection_refuses_non_finite_kernels(bad):
    k = np.random.default_rng(0).uniform(size=(6, 6)).astype(np.float32)
    k[2, 4] = bad
    with pytest.raises(ValueError, match=r"k_ff has 1 non-finite entries .* at \[2, 4\]"):
        select_subset(k, 3)
    with pytest.raises(ValueError, match="k_ft has 1 non-finite"):
        select_subset(np.ones((6, 6)), 3, objective="flmi", k_ft=k)
    with pytest.raises(ValueError, match="non-finite"):  # scale=False used to loop forever on NaN
        greedy_select(k, 3, scale=False)
    with pytest.raises(ValueError, match="non-finite"):
        lazy_greedy(k, 3)


def test_scaler_refuses_non_finite_labels():
    with pytest.raises(ValueError, match="1 non-finite"):
        Scaler.fit(np.array([0.1, np.nan, 0.3]))


def test_non_finite_teacher_value_stops_the_label_stage(tmp_path, corpus, tiny_overrides, monkeypatch):
    from nncift.config import load_config
    from nncift.influence.delift_se import DeliftSE
    from nncift.runner import Runner

    orig = DeliftSE.utility

    def fp16_overflow(self, examples, targets):
        out = orig(self, examples, targets)
        out[0, -1] = np.inf
        return out

    monkeypatch.setattr(DeliftSE, "utility", fp16_overflow)
    cfg = load_config(None, [f"data.input={corpus}", *tiny_overrides, "ray.executor=local"])
    with pytest.raises(TeacherError, match=r"label block 000000: teacher delift_se returned .* inf for the pair"):
        Runner(cfg, tmp_path / "run").run()
    assert not (tmp_path / "run" / "label" / "blocks" / "000000.parquet").exists()
    assert not (tmp_path / "run" / "label" / "_DONE.json").exists()


def test_non_utf8_and_bom(tmp_path):
    from nncift.config import DataConfig
    from nncift.corpus.readers import read_corpus

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_corpus(bad, DataConfig())
    js = tmp_path / "latin1.json"
    js.write_bytes(b'[\n{"prompt": "a", "response": "b"},\n{"prompt": "\xff", "response": "b"}\n]')
    with pytest.raises(DataError, match=r"latin1.json:3: not UTF-8"):
        read_corpus(js, DataConfig())
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert read_corpus(bom, DataConfig()).num_rows == 1


@pytest.mark.ray
@pytest.mark.slow  # CI time: the table is now checked in the driver; a worker's user error on Ray is one line in
# test_worker_user_errors_on_ray_are_one_line_and_never_retried, which stays in CI
@pytest.mark.timeout(600)
def test_worker_error_reaches_the_driver_as_one_line_under_ray(ray_session, tmp_path, corpus, tiny_overrides):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nncift.config import load_config
    from nncift.runner import Runner

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"example_id": ["x"], "target_id": ["y"], "value": [0.5]}), table)
    cfg = load_config(None, [f"data.input={corpus}", *tiny_overrides, "label.function=table", f"table.path={table}"])
    with pytest.raises(DataError) as info:
        Runner(cfg, tmp_path / "run").run("label")
    msg = str(info.value)
    assert "has no value for" in msg and "Traceback" not in msg and "\n" not in msg


class _Recorded:
    """A :class:`~nncift.labels.label_worker.LabelWorker` that records each construction and each block call in a file, and
    raises a user error on block ``fail_block`` (its teacher's constructor may raise one too)."""

    def __init__(self, record: str, fail_block: int = -1, **kw):
        from nncift.labels.label_worker import LabelWorker

        self.record, self.fail_block = record, fail_block
        self._note("init")
        self.inner = LabelWorker(**kw)

    def _note(self, what: str) -> None:
        with open(self.record, "a") as fh:
            fh.write(what + "\n")

    def __call__(self, batch):
        for b in batch["block_id"]:
            self._note(f"block {int(b)}")
            if int(b) == self.fail_block:  # raised, not returned: Ray Data fails the task
                raise DataError(f"block {int(b)}: a bad row (one line)")
        return self.inner(batch)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_worker_user_errors_on_ray_are_one_line_and_never_retried(ray_session, tmp_path, capfd):
    """A user error raised in a Ray actor's constructor (it used to kill the actor, and Ray Data to retry it)
    or raised by a block reaches the driver as the DataError the local executor raises, the same one line; the
    constructor runs once per actor and the failing block once (no retry of a deterministic error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nncift.config import RayConfig
    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import RayExecutor

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"example_id": ["x"], "target_id": ["y"], "value": [float("nan")]}), table)
    side, plan, specs = _label_setup()
    assert len(specs) >= 3
    # the table's kwargs as they reach a worker, unresolved (the driver's resolve() would refuse the file)
    kw = {"function": "table", "function_kwargs": {"path": str(table), "field": "table.path"},
          "pool": side(0, 40), "target": side(40, 60), "sets": [s.to_dict() for s in plan.sets]}  # fmt: skip
    with pytest.raises(DataError) as local:
        LocalExecutor().map_blocks(_Recorded, {**kw, "record": str(tmp_path / "local"), "out_dir": str(tmp_path / "l")},
                                   specs)  # fmt: skip
    assert "row 0: value is nan (not finite)" in str(local.value)
    ray_exec = RayExecutor(RayConfig())
    record = tmp_path / "ray_init"
    import ray.data

    ctx = ray.data.DataContext.get_current()
    deaths = ctx.max_consecutive_actor_init_deaths
    ctx.max_consecutive_actor_init_deaths = 2  # Ray Data would replace an actor that died in its constructor
    capfd.readouterr()
    try:
        with pytest.raises(DataError) as info:
            ray_exec.map_blocks(_Recorded, {**kw, "record": str(record), "out_dir": str(tmp_path / "r")}, specs,
                                concurrency=1, num_cpus=0.5)  # fmt: skip
    finally:
        ctx.max_consecutive_actor_init_deaths = deaths
    assert str(info.value) == str(local.value) and "\n" not in str(info.value)
    assert record.read_text().splitlines() == ["init"]  # built once, never rebuilt (the actor did not die)
    assert "Traceback" not in capfd.readouterr().err  # nor did Ray print the constructor's traceback
    assert not list(tmp_path.glob("r/*.parquet"))
    # a block that raises (rather than returns) a user error: the same line, the block not retried
    good = {**kw, "function": "delift_se", "function_kwargs": {}}
    record = tmp_path / "ray_block"
    with pytest.raises(DataError, match=r"^block 1: a bad row \(one line\)$"):
        ray_exec.map_blocks(_Recorded, {**good, "record": str(record), "out_dir": str(tmp_path / "r2"), "fail_block": 1},
                            specs, concurrency=1, num_cpus=0.5)  # fmt: skip
    lines = record.read_text().splitlines()
    assert lines.count("init") == 1 and lines.count("block 1") == 1, lines


def test_label_blocks_are_sized_by_teacher_cost():
    from nncift.labels.label_worker import block_side

    assert block_side(128, 120.0, 5.0) == 24  # DELIFT ICL on 2 cores: ~600 pairs, about 2 minutes a block
    assert block_side(128, 120.0, 1e6) == 128  # a cheap teacher keeps the configured side
    assert block_side(128, 1.0, 0.01) == 1


def test_pipeline_uses_the_cost_sized_side(tmp_path, corpus, tiny_overrides):
    from nncift.config import load_config
    from nncift.runner import Runner

    over = [f"data.input={corpus}", *tiny_overrides, "label.function=delift_icl", "label.block_size=128"]
    from nncift.labels.fanout import label_block_side

    assert label_block_side(Runner(load_config(None, over), tmp_path).ctx) == 24
    assert label_block_side(Runner(load_config(None, [*over, "label.pairs_per_second=50"]), tmp_path).ctx) == 77


@pytest.mark.ray
def test_ray_data_never_times_out_long_blocks(ray_session):
    import ray

    from nncift.exec.ray_executor import configure_data_context

    configure_data_context()
    assert ray.data.DataContext.get_current().execution_no_progress_timeout_s == -1


# ---------------------------------------------------------------------------------------------- faults
def test_two_runs_on_one_run_directory_refuse_each_other(tmp_path, corpus, tiny_overrides):
    import subprocess
    import sys
    import time

    from nncift.errors import RunDirBusyError
    from nncift.store import run_lock

    run = tmp_path / "run"
    # another process holds the run directory (what a second `nncift run` meets)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from nncift.store import run_lock\nimport time\nwith run_lock({str(run)!r}): time.sleep(60)",
        ]
    )
    try:
        deadline = time.time() + 30
        while not (run / ".lock").exists() or not (run / ".lock").read_text():
            assert time.time() < deadline
            time.sleep(0.05)
        from nncift.cli import main

        sets = [x for o in [*tiny_overrides, "ray.executor=local"] for x in ("--set", o)]
        assert main(["run", "-q", "--input", str(corpus), "--run-dir", str(run), *sets]) == 2
        busy = rf"run directory {run} is in use by nncift pid {holder.pid}"
        with pytest.raises(RunDirBusyError, match=busy), run_lock(run):
            pass
        assert not (run / "data").exists()  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # a dead holder's lock is gone (kill -9 leaves no stale lock), and the lock is re-entrant in one process
    with run_lock(run), run_lock(run):
        pass


@pytest.mark.parametrize(
    "stage,pattern", [("label", "blocks/000001.parquet"), ("estimate", "blocks/ff_000001.parquet")]
)
def test_truncated_block_file_is_recomputed_not_read(tmp_path, corpus, tiny_overrides, stage, pattern):
    import pyarrow.parquet as pq

    from nncift.config import load_config
    from nncift.runner import Runner
    from tests.conftest import recomputed, stamp_blocks

    cfg = load_config(None, [f"data.input={corpus}", *tiny_overrides, "ray.executor=local"])
    ref = tmp_path / "ref"
    Runner(cfg, ref).run()
    run = tmp_path / "run"
    Runner(cfg, run).run(stage)
    block = run / stage / pattern
    stamped = stamp_blocks(block.parent)
    data = block.read_bytes()
    block.write_bytes(data[: len(data) // 2])  # a truncated copy (disk full, an interrupted rsync)
    (run / stage / "_DONE.json").unlink()
    Runner(cfg, run).run()
    assert pq.read_table(block).num_rows == pq.read_table(ref / stage / pattern).num_rows
    # only the truncated block was recomputed (a resume that recomputes every block fails here)
    assert len(stamped) > 1 and recomputed(stamped, block.parent) == {block.name}
    assert pq.read_table(block).equals(pq.read_table(ref / stage / pattern))
    a = pq.read_table(ref / "select" / "selection.parquet")
    assert a.equals(pq.read_table(run / "select" / "selection.parquet"))


class _Dying:
    """A worker whose actor process dies (os._exit) in the middle of block 2, once (a marker file)."""

    def __init__(self, marker: str, worker: str, **kw):
        from nncift.kernels.estimate_worker import EstimateWorker
        from nncift.labels.label_worker import LabelWorker

        self.inner = {"label": LabelWorker, "estimate": EstimateWorker}[worker](**kw)
        self.marker = marker

    def __call__(self, batch):
        import os
        from pathlib import Path

        if 2 in [int(b) for b in batch["block_id"]] and not Path(self.marker).exists():
            Path(self.marker).write_text("died once")
            os._exit(1)
        return self.inner(batch)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_killed_actor_is_retried_and_the_labels_are_identical(ray_session, tmp_path):
    from nncift.config import RayConfig
    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import RayExecutor
    from nncift.labels.label_worker import LabelWorker
    from nncift.labels.tables import gather_labels

    side, plan, specs = _label_setup()
    kw = {"function": "delift_se", "function_kwargs": {}, "pool": side(0, 40), "target": side(40, 60),
          "sets": [s.to_dict() for s in plan.sets]}  # fmt: skip
    LocalExecutor().map_blocks(LabelWorker, {**kw, "out_dir": str(tmp_path / "local")}, specs)
    marker = tmp_path / "died"
    RayExecutor(RayConfig()).map_blocks(_Dying, {**kw, "out_dir": str(tmp_path / "ray"), "marker": str(marker), "worker": "label"},
               specs, concurrency=1, num_cpus=0.5)  # fmt: skip
    assert marker.read_text() == "died once"  # the actor really died mid-map
    assert gather_labels(tmp_path / "ray", len(specs)).equals(gather_labels(tmp_path / "local", len(specs)))


@pytest.mark.ray
@pytest.mark.slow  # CI time: the same retry of map_blocks is in CI for the label actors (the test above)
@pytest.mark.timeout(600)
def test_a_killed_estimate_actor_is_retried_and_the_tiles_are_identical(ray_session, tmp_path):
    from nncift.config import RayConfig
    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import RayExecutor
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.kernels.kernel_io import assemble_dense
    from nncift.labels.plan import block_grid
    from tests.kernels.test_estimate_worker import _heads

    heads, _ = _heads()
    specs = [b.to_dict() for b in block_grid("ff", 37, 37, 10) + block_grid("ft", 37, 11, 10, start_id=50)]
    LocalExecutor().map_blocks(EstimateWorker, {"heads": heads, "out_dir": str(tmp_path / "local")}, specs)
    marker = tmp_path / "died"
    kw = {"heads": heads, "out_dir": str(tmp_path / "ray"), "marker": str(marker), "worker": "estimate"}
    RayExecutor(RayConfig()).map_blocks(_Dying, kw, specs, concurrency=1, num_cpus=0.5)
    assert marker.read_text() == "died once"
    for kernel, shape in (("ff", (37, 37)), ("ft", (37, 11))):
        a = assemble_dense(tmp_path / "local", kernel, shape)
        np.testing.assert_array_equal(a, assemble_dense(tmp_path / "ray", kernel, shape))


def _label_setup():
    """60 unit embeddings as a 40-item pool and a 20-item target (``side(lo, hi)``: a worker's side kwargs),
    a block-design label plan over them and its blocks."""
    from nncift.labels.label_worker import plan_blocks
    from nncift.labels.plan import plan_labels

    e = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)

    def side(lo, hi):
        n = hi - lo
        return {"ids": [f"i{i}" for i in range(lo, hi)], "prompts": ["p"] * n, "responses": ["r"] * n,
                "embeddings": e[lo:hi]}  # fmt: skip

    plan = plan_labels(40, 20, 0.5, 4, 36, seed=0, design="block")
    return side, plan, plan_blocks(plan, 6)
