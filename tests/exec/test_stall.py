"""No silent stall: the watchdog (fake clock, no Ray), the wait description, and one Ray fan-out that waits for
CPUs another tenant holds, says so, and finishes when they are freed."""

import logging
import threading
import time

import numpy as np
import pytest

from nncift.exec.stall import StallWatch, actors_that_fit, describe_wait, watching


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _watch(clock, counter, probe=lambda: "waiting for X", stall=10.0):
    return StallWatch("LabelWorker", stall, lambda: counter[0], probe, clock=clock)


def test_warns_after_stall_seconds_without_progress_and_at_most_once_per_period(caplog):
    clock, counter = Clock(), [0]
    w = _watch(clock, counter)
    with caplog.at_level(logging.WARNING, logger="nncift.exec.stall"):
        clock.t = 9.9
        assert w.check() is None
        clock.t = 10.0
        assert w.check() == "LabelWorker: no progress for 10 s; waiting for X"
        for t in (11, 15, 19.9):  # not again within stall_seconds
            clock.t = t
            assert w.check() is None
        clock.t = 20.0
        assert w.check() == "LabelWorker: no progress for 20 s; waiting for X"
    assert [r.getMessage() for r in caplog.records] == [
        "LabelWorker: no progress for 10 s; waiting for X",
        "LabelWorker: no progress for 20 s; waiting for X",
    ]
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_progress_resets_the_timer():
    clock, counter = Clock(), [0]
    w = _watch(clock, counter)
    clock.t = 10
    assert w.check() is not None
    counter[0] = 1  # a block finished
    clock.t = 12
    assert w.check() is None
    clock.t = 21.9
    assert w.check() is None
    clock.t = 22
    assert w.check() == "LabelWorker: no progress for 10 s; waiting for X"


def test_a_failing_probe_still_gives_the_line():
    def probe():
        raise ConnectionError("GCS down")

    clock, counter = Clock(), [0]
    w = _watch(clock, counter, probe)
    clock.t = 10
    assert (
        w.check() == "LabelWorker: no progress for 10 s; (could not tell what it waits for: ConnectionError: GCS down)"
    )


def test_stall_seconds_must_be_positive():
    with pytest.raises(ValueError, match="stall_seconds"):
        StallWatch("x", 0, lambda: 0, lambda: "")


def test_watching_checks_on_a_thread_until_the_block_ends():
    counter, lines = [0], []
    w = StallWatch("Embedder", 0.05, lambda: counter[0], lambda: "waiting", logger=logging.getLogger("t.stall"))
    w._log = type("L", (), {"warning": lambda self, m: lines.append(m)})()
    with watching(w, interval=0.01):
        time.sleep(0.3)
    n = len(lines)
    assert n >= 2 and all(m.startswith("Embedder: no progress for ") for m in lines)
    time.sleep(0.05)
    assert len(lines) == n  # stopped with the block
    assert not [t for t in threading.enumerate() if t.name.startswith("stall-watch-")]


def test_actors_that_fit_counts_per_node():
    nodes = [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 0.5, "GPU": 2.0}, {"CPU": 8.0}]
    assert actors_that_fit(nodes, 1.0, 0.0) == 3 + 0 + 8
    assert actors_that_fit(nodes, 1.0, 1.0) == 1  # one GPU on the first node; the second has no CPU
    assert actors_that_fit(nodes, 0.5, 0.5) == 2 + 1
    assert actors_that_fit([{"CPU": 0.30000000000000004 * 10}], 0.3, 0) == 10  # float dust


def test_describe_wait_names_the_ask_the_free_resources_the_pending_actors_and_the_nodes():
    nodes = {"10.0.0.1": ({"CPU": 0.5, "GPU": 0.0}, {"CPU": 4.0, "GPU": 1.0})}
    line = describe_wait("LabelWorker", 4, 1.0, 1.0, nodes, pending=3)
    assert line == (
        "waiting for LabelWorker actors (up to 4, each asks 1 CPU, 1 GPU); free of the cluster: CPU 0.5/4 GPU 0/1; "
        "3 actors pending creation; no node has room for one (busy with other work?): 10.0.0.1 CPU 0.5/4 GPU 0/1"
    )
    nodes["10.0.0.2"] = ({"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0})
    line = describe_wait("LabelWorker", 4, 1.0, 1.0, nodes, pending=None)
    assert "pending" not in line
    assert line.endswith("1 of 2 nodes has room for one: 10.0.0.1 CPU 0.5/4 GPU 0/1, 10.0.0.2 CPU 4/4 GPU 1/1")


class _Echo:
    """A block worker that returns its block id."""

    def __call__(self, batch: dict) -> dict:
        return {"block_id": np.asarray(batch["block_id"])}


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_pool_that_waits_for_cpus_says_so_and_finishes_when_they_are_freed(ray_session, caplog):
    """Another tenant holds all but 0.5 of the 4 CPUs; a pool of 1-CPU actors waits, the watchdog says what for
    (once per stall_seconds), and the fan-out completes once the tenant leaves."""
    from nncift.exec.ray_executor import map_ray

    ray = ray_session

    @ray.remote(num_cpus=0)
    class Tenant:
        def ready(self) -> bool:
            return True

    free = ray.available_resources().get("CPU", 0.0)
    tenant = Tenant.options(num_cpus=free - 0.5).remote()
    ray.get(tenant.ready.remote())
    threading.Timer(5.0, ray.kill, args=(tenant,)).start()
    specs = [{"block_id": i} for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="nncift.exec.stall"):
        out = map_ray(_Echo, {}, specs, concurrency=2, num_cpus=1.0, stall_seconds=1.5)
    assert sorted(int(r["block_id"]) for r in out) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records if r.name == "nncift.exec.stall"]
    assert lines, "no stall warning"
    assert lines[0].startswith("_Echo: no progress for ")
    assert "each asks 1 CPU" in lines[0] and "CPU 0.5/4" in lines[0] and "no node has room for one" in lines[0]
