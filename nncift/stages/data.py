"""Stage ``data``: read, validate, deduplicate and split the inputs into D_F, D_T and the test split, streaming.

Reads: ``data.input`` (and ``data.target`` / ``data.test`` when set): each a file, a directory of shards or a
glob, any supported format (see :mod:`nncift.corpus.ingest`).
Writes: ``data/pool.parquet`` (M rows), ``data/target.parquet`` (N rows), ``data/test.parquet``; each with
``id``, ``prompt``, ``response`` [+ ``embedding``] and ``idx`` (the row's index in K_FF / K_FT), in row groups of
1024 rows.

The driver never holds the corpus, only per-task facts and index arrays:

1. plan read tasks from sizes and footers (in :meth:`DataStage.validate`: a missing, empty, binary or
   unreadable file leaves nothing behind), number the lines of JSONL ranges (:class:`~nncift.corpus.ingest.LineCountWorker`);
2. read and canonicalise every task in a worker (:class:`~nncift.corpus.ingest.ReadWorker`) into
   ``data/parts/<task>.parquet``;
3. deduplicate exactly per hash bucket of ids (:class:`~nncift.corpus.ingest.DedupWorker`) into ``data/dedup/``;
4. draw the split from the kept-row counts alone (:func:`nncift.corpus.readers.split_indices`, the same draws as the
   in-memory :func:`nncift.corpus.readers.load_pool_target`, so the outputs are identical), then stream the chosen rows
   of each part, in order, into the three files (one ``pq.ParquetWriter`` each, written atomically).

The staging folders ``data/parts/`` (with ``plan.json``) and ``data/dedup/`` make an interrupted stage
resumable (a finished part or bucket is not redone while the input files are unchanged); they are removed
when the stage completes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.corpus import ingest
from nncift.corpus.readers import split_indices
from nncift.errors import DataError
from nncift.stages.base import Context, Stage
from nncift.store import atomic_path, done_blocks, read_parquet_metadata, todo_blocks, write_json

log = logging.getLogger(__name__)

ROW_GROUP = 1024


class DataStage(Stage):
    name = "data"
    sections = ("", "data")
    writes = ("data/pool.parquet", "data/target.parquet", "data/test.parquet")

    def validate(self, ctx: Context, **params: Any) -> None:
        """Find and plan every input before anything is written (a missing, empty, binary or unreadable
        file leaves no run directory); rows are checked by the workers."""
        self._files = ingest.expand_inputs(ctx.cfg.data)
        self._specs = ingest.plan_reads(self._files, ctx.cfg.data.read_block_bytes)

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        if not hasattr(self, "_files"):
            self.validate(ctx)
        files, specs = self._files, self._specs
        del self._files, self._specs
        c = ctx.cfg.data
        res = {"concurrency": c.concurrency, "num_cpus": 1.0}
        parts_dir, dedup_dir = ctx.path("data", "parts"), ctx.path("data", "dedup")
        specs = _resume_plan(ctx, files, specs, parts_dir, dedup_dir, res)
        # ---- read: one canonical part per task
        names = [ingest.part_name(s) for s in specs]
        todo = todo_blocks(parts_dir, specs, lambda s: (ingest.part_name(s), None))
        log.info("data: %d read tasks over %d files (%d already done)", len(specs), len(files), len(specs) - len(todo))
        if todo:
            shutil.rmtree(dedup_dir, ignore_errors=True)
        kw = {"files": ingest.file_dicts(files), "data_cfg": dataclasses.asdict(c), "out_dir": str(parts_dir)}
        ctx.executor.map_blocks(ingest.ReadWorker, kw, todo, desc="data read", **_res(res, todo))
        facts = [read_parquet_metadata(parts_dir / n) for n in names]
        _check_files(files, specs, facts, c.embedding_field)
        corpus = [files[s["file"]].corpus for s in specs]
        rows = np.asarray([f["rows"] for f in facts], np.int64)
        # ---- exact dedup per hash bucket
        buckets = c.partitions or max(1, -(-int(rows.sum()) // ingest.ROWS_PER_BUCKET))
        bnames = [ingest.bucket_name(b, buckets) for b in range(buckets)]
        _remove_others(dedup_dir, bnames)
        ok = done_blocks(dedup_dir, dict.fromkeys(bnames))
        kw = {"parts": [str(parts_dir / n) for n in names], "corpus": corpus, "given": [f["given"] for f in facts],
              "rows": rows.tolist(), "buckets": buckets, "out_dir": str(dedup_dir)}  # fmt: skip
        todo = [{"block_id": b} for b, n in enumerate(bnames) if n not in ok]
        ctx.executor.map_blocks(ingest.DedupWorker, kw, todo, desc="data dedup", **_res(res, todo))
        drop_part, drop_row = _gather_dedup(ctx, [dedup_dir / n for n in bnames])
        # ---- split from the kept counts; stream the chosen rows out
        keep_mask = _kept_rows(rows, drop_part, drop_row)
        kept = np.asarray([m.sum() for m in keep_mask], np.int64)
        n_of = {k: (int(kept[np.asarray(corpus) == k].sum()) if k in corpus else None) for k in ingest.CORPORA}
        for k in ingest.CORPORA:
            if n_of[k] is not None:
                log.info("read %d rows from %s", n_of[k], _source(c, k))
        splits = dict(zip(("pool", "target", "test"), split_indices(n_of, c, ctx.cfg.seed), strict=True))
        if len(splits["pool"][1]) < 2 or len(splits["target"][1]) < 1:
            raise DataError(
                f"need at least 2 pool rows and 1 target row, got {len(splits['pool'][1])} and "
                f"{len(splits['target'][1])}"
            )
        parts = [parts_dir / n for n in names]
        sizes = _write_splits(ctx, splits, parts, corpus, keep_mask)
        shutil.rmtree(parts_dir)
        shutil.rmtree(dedup_dir, ignore_errors=True)
        return {
            "M": sizes["pool"],
            "N": sizes["target"],
            "test": sizes["test"],
            "read_tasks": len(specs),
            "partitions": buckets,
            "duplicates": len(drop_part),
        }


def _res(res: dict[str, Any], todo: list) -> dict[str, Any]:
    """Actor resources for a fan-out of ``todo`` tasks: never more actors than tasks."""
    return {**res, "concurrency": max(1, min(res["concurrency"], len(todo)))}


def _source(c: Any, corpus: str) -> str:
    spec = {"pool": c.input, "target": c.target, "test": c.test}[corpus]
    return spec if spec is not None else "the embedded corpus"


def _remove_others(folder: Path, names: list[str]) -> None:
    """Remove the Parquet files of ``folder`` not named in ``names`` (left by another plan)."""
    if folder.is_dir():
        keep = set(names)
        for p in folder.glob("*.parquet"):
            if p.name not in keep:
                p.unlink()


def _resume_plan(ctx: Context, files: list, specs: list[dict], parts_dir: Path, dedup_dir: Path, res: dict) -> list:
    """The read plan with JSONL line numbers: the saved ``parts/plan.json`` when the files (paths, sizes,
    modification times) and tasks are unchanged, else a fresh one (parts of an older plan are discarded)."""
    key = {"files": ingest.file_dicts(files), "tasks": specs}
    plan_path = parts_dir / "plan.json"
    if plan_path.is_file():
        saved = json.loads(plan_path.read_text())
        if saved.get("key") == key:
            return saved["specs"]
        log.warning("data: the inputs changed since the staged parts were read; reading them again")
    shutil.rmtree(parts_dir, ignore_errors=True)
    shutil.rmtree(dedup_dir, ignore_errors=True)
    todo = ingest.line_count_specs(specs)
    counts = {}
    if todo:
        kw = {"files": [f.path for f in files]}
        out = ctx.executor.map_blocks(ingest.LineCountWorker, kw, todo, desc="data lines", **_res(res, todo))
        counts = {int(r["block_id"]): int(r["lines"]) for r in out}
    numbered = ingest.number_lines(specs, counts)
    write_json(plan_path, {"key": key, "specs": numbered})
    return numbered


def _check_files(files: list, specs: list[dict], facts: list[dict], emb_field: str | None) -> None:
    """Per-file checks over its parts (file order): records, usable rows, skipped conversations, and one
    embedding dimension per input."""
    by_file: dict[int, list[dict]] = {}
    for s, f in zip(specs, facts, strict=True):
        by_file.setdefault(s["file"], []).append(f)
    for i, fs in sorted(by_file.items()):
        path = files[i].path
        records = sum(f["records"] for f in fs)
        if not records:
            raise DataError(f"{path}: the file holds no records")
        skipped = sum(f["skipped"] for f in fs)
        if skipped:
            log.info("%s: skipped %d conversations without a non-empty first human->assistant turn", path, skipped)
        if not sum(f["rows"] for f in fs):
            raise DataError(f"{path}: no usable records (all {records} lacked a prompt/response)")
    if emb_field is None:
        return
    ref: dict[str, dict] = {}
    for s, f in zip(specs, facts, strict=True):
        if not f["rows"]:
            continue
        r = ref.setdefault(files[s["file"]].corpus, f)
        if f["dim"] != r["dim"]:
            raise DataError(
                f"{f['first']}: field '{emb_field}' has {f['dim']} dimensions, the first record {r['dim']} "
                f"({r['first']})"
            )


def _gather_dedup(ctx: Context, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Raise the first duplicate-id clash (pool, then target, then test; the smallest id, as the in-memory
    reader does) or id shared with the pool; log the dropped duplicates. Returns (part, row) of dropped rows."""
    c = ctx.cfg.data
    facts = [read_parquet_metadata(p) for p in paths]
    for corpus in ingest.CORPORA:
        clashes = [f["clash"][corpus] for f in facts if corpus in f["clash"]]
        if clashes:
            cl = min(clashes, key=lambda x: x["id"])
            raise DataError(f"{cl['second']}: duplicate id '{cl['id']}' (first seen at {cl['first']})")
        dropped = sum(f["dropped"].get(corpus, 0) for f in facts)
        if dropped:
            log.info("%s: dropped %d exact duplicate rows", _source(c, corpus), dropped)
    for corpus in ingest.CORPORA[1:]:
        shared = [f["shared"][corpus] for f in facts if f["shared"].get(corpus, {}).get("count")]
        if shared:
            count, first = sum(s["count"] for s in shared), min(s["min"] for s in shared)
            raise DataError(
                f"{_source(c, corpus)}: {count} {corpus} rows share their id with the pool, e.g. id {first!r} is "
                f"also in the pool ({c.input or 'the embedded corpus'}); ids must be unique across pool and {corpus}"
            )
    tables = [pq.read_table(p) for p in paths]
    part = np.concatenate([t.column("part").to_numpy() for t in tables]) if tables else np.zeros(0, np.int32)
    row = np.concatenate([t.column("row").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    return part, row


def _kept_rows(rows: np.ndarray, drop_part: np.ndarray, drop_row: np.ndarray) -> list[np.ndarray]:
    """Per part, (rows,) bool: the rows that survive deduplication."""
    keep = [np.ones(int(n), bool) for n in rows]
    order = np.argsort(drop_part, kind="stable")
    bounds = np.searchsorted(drop_part[order], np.arange(len(rows) + 1))
    for p in np.unique(drop_part):
        keep[p][drop_row[order[bounds[p] : bounds[p + 1]]]] = False
    return keep


class _SplitWriter:
    """Appends rows to one output Parquet file (written to a temporary name, renamed by the caller's stack)
    in row groups of :data:`ROW_GROUP`, numbering them ``idx`` 0, 1, ..."""

    def __init__(self, tmp: Path, schema: pa.Schema):
        self.writer = pq.ParquetWriter(tmp, schema.append(pa.field("idx", pa.int64())))
        self.buf: list[pa.Table] = []
        self.buffered = self.n = 0
        self.closed = False

    def write(self, table: pa.Table) -> None:
        idx = pa.array(np.arange(self.n, self.n + table.num_rows, dtype=np.int64))
        self.buf.append(table.append_column("idx", idx))
        self.n += table.num_rows
        self.buffered += table.num_rows
        if self.buffered >= ROW_GROUP:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buf:
            return
        t = pa.concat_tables(self.buf)
        full = t.num_rows if final else t.num_rows - t.num_rows % ROW_GROUP
        if full:
            self.writer.write_table(t.slice(0, full), row_group_size=ROW_GROUP)
        rest = t.slice(full)
        self.buf, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if not self.closed:
            self._flush(final=True)
            self.writer.close()
            self.closed = True


def _write_splits(
    ctx: Context,
    splits: dict[str, tuple[str, np.ndarray]],
    parts: list[Path],
    corpus: list[str],
    keep: list[np.ndarray],
) -> dict[str, int]:
    """Stream the rows of each split from the parts, in input order, into ``data/<split>.parquet``.

    Each part is read once (only when a split takes rows from it); memory holds one part and one row group.

    Args:
        splits: split -> (source input, (R,) sorted indices into that input's kept rows).
        parts: part paths in global order. corpus: each part's input. keep: each part's surviving rows.

    Returns:
        split -> rows written.
    """
    schemas = {}
    for p, k in zip(parts, corpus, strict=True):
        if k not in schemas and pq.read_metadata(p).num_rows:
            s = pq.read_schema(p)
            schemas[k] = pa.schema([f for f in s if f.name not in ingest.STAGING])
    offset = dict.fromkeys(ingest.CORPORA, 0)
    with contextlib.ExitStack() as stack:
        writers = {}
        for name, (src, _) in splits.items():
            tmp = stack.enter_context(atomic_path(ctx.path("data", f"{name}.parquet")))
            writers[name] = _SplitWriter(tmp, schemas[src])
            stack.callback(writers[name].close)
        for p, k, m in zip(parts, corpus, keep, strict=True):
            n_kept, o = int(m.sum()), offset[k]
            offset[k] += n_kept
            take = {}
            for name, (src, idx) in splits.items():
                lo, hi = np.searchsorted(idx, [o, o + n_kept])
                if src == k and hi > lo:
                    take[name] = idx[lo:hi] - o
            if not take:
                continue
            t = pq.read_table(p, columns=schemas[k].names).replace_schema_metadata(None)
            rows = np.flatnonzero(m)
            for name, sel in take.items():
                writers[name].write(t.take(pa.array(rows[sel])))
        for w in writers.values():
            w.close()
        return {name: w.n for name, w in writers.items()}
