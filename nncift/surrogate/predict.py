"""Prediction from a surrogate's factors: the MLP head over projected halves (tiled) and dot-product factors."""

from __future__ import annotations

import numpy as np
import torch

from nncift.surrogate.numba_kernels import predict_block_np

TILE_BYTES = 8 << 20  # activation tile (rows x cols x hidden float32) kept around cache size


@torch.no_grad()
def predict_block(
    p: torch.Tensor, q: torch.Tensor, w2: torch.Tensor, b2: float, tile_bytes: int = TILE_BYTES
) -> torch.Tensor:
    """Network output for every pair of a block from the projected halves.

    Args:
        p: (R, h) float32, row projections ``e_i A^T + b1``.
        q: (C, h) float32, column projections ``e_j B^T``.
        w2: (h,) float32 second-layer weights.
        b2: second-layer bias.
        tile_bytes: size of one (rows, C, h) float32 activation tile.

    Returns:
        (R, C) float32 with ``out[r, c] = w2 . relu(p[r] + q[c]) + b2``.
    """
    r, h = p.shape
    c = q.shape[0]
    out = torch.empty((r, c), dtype=torch.float32, device=p.device)
    rows_per_tile = max(1, tile_bytes // max(1, c * h * 4))
    for r0 in range(0, r, rows_per_tile):
        r1 = min(r, r0 + rows_per_tile)
        act = torch.relu(p[r0:r1, None, :] + q[None, :, :])
        out[r0:r1] = act @ w2 + b2
    return out


def predict_factors(f: dict, r0: int = 0, r1: int | None = None, c0: int = 0, c1: int | None = None) -> np.ndarray:
    """Scores of rows [r0, r1) x columns [c0, c1) from a surrogate's factors (numpy, CPU).

    Args:
        f: :meth:`nncift.surrogate.network.Surrogate.estimator` output: ``{"type": "mlp", "p", "q" | "q_t", "w2", "b2"}``
            or ``{"type": "dot", "p" (R, k), "q" (C, k)}``.

    Returns:
        (r1-r0, c1-c0) float32 in the scaled label space.
    """
    if f["type"] == "dot":
        return np.matmul(f["p"][r0:r1], f["q"][c0:c1].T).astype(np.float32, copy=False)
    q_t = f["q_t"] if "q_t" in f else np.ascontiguousarray(np.asarray(f["q"]).T)
    return predict_block_np(f["p"][r0:r1], q_t[:, c0:c1], f["w2"], f["b2"])
