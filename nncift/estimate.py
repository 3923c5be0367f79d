"""Blockwise estimation kernels: pure functions over explicit index ranges (no Ray here)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nncift.kernels import TopK, predict_block_np
from nncift.pairs import Block
from nncift.store import read_parquet_metadata, write_parquet

log = logging.getLogger(__name__)

TILE_BYTES = 8 << 20  # activation tile (rows x cols x hidden float32) kept around cache size


@torch.no_grad()
def predict_block(p: torch.Tensor, q: torch.Tensor, w2: torch.Tensor, b2: float) -> torch.Tensor:
    """Network output for every pair of a block from the projected halves.

    Args:
        p: (R, h) float32, row projections ``e_i A^T + b1``.
        q: (C, h) float32, column projections ``e_j B^T``.
        w2: (h,) float32 second-layer weights.
        b2: second-layer bias.

    Returns:
        (R, C) float32 with ``out[r, c] = w2 . relu(p[r] + q[c]) + b2``.
    """
    r, h = p.shape
    c = q.shape[0]
    out = torch.empty((r, c), dtype=torch.float32, device=p.device)
    rows_per_tile = max(1, TILE_BYTES // max(1, c * h * 4))
    for r0 in range(0, r, rows_per_tile):
        r1 = min(r, r0 + rows_per_tile)
        act = torch.relu(p[r0:r1, None, :] + q[None, :, :])
        out[r0:r1] = act @ w2 + b2
    return out


class EstimateWorker:
    """Callable class: a batch of block specs -> Parquet blocks of predicted influence.

    Runs unchanged in a plain loop (local executor) or as a Ray Data actor. On CPU the compiled
    :func:`~nncift.kernels.predict_block_np` kernel is used; on other devices :func:`predict_block` (torch).

    Args:
        heads: per kernel ("ff" / "ft") a dict with ``p`` (M, h), ``q`` (M or N, h), ``w2`` (h,),
            ``b2`` (float), ``lo`` / ``hi`` (label scaler: predictions are written in raw label units).
        out_dir: folder receiving ``<kernel>_<block_id>.parquet``.
        device: torch device.
        layout: "dense" (a block is a tile) or "sparse" (a block is a row stripe reduced to its per-row top-k).
        topk: entries kept per row (sparse). col_chunk: columns predicted at once before each top-k merge.
    """

    def __init__(
        self,
        heads: dict[str, dict],
        out_dir: str,
        device: str = "cpu",
        layout: str = "dense",
        topk: int = 32,
        col_chunk: int = 8192,
    ):
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.layout, self.topk, self.col_chunk = layout, topk, col_chunk
        self.heads = {}
        for k, v in heads.items():
            head = {"b2": float(v["b2"]), "lo": float(v["lo"]), "hi": float(v["hi"])}
            if self.device.type == "cpu":
                head.update(
                    p=np.ascontiguousarray(v["p"], np.float32),
                    q_t=np.ascontiguousarray(np.asarray(v["q"]).T, np.float32),
                    w2=np.ascontiguousarray(v["w2"], np.float32),
                )
            else:
                head.update({n: torch.from_numpy(np.array(v[n], np.float32)).to(self.device) for n in ("p", "q", "w2")})
            self.heads[k] = head

    def predict(self, kernel: str, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """(r1-r0, c1-c0) float32 network outputs (scaled label space)."""
        h = self.heads[kernel]
        if self.device.type == "cpu":
            return predict_block_np(h["p"][r0:r1], h["q_t"][:, c0:c1], h["w2"], h["b2"])
        return predict_block(h["p"][r0:r1], h["q"][c0:c1], h["w2"], h["b2"]).cpu().numpy()

    def run_block(self, block: Block) -> int:
        head = self.heads[block.kernel]
        scale, lo = head["hi"] - head["lo"], head["lo"]
        path = self.out_dir / f"{block.name}.parquet"
        if self.layout == "dense":
            vals = self.predict(block.kernel, block.r0, block.r1, block.c0, block.c1) * scale + lo
            write_block(path, block, vals)
            return vals.size
        tk = TopK(block.r1 - block.r0, min(self.topk, block.c1 - block.c0))
        for c0 in range(block.c0, block.c1, self.col_chunk):
            c1 = min(block.c1, c0 + self.col_chunk)
            tk.update(self.predict(block.kernel, block.r0, block.r1, c0, c1), c0)
        cols, vals = tk.result()
        write_sparse_block(path, block, cols, vals * scale + lo, self.topk)
        return (block.r1 - block.r0) * (block.c1 - block.c0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = []
        for i in range(len(batch["block_id"])):
            block = Block(
                **{k: (str(batch[k][i]) if k == "kernel" else int(batch[k][i])) for k in Block.__annotations__}
            )
            pairs.append(self.run_block(block))
        return {"block_id": np.asarray(batch["block_id"]), "pairs": np.asarray(pairs, dtype=np.int64)}


def write_sparse_block(path: Path, block: Block, cols: np.ndarray, vals: np.ndarray, k: int) -> None:
    """Sparse row stripe as Parquet: ``row``, ``cols`` list<int64>, ``values`` list<float32> (top-k per row)."""
    n, kk = cols.shape
    offsets = pa.array(np.arange(0, n * kk + 1, kk, dtype=np.int32))
    table = pa.table(
        {
            "row": pa.array(np.arange(block.r0, block.r1, dtype=np.int64)),
            "cols": pa.ListArray.from_arrays(offsets, pa.array(cols.reshape(-1).astype(np.int64))),
            "values": pa.ListArray.from_arrays(offsets, pa.array(vals.reshape(-1).astype(np.float32))),
        }
    )
    write_parquet(path, table, metadata={"block": block.to_dict(), "layout": "sparse", "topk": k})


def read_sparse(block_dir: Path, kernel: str, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather the sparse stripes of ``kernel``: (cols (n_rows, k) int64, vals (n_rows, k) float32), rows checked."""
    cols, vals, seen = None, None, np.zeros(n_rows, bool)
    for path in sorted(block_dir.glob(f"{kernel}_*.parquet")):
        t = pq.read_table(path)
        rows = t.column("row").to_numpy()
        c = t.column("cols").combine_chunks()
        kk = len(c) and len(c.flatten()) // len(c)
        cc = c.flatten().to_numpy().reshape(len(rows), kk)
        vv = t.column("values").combine_chunks().flatten().to_numpy().reshape(len(rows), kk)
        if cols is None:
            cols = np.full((n_rows, kk), -1, np.int64)
            vals = np.zeros((n_rows, kk), np.float32)
        cols[rows], vals[rows], seen[rows] = cc, vv, True
    if cols is None or not seen.all():
        raise RuntimeError(f"{block_dir}: kernel '{kernel}' has {int((~seen).sum())} rows without a finished stripe")
    return cols, vals


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
    write_parquet(path, table, metadata={"block": block.to_dict(), "layout": "dense"})


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
