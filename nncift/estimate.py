"""Blockwise estimation kernels: pure functions over explicit index ranges (no Ray here)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

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

    Runs unchanged in a plain loop (local executor) or as a Ray Data actor.

    Args:
        heads: per kernel ("ff" / "ft") a dict with ``p`` (M, h), ``q`` (M or N, h), ``w2`` (h,),
            ``b2`` (float), ``lo`` / ``hi`` (label scaler: predictions are written in raw label units).
        out_dir: folder receiving ``<kernel>_<block_id>.parquet``.
        device: torch device.
    """

    def __init__(self, heads: dict[str, dict], out_dir: str, device: str = "cpu"):
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.heads = {
            k: {
                "p": torch.from_numpy(np.array(v["p"], np.float32)).to(self.device),
                "q": torch.from_numpy(np.array(v["q"], np.float32)).to(self.device),
                "w2": torch.from_numpy(np.array(v["w2"], np.float32)).to(self.device),
                "b2": float(v["b2"]),
                "lo": float(v["lo"]),
                "hi": float(v["hi"]),
            }
            for k, v in heads.items()
        }

    def run_block(self, block: Block) -> int:
        head = self.heads[block.kernel]
        vals = predict_block(head["p"][block.r0 : block.r1], head["q"][block.c0 : block.c1], head["w2"], head["b2"])
        vals = (vals * (head["hi"] - head["lo"]) + head["lo"]).cpu().numpy()
        write_block(self.out_dir / f"{block.name}.parquet", block, vals)
        return vals.size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = []
        for i in range(len(batch["block_id"])):
            block = Block(
                **{k: (str(batch[k][i]) if k == "kernel" else int(batch[k][i])) for k in Block.__annotations__}
            )
            pairs.append(self.run_block(block))
        return {"block_id": np.asarray(batch["block_id"]), "pairs": np.asarray(pairs, dtype=np.int64)}


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
