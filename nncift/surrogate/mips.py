"""Candidate search for factorised surrogates: each row's top-k of ``p_i . q_j`` without scoring every column.

A factorised (``dot``) surrogate scores a pair as an inner product of per-item factors, so a row's top-k is a
maximum-inner-product search (MIPS). MIPS is reduced to nearest-neighbour search in L2 by appending one
coordinate to each column factor, ``q'_j = [q_j, sqrt(R^2 - |q_j|^2)]`` with ``R = max_j |q_j|``, and a 0 to each
query: ``|p' - q'_j|^2 = |p|^2 + R^2 - 2 p.q_j``, so the nearest columns are the highest inner products whatever
the norms. The L2 search is a faiss inverted-file index (IVF-Flat): k-means cells over the columns, and a query
scans the ``nprobe`` nearest cells; with ``nprobe = nlist`` it is exhaustive and exact.

Candidates are then re-scored exactly by the caller (:class:`nncift.kernels.estimate_worker.EstimateWorker`), so only the
*set* is approximate; :func:`topk_recall` measures it against exhaustive estimation.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from nncift.errors import MissingDependencyError

log = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(
            "estimate.candidates=ivf needs faiss: `pip install faiss-cpu` (or set estimate.candidates=exhaustive)"
        ) from None
    return faiss


def auto_nlist(n_cols: int) -> int:
    """Default number of IVF cells for ``n_cols`` columns: about ``4 sqrt(n_cols)``, at least 1."""
    return max(1, min(n_cols // 40, int(4 * math.sqrt(n_cols))))


def augment_columns(q: np.ndarray) -> np.ndarray:
    """(C, k) column factors -> (C, k + 1) float32 with ``|q'_j| = R`` for every j (the MIPS -> L2 reduction)."""
    q = np.ascontiguousarray(q, np.float32)
    sq = np.einsum("ck,ck->c", q, q, dtype=np.float64)
    extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)
    return np.concatenate([q, extra[:, None]], axis=1)


def augment_queries(p: np.ndarray) -> np.ndarray:
    """(R, k) row factors -> (R, k + 1) float32 with a trailing 0."""
    p = np.ascontiguousarray(p, np.float32)
    return np.concatenate([p, np.zeros((len(p), 1), np.float32)], axis=1)


def build_index(q: np.ndarray, nlist: int, seed: int = 0, train_per_cell: int = 40):
    """An IVF-Flat L2 index over the augmented column factors.

    Args:
        q: (C, k) float32 column factors of a ``dot`` surrogate.
        nlist: k-means cells (see :func:`auto_nlist`).
        seed: k-means seed (a fixed seed gives the same cells on every machine up to float rounding).
        train_per_cell: training points per cell (a seeded sample of the columns).

    Returns:
        a trained, filled ``faiss.IndexIVFFlat`` (column ids 0..C-1).
    """
    faiss = _faiss()
    x = augment_columns(q)
    c, d = x.shape
    nlist = max(1, min(int(nlist), c))
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    index.cp.seed = int(seed)
    index.cp.max_points_per_centroid = int(train_per_cell)
    rng = np.random.default_rng(seed)
    n_train = min(c, nlist * train_per_cell)
    sample = x if n_train == c else x[np.sort(rng.choice(c, n_train, replace=False))]
    index.train(sample)
    index.add(x)
    return index


def save_index(index, path: str | Path) -> None:
    """Write a faiss index atomically (faiss's own format, no pickle)."""
    faiss = _faiss()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def load_index(path: str | Path):
    """Read an index written by :func:`save_index` into memory (faiss's memory-mapped IVF lists scan about 30%
    slower on our CPUs, measured at 1M columns)."""
    return _faiss().read_index(str(path))


def search(index, p: np.ndarray, k: int, nprobe: int) -> np.ndarray:
    """(R, k) int64 candidate columns of each row (the ``k`` highest ``p_i . q_j`` found; -1 = none found).

    Args:
        index: from :func:`build_index`. p: (R, kf) float32 row factors. k: candidates per row.
        nprobe: cells scanned per query (``nlist`` = exhaustive).
    """
    index.nprobe = max(1, min(int(nprobe), index.nlist))
    _, ids = index.search(augment_queries(p), int(k))
    return ids.astype(np.int64, copy=False)


def topk_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the (non-empty) entries of ``exact`` that ``found`` holds in the same row: (R, k) and (R, k')
    column-id arrays, -1 = empty (ids are unique within a row)."""
    hit = (exact[:, :, None] == found[:, None, :]).any(axis=2) & (exact >= 0)
    return float(hit.sum() / max(int((exact >= 0).sum()), 1))
