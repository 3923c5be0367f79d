"""Facility location (and FLMI / FLCG) over sparse top-k kernels, plus stochastic and partitioned greedy.

A sparse kernel keeps, per pool row i, its top-k candidates j with values ``K[i, j]``; every other entry
counts as 0 (no coverage). Gains are computed from the column view (CSC): the gain of candidate j is
``sum over stored (i, j) of max(K[i, j] - cur_i, 0)``. With k = M the results equal the dense greedy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from nncift.selection.greedy import OBJECTIVES


@dataclass
class SparseKernel:
    """A (n_rows, n_cand) kernel in CSC form, values already scaled.

    Attributes:
        indptr: (n_cand + 1,) int64; entries of candidate j are ``indptr[j]:indptr[j + 1]``.
        rows: (nnz,) int64 row of each entry. vals: (nnz,) float32 value of each entry.
        n_rows: number of rows (items to cover).
    """

    indptr: np.ndarray
    rows: np.ndarray
    vals: np.ndarray
    n_rows: int

    @property
    def n_cand(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_topk(cls, cols: np.ndarray, vals: np.ndarray, n_cand: int, row_ids: np.ndarray | None = None):
        """From per-row top-k: ``cols`` / ``vals`` are (R, k) (col -1 = empty); rows are ``row_ids`` or 0..R-1."""
        r, k = cols.shape
        rows = np.repeat(np.arange(r) if row_ids is None else np.asarray(row_ids), k)
        c, v = cols.reshape(-1), vals.reshape(-1).astype(np.float32)
        keep = c >= 0
        rows, c, v = rows[keep], c[keep], v[keep]
        order = np.lexsort((rows, c))
        counts = np.bincount(c, minlength=n_cand)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, rows[order].astype(np.int64), v[order], int(r if row_ids is None else rows.max() + 1))

    def scaled(self, lo: float | None = None, hi: float | None = None) -> SparseKernel:
        """Min-max scale the stored values with ``lo`` / ``hi`` (default: the stored values' own min / max;
        pass the whole kernel's extent to match the dense scaling); constant -> zeros."""
        if lo is None or hi is None:
            lo, hi = (float(self.vals.min()), float(self.vals.max())) if len(self.vals) else (0.0, 1.0)
        v = np.zeros_like(self.vals) if not hi > lo else (self.vals - lo) / (hi - lo)
        return SparseKernel(self.indptr, self.rows, v.astype(np.float32), self.n_rows)

    def capped(self, cap: np.ndarray) -> SparseKernel:
        """min(K[i, j], cap_i): FLMI's kernel."""
        return SparseKernel(self.indptr, self.rows, np.minimum(self.vals, cap[self.rows]), self.n_rows)


def _gains(kern: SparseKernel, cur: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """Gains of ``cands`` (float64), vectorised over their concatenated entries."""
    starts, ends = kern.indptr[cands], kern.indptr[cands + 1]
    lens = ends - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(len(cands))
    seg = np.repeat(np.arange(len(cands)), lens)
    idx = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(starts, lens)
    g = np.maximum(kern.vals[idx] - cur[kern.rows[idx]], 0.0)
    return np.bincount(seg, weights=g, minlength=len(cands))


@numba.njit(cache=True)
def _gain_one(indptr, rows, vals, cur, j):  # pragma: no cover - compiled
    g = 0.0
    for t in range(indptr[j], indptr[j + 1]):
        d = vals[t] - cur[rows[t]]
        if d > 0:
            g += d
    return g


@numba.njit(cache=True)
def _lazy_heap(indptr, rows, vals, cur, avail, budget):  # pragma: no cover - compiled
    n = len(indptr) - 1
    heap = [(0.0, np.int64(0))]
    heap.pop()
    for j in range(n):
        if avail[j]:
            heap.append((-_gain_one(indptr, rows, vals, cur, j), np.int64(j)))
    heapq.heapify(heap)
    chosen = np.empty(budget, np.int64)
    gains = np.empty(budget, np.float64)
    for step in range(budget):
        while True:
            _, j = heapq.heappop(heap)
            g = _gain_one(indptr, rows, vals, cur, j)
            # exact: accept when no other bound beats (g, lowest index) -- the naive greedy's choice
            if len(heap) == 0 or (-g, j) <= heap[0]:
                break
            heapq.heappush(heap, (-g, j))
        chosen[step] = j
        gains[step] = g
        for t in range(indptr[j], indptr[j + 1]):
            if vals[t] > cur[rows[t]]:
                cur[rows[t]] = vals[t]
    return chosen, gains


def sparse_lazy_greedy(
    kern: SparseKernel, budget: int, floor: np.ndarray | None = None, candidates=None
) -> tuple[np.ndarray, np.ndarray]:
    """Lazy greedy FL on a sparse kernel with a priority queue (compiled); the same picks as naive greedy
    (ties to the lowest index), in O(nnz) to build the bounds plus O(log n) per re-evaluation.

    Args:
        kern: scaled sparse kernel. budget: picks. floor: (n_rows,) initial coverage (FLCG).
        candidates: optional subset of candidate ids allowed (default all).

    Returns:
        (indices (budget,) int64, gains (budget,) float64).
    """
    n = kern.n_cand
    cur = np.zeros(kern.n_rows, np.float32) if floor is None else np.asarray(floor, np.float32).copy()
    avail = np.zeros(n, np.bool_)
    if candidates is None:
        avail[:] = True
    else:
        avail[np.asarray(candidates)] = True
    if budget > int(avail.sum()):
        raise ValueError(f"budget {budget} exceeds the {int(avail.sum())} candidates")
    if budget == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    return _lazy_heap(kern.indptr, kern.rows, kern.vals, cur, avail, budget)


def stochastic_greedy(
    kern: SparseKernel, budget: int, eps: float = 0.1, seed: int = 0, floor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic greedy (Mirzasoleiman et al.): each step scores a random sample of (n / budget) log(1/eps)
    candidates and takes the best. (1 - 1/e - eps) approximation in expectation; O(n log 1/eps) gains total."""
    rng = np.random.default_rng(seed)
    n = kern.n_cand
    cur = np.zeros(kern.n_rows, np.float32) if floor is None else np.asarray(floor, np.float32).copy()
    avail = np.ones(n, bool)
    size = max(1, int(np.ceil(n / max(budget, 1) * np.log(1.0 / eps))))
    chosen, gains = np.empty(budget, np.int64), np.empty(budget)
    left = n
    for step in range(budget):
        if left <= 2 * size:
            sample = np.flatnonzero(avail)
        else:  # rejection sampling: O(size) per step instead of O(n)
            draw = rng.integers(0, n, size=2 * size)
            sample = np.unique(draw[avail[draw]])[:size]
        g = _gains(kern, cur, sample)
        j = int(np.argmax(g))
        chosen[step], gains[step] = sample[j], g[j]
        avail[sample[j]] = False
        left -= 1
        s, e = kern.indptr[sample[j]], kern.indptr[sample[j] + 1]
        np.maximum.at(cur, kern.rows[s:e], kern.vals[s:e])
    return chosen, gains


def sparse_objective(kern: SparseKernel, idx: np.ndarray, floor: np.ndarray | None = None) -> float:
    """f(A) = sum_i max(max_{j in A} K[i, j], floor_i) - floor_i on a scaled sparse kernel."""
    cur = np.zeros(kern.n_rows, np.float32) if floor is None else np.asarray(floor, np.float32).copy()
    base = cur.copy()
    for j in np.asarray(idx):
        s, e = kern.indptr[j], kern.indptr[j + 1]
        np.maximum.at(cur, kern.rows[s:e], kern.vals[s:e])
    return float((cur - base).sum(dtype=np.float64))


def restrict(kern: SparseKernel, items: np.ndarray) -> tuple[SparseKernel, np.ndarray]:
    """The sub-kernel on ``items`` (as both rows and candidates), renumbered 0..len(items)-1.

    Returns:
        (sub-kernel, items) where sub-kernel index t means ``items[t]``.
    """
    items = np.sort(np.asarray(items, np.int64))
    local = np.full(max(kern.n_rows, kern.n_cand), -1, np.int64)
    local[items] = np.arange(len(items))
    owner = np.repeat(np.arange(kern.n_cand), np.diff(kern.indptr))
    keep = (local[owner] >= 0) & (local[kern.rows] >= 0)
    cols = local[owner[keep]]
    counts = np.bincount(cols, minlength=len(items))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = np.argsort(cols, kind="stable")
    return SparseKernel(indptr, local[kern.rows[keep]][order], kern.vals[keep][order], len(items)), items


def partition_items(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """Seeded random partition of range(n) into ``parts`` near-equal parts."""
    perm = np.random.default_rng([seed, 5]).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, parts)]


@dataclass(frozen=True)
class StripeSource:
    """Where a sparse FL / FLMI kernel lives on disk: the estimate's per-row top-k Parquet stripes.

    GreeDi's tasks build their own part of the kernel from it (:func:`stripe_kernel`), stripe by stripe, so
    neither the driver nor a task ever holds the whole (M, k) top-k. On a cluster the run directory is shared
    storage, so a task reads the stripes wherever it runs.

    Attributes:
        block_dir: folder of the stripes (``ff_*.parquet``, and ``ft_*.parquet`` for FLMI).
        m: items (rows and candidates). objective: "fl" or "flmi". eta: FLMI magnification.
    """

    block_dir: str
    m: int
    objective: str = "fl"
    eta: float = 1.0


def stripe_kernel(
    src: StripeSource, items: np.ndarray | None = None, cols: np.ndarray | None = None
) -> tuple[SparseKernel, np.ndarray | None]:
    """The scaled FL / FLMI sparse kernel read stripe by stripe, keeping only the entries needed.

    Args:
        src: the stripes. items: keep only these items as rows *and* candidates, renumbered 0..len-1 (the
            kernel :func:`restrict` gives). cols: keep all rows but only these candidate columns (global ids).

    Returns:
        (kernel, ids): ``ids`` maps a renumbered index to its item (``items`` sorted), or None (global ids).
        The kernel equals :func:`fl_kernel_from_topk` (restricted) on the gathered stripes, entry for entry.
    """
    from nncift.kernels.kernel_io import iter_sparse, sparse_extent

    m = src.m
    row_keep = np.ones(m, bool)
    col_keep = np.ones(m, bool)
    ids = None
    if items is not None:
        ids = np.sort(np.asarray(items, np.int64))
        row_keep[:] = False
        row_keep[ids] = True
        col_keep = row_keep
    if cols is not None:
        col_keep = np.zeros(m, bool)
        col_keep[np.asarray(cols, np.int64)] = True
    block_dir = Path(src.block_dir)
    obj = OBJECTIVES.get(src.objective)
    if obj.floor is not None or obj.modular:
        raise ValueError(f"a StripeSource builds facility-location kernels without a floor, not {src.objective!r}")
    cap = None
    if obj.cap is not None:  # FLMI: each row's coverage capped at eta x its best scaled K_FT value
        best = np.full(m, -np.inf, np.float32)
        for rows, _, vals in iter_sparse(block_dir, "ft"):
            best[rows] = vals.max(axis=1)
        cap = obj.cap(src.eta, scaled_row_max(best, sparse_extent(block_dir, "ft"))).astype(np.float32)
    rr, cc, vv = [], [], []
    for rows, cs, vals in iter_sparse(block_dir, "ff"):
        keep = (cs >= 0) & row_keep[rows][:, None]
        keep &= col_keep[np.where(cs >= 0, cs, 0)]
        r_idx, k_idx = np.nonzero(keep)
        rr.append(rows[r_idx])
        cc.append(cs[r_idx, k_idx])
        vv.append(vals[r_idx, k_idx])
    rows = np.concatenate(rr) if rr else np.zeros(0, np.int64)
    c = np.concatenate(cc) if cc else np.zeros(0, np.int64)
    v = np.concatenate(vv).astype(np.float32) if vv else np.zeros(0, np.float32)
    n = m
    if ids is not None:
        local = np.full(m, -1, np.int64)
        local[ids] = np.arange(len(ids))
        rows, c, n = local[rows], local[c], len(ids)
        cap = None if cap is None else cap[ids]
    order = np.lexsort((rows, c))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(c, minlength=n))]).astype(np.int64)
    kern = SparseKernel(indptr, rows[order].astype(np.int64), v[order], n).scaled(*sparse_extent(block_dir, "ff"))
    return (kern if cap is None else kern.capped(cap)), ids


def greedi_local_round(kern: SparseKernel | StripeSource, items: np.ndarray, budget: int) -> np.ndarray:
    """Round 1 of GreeDi on one part: greedy on the part's own sub-kernel (cut from ``kern``, or read from
    the stripes of a :class:`StripeSource`); returns global item ids."""
    sub, ids = stripe_kernel(kern, items=items) if isinstance(kern, StripeSource) else restrict(kern, items)
    k = min(budget, len(ids))
    return ids[sparse_lazy_greedy(sub, k)[0]]


def greedi_merge(
    kern: SparseKernel | StripeSource, local: list[np.ndarray], budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """Round 2: greedy over the union of the local solutions on the full objective (from a
    :class:`StripeSource`, only the union's columns are read)."""
    union = np.unique(np.concatenate(local))
    if isinstance(kern, StripeSource):
        kern = stripe_kernel(kern, cols=union)[0]
    return sparse_lazy_greedy(kern, min(budget, len(union)), candidates=union)


def topk_scores(row_means: np.ndarray, lo: float, hi: float, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k selection on K_FT row means scaled by the whole kernel's extent [lo, hi] (the dense layout's
    min-max scaling): (budget,) int64 indices (ties by index), their scores, and the objective (their sum)."""
    m = len(row_means)
    score = (row_means - lo) / (hi - lo) if hi > lo else np.zeros(m)
    order = np.lexsort((np.arange(m), -score))[:budget]
    return order.astype(np.int64), score[order], float(score[order].sum())


def scaled_row_max(best: np.ndarray, extent: tuple[float, float]) -> np.ndarray:
    """(M,) each K_FT row's best value min-max scaled by the whole kernel's extent (0 for a constant kernel):
    FLMI's coverage cap and FLCG's floor, before their eta / nu."""
    lo, hi = extent
    return (best - lo) / (hi - lo) if hi > lo else np.zeros(len(best), np.float32)


def fl_kernel_from_topk(
    ff_cols: np.ndarray,
    ff_vals: np.ndarray,
    ff_extent: tuple[float, float],
    ft_vals: np.ndarray | None,
    ft_extent: tuple[float, float] | None,
    objective: str,
    eta: float = 1.0,
    nu: float = 1.0,
) -> tuple[SparseKernel, np.ndarray | None]:
    """The sparse facility-location kernel of FL / FLMI / FLCG from per-row top-k estimates.

    K_FF's kept values are min-max scaled by the whole kernel's extent (as the dense layout scales). FLMI
    caps each row's coverage at ``eta`` x the row's best scaled K_FT value; FLCG instead gives each row a
    floor of ``nu`` x that value (coverage below it counts as zero gain).

    Args:
        ff_cols, ff_vals: (M, k) int64 / float32 top-k of K_FF rows. ft_vals: (M, k') top-k of K_FT rows.
        ff_extent / ft_extent: (min, max) of the whole kernels, recorded by the estimate stage.

    Returns:
        (kernel, floor): floor is (M,) float32 for FLCG, else None.
    """
    m = len(ff_cols)
    kern = SparseKernel.from_topk(ff_cols, ff_vals, m).scaled(*ff_extent)
    obj = OBJECTIVES.get(objective)
    if obj.cap is None and obj.floor is None:  # FL (and a modular objective: K_FF as it is)
        return kern, None
    row_max = scaled_row_max(ft_vals.max(axis=1), ft_extent)
    if obj.cap is not None:
        kern = kern.capped(obj.cap(eta, row_max).astype(np.float32))
    return kern, None if obj.floor is None else obj.floor(nu, row_max).astype(np.float32)
