"""Prediction from a surrogate's factors: the MLP head over projected halves (tiled) and dot-product factors.

The factors are a dict whose ``type`` names a :class:`Head` of :data:`HEADS` (what
:meth:`~nncift.surrogate.network.Surrogate.estimator` returns): ``mlp`` (the paper's network) or ``dot``
(bilinear networks and the free candidate estimates). The estimation kernels score through the head only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nncift.registry import Registry
from nncift.surrogate.numba_kernels import predict_block_np

TILE_BYTES = 8 << 20  # activation tile (rows x cols x hidden float32) kept around cache size
_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=float32) for bf16 inputs, until a build refuses it


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


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32 for bfloat16 operands: float32 output straight from the GEMM (CUDA, ``out_dtype``)
    where the build has it, else the bfloat16 product widened."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE and a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return torch.mm(a, b).float()


@dataclass(frozen=True)
class Head:
    """One type of estimator head: how a block of scores (scaled label space) comes from its factors.

    Every head has ``p`` (R, f) row factors and ``q`` (C, f) column factors (float32), plus its own ``arrays``
    and ``scalars``.

    Attributes:
        arrays: float32 arrays besides ``p`` and ``q``. scalars: float parameters.
        factorised: ``score = p @ q.T``, one GEMM: reduced-precision (bf16 / tf32) matmuls, inner-product
            candidate search and float64 row sums straight from the factors apply to it.
        q_t: the numpy engine keeps the column factors transposed, as ``q_t`` (f, C) (its compiled kernel's
            layout).
        scores: numpy, ``(f, r0, r1, c0, c1) -> (r1-r0, c1-c0) float32`` (CPU).
        scores_torch: ``(t, f, r0, r1, c0, c1, tile_bytes) -> (r1-r0, c1-c0) float32`` on ``t``'s device: ``t``
            holds the head's tensors (``p``, ``q`` (C, f), its arrays; bfloat16 ``p16`` / ``q16`` when a
            factorised head runs at bf16), ``f`` the head itself (its scalars).
    """

    arrays: tuple[str, ...]
    scalars: tuple[str, ...]
    factorised: bool
    q_t: bool
    scores: Callable[..., np.ndarray]
    scores_torch: Callable[..., torch.Tensor]


def _dot_scores(f: dict, r0: int, r1: int | None, c0: int, c1: int | None) -> np.ndarray:
    return np.matmul(f["p"][r0:r1], f["q"][c0:c1].T).astype(np.float32, copy=False)


def _dot_scores_torch(t: dict, f: dict, r0: int, r1: int, c0: int, c1: int, tile_bytes: int) -> torch.Tensor:
    if "p16" in t:
        return mm_f32(t["p16"][r0:r1], t["q16"][c0:c1].T)
    return t["p"][r0:r1] @ t["q"][c0:c1].T


def _mlp_scores(f: dict, r0: int, r1: int | None, c0: int, c1: int | None) -> np.ndarray:
    q_t = f["q_t"] if "q_t" in f else np.ascontiguousarray(np.asarray(f["q"]).T)
    return predict_block_np(f["p"][r0:r1], q_t[:, c0:c1], f["w2"], f["b2"])


def _mlp_scores_torch(t: dict, f: dict, r0: int, r1: int, c0: int, c1: int, tile_bytes: int) -> torch.Tensor:
    return predict_block(t["p"][r0:r1], t["q"][c0:c1].contiguous(), t["w2"], f["b2"], tile_bytes)


HEADS: Registry[Head] = Registry("estimator head")
HEADS.register("mlp")(Head(("w2",), ("b2",), factorised=False, q_t=True, scores=_mlp_scores,
                           scores_torch=_mlp_scores_torch))  # fmt: skip
HEADS.register("dot")(Head((), (), factorised=True, q_t=False, scores=_dot_scores, scores_torch=_dot_scores_torch))


def head_of(f: dict[str, Any]) -> Head:
    """The :class:`Head` of factors ``f`` (by its ``type``; a ValueError naming the known ones)."""
    if "type" not in f:
        raise ValueError(f"estimator factors name their head: 'type' (one of {', '.join(HEADS)}), got {sorted(f)}")
    return HEADS.get(f["type"])


def predict_factors(f: dict, r0: int = 0, r1: int | None = None, c0: int = 0, c1: int | None = None) -> np.ndarray:
    """Scores of rows [r0, r1) x columns [c0, c1) from a surrogate's factors (numpy, CPU).

    Args:
        f: :meth:`nncift.surrogate.network.Surrogate.estimator` output: ``{"type": "mlp", "p", "q" | "q_t", "w2", "b2"}``
            or ``{"type": "dot", "p" (R, k), "q" (C, k)}``.

    Returns:
        (r1-r0, c1-c0) float32 in the scaled label space.
    """
    return head_of(f).scores(f, r0, r1, c0, c1)
