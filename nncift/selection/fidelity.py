"""Selection fidelity: does the cheap estimate pick what the expensive function would?

All values are measured under the teacher's own kernels, min-max scaled once (as the selection scales them):

- ``f(S)``: the selection objective (FL, FLMI, FLCG; for top-k the summed mean row score) of subset S;
- ``S_exact``: greedy on the teacher's full kernels; ``S_rand``: seeded uniform subsets of the same budget;
- **gap closed** = (f(S) - mean f(S_rand)) / (f(S_exact) - mean f(S_rand)): 1 = as good as the teacher's own
  selection, 0 = no better than random, < 0 = worse than random;
- Jaccard(S, S_exact): overlap with the teacher's subset (harsh: facility location has many near-optimal
  subsets);
- the **zero-label baseline**: the same selection on plain embedding cosine, which costs no teacher call.
  A surrogate that does not beat it has not earned its labels.

Pure numpy over dense kernels: only for runs whose full kernel fits in memory (``fidelity.max_pairs``).
"""

from __future__ import annotations

import numpy as np

from nncift.selection.greedy import greedy_select, minmax_scale, objective_value


def teacher_kernels(fn, pool, target, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's full K_FF (M, M) and K_FT (M, N) float32, computed in row blocks.

    Args:
        fn: an :class:`~nncift.influence.InfluenceFunction` (cheap ones only: cosine, a table).
        pool, target: :class:`~nncift.influence.Items` of D_F and D_T.
    """
    m, n = len(pool), len(target)
    k_ff = np.empty((m, m), np.float32)
    k_ft = np.empty((m, n), np.float32)
    for r0 in range(0, m, block):
        rows = pool.take(np.arange(r0, min(m, r0 + block)))
        k_ff[r0 : r0 + len(rows)] = fn.kernel_block("ff", rows, pool)
        k_ft[r0 : r0 + len(rows)] = fn.kernel_block("ft", rows, target)
    return k_ff, k_ft


def cosine_kernels(e_pool: np.ndarray, e_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The zero-label kernels: embedding cosine K_FF (M, M) and K_FT (M, N), float32 (unit-norm inputs)."""
    return (e_pool @ e_pool.T).astype(np.float32), (e_pool @ e_target.T).astype(np.float32)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets (1.0 for two empty sets)."""
    sa, sb = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def random_subsets(m: int, budget: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` seeded uniform subsets of ``budget`` of range(m) (without replacement)."""
    rng = np.random.default_rng([seed, 7])
    return [np.sort(rng.choice(m, size=budget, replace=False)) for _ in range(count)]


def select(
    k_ff: np.ndarray, k_ft: np.ndarray | None, budget: int, objective: str, eta: float = 1.0, nu: float = 1.0
) -> np.ndarray:
    """Greedy selection (min-max scaled kernels, as the pipeline selects): (budget,) int64 indices."""
    return greedy_select(k_ff, budget, objective=objective, k_ft=k_ft, eta=eta, nu=nu)[0]


def gap_closed(f: float, f_exact: float, f_random: float) -> float | None:
    """(f - f_random) / (f_exact - f_random); None when the exact subset is no better than random."""
    den = f_exact - f_random
    return None if not den > 0 else float((f - f_random) / den)


def selection_fidelity(
    true_ff: np.ndarray,
    true_ft: np.ndarray | None,
    subsets: dict[str, np.ndarray],
    budget: int,
    objective: str = "fl",
    eta: float = 1.0,
    nu: float = 1.0,
    random_count: int = 10,
    seed: int = 0,
    exact: np.ndarray | None = None,
) -> dict:
    """Score subsets under the teacher's kernels.

    Args:
        true_ff: (M, M) teacher K_FF; true_ft: (M, N) teacher K_FT (FLMI, FLCG, top-k; may be None for FL).
        subsets: name -> (budget,) indices of D_F (e.g. ``{"nncift": ..., "zero_label": ...}``).
        budget: subset size (random subsets and S_exact use it).
        objective, eta, nu: the selection objective and its parameters.
        random_count: number of seeded random subsets.
        exact: S_exact when already known (else greedy on the true kernels).

    Returns:
        ``{"objective", "budget", "f_exact", "f_random_mean", "f_random_sd", "random_subsets", "exact",
        "subsets": {name: {"f", "gap_closed", "jaccard"}}}`` (``exact`` = S_exact indices as a list).
    """
    s_ff = minmax_scale(true_ff)
    s_ft = None if true_ft is None else minmax_scale(true_ft)
    if exact is None:
        exact = select(true_ff, true_ft, budget, objective, eta, nu)

    def f(idx: np.ndarray) -> float:
        return objective_value(s_ff, np.asarray(idx, np.int64), objective, s_ft, eta, nu)

    f_exact = f(exact)
    rand = np.array([f(r) for r in random_subsets(len(true_ff), budget, random_count, seed)])
    f_rand = float(rand.mean())
    out = {
        "objective": objective,
        "budget": int(budget),
        "f_exact": f_exact,
        "f_random_mean": f_rand,
        "f_random_sd": float(rand.std(ddof=1)) if len(rand) > 1 else 0.0,
        "random_subsets": int(random_count),
        "exact": np.asarray(exact).tolist(),
        "subsets": {},
    }
    for name, idx in subsets.items():
        fv = f(idx)
        out["subsets"][name] = {"f": fv, "gap_closed": gap_closed(fv, f_exact, f_rand), "jaccard": jaccard(idx, exact)}
    return out
