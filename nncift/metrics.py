"""Fidelity of the network against the teacher, with honest baselines (METHOD.md §7.9)."""

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


def quadrant_report(pred: np.ndarray, true: np.ndarray, train_mean: float, seed: int = 0) -> dict:
    """Network metrics plus the baselines: predict the training mean, predict 0, uniform U[0, 1].

    All baselines are scored against the true labels (not against the predictions), on the same pairs.
    """
    rng = np.random.default_rng([seed, 3])
    n = len(true)
    return {
        "pairs": int(n),
        "network": regression_metrics(pred, true),
        "baseline_mean": regression_metrics(np.full(n, train_mean), true),
        "baseline_zero": regression_metrics(np.zeros(n), true),
        "baseline_uniform": regression_metrics(rng.random(n), true),
    }
