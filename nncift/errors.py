"""Exceptions raised at the boundary. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class NnciftError(Exception):
    """Base class of the errors a user can fix (bad input, bad config, refused resume)."""


class ConfigError(NnciftError, ValueError):
    """A configuration field is unknown, mistyped or out of range."""


class DataError(NnciftError, ValueError):
    """An input file is missing, empty or malformed; the message names the file and line or field."""


class ProvenanceError(NnciftError):
    """A finished stage was produced with a different configuration (rerun with --overwrite)."""


class RunDirBusyError(NnciftError):
    """Another process holds the run directory."""


class MissingDependencyError(NnciftError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""


class TeacherError(NnciftError):
    """The influence function returned unusable values (NaN / inf); the message names the block and pair."""


def encode_worker_error(exc: NnciftError) -> str:
    """``"ClassName\tmessage"``: a user-fixable error a worker returns instead of raising, so that it reaches
    the driver as one clear line whatever executor ran the worker (Ray wraps raised exceptions)."""
    return f"{type(exc).__name__}\t{exc}"


def raise_worker_errors(results: list[dict]) -> None:
    """Re-raise, in the driver, the first user-fixable error a worker returned in its ``error`` field."""
    for r in results:
        err = str(r.get("error") or "")
        if err:
            name, _, msg = err.partition("\t")
            cls = {c.__name__: c for c in (ConfigError, DataError, TeacherError, NnciftError)}.get(name, NnciftError)
            raise cls(msg)


def run_worker_batch(batch: dict, run_block, count: str) -> dict:
    """The body of a block worker's ``__call__``: ``run_block(spec)`` on each block of a Ray-Data-style batch
    (a dict of equal-length arrays, one row per block spec), collecting its returned count under ``count``.
    A user-fixable error (:class:`NnciftError`) is returned in ``error`` instead of raised, so the driver
    reports it as one line whatever executor ran the worker (:func:`raise_worker_errors`)."""
    import numpy as np

    n, errors = [], []
    for i in range(len(batch["block_id"])):
        try:
            n.append(run_block({k: int(v[i]) for k, v in batch.items()}))
            errors.append("")
        except NnciftError as exc:
            n.append(0)
            errors.append(encode_worker_error(exc))
    return {"block_id": np.asarray(batch["block_id"]), count: np.asarray(n, dtype=np.int64),
            "error": np.asarray(errors, dtype=object)}  # fmt: skip
