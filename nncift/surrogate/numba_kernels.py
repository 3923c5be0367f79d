"""Compiled CPU kernels for blockwise estimation (numba), with exact torch twins for other devices.

The estimation inner loop is ``out[i, j] = b2 + sum_k w2[k] * relu(p[i, k] + q[j, k])``. The numba kernel
keeps the column projections transposed (``q_t`` is (h, C)) so the innermost loop runs over a contiguous
slice of columns (one add, one max and one fused multiply-add per lane, vectorised by LLVM) for four rows
at once (each loaded column slice serves four accumulators); (4 rows, cache-sized column chunk) tasks are
spread over the cores by ``prange``.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a core dependency; the guard keeps `import nncift` working in minimal environments
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

COL_CHUNK = 512

if HAVE_NUMBA:

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _predict_numba(p, q_t, w2, b2, out):  # pragma: no cover - compiled
        # task = (block of 4 rows, chunk of columns); each q_t row slice is loaded once for the 4 rows
        r, h = p.shape
        c = q_t.shape[1]
        n_chunks = (c + COL_CHUNK - 1) // COL_CHUNK
        n_rb = (r + 3) // 4
        zero = np.float32(0.0)
        for task in numba.prange(n_rb * n_chunks):
            i0 = (task // n_chunks) * 4
            c0 = (task % n_chunks) * COL_CHUNK
            c1 = min(c, c0 + COL_CHUNK)
            n = c1 - c0
            i1, i2, i3 = min(i0 + 1, r - 1), min(i0 + 2, r - 1), min(i0 + 3, r - 1)
            a0 = np.full(n, b2, dtype=np.float32)
            a1 = np.full(n, b2, dtype=np.float32)
            a2 = np.full(n, b2, dtype=np.float32)
            a3 = np.full(n, b2, dtype=np.float32)
            for k in range(h):
                wk = w2[k]
                p0, p1, p2, p3 = p[i0, k], p[i1, k], p[i2, k], p[i3, k]
                qk = q_t[k, c0:c1]  # a contiguous slice: lets LLVM vectorise the loop below
                for j in range(n):
                    v = qk[j]
                    a0[j] += wk * max(p0 + v, zero)
                    a1[j] += wk * max(p1 + v, zero)
                    a2[j] += wk * max(p2 + v, zero)
                    a3[j] += wk * max(p3 + v, zero)
            out[i0, c0:c1] = a0
            if i0 + 1 < r:
                out[i0 + 1, c0:c1] = a1
            if i0 + 2 < r:
                out[i0 + 2, c0:c1] = a2
            if i0 + 3 < r:
                out[i0 + 3, c0:c1] = a3

    @numba.njit(cache=True)
    def _argmin_entry(vals, cols, i, k):  # pragma: no cover - compiled
        # the entry to evict: smallest value, and among equal values the largest column (lower columns win ties)
        m = 0
        for t in range(1, k):
            if vals[i, t] < vals[i, m] or (vals[i, t] == vals[i, m] and cols[i, t] > cols[i, m]):
                m = t
        return m

    @numba.njit(parallel=True, cache=True)
    def _topk_merge_numba(vals, cols, new_vals, col0, k):  # pragma: no cover - compiled
        # vals/cols: (R, k) running top-k (unsorted); new_vals: (R, C) block starting at column col0
        r, c = new_vals.shape
        for i in numba.prange(r):
            # index of the current minimum of the running top-k
            m = _argmin_entry(vals, cols, i, k)
            for j in range(c):
                v = new_vals[i, j]
                if v > vals[i, m]:
                    vals[i, m] = v
                    cols[i, m] = col0 + j
                    m = _argmin_entry(vals, cols, i, k)


def predict_block_np(p: np.ndarray, q_t: np.ndarray, w2: np.ndarray, b2: float) -> np.ndarray:
    """``out[i, j] = b2 + w2 . relu(p[i] + q_t[:, j])`` on CPU.

    Args:
        p: (R, h) float32 row projections. q_t: (h, C) float32 transposed column projections.
        w2: (h,) float32. b2: bias.

    Returns:
        (R, C) float32.
    """
    p = np.ascontiguousarray(p, dtype=np.float32)
    q_t = np.ascontiguousarray(q_t, dtype=np.float32)
    w2 = np.ascontiguousarray(w2, dtype=np.float32)
    out = np.empty((p.shape[0], q_t.shape[1]), dtype=np.float32)
    if HAVE_NUMBA:
        _predict_numba(p, q_t, w2, np.float32(b2), out)
    else:  # pragma: no cover
        for i in range(p.shape[0]):
            out[i] = np.maximum(p[i][:, None] + q_t, 0.0).T @ w2 + b2
    return out


class TopK:
    """Streaming per-row top-k over column blocks (values and global column ids); nothing of size R x C kept.

    Args:
        rows: number of rows R. k: entries kept per row.
    """

    def __init__(self, rows: int, k: int):
        self.k = k
        self.vals = np.full((rows, k), -np.inf, dtype=np.float32)
        self.cols = np.full((rows, k), -1, dtype=np.int64)

    def update(self, block: np.ndarray, col0: int) -> None:
        """Merge a (R, C) block whose first column is global column ``col0``."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        if HAVE_NUMBA:
            _topk_merge_numba(self.vals, self.cols, block, col0, self.k)
            return
        allv = np.concatenate([self.vals, block], axis=1)  # pragma: no cover
        allc = np.concatenate([self.cols, np.arange(col0, col0 + block.shape[1])[None].repeat(len(block), 0)], 1)
        idx = np.argpartition(-allv, self.k - 1, axis=1)[:, : self.k]
        self.vals = np.take_along_axis(allv, idx, 1)
        self.cols = np.take_along_axis(allc, idx, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(cols (R, k) int64, vals (R, k) float32), each row sorted by value descending then column."""
        order = np.lexsort((self.cols, -self.vals), axis=1)
        return np.take_along_axis(self.cols, order, 1), np.take_along_axis(self.vals, order, 1)
