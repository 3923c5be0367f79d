"""The pair space: seeded u-fraction sampling, quadrants Q1-Q4 and block tiling.

Quadrants (NN-CIFT §4.2), for a kernel whose rows are D_F and columns D_F (``ff``) or D_T (``ft``):

- Q1: labeled rows x labeled columns -> training labels
- Q2: unlabeled rows x labeled columns
- Q3: labeled rows x unlabeled columns
- Q4: unlabeled rows x unlabeled columns (fully out of distribution)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nncift.registry import Registry

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
    """A set of pairs of the pair space to label (indices into D_F and D_F / D_T).

    A dense set is the rectangle ``rows x cols``; a ``paired`` set is the aligned pair list
    ``(rows[k], cols[k])`` (e.g. the diagonal of K_FF).
    """

    kernel: str  # "ff" | "ft" | "item" (a pointwise teacher's scores)
    quadrant: str  # "q1".."q4" | "diag"
    rows: np.ndarray
    cols: np.ndarray
    paired: bool = False

    @property
    def num_pairs(self) -> int:
        return len(self.rows) if self.paired else len(self.rows) * len(self.cols)

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "quadrant": self.quadrant, "rows": self.rows, "cols": self.cols,
                "paired": self.paired}  # fmt: skip


@dataclass
class LabelPlan:
    """Which pairs the expensive function labels.

    Attributes:
        pool_labeled: (dl,) int64 indices into D_F whose pairs may be used for training; every other pool
            item is held out (never in a training pair), which makes Q2-Q4 honest.
        target_labeled: (pl,) int64 indices into D_T, likewise.
        sets: the Q1 training sets, the Q2-Q4 evaluation rectangles and the optional K_FF diagonal.
        design: a :data:`DESIGNS` name ("items" for a pointwise plan).
    """

    pool_labeled: np.ndarray
    target_labeled: np.ndarray
    sets: list[LabelSet] = field(default_factory=list)
    design: str = "block"

    def pairs(self, *quadrants: str) -> int:
        return sum(s.num_pairs for s in self.sets if s.quadrant in quadrants)

    @property
    def train_pairs(self) -> int:
        return self.pairs("q1")

    @property
    def eval_pairs(self) -> int:
        return self.pairs("q2", "q3", "q4")

    @property
    def diag_pairs(self) -> int:
        return self.pairs("diag")

    @property
    def probe_pairs(self) -> int:
        return self.pairs("probe")

    def summary(self) -> list[dict]:
        """Sets and pairs per (kernel, quadrant) (for plan.json and logs)."""
        out: dict[tuple[str, str], dict] = {}
        for s in self.sets:
            rec = out.setdefault((s.kernel, s.quadrant), {"kernel": s.kernel, "quadrant": s.quadrant, "sets": 0,
                                                          "pairs": 0})  # fmt: skip
            rec["sets"] += 1
            rec["pairs"] += s.num_pairs
        return list(out.values())


def plan_labels(
    m: int,
    n: int,
    fraction: float,
    min_count: int,
    eval_pairs: int,
    seed: int,
    design: str = "block",
    partners: int = 20,
    diagonal: bool = False,
    probes: int = 0,
    item_cost: bool = False,
) -> LabelPlan:
    """Draw the labeled items of D_F (m rows) and D_T (n rows), the training pairs and the evaluation rectangles.

    Designs of the training pairs (Q1), both over the same seeded labeled items:

    - ``block``: every pair among the labeled items (the paper's design): ``dl x dl`` for K_FF and ``dl x pl``
      for K_FT.
    - ``active``: the spread design with ``partners // 2``; the other half is spent by a second round
      (:mod:`nncift.labels.active`) on the pairs a round-1 surrogate ranks highest in each labeled row.
    - ``spread``: each labeled item is the in-context example of exactly one small dense rectangle of
      ``partners`` examples x ``partners`` random labeled partners (targets), so pairs = ``dl x partners`` per
      kernel, spread over many more items than a block of the same cost, while every example still meets
      several targets (prefix-KV reuse keeps paying). In K_FF the example is the column, in K_FT the row.

    Items outside the labeled sets are never in a training pair: Q2-Q4 rectangles (about ``eval_pairs``
    pairs each, a square sample of their rows and columns) measure generalisation to unseen items honestly.
    With ``diagonal``, the exact K_FF self pairs ``(i, i)`` of every pool item are labeled too (m teacher
    calls), to be used as they are, never as training pairs. With ``probes`` P, P seeded labeled pool items are
    each the in-context example of every other pool item (P full columns of K_FF, quadrant ``probe``: P (M - 1)
    pairs sharing one prefix each): every item's per-target effect is measured, for the additive estimate of
    :mod:`nncift.surrogate.candidates`; probe pairs are never training pairs of the network. ``fraction >= 1`` labels every
    pair (block).

    ``item_cost`` (a teacher that pays per distinct item, e.g. LESS's gradient features): every pair among
    featurised items is nearly free, so the plan minimises the items it touches: the training pairs are the
    block over the labeled items (``fraction`` alone sets them), there is no diagonal or probe (they would
    touch every pool item), and every evaluation rectangle reuses one held-out pool set and one held-out target
    set of ``isqrt(eval_pairs)`` items each.
    """
    planner = DESIGNS.get(design)
    if item_cost and fraction < 1.0:
        return _plan_items_cost(m, n, fraction, eval_pairs, seed)
    if fraction >= 1.0:  # every item labeled: every pair (full labeling, the cost baseline), whatever the design
        design, planner = "block", DESIGNS.get("block")
    rng = np.random.default_rng([seed, 1])
    floor = min_count if planner.min_count else 2  # else `fraction` alone sets the held-out share
    pool_l = sample_fraction(m, fraction, min(floor, m), rng)
    targ_l = sample_fraction(n, fraction, min(floor, n), rng)
    pool_u = np.setdiff1d(np.arange(m), pool_l)
    targ_u = np.setdiff1d(np.arange(n), targ_l)
    plan = LabelPlan(pool_l, targ_l, design=design)
    side = max(1, math.isqrt(max(eval_pairs, 1)))
    design_rng = np.random.default_rng([seed, 4])
    for kernel, col_l, col_u in (("ff", pool_l, pool_u), ("ft", targ_l, targ_u)):
        plan.sets += planner.train_sets(kernel, pool_l, col_l, partners, design_rng)
        if eval_pairs <= 0:
            continue
        for quad, rows, cols in (("q2", pool_u, col_l), ("q3", pool_l, col_u), ("q4", pool_u, col_u)):
            if len(rows) == 0 or len(cols) == 0:
                continue
            r = np.sort(rng.choice(rows, size=min(side, len(rows)), replace=False))
            c = np.sort(rng.choice(cols, size=min(side, len(cols)), replace=False))
            plan.sets.append(LabelSet(kernel, quad, r, c))
    if diagonal:
        idx = np.arange(m, dtype=np.int64)
        plan.sets.append(LabelSet("ff", "diag", idx, idx, paired=True))
    if probes > 0 and fraction < 1.0:
        plan.sets += probe_sets(m, pool_l, probes, seed)
    return plan


def probe_sets(m: int, pool_labeled: np.ndarray, probes: int, seed: int) -> list[LabelSet]:
    """``probes`` seeded labeled pool items, each the in-context example of every other pool item: one K_FF
    column of M - 1 pairs each (quadrant ``probe``)."""
    rng = np.random.default_rng([seed, 5])
    sets = []
    for j in np.sort(rng.choice(pool_labeled, size=min(probes, len(pool_labeled)), replace=False)):
        others = np.setdiff1d(np.arange(m, dtype=np.int64), [j])
        sets.append(LabelSet("ff", "probe", others, np.array([j], np.int64)))
    return sets


def _plan_items_cost(m: int, n: int, fraction: float, eval_pairs: int, seed: int) -> LabelPlan:
    """The plan of a per-item-cost pairwise teacher (see :func:`plan_labels`): block training pairs over the
    labeled items, evaluation rectangles over one held-out set per side."""
    rng = np.random.default_rng([seed, 1])
    pool_l = sample_fraction(m, fraction, min(2, m), rng)
    targ_l = sample_fraction(n, fraction, min(2, n), rng)
    pool_u, targ_u = np.setdiff1d(np.arange(m), pool_l), np.setdiff1d(np.arange(n), targ_l)
    plan = LabelPlan(pool_l, targ_l, design="block")
    plan.sets += [LabelSet("ff", "q1", pool_l, pool_l), LabelSet("ft", "q1", pool_l, targ_l)]
    side = max(1, math.isqrt(max(eval_pairs, 1)))
    if eval_pairs <= 0:
        return plan
    hp = np.sort(rng.choice(pool_u, size=min(side, len(pool_u)), replace=False)) if len(pool_u) else pool_u
    ht = np.sort(rng.choice(targ_u, size=min(side, len(targ_u)), replace=False)) if len(targ_u) else targ_u
    lp = np.sort(rng.choice(pool_l, size=min(side, len(pool_l)), replace=False))
    lt = np.sort(rng.choice(targ_l, size=min(side, len(targ_l)), replace=False))
    for kernel, quad, rows, cols in (("ff", "q2", hp, lp), ("ff", "q3", lp, hp), ("ff", "q4", hp, hp),
                                     ("ft", "q2", hp, lt), ("ft", "q3", lp, ht), ("ft", "q4", hp, ht)):  # fmt: skip
        if len(rows) and len(cols):
            plan.sets.append(LabelSet(kernel, quad, rows, cols))
    return plan


def plan_items(m: int, fraction: float, min_count: int, eval_items: int, seed: int) -> LabelPlan:
    """The label plan of a pointwise teacher: a seeded ``fraction`` of D_F (at least ``min(min_count, m)``
    items) labeled for training (kernel ``item``, quadrant q1), and up to ``eval_items`` of the held-out
    items labeled for the report (q2). Sets are ``paired`` with column 0 (one score per item).
    """
    rng = np.random.default_rng([seed, 1])
    pool_l = sample_fraction(m, fraction, min(min_count, m), rng)
    pool_u = np.setdiff1d(np.arange(m), pool_l)
    plan = LabelPlan(pool_l, np.zeros(0, np.int64), design="items")
    plan.sets.append(LabelSet("item", "q1", pool_l, np.zeros(len(pool_l), np.int64), paired=True))
    if eval_items > 0 and len(pool_u):
        held = np.sort(rng.choice(pool_u, size=min(eval_items, len(pool_u)), replace=False)).astype(np.int64)
        plan.sets.append(LabelSet("item", "q2", held, np.zeros(len(held), np.int64), paired=True))
    return plan


def cap_plan(plan: LabelPlan, max_pairs: int | None, seed: int) -> LabelPlan:
    """Cap the teacher work of ``plan`` at ``max_pairs`` pairs (items, for a pointwise plan) in all.

    The evaluation sets (Q2-Q4) and the K_FF diagonal are kept whole; the training (Q1) labels share what is
    left: a pointwise or dense Q1 set keeps a seeded subset of its rows, and the rectangles of the spread /
    active designs are kept whole, in a seeded order, while they fit (both kernels alternately, so neither
    is starved). Items whose training labels are dropped stay out of the held-out quadrants (they were
    drawn as labeled), so Q2-Q4 stay honest.

    Raises:
        ValueError: the evaluation sets and the diagonal alone exceed ``max_pairs`` (the message gives the
            minimum).
    """
    if max_pairs is None or sum(s.num_pairs for s in plan.sets) <= max_pairs:
        return plan
    fixed = [s for s in plan.sets if s.quadrant != "q1"]
    q1 = [s for s in plan.sets if s.quadrant == "q1"]
    left = max_pairs - sum(s.num_pairs for s in fixed)
    if left <= 0:
        raise ValueError(
            f"label.max_pairs={max_pairs:,} leaves no training pairs: the evaluation sets and the diagonal "
            f"alone need {max_pairs - left:,} (lower label.eval_pairs, or set label.diagonal=false)"
        )
    rng = np.random.default_rng([seed, 9])
    kept: list[LabelSet] = []
    if len({s.kernel for s in q1}) == len(q1):
        # one set per kernel (block design, pointwise): each keeps a seeded subset of its rows
        share = left // len(q1)
        for s in q1:
            per_row = 1 if s.paired else max(1, len(s.cols))
            keep = np.sort(rng.permutation(len(s.rows))[: max(0, share // per_row)])
            kept.append(LabelSet(s.kernel, s.quadrant, s.rows[keep], s.cols[keep] if s.paired else s.cols, s.paired))
    else:  # many rectangles: whole ones in a seeded order, the kernels interleaved
        by_kernel = {k: [q1[i] for i in rng.permutation(len(q1)) if q1[i].kernel == k] for k in ("ff", "ft", "item")}
        order = [s for group in zip(*[v for v in by_kernel.values() if v], strict=False) for s in group]
        order += [s for v in by_kernel.values() for s in v[min(len(x) for x in by_kernel.values() if x) :]]
        for s in order:
            if s.num_pairs <= left:
                kept.append(s)
                left -= s.num_pairs
    return LabelPlan(plan.pool_labeled, plan.target_labeled, kept + fixed, plan.design)


def spread_sets(
    kernel: str, pool_l: np.ndarray, col_l: np.ndarray, partners: int, rng: np.random.Generator
) -> list[LabelSet]:
    """Q1 rectangles of the ``spread`` design: each labeled example in one (partners x partners) rectangle.

    K_FF: the examples are columns (``K_FF[i, j] = U(j -> i)``), grouped ``partners`` at a time (at most half
    the labeled items), each group with ``partners`` labeled rows outside the group. K_FT: the examples are pool rows, each group with
    ``partners`` labeled targets. Partners are drawn from a stream of seeded permutations, so every labeled
    item is used as a partner about equally often (balanced coverage, not independent draws).
    """
    examples = pool_l[rng.permutation(len(pool_l))]
    others = pool_l if kernel == "ff" else col_l
    stream = _PermutationStream(others, rng)
    # in K_FF a group's partners come from outside the group: keep groups at most half the labeled items
    size = max(1, min(partners, len(examples) // 2)) if kernel == "ff" else partners
    sets = []
    for g0 in range(0, len(examples), size):
        group = np.sort(examples[g0 : g0 + size])
        exclude = group if kernel == "ff" else group[:0]
        k = min(partners, len(others) - len(np.intersect1d(others, exclude)))
        if k <= 0:
            continue
        mates = np.sort(stream.take(k, exclude)).astype(np.int64)
        sets.append(LabelSet(kernel, "q1", mates, group) if kernel == "ff" else LabelSet(kernel, "q1", group, mates))
    return sets


@dataclass(frozen=True)
class Design:
    """One ``label.design``: the training pairs (Q1) of a kernel over its labeled items (see :func:`plan_labels`).

    Attributes:
        train_sets: ``(kernel, pool_labeled, col_labeled, partners, rng) -> [LabelSet]``; ``rng`` is the design's
            own seeded generator (the other draws of the plan do not depend on it).
        min_count: ``label.min_count`` floors the labeled items of each side (else ``fraction`` alone sets them).
        second_round: more training pairs are chosen after a first fit (:mod:`nncift.labels.active`), so the
            whole plan is not known up front (``label.max_pairs`` cannot cap it yet).
    """

    train_sets: Callable[[str, np.ndarray, np.ndarray, int, np.random.Generator], list[LabelSet]]
    min_count: bool = False
    second_round: bool = False


DESIGNS: Registry[Design] = Registry("label design")
DESIGNS.register("block")(Design(lambda kernel, rows, cols, partners, rng: [LabelSet(kernel, "q1", rows, cols)],
                                 min_count=True))  # fmt: skip
DESIGNS.register("spread")(Design(spread_sets))
# active: its first round is spread with half the partners; the pipeline plans the second (nncift.labels.active)
DESIGNS.register("active")(Design(lambda kernel, rows, cols, partners, rng:
                                  spread_sets(kernel, rows, cols, max(1, partners // 2), rng),
                                  second_round=True))  # fmt: skip


class _PermutationStream:
    """Items of ``items`` in consecutive seeded permutations; :meth:`take` returns distinct ones."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self.items, self.rng = np.asarray(items), rng
        self.buf = np.empty(0, self.items.dtype)

    def take(self, k: int, exclude: np.ndarray) -> np.ndarray:
        """``k`` distinct items not in ``exclude`` (requires that many to exist)."""
        out = np.empty(0, self.items.dtype)
        while len(out) < k:
            while len(self.buf) < 2 * k + len(exclude):
                self.buf = np.concatenate([self.buf, self.rng.permutation(self.items)])
            window = self.buf[: k - len(out) + len(exclude)]
            ok = ~np.isin(window, exclude) & ~np.isin(window, out)
            _, first = np.unique(window, return_index=True)
            dedup = np.zeros(len(window), bool)
            dedup[first] = True
            fresh = window[ok & dedup][: k - len(out)]
            used = len(window) if len(fresh) < k - len(out) else int(np.flatnonzero(ok & dedup)[len(fresh) - 1]) + 1
            out = np.concatenate([out, fresh])
            self.buf = self.buf[used:]
        return out


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
