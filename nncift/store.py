"""The run directory: atomic artifacts, completion markers and provenance checks.

Layout::

    <run>/config.yaml                 the last configuration used (informational)
    <run>/<stage>/_STARTED.json       fingerprint of the config the stage is being computed with
    <run>/<stage>/_DONE.json          fingerprint, provenance and seconds of a finished stage
    <run>/<stage>/...                 the stage's artifacts (Parquet / JSON / safetensors)
    <run>/<stage>/blocks/*.parquet    per-block outputs of block-parallel stages (each file = one done block)

Every file is written to a temporary name in the same folder and renamed into place, so a reader (or a
run killed with ``kill -9``) never sees a half-written artifact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.errors import ProvenanceError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_HELD: dict[str, list] = {}  # run directory -> [lock file object, depth]: the lock is re-entrant per process


@contextlib.contextmanager
def run_lock(root: str | Path) -> Iterator[None]:
    """Hold the run directory ``root`` exclusively (an advisory ``flock`` on ``<root>/.lock``).

    A second process on the same run directory gets a :class:`~nncift.errors.RunDirBusyError` at once instead
    of writing the same artifacts concurrently. The lock dies with its process (``kill -9`` included), so a
    crashed run never leaves a stale lock. Re-entrant within one process. (``flock`` is local to a machine:
    on shared storage, start one driver per run directory.)
    """
    import fcntl

    from nncift.errors import RunDirBusyError

    key = str(Path(root).resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    fh = open(Path(root) / ".lock", "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunDirBusyError(
            f"run directory {root} is in use by {holder}; wait for it to finish or use another --run-dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"nncift pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    fh.flush()
    _HELD[key] = [fh, 1]
    try:
        yield
    finally:
        _HELD.pop(key, None)
        fh.close()  # releases the flock


def valid_parquet(path: str | Path, rows: int | None = None) -> bool:
    """Whether ``path`` is a complete Parquet file (footer readable) with ``rows`` rows when given."""
    try:
        meta = pq.read_metadata(path)
    except Exception:  # truncated, empty or not Parquet: pyarrow raises several types
        return False
    return rows is None or meta.num_rows == rows


def done_blocks(block_dir: Path, expected: dict[str, int | None]) -> set[str]:
    """File names of ``expected`` (name -> rows or None) already complete in ``block_dir``.

    A block file that exists but is not a complete Parquet file of the expected size (a truncated copy, a
    disk-full write, a file from another layout) is removed and reported, so that it is recomputed, never read.
    """
    done = set()
    for name, rows in expected.items():
        path = block_dir / name
        if not path.is_file():
            continue
        if valid_parquet(path, rows):
            done.add(name)
        else:
            log.warning("%s is incomplete or corrupt: recomputing it", path)
            path.unlink()
    return done


def todo_blocks(block_dir: Path, specs: list, key: Any) -> list:
    """The specs whose block is not complete in ``block_dir`` (the resumable fan-out: finished blocks are
    skipped, damaged ones removed and redone; see :func:`done_blocks`), in spec order.

    Args:
        specs: block specs of any type. key: ``spec -> (file name, expected rows or None)``.
    """
    keys = [key(s) for s in specs]
    ok = done_blocks(block_dir, dict(keys))
    return [s for s, (name, _) in zip(specs, keys, strict=True) if name not in ok]


def clean_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None (nested dicts, lists and tuples), so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(
    path: str | Path,
    table: pa.Table,
    metadata: dict[str, Any] | None = None,
    row_group_size: int | None = None,
    use_dictionary: bool = True,
) -> None:
    """Write ``table`` atomically, with ``metadata`` (JSON values) in its schema. ``use_dictionary=False`` skips
    dictionary encoding: for columns of mostly distinct numbers (estimated kernels) it only costs time."""
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): json.dumps(v, default=_json_default).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, use_dictionary=use_dictionary)


def read_parquet_metadata(path: str | Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    out = {}
    for k, v in meta.items():
        key = k.decode()
        if key.startswith("ARROW") or key == "pandas":
            continue
        try:
            out[key] = json.loads(v.decode())
        except (ValueError, UnicodeDecodeError):
            continue
    return out


def write_jsonl(path: str | Path, table: pa.Table, chunk: int = 8192) -> None:
    """Write a table's rows as JSON lines, atomically, ``chunk`` rows at a time (no whole-table Python list)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for batch in table.to_batches(max_chunksize=chunk):
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in batch.to_pylist())


_ST_DTYPES = {
    np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}  # fmt: skip


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write arrays as a safetensors file, atomically, streaming each array's bytes (no second in-memory copy
    of a large array). Readable by ``safetensors`` and memory-mappable with :func:`memmap_safetensors`."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {a.dtype} is not supported in safetensors files here")
        header[name] = {
            "dtype": _ST_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name in sorted(arrays):
            fh.write(memoryview(arrays[name].reshape(-1)).cast("B"))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def memmap_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file as read-only memory maps (pages are read on use and shared between
    the processes that map the same file)."""
    inverse = {v: k for k, v in _ST_DTYPES.items()}
    path = Path(path)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(h["shape"])
        begin = h["data_offsets"][0]
        if int(np.prod(shape)) == 0:
            out[name] = np.zeros(shape, inverse[h["dtype"]])
            continue
        out[name] = np.memmap(path, dtype=inverse[h["dtype"]], mode="r", offset=8 + n + begin, shape=shape)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested provenance dicts ("key: old -> new")."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = key if not prefix else (f"{prefix}.{key}" if prefix != "root" else key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, name)
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


class RunDir:
    """A run directory with per-stage completion markers and enforced provenance.

    Args:
        root: the directory (created on first write).
        order: the pipeline's stage names in order: overwriting one stage clears it and every later one.
    """

    def __init__(self, root: str | Path, order: tuple[str, ...] = ()):
        self.root = Path(root)
        self.order = tuple(order)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def path(self, stage: str, name: str) -> Path:
        return self.root / stage / name

    def done_info(self, stage: str) -> dict[str, Any] | None:
        p = self.stage_dir(stage) / "_DONE.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            from nncift.errors import DataError

            raise DataError(
                f"{p}: corrupt completion marker (markers are written atomically, so the file was damaged "
                f"outside nncift); delete the folder {p.parent} to recompute that stage"
            ) from None

    def is_done(self, stage: str) -> bool:
        return self.done_info(stage) is not None

    def begin(self, stage: str, fingerprint: str, provenance: dict[str, Any], overwrite: bool = False) -> bool:
        """Prepare ``stage`` for computation.

        Returns:
            True if the stage must be computed, False if it is already done with the same fingerprint.

        Raises:
            ProvenanceError: the stage is finished with a different configuration and ``overwrite`` is False.
        """
        done = self.done_info(stage)
        if done is not None:
            if done.get("fingerprint") == fingerprint:
                return False
            if not overwrite:
                changes = "; ".join(_diff(done.get("provenance") or {}, provenance)) or "fingerprint differs"
                raise ProvenanceError(
                    f"stage '{stage}' in {self.root} was finished with a different configuration ({changes}). "
                    "Use another --run-dir, or rerun with --overwrite to recompute it and every later stage."
                )
            log.warning("overwriting stage '%s' and every later stage in %s", stage, self.root)
            self.clear_from(stage)
        started = self.stage_dir(stage) / "_STARTED.json"
        if started.is_file() and json.loads(started.read_text()).get("fingerprint") != fingerprint:
            log.warning("stage '%s' was started with another configuration; discarding its partial blocks", stage)
            shutil.rmtree(self.stage_dir(stage))
        for stray in self.stage_dir(stage).rglob(".*.tmp"):  # left by a process killed mid-write
            stray.unlink(missing_ok=True)
        write_json(started, {"fingerprint": fingerprint, "provenance": provenance, "started": time.time()})
        return True

    def finish(self, stage: str, fingerprint: str, provenance: dict[str, Any], **info: Any) -> None:
        """Write the completion marker of ``stage`` (the last write of the stage)."""
        write_json(
            self.stage_dir(stage) / "_DONE.json",
            {"fingerprint": fingerprint, "provenance": provenance, "finished": time.time(), **info},
        )

    def clear_from(self, stage: str) -> None:
        """Remove ``stage`` and every later pipeline stage (only ``stage`` itself if it is not a pipeline stage)."""
        for s in self.order[self.order.index(stage) :] if stage in self.order else [stage]:
            d = self.stage_dir(s)
            if d.exists():
                shutil.rmtree(d)

    def has_finished_stage(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("*/_DONE.json"))
