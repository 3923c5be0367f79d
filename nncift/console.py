"""What a person sees: a short console, and everything else in the run's log file.

By default the console shows one line per stage start and end, one progress line per fan-out (done / total,
rate, ETA), the command's result lines and every warning. Every INFO record of every logger also goes to
``<run_dir>/logs/run.log``. ``-v`` brings the INFO records, Ray Data's progress dumps and the Ray workers' log
lines back to the console; ``-q`` keeps warnings only.

A record reaches the default console when it is a warning or worse, or when it is logged with
``extra=CONSOLE`` (the stage lines of :class:`~nncift.runner.Runner`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

CONSOLE = {"console": True}  # ``log.info(..., extra=CONSOLE)``: shown on the default console
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_state = {"verbosity": 0}  # -1 quiet, 0 default, 1 verbose


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbosity"] > 0:
            return True
        if _state["verbosity"] < 0:
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.WARNING or getattr(record, "console", False)


def setup(verbosity: int = 0) -> None:
    """Configure the root logger for a command: INFO records are kept (for the run log), the console handler
    shows what ``verbosity`` asks for (-1 quiet, 0 default, 1 verbose). Safe to call several times."""
    _state["verbosity"] = verbosity
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_nncift", None) == "console":
            root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    h.addFilter(_ConsoleFilter())
    h._nncift = "console"  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(logging.INFO)
    for noisy in ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "datasets", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbosity > 0 else logging.WARNING)


def verbose() -> bool:
    """Whether ``-v`` was given: Ray Data progress dumps and the workers' log lines on the console."""
    return _state["verbosity"] > 0


class RunLog(logging.Handler):
    """``<run_dir>/logs/run.log``: every INFO record, appended. Records are held in memory until the run's
    first stage has finished (``data/_DONE.json``), so a run that fails before that leaves no run directory
    (nothing half-written); held records of such a run are dropped at :meth:`close`."""

    def __init__(self, run_dir: str | Path):
        super().__init__(logging.INFO)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "logs" / "run.log"
        self._held: list[str] = []
        self._fh = None
        self.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self._fh is None:
                self._held.append(line)
                if not (self.run_dir / "data" / "_DONE.json").is_file():
                    return
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("a", encoding="utf-8")
                line, self._held = "".join(self._held), []
            self._fh.write(line)
            self._fh.flush()
        except Exception:  # a log line must never break the run
            self.handleError(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._held = []
        super().close()


def attach_run_log(run_dir: str | Path) -> RunLog:
    """Add a :class:`RunLog` of ``run_dir`` to the root logger; remove it with :func:`detach`."""
    h = RunLog(run_dir)
    logging.getLogger().addHandler(h)
    return h


def detach(handler: logging.Handler) -> None:
    """Remove and close a handler added by :func:`attach_run_log`."""
    logging.getLogger().removeHandler(handler)
    handler.close()
