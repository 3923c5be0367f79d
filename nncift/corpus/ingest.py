"""Streaming reads for the data stage: read tasks, their workers, and the hash-partitioned exact dedup.

The driver never holds the corpus. It plans read tasks from file sizes and footers (:func:`expand_inputs`,
:func:`plan_reads`); the tasks run in workers through the executor's ``map_blocks``:

- a JSONL file is cut into line-aligned byte ranges of about ``data.read_block_bytes``, each with the number of
  its first line (:class:`LineCountWorker` counts the lines of every range but the last of a file);
- a Parquet file into runs of whole row groups of about that many (uncompressed) bytes;
- a JSON list, a ShareGPT file or a saved HF dataset directory is one task each (JSON must be decoded whole).

:class:`ReadWorker` turns one task into a canonical part ``data/parts/<task>.parquet``: ``id``, ``prompt``,
``response`` [+ ``embedding``], and staging columns ``file`` (the file's ordinal), ``line`` (line or record
number), ``where`` (the location for messages) and ``hash`` (CRC-32 of the id). Every check and message is
that of :func:`nncift.corpus.readers.canonicalize` (same code): errors name the file and the absolute line.
:class:`DedupWorker` resolves exact duplicates of one hash bucket of ids, per input, in global input order
(file ordinal, then position in the file), and checks ids shared by the pool and the target / test inputs.

Inputs may be local paths or URIs of ``pyarrow.fs`` filesystems (``s3://bucket/prefix/*.parquet``,
``file:///abs/path``): every read goes through :mod:`nncift.corpus.fsio`, and a worker re-resolves the filesystem
from the file's spec string (specs and file lists stay plain strings and ints). Saved HF dataset directories
must be local.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import zlib
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.config import DataConfig
from nncift.corpus import fsio
from nncift.corpus.readers import (
    FORMATS,
    Record,
    _detect_format,
    _refuse_binary,
    canonical_rows,
    embedded_sharegpt_path,
    embedding_dim,
    hf_not_local,
    parquet_records,
    parse_jsonl,
    resolve_duplicates,
    resolve_fields,
)
from nncift.errors import DataError, run_worker_batch
from nncift.store import write_parquet

log = logging.getLogger(__name__)

CORPORA = ("pool", "target", "test")
STAGING = ("file", "line", "where", "hash")  # part columns that never reach data/*.parquet
ROWS_PER_BUCKET = 4 * 2**20  # default dedup bucket size: ids of 4 Mi rows are a few hundred MiB at most
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SHARD_SUFFIXES = (".jsonl", ".ndjson", ".parquet", ".json")


@dataclass(frozen=True)
class InputFile:
    """One input file (or HF dataset directory), in global input order.

    Attributes:
        path: the file: a local path or a URI (:mod:`nncift.corpus.fsio`). fmt: its resolved format. corpus: "pool",
            "target" or "test".
        size / mtime_ns: its stat when planned (a resumed run reuses parts only of unchanged files; -1: the
            object store reports no modification time, so the size alone is compared).
    """

    path: str
    fmt: str
    corpus: str
    size: int
    mtime_ns: int


# ----------------------------------------------------------------------------------------- planning
def expand_inputs(cfg: DataConfig) -> list[InputFile]:
    """The files of ``data.input`` / ``data.target`` / ``data.test``, in global input order, checked cheaply.

    Each input is a file, a glob pattern (its matches, sorted), a directory of shards (its ``.jsonl``,
    ``.ndjson``, ``.parquet`` and ``.json`` files at any depth, sorted, hidden ones skipped) or a saved HF
    dataset directory (one with ``dataset_info.json`` / ``state.json`` / ``dataset_dict.json``, or with no
    shard); None (``data.input``) is the embedded ShareGPT file.

    An input may also be a URI of a ``pyarrow.fs`` filesystem (:func:`_expand_uri`): a file, a pattern
    (matched on the listing of its directory), or a directory / prefix of shards; not an HF dataset directory.

    Raises:
        DataError: a missing path, an empty file, an unknown suffix, a binary JSONL file; a URI whose
            filesystem cannot be built, or an HF dataset directory given as a URI.
    """
    out = []
    for corpus, spec in zip(CORPORA, (cfg.input, cfg.target, cfg.test), strict=True):
        if spec is None and corpus != "pool":
            continue
        if spec is not None and fsio.is_uri(spec):
            out += [InputFile(e.spec, fmt, corpus, e.size, e.mtime_ns) for e, fmt in _expand_uri(spec, cfg)]
            continue
        for path, fmt in _expand(spec, cfg):
            st = path.stat()
            out.append(InputFile(str(path), fmt, corpus, st.st_size, st.st_mtime_ns))
    return out


def _expand(spec: str | None, cfg: DataConfig) -> list[tuple[Path, str]]:
    if spec is None:
        paths = [embedded_sharegpt_path()]
    else:
        p = Path(spec)
        if not p.exists() and any(c in spec for c in "*?["):
            paths = sorted(Path(x) for x in glob.glob(spec, recursive=True) if Path(x).is_file())
            if not paths:
                raise DataError(f"{spec}: no such file or directory (the pattern matches no file)")
        elif not p.exists():
            raise DataError(f"{p}: no such file or directory")
        elif p.is_dir() and cfg.format != "hf" and not any((p / m).exists() for m in _HF_MARKERS):
            paths = sorted(
                x
                for x in p.rglob("*")
                if x.is_file()
                and x.suffix.lower() in _SHARD_SUFFIXES
                and not any(part.startswith(".") for part in x.relative_to(p).parts)
            ) or [p]  # no shard: read it as an HF dataset directory (whose reader says what is wrong)
        else:
            paths = [p]
    out = []
    for q in paths:
        fmt = cfg.format if cfg.format != "auto" else ("sharegpt" if spec is None else _detect_format(q))
        if q.is_file() and q.stat().st_size == 0:
            raise DataError(f"{q}: the file is empty")
        if fmt == "jsonl":
            _refuse_binary(q)
        out.append((q, fmt))
    return out


def _expand_uri(spec: str, cfg: DataConfig) -> list[tuple[fsio.Entry, str]]:
    """The files of the URI input ``spec`` (with their sizes and modification times) and their formats, as
    :func:`_expand` finds local ones.

    A pattern (``*``, ``?``, ``[``) is matched on the listing of its directory (:func:`nncift.corpus.fsio.glob`); a
    directory (object store: a prefix) holds the shards below it; a saved HF dataset directory is refused.

    Raises:
        DataError: nothing at ``spec``, no match, no shard under a prefix, an HF dataset directory, an empty
            or binary file, an unknown suffix; the filesystem cannot be built or refuses the request.
    """
    if cfg.format == "hf":
        raise hf_not_local(spec)
    fi = fsio.info(spec)
    kind = fi.type
    if kind == fsio.FileType.NotFound and fsio.has_glob(spec):
        entries = fsio.glob(spec)
        if not entries:
            raise DataError(f"{spec}: no such file or directory (the pattern matches no file)")
    elif kind == fsio.FileType.NotFound:
        raise DataError(f"{spec}: no such file or directory")
    elif kind == fsio.FileType.Directory:
        if any(fsio.info(fsio.join(spec, m)).type == fsio.FileType.File for m in _HF_MARKERS):
            raise hf_not_local(spec)
        entries = [
            e
            for e in fsio.list_files(spec)
            if fsio.suffix(e.spec) in _SHARD_SUFFIXES
            and not any(c.startswith(".") for c in fsio.relative(spec, e.spec))
        ]
        if not entries:
            raise DataError(
                f"{spec}: no .jsonl, .ndjson, .parquet or .json file under this prefix "
                "(HF dataset directories must be local; convert to Parquet)"
            )
    else:
        entries = [fsio.Entry(spec, *fsio.stat(spec))]
    out = []
    for e in entries:
        fmt = cfg.format if cfg.format != "auto" else _detect_format(e.spec)
        if e.size == 0:
            raise DataError(f"{e.spec}: the file is empty")
        if fmt == "jsonl":
            _refuse_binary(e.spec)
        out.append((e, fmt))
    return out


def line_cuts(path: fsio.Spec, size: int, block_bytes: int) -> list[int]:
    """Byte offsets ``[0, c1, ..., size]`` cutting ``path`` (a local path or a URI) into ranges of about
    ``block_bytes``, each starting at a line start (a range may be longer than ``block_bytes`` when a line
    is)."""
    cuts = [0]
    with fsio.open_input(path) as fh:
        pos = block_bytes
        while pos < size:
            fh.seek(pos - 1)  # the byte before: a "\n" there makes ``pos`` itself a line start
            nxt = size
            while True:
                buf = fh.read(1 << 16)
                if not buf:
                    break
                j = buf.find(b"\n")
                if j >= 0:
                    nxt = fh.tell() - len(buf) + j + 1
                    break
            if nxt >= size:
                break
            cuts.append(nxt)
            pos = nxt + block_bytes
    cuts.append(size)
    return cuts


def plan_reads(files: list[InputFile], block_bytes: int) -> list[dict[str, int]]:
    """The read tasks of ``files`` in global input order.

    Returns:
        One spec per task: ``block_id``, ``file`` (ordinal into ``files``), ``start`` / ``stop`` (JSONL: byte
        range; Parquet: row-group range; other formats: 0, 0) and ``line`` (JSONL: the number of the range's
        first line, -1 until :func:`number_lines` fills it; Parquet: the record number of its first row; else 1).

    Raises:
        DataError: an unreadable Parquet footer.
    """
    specs: list[dict[str, int]] = []

    def add(i: int, start: int, stop: int, line: int) -> None:
        specs.append({"block_id": len(specs), "file": i, "start": start, "stop": stop, "line": line})

    for i, f in enumerate(files):
        path = f.path
        if f.fmt == "jsonl":
            for a, b in pairwise(line_cuts(path, f.size, block_bytes)):
                add(i, a, b, 1 if a == 0 else -1)
        elif f.fmt == "parquet":
            with fsio.open_input(path) as fh:
                try:
                    meta = pq.read_metadata(fh)
                except Exception as exc:  # pyarrow raises several types for a damaged file
                    raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
            g0, row0, row, acc = 0, 0, 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                row += meta.row_group(g).num_rows
                if acc >= block_bytes or g == meta.num_row_groups - 1:
                    add(i, g0, g + 1, row0)
                    g0, row0, acc = g + 1, row, 0
            if meta.num_row_groups == 0:
                add(i, 0, 0, 0)
        else:
            add(i, 0, 0, 1)
    return specs


def line_count_specs(specs: list[dict[str, int]]) -> list[dict[str, int]]:
    """The JSONL ranges whose line counts number a later range (every range but the last of a cut file)."""
    cut = {s["file"] for s in specs if s["line"] == -1}
    last = {s["file"]: s["block_id"] for s in specs}
    return [s for s in specs if s["file"] in cut and s["block_id"] != last[s["file"]]]


def number_lines(specs: list[dict[str, int]], counts: dict[int, int]) -> list[dict[str, int]]:
    """``specs`` with the first line of every JSONL range filled from ``counts`` (block_id -> its lines)."""
    out, line, file = [], 1, -1
    for s in specs:
        if s["file"] != file:
            file, line = s["file"], 1
        if s["line"] == -1:
            s = {**s, "line": line}
        line += counts.get(s["block_id"], 0)
        out.append(s)
    return out


def part_name(spec: dict[str, int]) -> str:
    return f"{spec['block_id']:06d}.parquet"


# ----------------------------------------------------------------------------------------- workers
class LineCountWorker:
    """Callable class: JSONL byte ranges -> their number of lines (``"\\n"`` bytes).

    Args:
        files: paths or URIs by file ordinal (each worker re-resolves their filesystems).
    """

    def __init__(self, files: list[str]):
        self.files = files

    def count(self, spec: dict[str, int]) -> int:
        n, left = 0, spec["stop"] - spec["start"]
        with fsio.open_input(self.files[spec["file"]]) as fh:
            fh.seek(spec["start"])
            while left > 0:
                buf = fh.read(min(left, 8 << 20))
                if not buf:
                    break
                n += buf.count(b"\n")
                left -= len(buf)
        return n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_worker_batch(batch, self.count, "lines")


def _first_jsonl_record(path: str) -> Record | None:
    """The first record of a JSONL file (its first non-blank line), or None; reads only up to that line."""
    with fsio.open_input(path) as fh:
        lineno, pending = 1, []
        while chunk := fh.read(1 << 16):
            start = 0
            while (j := chunk.find(b"\n", start)) >= 0:
                recs = parse_jsonl(path, b"".join([*pending, chunk[start : j + 1]]), lineno)
                if recs:
                    return recs[0]
                pending, lineno, start = [], lineno + 1, j + 1
            pending.append(chunk[start:])
        recs = parse_jsonl(path, b"".join(pending), lineno)
    return recs[0] if recs else None


class ReadWorker:
    """Callable class: read tasks (:func:`plan_reads` specs) -> canonical parts ``<out_dir>/<block_id>.parquet``.

    A part holds the task's kept rows in input order: ``id``, ``prompt``, ``response`` (strings)
    [+ ``embedding`` (fixed-size list<float32>)] and the staging columns ``file`` (int32), ``line`` (int64),
    ``where`` (string) and ``hash`` (uint32 CRC-32 of the id's UTF-8), with facts in its metadata: ``records``
    (raw records read), ``rows`` (kept), ``skipped`` (ShareGPT conversations without a first turn), ``dim`` (the
    embedding dimension or None), ``given`` (whether the file gives ids) and ``first`` (where its first row is).

    The field mapping and the reference embedding dimension come from the first record of the task's file, so
    every range of a file is read as a whole-file reader would read it.

    Args:
        files: :class:`InputFile` fields by ordinal (paths or URIs: each worker re-resolves their filesystems).
        data_cfg: the ``data`` config fields. out_dir: the parts.
    """

    def __init__(self, files: list[dict[str, Any]], data_cfg: dict[str, Any], out_dir: str):
        self.files = [InputFile(**f) for f in files]
        self.cfg = DataConfig(**data_cfg)
        self.out_dir = Path(out_dir)

    def records(self, spec: dict[str, int]) -> tuple[list[Record], Record | None]:
        """(the task's raw records, the first record of its file or None when the task has none)."""
        f = self.files[spec["file"]]
        path = f.path
        if f.fmt == "jsonl":
            data = fsio.read_bytes(path, spec["start"], spec["stop"] - spec["start"])
            records = parse_jsonl(path, data, spec["line"])
            if not records:
                return records, None
            return records, records[0] if spec["start"] == 0 else _first_jsonl_record(path)
        if f.fmt == "parquet":
            with fsio.open_input(path) as fh:
                try:
                    pf = pq.ParquetFile(fh)
                    rows = pf.read_row_groups(range(spec["start"], spec["stop"])).to_pylist() if spec["stop"] else []
                    head = None
                    if rows and spec["start"] > 0:
                        head = parquet_records(path, next(pf.iter_batches(batch_size=1)).to_pylist())[0]
                except Exception as exc:  # pyarrow raises several types for a damaged file
                    raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
            records = parquet_records(path, rows, spec["line"])
            return records, (head or records[0]) if records else None
        records = FORMATS.get(f.fmt).read(path, self.cfg)  # json, sharegpt, hf: one whole file per task
        return records, records[0] if records else None

    def run_block(self, spec: dict[str, int]) -> int:
        f = self.files[spec["file"]]
        records, head = self.records(spec)
        facts: dict[str, Any] = {"records": len(records), "rows": 0, "skipped": 0, "dim": None, "given": False}
        if head is None:
            table = pa.table({"id": [], "prompt": [], "response": []}, schema=_BASE)
            kept: list[Record] = []
        else:
            fields = resolve_fields(head, self.cfg, f.fmt)
            # the first range measures against its own first kept row, as the whole-file reader does
            dim = embedding_dim(head, self.cfg) if records[0] is not head else None
            table, kept, skipped = canonical_rows(records, self.cfg, fields, dim)
            facts.update(rows=len(kept), skipped=skipped, given=fields.id is not None)
            if "embedding" in table.column_names:
                facts["dim"] = table.schema.field("embedding").type.list_size
            if kept:
                facts["first"] = kept[0].where
        ids = table.column("id").to_pylist()
        table = (
            table.append_column("file", pa.array(np.full(len(kept), spec["file"], np.int32)))
            .append_column("line", pa.array(np.fromiter((r.pos for r in kept), np.int64, len(kept))))
            .append_column("where", pa.array([r.where for r in kept], pa.string()))
            .append_column("hash", pa.array(id_hashes(ids)))
        )
        write_parquet(self.out_dir / part_name(spec), table, metadata=facts)
        return len(kept)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_worker_batch(batch, self.run_block, "rows")


_BASE = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string())])


def id_hashes(ids: list[str]) -> np.ndarray:
    """(R,) uint32 CRC-32 of each id's UTF-8 (stable across processes, unlike ``hash``)."""
    return np.fromiter((zlib.crc32(s.encode()) for s in ids), np.uint32, len(ids))


class DedupWorker:
    """Callable class: hash buckets -> ``<out_dir>/<bucket>-of-<buckets>.parquet``, the rows to drop.

    A bucket is every part row whose id hash is ``bucket`` modulo ``buckets``; equal ids share a bucket, so
    each bucket is resolved exactly and alone. Per input (pool, target, test), in global input order, by
    :func:`nncift.corpus.readers.resolve_duplicates`: later copies of a content-hash id are dropped; a repeated given id
    is a clash. The output holds ``part`` (int32) and ``row`` (int64) of each dropped row, and in its metadata
    ``dropped`` (input -> rows), ``clash`` (input -> the smallest clashing id with ``first`` / ``second``
    locations) and ``shared`` (target / test -> ``count`` of kept ids also kept in the pool, and the smallest).

    Args:
        parts: part paths in global order. corpus: each part's input. given: whether each part's file gives
            ids. rows: each part's row count. buckets: the number of buckets. out_dir: the outputs.
    """

    def __init__(
        self,
        parts: list[str],
        corpus: list[str],
        given: list[bool],
        rows: list[int],
        buckets: int,
        out_dir: str,
    ):
        self.parts, self.corpus, self.given, self.rows = parts, corpus, given, rows
        self.buckets, self.out_dir = buckets, Path(out_dir)

    def run_block(self, spec: dict[str, int]) -> int:
        b = spec["block_id"]
        ids, part, row = [], [], []
        for p, path in enumerate(self.parts):
            if not self.rows[p]:
                continue
            t = pq.read_table(path, columns=["id", "hash"])
            sel = np.flatnonzero(t.column("hash").to_numpy() % self.buckets == b)
            ids.append(t.column("id").take(pa.array(sel)).to_numpy(zero_copy_only=False))
            part.append(np.full(len(sel), p, np.int32))
            row.append(sel.astype(np.int64))
        ids_a = np.concatenate(ids).astype(object) if ids else np.zeros(0, object)
        part_a = np.concatenate(part) if part else np.zeros(0, np.int32)
        row_a = np.concatenate(row) if row else np.zeros(0, np.int64)
        corpus = np.asarray(self.corpus, dtype=object)[part_a] if len(part_a) else np.zeros(0, object)
        given = np.asarray(self.given, bool)[part_a] if len(part_a) else np.zeros(0, bool)
        drops, facts = [], {"dropped": {}, "clash": {}, "shared": {}}
        kept_ids = {}
        for c in CORPORA:
            sel = np.flatnonzero(corpus == c)
            drop, clash = resolve_duplicates(ids_a[sel], given[sel])
            if clash is not None:
                first, second = (sel[i] for i in clash)
                facts["clash"][c] = {"id": str(ids_a[first]), "first": self._where(part_a[first], row_a[first]),
                                     "second": self._where(part_a[second], row_a[second])}  # fmt: skip
            drops.append(sel[drop])
            facts["dropped"][c] = len(drop)
            kept_ids[c] = np.delete(ids_a[sel], drop).astype(str)
        for c in CORPORA[1:]:
            shared = np.intersect1d(kept_ids["pool"], kept_ids[c])
            facts["shared"][c] = {"count": len(shared), "min": str(shared[0]) if len(shared) else None}
        dropped = np.sort(np.concatenate(drops))
        out = pa.table({"part": part_a[dropped], "row": row_a[dropped]})
        write_parquet(self.out_dir / bucket_name(b, self.buckets), out, metadata=facts)
        return len(dropped)

    def _where(self, part: int, row: int) -> str:
        return pq.read_table(self.parts[part], columns=["where"]).column("where")[int(row)].as_py()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_worker_batch(batch, self.run_block, "dropped")


def bucket_name(bucket: int, buckets: int) -> str:
    return f"{bucket:05d}-of-{buckets:05d}.parquet"


def file_dicts(files: list[InputFile]) -> list[dict[str, Any]]:
    """``files`` as JSON-able dicts (worker arguments and the resume plan)."""
    return [dataclasses.asdict(f) for f in files]
