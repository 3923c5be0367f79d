"""Subset selection: facility location (FL), FLMI and FLCG by vectorised lazy greedy, and top-k.

All three objectives reduce to facility location with a per-row floor and cap. With ``m_i(A) =
max_{j in A} K_FF[i, j]`` (0 for the empty set) and ``c_i = max_q K_FT[i, q]``:

- FL:   f(A) = sum_i m_i(A)
- FLMI: f(A) = sum_i min(m_i(A), eta c_i)          -> FL on ``min(K_FF, eta c)``   (submodlib's FLMI)
- FLCG: f(A) = sum_i max(m_i(A) - nu c_i, 0)        -> FL started from ``cur = nu c`` (submodlib's FLCG)

so one greedy serves all of them. ``K_FF[i, j]`` is how well candidate j represents (or helps) item i. Each
objective is an :class:`Objective` of :data:`OBJECTIVES` (``select.objective``): its per-row cap or floor,
which the dense greedy here and the sparse one (:mod:`nncift.selection.sparse`) both apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nncift.registry import Registry


@dataclass(frozen=True)
class Objective:
    """One selection objective (``select.objective``) as facility location on K_FF with a per-row cap or floor
    made from ``c``, each row's best (scaled) K_FT value; or a modular one.

    Attributes:
        cap: ``(eta, c) -> (M,)``: each row's coverage is capped there (FL on ``min(K_FF, cap)``), or None.
        floor: ``(nu, c) -> (M,)``: each row's initial coverage (gain only above it), or None.
        modular: not facility location: each item's mean K_FT value, the ``budget`` best taken (top-k).
    """

    cap: Callable[[float, np.ndarray], np.ndarray] | None = None
    floor: Callable[[float, np.ndarray], np.ndarray] | None = None
    modular: bool = False

    @property
    def uses_ft(self) -> bool:
        """Whether it reads K_FT."""
        return self.modular or self.cap is not None or self.floor is not None


OBJECTIVES: Registry[Objective] = Registry("objective")
OBJECTIVES.register("fl")(Objective())
OBJECTIVES.register("flmi")(Objective(cap=lambda eta, c: eta * c))
OBJECTIVES.register("flcg")(Objective(floor=lambda nu, c: nu * c))
OBJECTIVES.register("topk")(Objective(modular=True))


def check_finite(k: np.ndarray, name: str) -> None:
    """Raise ValueError naming the first non-finite entry of a kernel (NaN / inf would select silently wrong)."""
    k = np.asarray(k)
    bad = ~np.isfinite(k)
    if bad.any():
        where = tuple(int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (first {k[where]} at {list(where)})")


def minmax_scale(k: np.ndarray) -> np.ndarray:
    """Scale a kernel to [0, 1] over all its entries; a constant kernel maps to zeros (no 0/0)."""
    k = np.asarray(k, dtype=np.float32)
    lo, hi = float(k.min()), float(k.max())
    if not hi > lo:
        return np.zeros_like(k)
    return (k - lo) / (hi - lo)


def _gains(k: np.ndarray, cur: np.ndarray, cols: np.ndarray | slice) -> np.ndarray:
    """Marginal gains of the candidate columns ``cols``: sum_i max(K[i, j] - cur_i, 0) (float64)."""
    return np.maximum(k[:, cols] - cur[:, None], 0.0).sum(axis=0, dtype=np.float64)


def lazy_greedy(
    k: np.ndarray, budget: int, floor: np.ndarray | None = None, batch: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Maximise ``sum_i max(max_{j in A} K[i, j], floor_i) - floor_i`` greedily.

    Lazy evaluation (Minoux) with vectorised re-evaluation: the ``batch`` candidates with the largest
    upper bounds are re-scored at once; the best is taken when its fresh gain is at least every other
    bound. Ties go to the lowest index, as in naive greedy.

    Args:
        k: (n_rows, n_candidates) float32 kernel, ``k[i, j]`` = how well candidate j covers row i.
        budget: number of candidates to pick (<= n_candidates).
        floor: (n_rows,) initial coverage (FLCG); zeros when None.
        batch: candidates re-scored per round.

    Returns:
        (indices (budget,) int64 in greedy order, gains (budget,) float64).
    """
    k = np.asarray(k, dtype=np.float32)
    check_finite(k, "kernel")
    n_rows, n_cand = k.shape
    if not 0 <= budget <= n_cand:
        raise ValueError(f"budget must be in [0, {n_cand}], got {budget}")
    cur = np.zeros(n_rows, dtype=np.float32) if floor is None else np.asarray(floor, dtype=np.float32).copy()
    ub = _gains(k, cur, slice(None))
    avail = np.ones(n_cand, dtype=bool)
    chosen = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)
    neg_inf = -np.inf
    for step in range(budget):
        while True:
            bound = np.where(avail, ub, neg_inf)
            b = min(batch, int(avail.sum()))
            top = np.argpartition(-bound, b - 1)[:b] if b < n_cand else np.arange(n_cand)
            top = top[avail[top]]
            fresh = _gains(k, cur, top)
            ub[top] = fresh
            best_val = fresh.max()
            bound[top] = neg_inf
            others = bound.max()
            if best_val > others:
                best = int(top[fresh == best_val].min())
                break
            if best_val == others:
                if best_val <= 0.0:  # saturated: every remaining gain is 0, naive greedy takes the lowest index
                    best = int(np.flatnonzero(avail).min())
                    break
                # exact tie-break: rescore every stale bound that could equal best_val, then lowest index wins
                tie = np.flatnonzero(bound >= best_val)
                f2 = _gains(k, cur, tie)
                ub[tie] = f2
                best = int(min(top[fresh == best_val].min(), tie[f2 == best_val].min(initial=n_cand)))
                break
        chosen[step] = best
        gains[step] = best_val
        avail[best] = False
        np.maximum(cur, k[:, best], out=cur)
    return chosen, gains


def naive_greedy(k: np.ndarray, budget: int, floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference greedy: rescore every candidate at every step (for tests and benchmarks)."""
    k = np.asarray(k, dtype=np.float32)
    cur = np.zeros(k.shape[0], dtype=np.float32) if floor is None else np.asarray(floor, np.float32).copy()
    avail = np.ones(k.shape[1], dtype=bool)
    chosen, gains = [], []
    for _ in range(budget):
        g = np.where(avail, _gains(k, cur, slice(None)), -np.inf)
        j = int(np.argmax(g))
        chosen.append(j)
        gains.append(g[j])
        avail[j] = False
        np.maximum(cur, k[:, j], out=cur)
    return np.asarray(chosen, dtype=np.int64), np.asarray(gains)


def prepare_objective(
    k_ff: np.ndarray, objective: str, k_ft: np.ndarray | None, eta: float, nu: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reduce FL / FLMI / FLCG to (kernel, floor) for :func:`lazy_greedy`."""
    obj = OBJECTIVES.get(objective)
    if not obj.uses_ft:
        return k_ff, None
    if k_ft is None:
        raise ValueError(f"objective '{objective}' needs k_ft (the (M, N) pool x target kernel)")
    if k_ft.shape[0] != k_ff.shape[0]:
        raise ValueError(f"k_ft has {k_ft.shape[0]} rows but k_ff has {k_ff.shape[0]}; rows must be D_F")
    if obj.modular:
        raise ValueError(f"objective {objective!r} is modular: it has no facility-location kernel")
    c = k_ft.max(axis=1).astype(np.float32)
    kernel = k_ff if obj.cap is None else np.minimum(k_ff, obj.cap(eta, c)[:, None])
    return kernel, None if obj.floor is None else obj.floor(nu, c)


def objective_value(
    k_ff: np.ndarray,
    idx: np.ndarray,
    objective: str = "fl",
    k_ft: np.ndarray | None = None,
    eta: float = 1.0,
    nu: float = 1.0,
) -> float:
    """f(A) of FL / FLMI / FLCG (same definitions as submodlib) on already-scaled kernels."""
    if OBJECTIVES.get(objective).modular:
        return float(k_ft.mean(axis=1)[idx].sum())
    k, floor = prepare_objective(np.asarray(k_ff, np.float32), objective, k_ft, eta, nu)
    m = k[:, idx].max(axis=1) if len(idx) else np.zeros(k.shape[0], np.float32)
    m = np.maximum(m, 0.0)
    if floor is None:
        return float(m.sum(dtype=np.float64))
    return float(np.maximum(m - floor, 0.0).sum(dtype=np.float64))


def greedy_select(
    k_ff: np.ndarray | None,
    budget: int,
    *,
    objective: str = "fl",
    k_ft: np.ndarray | None = None,
    eta: float = 1.0,
    nu: float = 1.0,
    scale: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`select_subset` but also returns the marginal gain of each pick.

    Returns:
        (indices (budget,) int64 in greedy order, gains (budget,) float64).
    """
    obj = OBJECTIVES.get(objective)
    for name, k in (("k_ff", k_ff), ("k_ft", k_ft)):
        if k is not None:
            check_finite(k, name)
    if scale:
        k_ff = None if k_ff is None else minmax_scale(k_ff)
        k_ft = None if k_ft is None else minmax_scale(k_ft)
    if obj.modular:
        if k_ft is None:
            raise ValueError(f"objective '{objective}' needs k_ft")
        score = k_ft.mean(axis=1, dtype=np.float64)
        order = np.lexsort((np.arange(len(score)), -score))[:budget]
        return order.astype(np.int64), score[order]
    if k_ff is None or k_ff.ndim != 2 or k_ff.shape[0] != k_ff.shape[1]:
        raise ValueError(f"k_ff must be a square (M, M) kernel, got {None if k_ff is None else k_ff.shape}")
    k, floor = prepare_objective(k_ff, objective, k_ft, eta, nu)
    return lazy_greedy(k, budget, floor)


def select_subset(
    k_ff: np.ndarray | None,
    budget: int,
    *,
    objective: str = "fl",
    k_ft: np.ndarray | None = None,
    eta: float = 1.0,
    nu: float = 1.0,
    scale: bool = True,
) -> np.ndarray:
    """Pick ``budget`` pool items by greedy maximisation of ``objective``.

    Args:
        k_ff: (M, M) kernel; ``k_ff[i, j]`` is how well item j represents (or helps) item i.
        budget: number of items.
        objective: "fl" | "flmi" | "flcg" | "topk" (top mean of each row of ``k_ft``).
        k_ft: (M, N) pool x target kernel (FLMI, FLCG, top-k).
        eta: FLMI magnification. nu: FLCG privacy hardness.
        scale: min-max scale each kernel to [0, 1] first (as DELIFT does).

    Returns:
        (budget,) int64 pool indices in greedy order.
    """
    return greedy_select(k_ff, budget, objective=objective, k_ft=k_ft, eta=eta, nu=nu, scale=scale)[0]
