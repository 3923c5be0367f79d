"""No silent stall: a watchdog that says, in one line, what a fan-out is waiting for.

:class:`StallWatch` is pure (a clock, a progress counter and a probe are given to it), so it is tested without
Ray; :func:`watching` runs its :meth:`~StallWatch.check` on a daemon thread while the driver blocks on a Ray
Data iterator or write. The Ray probe that describes the wait lives in :mod:`nncift.exec.ray_executor`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


class StallWatch:
    """Warn once per ``stall_seconds`` while ``progress()`` has not changed for ``stall_seconds``.

    Args:
        what: the fan-out, as named in the warning (e.g. ``"LabelWorker"``).
        stall_seconds: time without progress before the first warning, and the least time between two.
        progress: a counter that changes when the fan-out makes progress (blocks done, parts written).
        probe: one line on what the fan-out waits for (resources asked vs free, pending actors, nodes); an
            exception it raises is reported in the line instead.
        clock: monotonic seconds (:func:`time.monotonic`; a fake in the tests).
    """

    def __init__(
        self,
        what: str,
        stall_seconds: float,
        progress: Callable[[], int],
        probe: Callable[[], str],
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ):
        if stall_seconds <= 0:
            raise ValueError(f"stall_seconds must be positive, got {stall_seconds}")
        self.what, self.stall_seconds = what, stall_seconds
        self._progress, self._probe, self._clock, self._log = progress, probe, clock, logger
        self._value = progress()
        self._since = clock()  # last progress (or the start)
        self._warned: float | None = None  # last warning since the last progress

    def check(self) -> str | None:
        """Poll the counter; log and return the warning line when one is due, else ``None``."""
        now, value = self._clock(), self._progress()
        if value != self._value:
            self._value, self._since, self._warned = value, now, None
            return None
        idle = now - self._since
        if idle < self.stall_seconds or (self._warned is not None and now - self._warned < self.stall_seconds):
            return None
        self._warned = now
        try:
            detail = self._probe()
        except Exception as e:  # the warning must still be said
            detail = f"(could not tell what it waits for: {type(e).__name__}: {e})"
        line = f"{self.what}: no progress for {idle:.0f} s; {detail}"
        self._log.warning(line)
        return line


def actors_that_fit(free_per_node: list[dict[str, float]], num_cpus: float, num_gpus: float) -> int:
    """How many more actors asking ``num_cpus`` CPUs and ``num_gpus`` GPUs each fit into the free resources
    of the nodes (one dict of free resources per node)."""
    asks = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
    if not asks:
        return sys.maxsize
    return sum(int(min(free.get(k, 0.0) / v + 1e-9 for k, v in asks.items())) for free in free_per_node)


def describe_wait(
    what: str,
    max_actors: int,
    num_cpus: float,
    num_gpus: float,
    nodes: dict[str, tuple[dict[str, float], dict[str, float]]],
    pending: int | None,
) -> str:
    """One line on what an actor pool waits for.

    Args:
        nodes: node address -> (free, total) resources.
        pending: actors of the pool pending creation (``None``: unknown).
    """
    ask = ", ".join(f"{v:g} {k}" for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0) or "no CPU"
    head = f"waiting for {what} actors (up to {max_actors}, each asks {ask})"
    keys = [k for k in ("CPU", "GPU") if any(total.get(k) for _, total in nodes.values())]

    def res(free: dict[str, float], total: dict[str, float]) -> str:
        return " ".join(f"{k} {free.get(k, 0.0):g}/{total.get(k, 0.0):g}" for k in keys)

    free_all = {k: sum(f.get(k, 0.0) for f, _ in nodes.values()) for k in keys}
    total_all = {k: sum(t.get(k, 0.0) for _, t in nodes.values()) for k in keys}
    parts = [head, f"free of the cluster: {res(free_all, total_all) or 'nothing'}"]
    if pending is not None:
        parts.append(f"{pending} actor{'s' * (pending != 1)} pending creation")
    room = {addr: actors_that_fit([free], num_cpus, num_gpus) for addr, (free, _) in nodes.items()}
    fits = [a for a, r in room.items() if r > 0]
    shown = sorted(nodes)[:4]
    where = ", ".join(f"{a} {res(*nodes[a])}" for a in shown) + (f" (+{len(nodes) - 4} more)" if len(nodes) > 4 else "")
    if not nodes:
        parts.append("no live node")
    elif fits:
        parts.append(f"{len(fits)} of {len(nodes)} node{'s' * (len(nodes) != 1)} has room for one: {where}")
    else:
        parts.append(f"no node has room for one (busy with other work?): {where}")
    return "; ".join(parts)


@contextlib.contextmanager
def watching(watch: StallWatch | None, interval: float | None = None) -> Iterator[StallWatch | None]:
    """Run ``watch.check()`` every ``interval`` seconds (default: a quarter of ``stall_seconds``, at most 5 s)
    on a daemon thread for the duration of the block; ``None`` watches nothing."""
    if watch is None:
        yield None
        return
    every = interval if interval is not None else min(5.0, watch.stall_seconds / 4)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                watch.check()
            except Exception:  # a watchdog never takes the run down
                log.debug("stall watch of %s failed", watch.what, exc_info=True)

    thread = threading.Thread(target=loop, name=f"stall-watch-{watch.what}", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(timeout=every + 1)
