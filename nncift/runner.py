"""The one runner of every stage: fingerprints, skip/resume, completion markers, timing, the run-dir lock.

For each stage (:data:`nncift.stages.STAGES`) the runner computes the fingerprint of the config sections the
stage depends on (its own plus those of every stage it comes after, recursively), skips it when a
completion marker with that fingerprint exists, refuses a changed configuration of a finished stage unless
``overwrite`` (naming the changed fields), times it, and writes its marker as the stage's last write.

    runner = Runner(cfg, "runs/demo")
    runner.run("report")                       # data -> embed -> label -> fit -> estimate -> select -> report
    runner.run_stage("finetune", subset="nncift")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nncift.config import RunConfig
from nncift.console import CONSOLE
from nncift.errors import DataError, NnciftError, RunDirBusyError
from nncift.exec import make_executor
from nncift.stages import PIPELINE, STAGES
from nncift.stages.base import Context, Stage
from nncift.store import RunDir, run_lock, write_text

log = logging.getLogger(__name__)


GC_ABOVE_MIB = 1536.0


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: ``/proc/self/clear_refs``; elsewhere a no-op, and
    :func:`peak_rss_mib` is then the process's peak so far). Freed heap memory is first handed back to the
    system (glibc ``malloc_trim``), so a stage does not inherit the last one's high-water mark. The full garbage
    collection that frees cyclic garbage first (about 0.15 s with torch loaded) runs only when the process holds
    more than ``GC_ABOVE_MIB``: below that its memory is noise beside the peaks being measured."""
    import ctypes
    import gc

    if rss_now_mib() > GC_ABOVE_MIB:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _status_mib(key: str) -> float | None:
    """A memory line of ``/proc/self/status`` (e.g. ``VmRSS``) in MiB, or None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def rss_now_mib() -> float:
    """Resident memory of this process now, in MiB (Linux ``VmRSS``; NaN elsewhere)."""
    now = _status_mib("VmRSS")
    return float("nan") if now is None else now


def peak_rss_mib() -> float:
    """Peak resident memory of this (driver) process since :func:`reset_peak_rss`, in MiB (Linux ``VmHWM``;
    elsewhere the lifetime peak). Ray workers are separate processes."""
    import resource
    import sys

    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Runs the stages of one run directory.

    Args:
        cfg: validated configuration.
        run_dir: the run directory.
        overwrite: recompute finished stages whose configuration changed (and every later pipeline stage).
        executor: the executor (default: from ``ray.executor``, chosen once here).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, overwrite: bool = False, executor: Any = None):
        self.cfg = cfg
        self.store = RunDir(run_dir, order=tuple(s.name for s in PIPELINE))
        self.overwrite = overwrite
        self.executor = executor or make_executor(cfg.ray)
        self.ctx = Context(cfg, self.store, self.executor, self)
        self._depth = 0
        self.skipped: set[str] = set()  # stage folders found finished in this runner's life
        self._visited: set[str] = set()  # stage folders run or found finished in the current session

    # ------------------------------------------------------------------ provenance
    def sections(self, stage: str) -> tuple[str, ...]:
        """The config sections ``stage``'s results depend on: its own and every upstream stage's, in order."""
        out: list[str] = []

        def visit(name: str) -> None:
            st = STAGES[name]
            for up in st.after:
                visit(up)
            for s in st.config_sections(self.cfg):
                if s not in out:
                    out.append(s)

        visit(stage)
        return tuple(out)

    def identity(self, stage: str, **params: Any) -> tuple[str, dict]:
        """(fingerprint, provenance) of ``stage`` for ``params``."""
        prov = self.cfg.provenance(*self.sections(stage))
        extra = STAGES[stage].identity(self.ctx, **params)
        if extra:
            prov["stage"] = extra
        return _hash(prov), prov  # equals cfg.fingerprint(*sections) when there is no extra identity

    # ------------------------------------------------------------------ running
    def run(self, until: str = "report") -> dict[str, Any]:
        """Run every pipeline stage up to ``until`` (inclusive); returns {stage: seconds or 'skipped'}."""
        names = [s.name for s in PIPELINE]
        if until not in names:
            raise ValueError(f"unknown stage {until!r} (stages: {', '.join(names)})")
        done: dict[str, Any] = {}
        with self.session():
            for name in names[: names.index(until) + 1]:
                res = self.run_stage(name)
                done[name] = "skipped" if name in self.skipped else res["seconds"]
        return done

    @contextlib.contextmanager
    def session(self) -> Iterator[Runner]:
        """The run-directory lock, and cleanup of a new run directory when a user error stops the run."""
        root = self.store.root
        if root.exists() and not root.is_dir():
            raise DataError(f"--run-dir {root}: exists and is not a directory")
        fresh = not root.exists()
        with run_lock(root):
            self._depth += 1
            try:
                yield self
            except RunDirBusyError:
                raise
            except NnciftError:
                if fresh and root.exists() and not self.store.has_finished_stage():
                    shutil.rmtree(root)  # bad input: leave nothing half-written behind
                raise
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._visited.clear()  # another process may change the run directory between sessions

    def finished_result(self, stage: str, **params: Any) -> Any:
        """Run ``stage`` for ``params`` unless finished, then return what its finished run holds
        (:meth:`Stage.skipped_result`: the same whether it ran now or earlier)."""
        self.run_stage(stage, **params)
        return STAGES[stage].skipped_result(self.ctx, **params)

    def run_stage(self, stage: str, **params: Any) -> Any:
        """Run ``stage`` for ``params`` (its upstream stages first), or skip it when finished.

        Returns:
            the stage's result (its completion facts, with ``seconds``), or what a finished stage returns.
        """
        if self._depth == 0:
            with self.session():
                return self.run_stage(stage, **params)
        st: Stage = STAGES[stage]
        for up in st.after:
            if up not in self._visited:  # once per session: upstream stages are not re-checked per stage
                self.run_stage(up)
        folder = st.folder(**params)
        label = folder.replace("/", " ")
        fp, prov = self.identity(stage, **params)
        done = None if st.always_run else self.store.done_info(folder)
        if done is not None and done.get("fingerprint") == fp:
            log.info("stage %-8s already done, skipping", label, extra=CONSOLE)
            self.skipped.add(folder)
            self._visited.add(folder)
            if stage == "data":
                write_text(self.store.root / "config.yaml", self.cfg.to_yaml())
            return st.skipped_result(self.ctx, **params)
        if done is not None and not self.overwrite:
            self.store.begin(folder, fp, prov)  # raises ProvenanceError naming the changed fields
        reset_peak_rss()  # each stage's marker holds its own peak (validation included)
        t0 = time.perf_counter()
        st.validate(self.ctx, **params)  # inputs checked before anything of the stage is written
        self.store.begin(folder, fp, prov, overwrite=self.overwrite or st.always_run)
        self.skipped.discard(folder)
        log.info("stage %-8s running", label, extra=CONSOLE)
        info = st.run(self.ctx, **params) or {}
        seconds = time.perf_counter() - t0
        info.setdefault("peak_rss_mib", peak_rss_mib())
        self.store.finish(folder, fp, prov, seconds=seconds, **info)
        if stage == "data":
            write_text(self.store.root / "config.yaml", self.cfg.to_yaml())
        self._visited.add(folder)
        log.info("stage %-8s done in %.1f s (driver peak RSS %.0f MiB, now %.0f MiB)", label, seconds,
                 info["peak_rss_mib"], rss_now_mib(), extra=CONSOLE)  # fmt: skip
        return {**info, "seconds": seconds}

    # ------------------------------------------------------------------ conveniences
    def export_table(self, out: str | Path) -> dict:
        """Write the finished label stage as a table-teacher file (see :func:`nncift.labels.tables.export_table`)."""
        from nncift.labels.tables import export_table

        return export_table(self.ctx, out)
