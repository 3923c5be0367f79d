"""The pair space: seeded u-fraction sampling, quadrants Q1-Q4 and block tiling.

Quadrants (METHOD.md §2), for a kernel whose rows are D_F and columns D_F (``ff``) or D_T (``ft``):

- Q1: labeled rows x labeled columns -> training labels
- Q2: unlabeled rows x labeled columns
- Q3: labeled rows x unlabeled columns
- Q4: unlabeled rows x unlabeled columns (fully out of distribution)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

QUADRANTS = ("q1", "q2", "q3", "q4")


def sample_fraction(n: int, fraction: float, min_count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of max(floor(fraction * n), min_count) items, capped at n - 1 when n > 1.

    One item is always left unlabeled (when n > 1) so that every quadrant exists.
    """
    k = max(math.floor(fraction * n), min_count)
    k = min(k, n - 1 if n > 1 else n)
    if fraction >= 1.0:
        k = n
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


@dataclass
class LabelSet:
    """One rectangle of the pair space to label: rows x cols (indices into D_F and D_F / D_T)."""

    kernel: str  # "ff" | "ft"
    quadrant: str  # "q1".."q4"
    rows: np.ndarray
    cols: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.rows) * len(self.cols)


@dataclass
class LabelPlan:
    """Which pairs the expensive function labels.

    Attributes:
        pool_labeled: (dl,) int64 indices into D_F.
        target_labeled: (pl,) int64 indices into D_T.
        sets: the Q1 training rectangles and the Q2-Q4 evaluation rectangles.
    """

    pool_labeled: np.ndarray
    target_labeled: np.ndarray
    sets: list[LabelSet] = field(default_factory=list)

    @property
    def train_pairs(self) -> int:
        return sum(s.num_pairs for s in self.sets if s.quadrant == "q1")

    @property
    def eval_pairs(self) -> int:
        return sum(s.num_pairs for s in self.sets if s.quadrant != "q1")


def plan_labels(m: int, n: int, fraction: float, min_count: int, eval_pairs: int, seed: int) -> LabelPlan:
    """Draw the labeled fractions of D_F (m rows) and D_T (n rows) and the evaluation rectangles.

    Evaluation rectangles of Q2-Q4 hold about ``eval_pairs`` pairs each (a square sample of their
    rows and columns), so the fidelity report costs a bounded number of teacher calls.
    """
    rng = np.random.default_rng([seed, 1])
    pool_l = sample_fraction(m, fraction, min(min_count, m), rng)
    targ_l = sample_fraction(n, fraction, min(min_count, n), rng)
    pool_u = np.setdiff1d(np.arange(m), pool_l)
    targ_u = np.setdiff1d(np.arange(n), targ_l)
    plan = LabelPlan(pool_l, targ_l)
    side = max(1, math.isqrt(max(eval_pairs, 1)))
    for kernel, col_l, col_u in (("ff", pool_l, pool_u), ("ft", targ_l, targ_u)):
        plan.sets.append(LabelSet(kernel, "q1", pool_l, col_l))
        if eval_pairs <= 0:
            continue
        for quad, rows, cols in (("q2", pool_u, col_l), ("q3", pool_l, col_u), ("q4", pool_u, col_u)):
            if len(rows) == 0 or len(cols) == 0:
                continue
            r = np.sort(rng.choice(rows, size=min(side, len(rows)), replace=False))
            c = np.sort(rng.choice(cols, size=min(side, len(cols)), replace=False))
            plan.sets.append(LabelSet(kernel, quad, r, c))
    return plan


def ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of at most ``size`` covering range(n)."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass(frozen=True)
class Block:
    """A tile of a kernel: rows [r0, r1) x columns [c0, c1) of an index space."""

    kernel: str
    block_id: int
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def name(self) -> str:
        return f"{self.kernel}_{self.block_id:06d}"

    def to_dict(self) -> dict:
        return {
            "kernel": self.kernel,
            "block_id": self.block_id,
            "r0": self.r0,
            "r1": self.r1,
            "c0": self.c0,
            "c1": self.c1,
        }


def block_grid(
    kernel: str, n_rows: int, n_cols: int, size: int, start_id: int = 0, col_size: int | None = None
) -> list[Block]:
    """Row-major grid of blocks over an ``n_rows x n_cols`` kernel (``col_size`` defaults to ``size``;
    ``col_size=n_cols`` gives row stripes)."""
    out = []
    for r0, r1 in ranges(n_rows, size):
        for c0, c1 in ranges(n_cols, col_size or size):
            out.append(Block(kernel, start_id + len(out), r0, r1, c0, c1))
    return out
