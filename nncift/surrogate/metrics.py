"""Regression and ranking metrics of the surrogate against the teacher, with honest baselines."""

from __future__ import annotations

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MSE, MAE and Spearman of ``pred`` vs ``true`` (both (P,) in the same scaled space)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    err = pred - true
    return {
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "spearman": spearman(pred, true),
    }


def topk_recall(pred: np.ndarray, true: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int = 10) -> float | None:
    """Mean over rows of |top-k columns by ``pred`` ∩ top-k columns by ``true``| / k.

    The pairs (P,) are grouped by ``rows``; only rows with more than ``k`` labeled columns count. Meant for
    rectangles of labeled pairs (the Q2-Q4 evaluation sets); returns None when no row qualifies or the
    pairs are too scattered to form a rectangle (more than 4x as many grid cells as pairs).

    Args:
        pred, true: (P,) scores. rows, cols: (P,) int indices of each pair.
    """
    rows, cols = np.asarray(rows), np.asarray(cols)
    if len(rows) == 0:
        return None
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    if len(ur) * len(uc) > 4 * len(rows):
        return None
    grid_t = np.full((len(ur), len(uc)), -np.inf)
    grid_p = np.full((len(ur), len(uc)), -np.inf)
    grid_t[ri, ci] = true
    grid_p[ri, ci] = pred
    ok = np.isfinite(grid_t).sum(axis=1) > k
    if not ok.any():
        return None
    grid_t, grid_p = grid_t[ok], grid_p[ok]
    top_t = np.argpartition(-grid_t, k - 1, axis=1)[:, :k]
    top_p = np.argpartition(-grid_p, k - 1, axis=1)[:, :k]
    hit_t = np.zeros(grid_t.shape, bool)
    hit_p = np.zeros(grid_p.shape, bool)
    np.put_along_axis(hit_t, top_t, True, axis=1)
    np.put_along_axis(hit_p, top_p, True, axis=1)
    return float(np.mean((hit_t & hit_p).sum(axis=1) / k))


def quadrant_report(
    pred: np.ndarray,
    true: np.ndarray,
    train_mean: float,
    seed: int = 0,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    k: int = 10,
) -> dict:
    """Network metrics plus the baselines: predict the training mean, predict 0, uniform U[0, 1].

    All baselines are scored against the true labels (not against the predictions), on the same pairs.
    With ``rows`` / ``cols``, the network's per-row top-``k`` recall is added (``network.topk_recall``).
    """
    rng = np.random.default_rng([seed, 3])
    n = len(true)
    net = regression_metrics(pred, true)
    if rows is not None and cols is not None:
        net["topk_recall"] = topk_recall(pred, true, rows, cols, k)
    return {
        "pairs": int(n),
        "network": net,
        "baseline_mean": regression_metrics(np.full(n, train_mean), true),
        "baseline_zero": regression_metrics(np.zeros(n), true),
        "baseline_uniform": regression_metrics(rng.random(n), true),
    }
