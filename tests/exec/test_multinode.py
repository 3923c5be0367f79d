"""Multi-node on one machine: Ray's test cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes, each
with its own CPUs and one logical GPU) runs the pipeline through ``ray.address``.

* the label, estimate, embed and score fan-outs place their actors on both worker nodes (each actor asks for
  one GPU, and each node has one), and the artifacts equal the local executor's: block files byte for byte;
* a worker node killed mid-label and again mid-estimate (``cluster.remove_node``, a fresh node joining as a
  replacement would) leaves a run that completes, with Ray's retries or a rerun's resume, with the same bytes
  and no half-written file left behind;
* a node that cannot see the run directory stops the fan-out with one clear error naming the node and path.

Ray allows one ``ray.init`` per process, and the other tests share one session (``ray_session``): every cluster
here lives in a subprocess (:data:`HELPER`) that prints one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nncift.config import load_config
from nncift.runner import Runner
from tests.conftest import make_rows, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]

# each fan-out: one actor per logical GPU, so one on each worker node
SPREAD = [f"{sec}.{k}={v}" for sec in ("embed", "label", "estimate") for k, v in (("concurrency", 2), ("num_gpus", 1))]

HELPER = r'''
import json, os, sys, threading, time, traceback
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
from ray.cluster_utils import Cluster

from nncift.config import load_config
from nncift.exec.ray_executor import RayExecutor
from nncift.exec.local import LocalExecutor
from nncift.runner import Runner

args = json.loads(sys.argv[1])
mode, run = args["mode"], Path(args["run"])
NODE = {"num_cpus": 2, "num_gpus": 1}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
workers = [cluster.add_node(**NODE) for _ in range(2)]
cluster.wait_for_nodes()
hide = {}  # set below: the node id whose workers must not see the run directory


def blind(prefix=str(run)):
    """Worker setup hook: on the node named in NNCIFT_TEST_BLIND_NODE, files under the run directory do not exist
    (as on a node that does not mount it)."""
    import os, os.path, ray

    if ray.get_runtime_context().get_node_id() != os.environ.get("NNCIFT_TEST_BLIND_NODE"):
        return
    real = os.path.isfile
    os.path.isfile = lambda p: False if str(p).startswith(prefix) else real(p)


def slow_blocks():
    """Worker setup hook: every label and estimate block takes 50 ms longer (the same bytes), so that a node dies
    while its fan-out still has work."""
    import time
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.labels.label_worker import LabelWorker

    for cls in (LabelWorker, EstimateWorker):
        def run_block(self, spec, _orig=cls.run_block):
            time.sleep(0.05)
            return _orig(self, spec)

        cls.run_block = run_block


env = {}
if mode == "kill":
    env = {"worker_process_setup_hook": slow_blocks}
if mode == "blind":
    env = {"worker_process_setup_hook": blind, "env_vars": {"NNCIFT_TEST_BLIND_NODE": workers[1].node_id}}
ray.init(address=cluster.address, log_to_driver=False, runtime_env=env or None)


class Executor(RayExecutor):
    """Ray for every fan-out; the fit (Ray Train, not under test here) in this process."""

    def _fit(self, *a, **kw):
        return LocalExecutor()._fit(*a, **kw)


def runner():
    cfg = load_config(None, [*args["overrides"], f"ray.address={cluster.address}", "ray.executor=ray"])
    return Runner(cfg, run, executor=Executor(cfg.ray))


def actor_nodes():
    """worker class -> sorted node ids of every actor Ray Data started for it (GCS actor table, live or dead)."""
    out = {}
    for a in ray._private.state.actors().values():
        name = a.get("ActorClassName") or a.get("ClassName") or ""
        node = (a.get("Address") or {}).get("NodeID")
        if "(" in name and node:
            cls = name.rsplit("(", 1)[-1].rstrip(")")
            out.setdefault(cls, set()).add(node)
    return {k: sorted(v) for k, v in out.items()}


result = {"worker_nodes": [w.node_id for w in workers], "head": cluster.head_node.node_id, "killed": [], "errors": []}
t0 = time.time()
if mode == "spread":
    runner().run(args["until"])
    from nncift.stages.score import score

    score(runner(), args["new"], "new")
    result["actors"] = actor_nodes()
elif mode == "kill":
    # a node running a label actor dies after the first label block lands, one running an estimate actor after
    # the first estimate block lands; two spare nodes stand by (as an autoscaler's replacements would)
    spares = [cluster.add_node(**NODE) for _ in range(2)]  # add_node works only in the main thread
    cluster.wait_for_nodes()

    def busy_node(cls):
        """A node hosting a live actor of ``cls`` now (None while there is none)."""
        for a in ray._private.state.actors().values():
            if a.get("State") == "ALIVE" and f"({cls})" in (a.get("ActorClassName") or ""):
                return (a.get("Address") or {}).get("NodeID")
        return None

    def watch():
        nodes = {n.node_id: n for n in [*workers, *spares]}
        for folder, cls in ((run / "label" / "blocks", "LabelWorker"), (run / "estimate" / "blocks", "EstimateWorker")):
            while not list(folder.glob("*.parquet")) or busy_node(cls) not in nodes:
                if stop.is_set():
                    return
                time.sleep(0.005)
            victim = nodes.pop(busy_node(cls))
            cluster.remove_node(victim, allow_graceful=False)
            result["killed"].append({"node": victim.node_id, "stage": folder.parent.name,
                                     "blocks_before": len(list(folder.glob("*.parquet")))})

    stop = threading.Event()
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    for attempt in range(3):  # Ray retries the lost actors' blocks; if the run fails anyway, a rerun resumes
        try:
            runner().run(args["until"])
            break
        except Exception as exc:
            result["errors"].append(f"{type(exc).__name__}: {str(exc)[:300]}")
    stop.set()
    th.join(30)
    result["attempts"] = attempt + 1
    result["watcher_alive"] = th.is_alive()
elif mode == "blind":
    try:
        runner().run(args["until"])
    except Exception as exc:
        result["error"] = {"type": type(exc).__name__, "message": str(exc)}
    result["blind_node"] = workers[1].node_id
    result["blind_ip"] = workers[1].node_ip_address
result["seconds"] = round(time.time() - t0, 1)
ray.shutdown()
cluster.shutdown()
print("RESULT " + json.dumps(result), flush=True)
'''


def _helper(**args) -> dict:
    """Run :data:`HELPER` (its own Ray cluster) with ``args``; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", HELPER, json.dumps(args, default=str)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"helper failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def _overrides(corpus: Path, tiny_overrides: list[str], *extra: str) -> list[str]:
    return [f"data.input={corpus}", *tiny_overrides, *extra]


def _local(run: Path, overrides: list[str], until: str) -> Runner:
    runner = Runner(load_config(None, [*overrides, "ray.executor=local"]), run)
    runner.run(until)
    return runner


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.glob("*.parquet"))}


def _no_leftovers(run: Path) -> None:
    """No half-written block (``.<name>.*.tmp``) and no visibility marker of a fan-out is left in the run."""
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".nncift-visible-")]


# ------------------------------------------------------------------------------------------------------ tests
def test_fan_outs_spread_over_the_nodes_and_equal_the_local_artifacts(tmp_path, corpus, tiny_overrides):
    from nncift.stages.score import score
    from nncift.store import read_safetensors

    new = write_jsonl(tmp_path / "new.jsonl", [{**r, "id": f"n{i}"} for i, r in enumerate(make_rows(24, seed=5))])
    over = _overrides(corpus, tiny_overrides)
    ref = _local(tmp_path / "ref", over, "select")
    score(ref, new, "new")
    res = _helper(mode="spread", run=tmp_path / "run", overrides=[*over, *SPREAD], until="select", new=new)
    workers = sorted(res["worker_nodes"])
    for cls in ("Embedder", "LabelWorker", "EstimateWorker", "ExtendWorker"):  # ExtendWorker: the score fan-out
        assert res["actors"].get(cls) == workers, (cls, res["actors"])
    a, b = tmp_path / "ref", tmp_path / "run"
    for folder in ("label/blocks", "estimate/blocks", "score/new/blocks"):
        da, db = _digests(a / folder), _digests(b / folder)
        assert da and da == db, folder  # every block, byte for byte
    for name in ("label/labels.parquet", "select/selection.parquet"):
        assert _sha(a / name) == _sha(b / name), name
    # embeddings: the same encoder on other batches (allclose, as in tests/exec/test_ray_executor.py)
    for f in ("embed/embeddings.safetensors", "score/new/embeddings.safetensors"):
        ea, eb = read_safetensors(a / f), read_safetensors(b / f)
        assert ea.keys() == eb.keys()
        for k in ea:
            np.testing.assert_allclose(ea[k], eb[k], rtol=1e-5, atol=1e-6)
    _no_leftovers(b)


def test_a_worker_node_killed_mid_label_and_mid_estimate_leaves_the_same_artifacts(tmp_path, corpus, tiny_overrides):
    over = _overrides(corpus, tiny_overrides, "label.block_size=4", "estimate.block_size=10")
    _local(tmp_path / "ref", over, "estimate")
    res = _helper(mode="kill", run=tmp_path / "run", overrides=[*over, *SPREAD], until="estimate")
    assert [k["stage"] for k in res["killed"]] == ["label", "estimate"], json.dumps(
        {k: v for k, v in res.items() if k != "worker_nodes"}
    )
    a, b = tmp_path / "ref", tmp_path / "run"
    for folder in ("label/blocks", "estimate/blocks"):
        da, db = _digests(a / folder), _digests(b / folder)
        assert da and da == db, folder
        killed = next(k for k in res["killed"] if k["stage"] == folder.split("/")[0])
        assert killed["blocks_before"] < len(da), "the node died after the fan-out had finished"
    assert _sha(a / "label/labels.parquet") == _sha(b / "label/labels.parquet")
    assert (b / "estimate" / "_DONE.json").is_file()
    _no_leftovers(b)
    print(f"attempts {res['attempts']}, errors {res['errors']}, {res['seconds']} s")


def test_a_node_that_cannot_see_the_run_directory_gives_one_clear_error(tmp_path, corpus, tiny_overrides):
    res = _helper(mode="blind", run=tmp_path / "run", overrides=[*_overrides(corpus, tiny_overrides), *SPREAD],
                  until="label")  # fmt: skip
    err = res.get("error")
    assert err and err["type"] == "DataError", res
    msg = err["message"]
    assert "\n" not in msg
    assert msg.startswith(
        f"Ray node {res['blind_ip']} (node id {res['blind_node'][:12]}) cannot see the run directory: "
    )
    assert str(tmp_path / "run") in msg and "shared storage" in msg
