"""``device: auto`` and Ray's GPU scheduling, tested on CPU.

The resolution is a pure function (:func:`nncift.exec.devices.resolve_device`). The Ray tests use the session's Ray,
which declares 2 logical GPUs where torch has no CUDA (tests/conftest.py), and run every fan-out (label,
estimate, embed, evaluate) with ``num_gpus`` per actor and ``device: auto``: each actor is given its own GPU
(``CUDA_VISIBLE_DEVICES``), resolves auto to cpu with a warning (no CUDA), and writes what the local executor
writes. The Ray Train fit cannot run on logical GPUs (NCCL, ``cuda:N``): its ScalingConfig is checked instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from nncift.exec import devices
from nncift.exec.devices import local_gpu_ids, resolve_device, resolve_worker_kwargs

WARNING = "device=auto: this process was given GPUs"


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(devices, "_warned", set())


# ---------------------------------------------------------------------------------------------- pure resolution
def test_explicit_devices_are_kept_whatever_the_gpus():
    for dev in ("cpu", "cuda", "cuda:1"):
        assert resolve_device(dev, [], cuda=False) == dev
        assert resolve_device(dev, ["0"], cuda=True) == dev


def test_auto_is_cuda_only_where_gpus_were_given_and_cuda_works(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="nncift.exec.devices"):
        assert resolve_device("auto", [], cuda=True) == "cpu"  # an actor given no GPU (num_gpus=0)
        assert resolve_device("auto", None, cuda=True) == "cpu"
        assert resolve_device("auto", ["1"], cuda=True) == "cuda"  # its own GPU is cuda:0 of its CUDA_VISIBLE_DEVICES
        assert resolve_device("auto", [0, 1], cuda=True) == "cuda"
        assert not caplog.records
        # logical GPUs without CUDA (a CPU cluster declaring num_gpus): cpu, one warning per process
        assert resolve_device("auto", ["0"], cuda=False) == "cpu"
        assert resolve_device("auto", ["1"], cuda=False) == "cpu"
    assert [r.getMessage() for r in caplog.records] == [f"{WARNING} ['0'] but torch has no CUDA; running on cpu"]


def test_auto_asks_torch_when_not_told(fresh_warnings, monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert resolve_device("auto", ["0"]) == "cuda"
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert resolve_device("auto", ["0"]) == "cpu"


def test_local_gpu_ids_follow_cuda_visible_devices(monkeypatch):
    for env, ids in (("", []), ("0,1", ["0", "1"]), (" 2 ", ["2"]), ("1,-1,0", ["1"]), ("-1", []),
                     ("NoDevFiles", []), ("GPU-6f2a", ["GPU-6f2a"])):  # fmt: skip
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
        assert local_gpu_ids() == ids, env
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # unset: every device torch sees
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert local_gpu_ids() == []


def test_worker_kwargs_resolve_their_own_and_the_teachers_device(fresh_warnings):
    kw = {"device": "auto", "function_kwargs": {"model": "m", "device": "auto"}, "out_dir": "x"}
    out = resolve_worker_kwargs(kw, [])
    assert out == {"device": "cpu", "function_kwargs": {"model": "m", "device": "cpu"}, "out_dir": "x"}
    assert kw["device"] == "auto" and kw["function_kwargs"]["device"] == "auto"  # the caller's dict is untouched
    plain = {"device": "cuda:1", "function_kwargs": {}}
    assert resolve_worker_kwargs(plain, ["0"]) is plain
    assert resolve_worker_kwargs({"heads": {}}, ["0"]) == {"heads": {}}


def test_auto_devices_leave_the_fingerprints_unchanged():
    from nncift.config import load_config

    base = load_config()
    auto = load_config(overrides=[f"{s}.device=auto" for s in ("embed", "label", "estimate", "eval")])
    assert (auto.embed.device, auto.label.device, auto.estimate.device, auto.eval.device) == ("auto",) * 4
    for sections in (("embed",), ("label",), ("estimate",), ("eval",), ("", "embed", "label", "estimate")):
        assert auto.fingerprint(*sections) == base.fingerprint(*sections)


def test_the_fit_scaling_config_gives_each_worker_one_gpu():
    """Ray Train's fit on logical GPUs cannot run here (NCCL and ``cuda:N`` need CUDA): its ScalingConfig is
    what decides the placement, so it is checked directly."""
    from nncift.exec.ray_executor import scaling_config

    gpu = scaling_config(2, True)
    assert (gpu.num_workers, gpu.use_gpu, gpu.num_gpus_per_worker) == (2, True, 1)
    assert gpu.total_resources.get("GPU") == 2
    cpu = scaling_config(3, False)
    assert (cpu.num_workers, cpu.use_gpu, cpu.num_gpus_per_worker, cpu.num_cpus_per_worker) == (3, False, 0, 1)
    assert "GPU" not in cpu.total_resources


# ------------------------------------------------------------------------------------ Ray with 2 logical GPUs
@pytest.fixture
def ray_gpus(ray_session):
    """The session's Ray, which declares 2 logical GPUs where torch has no CUDA (tests/conftest.py); on a CUDA
    machine its real GPUs (at least 2 needed)."""
    import torch

    gpus = ray_session.cluster_resources().get("GPU", 0)
    if torch.cuda.is_available() and gpus < 2:
        pytest.skip(f"needs 2 GPUs in the Ray cluster, found {gpus}")
    assert gpus >= 2, "the shared Ray (tests/conftest.py ray_session) should declare logical GPUs"
    return ray_session


def _auto_here() -> tuple[str, bool]:
    """(what device=auto gives an actor given a GPU, whether it warns): cpu with a warning without CUDA."""
    import torch

    return ("cuda", False) if torch.cuda.is_available() else ("cpu", True)


class DeviceProbe:
    """A block worker that records, when its actor builds it, the GPUs Ray gave the actor, its
    CUDA_VISIBLE_DEVICES and the device it was built with (``device: auto`` already resolved); its first
    block waits (up to 60 s) until ``actors`` probes have recorded, so that every actor of the pool is seen."""

    def __init__(self, device: str, out_dir: str, actors: int):
        import ray

        self.out_dir, self.actors = Path(out_dir), actors
        rec = {
            "pid": os.getpid(),
            "device": device,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "warned": bool(devices._warned),
        }
        (self.out_dir / f"{os.getpid()}.json").write_text(json.dumps(rec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        deadline = time.monotonic() + 60
        while len(list(self.out_dir.glob("*.json"))) < self.actors and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"block_id": np.asarray(batch["block_id"])}


def _worker_warnings(ray, pid: int) -> int:
    """How often the actor process ``pid`` logged the device=auto fallback (its Ray worker log files)."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return sum(p.read_text(errors="replace").count(WARNING) for p in logs.glob(f"worker-*-{pid}.*"))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_each_actor_gets_its_own_logical_gpu_and_auto_falls_back_to_cpu(ray_gpus, tmp_path):
    """2 actors x num_gpus=1 on 2 logical GPUs, through map_ray (the options every block fan-out uses)."""
    from nncift.exec.ray_executor import map_ray

    specs = [{"block_id": i} for i in range(4)]
    kw = {"device": "auto", "out_dir": str(tmp_path), "actors": 2}
    res = map_ray(DeviceProbe, kw, specs, concurrency=2, num_cpus=0.5, num_gpus=1.0)
    assert sorted(int(r["block_id"]) for r in res) == list(range(4))
    recs = sorted((json.loads(p.read_text()) for p in tmp_path.glob("*.json")), key=lambda r: r["gpu_ids"])
    assert len({r["pid"] for r in recs}) == 2
    assert all(len(r["gpu_ids"]) == 1 for r in recs)
    assert len({r["gpu_ids"][0] for r in recs}) == 2  # one GPU each (on CPU machines: logical GPUs 0 and 1)
    assert [r["cuda_visible_devices"] for r in recs] == [r["gpu_ids"][0] for r in recs]  # Ray set each actor's own
    device, warns = _auto_here()
    assert all(r["device"] == device and r["warned"] == warns for r in recs)  # no CUDA: cpu, with the warning
    deadline = time.monotonic() + 10  # the warning reaches each actor's log file, once
    while warns and time.monotonic() < deadline and any(_worker_warnings(ray_gpus, r["pid"]) != 1 for r in recs):
        time.sleep(0.2)
    assert [_worker_warnings(ray_gpus, r["pid"]) for r in recs] == [int(warns)] * 2


@pytest.mark.ray
@pytest.mark.slow  # CI time: device=auto in an actor is in CI with the LM teacher and the embedding (below)
@pytest.mark.timeout(120)
def test_estimate_on_logical_gpus_equals_local(ray_gpus, tmp_path):
    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import RayExecutor
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.kernels.kernel_io import assemble_dense
    from nncift.labels.plan import block_grid
    from tests.kernels.test_estimate_worker import _heads

    heads, _ = _heads()
    specs = [b.to_dict() for b in block_grid("ff", 37, 37, 10) + block_grid("ft", 37, 11, 10, start_id=50)]
    res = {"concurrency": 2, "num_cpus": 0.5, "num_gpus": 1.0}
    for name, ex in (("local", LocalExecutor()), ("ray", RayExecutor(None))):
        kw = {"heads": heads, "out_dir": str(tmp_path / name), "device": "auto"}
        out = ex.map_blocks(EstimateWorker, kw, specs, **res)
        assert sorted(int(r["block_id"]) for r in out) == [s["block_id"] for s in specs]
    for kernel, shape in (("ff", (37, 37)), ("ft", (37, 11))):
        np.testing.assert_array_equal(
            assemble_dense(tmp_path / "local", kernel, shape), assemble_dense(tmp_path / "ray", kernel, shape)
        )


@pytest.mark.ray
@pytest.mark.slow  # CI time: label actors' Ray twin is in CI (test_ray_executor.py), device=auto with the embedding
@pytest.mark.timeout(120)
def test_label_with_an_lm_teacher_on_logical_gpus_equals_local(ray_gpus, tiny_lm, tmp_path):
    """label.device=auto reaches the teacher (``function_kwargs.device``) and is resolved in the actor."""
    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import RayExecutor
    from nncift.labels.label_worker import LabelWorker, plan_blocks
    from nncift.labels.plan import plan_labels
    from nncift.labels.tables import gather_labels

    rng = np.random.default_rng(0)
    e = rng.normal(size=(18, 4)).astype(np.float32)
    words = ["sort a list", "bake bread", "king of rivers", "prime sum", "json parse", "guitar chord"]

    def side(sl):
        return {
            "ids": [f"i{i}" for i in range(sl.start, sl.stop)],
            "prompts": [words[i % 6] for i in range(sl.start, sl.stop)],
            "responses": [words[(i * 5 + 1) % 6] for i in range(sl.start, sl.stop)],
            "embeddings": e[sl],
        }

    plan = plan_labels(12, 6, 0.5, 3, 0, seed=0)
    specs = plan_blocks(plan, 3)
    assert len(specs) >= 2
    sets = [{"kernel": s.kernel, "quadrant": s.quadrant, "rows": s.rows, "cols": s.cols} for s in plan.sets]
    fk = {"model": tiny_lm, "device": "auto", "max_prompt_tokens": 16, "max_response_tokens": 16}
    res = {"concurrency": 2, "num_cpus": 0.5, "num_gpus": 1.0}
    for name, ex in (("local", LocalExecutor()), ("ray", RayExecutor(None))):
        kw = {"function": "delift_icl", "function_kwargs": fk, "pool": side(slice(0, 12)),
              "target": side(slice(12, 18)), "sets": sets, "out_dir": str(tmp_path / name)}  # fmt: skip
        ex.map_blocks(LabelWorker, kw, specs, **res)
    a, b = gather_labels(tmp_path / "local", len(specs)), gather_labels(tmp_path / "ray", len(specs))
    assert a.num_rows > 0 and np.isfinite(a.column("value").to_numpy()).all()
    assert a.equals(b)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_embed_on_logical_gpus_equals_local(ray_gpus, tiny_st_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nncift.corpus.embedder import Embedder
    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import RayExecutor

    prompts = [f"explain python sort {i} " * (1 + i % 3) for i in range(40)]
    pq.write_table(
        pa.table({"prompt": prompts, "response": [f"answer list {i}" for i in range(40)], "idx": np.arange(40)}),
        tmp_path / "pool.parquet",
        row_group_size=7,
    )
    kw = {"model_path": tiny_st_model, "batch_size": 8, "max_seq_length": 64, "template": "{prompt}\n{response}",
          "device": "auto"}  # fmt: skip
    src = {"pool": str(tmp_path / "pool.parquet")}
    res = {"concurrency": 2, "num_cpus": 0.5, "num_gpus": 1.0}
    local = LocalExecutor().map_rows(Embedder, kw, src, tmp_path / "local", 8, "embedding", **res)["pool"]
    remote = RayExecutor(None).map_rows(Embedder, kw, src, tmp_path / "ray", 8, "embedding", **res)["pool"]
    assert remote.shape == local.shape == (40, 32)
    np.testing.assert_allclose(remote, local, atol=1e-5)
    direct = Embedder(**{**kw, "device": "cpu"}).encode([f"{p}\nanswer list {i}" for i, p in enumerate(prompts)])
    np.testing.assert_array_equal(local, direct)  # the local twin encodes exactly what the Embedder does
    assert list((tmp_path / "ray").glob("*.parquet"))  # written by the actors, not the driver


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_evaluate_on_shared_logical_gpus_equals_local(ray_gpus, tiny_lm, tmp_path):
    """Two eval actors sharing one logical GPU (num_gpus=0.5 each)."""
    import pyarrow.parquet as pq

    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import RayExecutor
    from nncift.lm.eval_worker import EvalWorker

    rows = {"prompt": ["sort a list", "hi", "bake bread", "sum two primes"],
            "response": ["use sorted(x)", "hello", "flour oven salt", "2 + 3"]}  # fmt: skip
    specs = [{"block_id": 0, "r0": 0, "r1": 2}, {"block_id": 1, "r0": 2, "r1": 4}]
    fk = {"template": "auto", "max_prompt_tokens": 32, "max_seq_len": 64}
    res = {"concurrency": 2, "num_cpus": 0.5, "num_gpus": 0.5}
    for name, ex in (("local", LocalExecutor()), ("ray", RayExecutor(None))):
        kw = {"base": tiny_lm, "adapter": None, "rows": rows, "out_dir": str(tmp_path / name), "fmt_kwargs": fk,
              "max_new_tokens": 4, "batch_size": 2, "device": "auto"}  # fmt: skip
        out = ex.map_blocks(EvalWorker, kw, specs, **res)
        assert sorted(int(r["block_id"]) for r in out) == [0, 1]
    for b in ("000000", "000001"):
        assert pq.read_table(tmp_path / "local" / f"{b}.parquet").equals(
            pq.read_table(tmp_path / "ray" / f"{b}.parquet")
        )
