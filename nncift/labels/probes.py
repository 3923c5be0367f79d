"""``label.probes=auto`` for a teacher of unknown nature (a table without provenance, a plugin that does not
declare :attr:`~nncift.influence.interface.InfluenceFunction.auto_probes`): the probe columns are decided on the
run's own training labels.

Probe columns measure every pool item's per-target effect (how much item i gains from examples in general).
Measured on ``benchmarks/bench_fidelity.py`` (30% of items labeled, 10 seeds; docs/fidelity.md), they lift the
DELIFT ICL tables presented as plain tables by +0.006 to +0.009 gap closed, and buy nothing on the text teachers
(TF-IDF cosines, BM25), where they cost 40% more teacher pairs. What separates the two families, and can be read
from labels the run pays for anyway, is symmetry: an in-context utility U(e -> t) is unrelated to U(t -> e)
(Spearman 0.0-0.1 on the three DELIFT tables), a text similarity is (nearly) symmetric (0.9-1.0). The spread
and block designs label many pairs both ways, so the rule is: probe columns when the pairs labeled both ways
are not symmetric.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nncift.surrogate.metrics import spearman

MIN_MIRRORS = 12  # fewer pairs labeled both ways cannot tell symmetric from not: no probes
SYMMETRIC_AT = 0.5  # Spearman of U(i -> j) against U(j -> i) at or above this: the teacher reads as symmetric
AUTO_PROBES = 4  # probe columns of an asymmetric teacher (DELIFT ICL's own default)


def mirrored_values(rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels of every unordered pair {i, j}, i != j, labeled both ways.

    Args:
        rows, cols: (P,) int64 K_FF indices of the labeled pairs (a repeated pair counts once: its first label).
        values: (P,) float labels.

    Returns:
        ``(u_ij, u_ji)``: (Q,) float64 each, the labels of (i, j) and of (j, i) for the Q pairs with i < j.
    """
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    values = np.asarray(values, np.float64)
    off = rows != cols
    rows, cols, values = rows[off], cols[off], values[off]
    if len(rows) == 0:
        return np.zeros(0), np.zeros(0)
    width = int(max(rows.max(), cols.max())) + 1
    keys, first = np.unique(rows * width + cols, return_index=True)
    rows, cols, values = rows[first], cols[first], values[first]
    lower = rows < cols
    where = np.searchsorted(keys, cols[lower] * width + rows[lower])
    where = np.minimum(where, len(keys) - 1)
    hit = keys[where] == cols[lower] * width + rows[lower]
    return values[lower][hit], values[where[hit]]


def decide_probes(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, probes: int = AUTO_PROBES) -> dict[str, Any]:
    """How many probe columns an unknown teacher gets, from its K_FF training labels.

    Args:
        rows, cols, values: (P,) the K_FF training labels (``K_FF[i, j] = U(j -> i)``); self pairs are ignored.
        probes: the columns an asymmetric teacher gets.

    Returns:
        ``{"probes", "mirror_pairs", "symmetry", "reason"}``: the decision, the number of pairs labeled both
        ways, their Spearman correlation (None below :data:`MIN_MIRRORS` or when constant) and why, in words.
    """
    a, b = mirrored_values(rows, cols, values)
    n = len(a)
    rho = spearman(a, b) if n >= MIN_MIRRORS else float("nan")
    out: dict[str, Any] = {"mirror_pairs": int(n), "symmetry": None if np.isnan(rho) else round(float(rho), 4)}
    if n < MIN_MIRRORS:
        return {**out, "probes": 0, "reason": f"only {n} pairs labeled both ways (< {MIN_MIRRORS}): symmetry unknown"}
    if np.isnan(rho):
        return {**out, "probes": 0, "reason": "constant labels"}
    if rho >= SYMMETRIC_AT:
        return {**out, "probes": 0, "reason": f"symmetric: Spearman {rho:.2f} >= {SYMMETRIC_AT} over {n} pairs"}
    return {**out, "probes": int(probes), "reason": f"asymmetric: Spearman {rho:.2f} < {SYMMETRIC_AT} over {n} pairs"}


def probe_round(m: int, plan: Any, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, seed: int,
                max_pairs: int | None = None) -> tuple[dict[str, Any], list]:  # fmt: skip
    """``label.probes=auto``'s round for a teacher of unknown nature: :func:`decide_probes` on the K_FF training
    labels, and the probe columns it asks for (:func:`~nncift.labels.plan.probe_sets` over ``plan``'s labeled
    pool items), none when they would take the plan past ``max_pairs`` (the decision then says so).

    Args:
        m: pool size. plan: the first round's :class:`~nncift.labels.plan.LabelPlan`.
        rows, cols, values: (P,) its K_FF training labels. seed: the run's seed.

    Returns:
        ``(decision, sets)``: :func:`decide_probes`'s dict and the probe :class:`~nncift.labels.plan.LabelSet` list.
    """
    from nncift.labels.plan import probe_sets

    decision = decide_probes(rows, cols, values)
    sets = probe_sets(m, plan.pool_labeled, decision["probes"], seed) if decision["probes"] else []
    pairs, have = sum(s.num_pairs for s in sets), sum(s.num_pairs for s in plan.sets)
    if sets and max_pairs is not None and have + pairs > max_pairs:
        decision.update(probes=0, reason=f"{decision['reason']}; but {pairs:,} probe pairs would exceed "
                                         f"label.max_pairs={max_pairs:,} ({have:,} planned)")  # fmt: skip
        sets = []
    return decision, sets
