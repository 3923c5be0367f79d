"""The expensive influence functions ("teachers") that NN-CIFT learns to imitate, as registered plugins.

A teacher is one module: a subclass of :class:`InfluenceFunction` (pairwise, U(example -> target)) or of
:class:`PointwiseInfluenceFunction` (one score per item), decorated with :func:`register`, optionally with a
config dataclass of its own (``config = MyConfig``) that the run configuration exposes as the section named
like the teacher (``label.function=less`` reads ``less.*``). Built-in teachers are imported below; third-party
ones are found through the ``nncift.teachers`` entry-point group. See ``docs/teachers.md``.

Orientation of the kernels built from a pairwise teacher is fixed by :meth:`InfluenceFunction.kernel_block`.
"""

from __future__ import annotations

from nncift.influence.delift_se import DeliftSE
from nncift.influence.interface import InfluenceFunction, Items, PointwiseInfluenceFunction
from nncift.influence.plugins import (
    BUILTIN,
    build_influence_function,
    function_traits,
    register,
    teacher_class,
    teachers,
)

__all__ = [
    "BUILTIN",
    "DeliftSE",
    "InfluenceFunction",
    "Items",
    "PointwiseInfluenceFunction",
    "build_influence_function",
    "function_traits",
    "register",
    "teacher_class",
    "teachers",
]
