"""Pairwise vs pointwise teachers as one strategy object: what a teacher's labels are, how many the full
space holds, which kernels a run fits, and what its exact labeling covers.

A pairwise teacher (``InfluenceFunction.kind == "pairwise"``) labels pairs U(example -> target): the run works
on K_FF (M x M) and K_FT (M x N). A pointwise teacher scores items: the run works on one ``item`` column of M
scores. Stages ask the run's :class:`TeacherKind` (``Context.kind()``) instead of branching on the name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TeacherKind:
    """The shape of a teacher's labels.

    Attributes:
        name: ``pairwise`` or ``pointwise`` (``InfluenceFunction.kind``).
        unit: what one label is, for messages and reports: ``pairs`` or ``items``.
        kernels: the kernels a run labels, fits and estimates: ``("ff", "ft")`` or ``("item",)``.
    """

    name: str
    unit: str
    kernels: tuple[str, ...]

    @property
    def pointwise(self) -> bool:
        return self.name == "pointwise"

    def total(self, m: int, n: int) -> int:
        """Labels in the full space of M pool and N target items: M*M + M*N pairs, or M items."""
        return m if self.pointwise else m * m + m * n

    def exact_sets(self, m: int, n: int) -> tuple[list, tuple[np.ndarray, np.ndarray]]:
        """The label sets that cover the full space, and the (pool, target) items they touch.

        Returns:
            (list of :class:`~nncift.labels.plan.LabelSet`, ((P,) int64 pool, (T,) int64 target indices)).
        """
        from nncift.labels.plan import LabelSet

        rows = np.arange(m, dtype=np.int64)
        if self.pointwise:  # every item's score
            return [LabelSet("item", "all", rows, np.zeros(m, np.int64), paired=True)], (rows, np.zeros(0, np.int64))
        cols = np.arange(n, dtype=np.int64)
        return [LabelSet("ff", "all", rows, rows), LabelSet("ft", "all", rows, cols)], (rows, cols)


PAIRWISE = TeacherKind("pairwise", "pairs", ("ff", "ft"))
POINTWISE = TeacherKind("pointwise", "items", ("item",))
KINDS = {k.name: k for k in (PAIRWISE, POINTWISE)}


def teacher_kind(name: str) -> TeacherKind:
    """The :class:`TeacherKind` of ``InfluenceFunction.kind`` ``name``."""
    if name not in KINDS:
        raise ValueError(f"unknown teacher kind {name!r} (known: {', '.join(KINDS)})")
    return KINDS[name]
