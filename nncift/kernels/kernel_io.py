"""The estimated-kernel format, read and written here only: dense tiles (``<kernel>_<r0>_<c0>.parquet``),
sparse per-row top-k stripes (with each stripe's extent and row means), ``kernels.json`` (shapes, layout) and
``scores.parquet`` (pointwise runs). The estimate and score stages write it; selection and scoring read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.labels.plan import Block
from nncift.store import read_parquet_metadata, write_json, write_parquet


def write_sparse_block(
    path: Path,
    block: Block,
    cols: np.ndarray,
    vals: np.ndarray,
    k: int,
    extent: tuple[float, float] | None = None,
    row_means: np.ndarray | None = None,
) -> None:
    """Sparse row stripe as Parquet: ``row``, ``cols`` list<int64>, ``values`` list<float32> (top-k per row),
    optionally ``row_mean`` (each row's mean over every column); ``extent`` = (min, max) of every estimated
    value of the stripe, kept ones or not, in the metadata."""
    n, kk = cols.shape
    offsets = pa.array(np.arange(0, n * kk + 1, kk, dtype=np.int32))
    table = pa.table(
        {
            "row": pa.array(np.arange(block.r0, block.r1, dtype=np.int64)),
            "cols": pa.ListArray.from_arrays(offsets, pa.array(cols.reshape(-1).astype(np.int64))),
            "values": pa.ListArray.from_arrays(offsets, pa.array(vals.reshape(-1).astype(np.float32))),
        }
    )
    if row_means is not None:
        table = table.append_column("row_mean", pa.array(np.asarray(row_means, np.float64)))
    meta = {"block": block.to_dict(), "layout": "sparse", "topk": k}
    if extent is not None:
        meta["extent"] = [float(extent[0]), float(extent[1])]
    write_parquet(path, table, metadata=meta, use_dictionary=False)  # distinct values: dictionaries only cost


def _as_matrix(col: pa.ChunkedArray, n: int, dtype) -> np.ndarray:
    """A list<...> column of ``n`` equal-length lists as an (n, k) array."""
    flat = col.combine_chunks().flatten()
    return flat.to_numpy().astype(dtype, copy=False).reshape(n, len(flat) // n if n else 0)


def iter_sparse(block_dir: Path, kernel: str, rows: np.ndarray | None = None, values: bool = True):
    """The sparse stripes of ``kernel``, one at a time in file order: (rows (R,) int64, cols (R, k) int64,
    vals (R, k) float32 or None). With ``rows``, only the stripes holding some of them are read (from each
    stripe's recorded row range) and only those rows are yielded."""
    for path in sorted(block_dir.glob(f"{kernel}_*.parquet")):
        if rows is not None:
            b = read_parquet_metadata(path)["block"]
            if not ((rows >= b["r0"]) & (rows < b["r1"])).any():
                continue
        t = pq.read_table(path, columns=["row", "cols", "values"] if values else ["row", "cols"])
        r = t.column("row").to_numpy()
        cols = _as_matrix(t.column("cols"), len(r), np.int64)
        vals = _as_matrix(t.column("values"), len(r), np.float32) if values else None
        if rows is not None:
            keep = np.isin(r, rows)
            r, cols, vals = r[keep], cols[keep], None if vals is None else vals[keep]
        yield r, cols, vals


def read_sparse(block_dir: Path, kernel: str, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather the sparse stripes of ``kernel``: (cols (n_rows, k) int64, vals (n_rows, k) float32), rows checked."""
    cols, vals, seen = None, None, np.zeros(n_rows, bool)
    for rows, cc, vv in iter_sparse(block_dir, kernel):
        if cols is None:
            cols = np.full((n_rows, cc.shape[1]), -1, np.int64)
            vals = np.zeros((n_rows, cc.shape[1]), np.float32)
        cols[rows], vals[rows], seen[rows] = cc, vv, True
    if cols is None or not seen.all():
        raise RuntimeError(f"{block_dir}: kernel '{kernel}' has {int((~seen).sum())} rows without a finished stripe")
    return cols, vals


def read_sparse_rows(block_dir: Path, kernel: str, rows: np.ndarray) -> np.ndarray:
    """(len(rows), k) int64 top-k columns of the given rows (sorted, unique), reading only the stripes that hold
    them."""
    rows = np.asarray(rows, np.int64)
    out: np.ndarray | None = None
    seen = np.zeros(len(rows), bool)
    for r, cols, _ in iter_sparse(block_dir, kernel, rows=rows, values=False):
        if out is None:
            out = np.full((len(rows), cols.shape[1]), -1, np.int64)
        at = np.searchsorted(rows, r)
        out[at], seen[at] = cols, True
    if out is None or not seen.all():
        raise RuntimeError(f"{block_dir}: kernel '{kernel}' lacks stripes for {int((~seen).sum())} sampled rows")
    return out


def read_row_means(block_dir: Path, kernel: str, n_rows: int) -> np.ndarray:
    """(n_rows,) float64 mean of each row over every column, from the sparse stripes of ``kernel``."""
    out = np.full(n_rows, np.nan)
    for path in sorted(block_dir.glob(f"{kernel}_*.parquet")):
        t = pq.read_table(path, columns=["row", "row_mean"])
        out[t.column("row").to_numpy()] = t.column("row_mean").to_numpy()
    if np.isnan(out).any():
        raise RuntimeError(f"{block_dir}: kernel '{kernel}' has {int(np.isnan(out).sum())} rows without a row mean")
    return out


def sparse_extent(block_dir: Path, kernel: str) -> tuple[float, float]:
    """(min, max) of every estimated value of ``kernel`` (all stripes), the dense layout's min-max scaling."""
    lo, hi = np.inf, -np.inf
    for path in sorted(block_dir.glob(f"{kernel}_*.parquet")):
        ext = read_parquet_metadata(path).get("extent")
        if ext is None:
            raise RuntimeError(f"{path}: a sparse stripe without its value extent (written by an older nncift)")
        lo, hi = min(lo, ext[0]), max(hi, ext[1])
    return float(lo), float(hi)


def write_block(path: Path, block: Block, values: np.ndarray) -> None:
    """Dense tile as Parquet: one row per kernel row (``row``, ``values`` list<float32>), ranges in metadata."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
    table = pa.table(
        {
            "row": pa.array(np.arange(block.r0, block.r1, dtype=np.int64)),
            "values": pa.ListArray.from_arrays(offsets, flat),
        }
    )
    write_parquet(path, table, metadata={"block": block.to_dict(), "layout": "dense"}, use_dictionary=False)


def read_block(path: Path) -> tuple[Block, np.ndarray]:
    """Inverse of :func:`write_block`: (block, (r1-r0, c1-c0) float32)."""
    meta = read_parquet_metadata(path)
    block = Block(**meta["block"])
    col = pq.read_table(path, columns=["values"]).column("values").combine_chunks()
    vals = col.flatten().to_numpy().reshape(block.r1 - block.r0, block.c1 - block.c0)
    return block, vals


def assemble_dense(block_dir: Path, kernel: str, shape: tuple[int, int]) -> np.ndarray:
    """Gather the dense tiles of ``kernel`` into one (rows, cols) float32 matrix, checking full coverage."""
    out = np.full(shape, np.nan, dtype=np.float32)
    for path in sorted(block_dir.glob(f"{kernel}_*.parquet")):
        block, vals = read_block(path)
        out[block.r0 : block.r1, block.c0 : block.c1] = vals
    missing = int(np.isnan(out).sum())
    if missing:
        raise RuntimeError(f"{block_dir}: kernel '{kernel}' has {missing} pairs without a finished block")
    return out


META = "kernels.json"  # shapes and layout of a kernel folder (estimate/ or score/<name>/)
SCORES = "scores.parquet"  # a pointwise run's item scores (idx, score)


def write_meta(kernel_dir: str | Path, meta: dict) -> None:
    """Write a kernel folder's ``kernels.json`` (``ff`` / ``ft`` or ``item`` shapes, ``layout``, ...)."""
    write_json(Path(kernel_dir) / META, meta)


def read_meta(kernel_dir: str | Path) -> dict:
    """A kernel folder's ``kernels.json``."""
    return json.loads((Path(kernel_dir) / META).read_text())


def write_item_scores(kernel_dir: str | Path, scores: np.ndarray, **meta) -> None:
    """Write (M,) float32 item scores (``scores.parquet``) and the folder's ``kernels.json`` (layout ``items``,
    plus ``meta``)."""
    write_parquet(Path(kernel_dir) / SCORES, pa.table({"idx": np.arange(len(scores), dtype=np.int64), "score": scores}))
    write_meta(kernel_dir, {"item": {"shape": [len(scores)]}, "layout": "items", **meta})


def dense_kernels(kernel_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The dense estimated kernels (K_FF (M, M), K_FT (M, N)) float32 of a dense-layout kernel folder."""
    meta = read_meta(kernel_dir)
    block_dir = Path(kernel_dir) / "blocks"
    return (
        assemble_dense(block_dir, "ff", tuple(meta["ff"]["shape"])),
        assemble_dense(block_dir, "ft", tuple(meta["ft"]["shape"])),
    )


def item_scores(kernel_dir: str | Path, m: int | None = None) -> np.ndarray:
    """(m,) float32 scores of a pointwise kernel folder (teacher scale), placed by ``idx`` (m: its rows)."""
    t = pq.read_table(Path(kernel_dir) / SCORES)
    out = np.empty(t.num_rows if m is None else m, np.float32)
    out[t.column("idx").to_numpy()] = t.column("score").to_numpy()
    return out
