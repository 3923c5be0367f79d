"""The expensive influence functions ("teachers") that NN-CIFT learns to imitate.

Each function implements :meth:`InfluenceFunction.utility` (U(example -> target)); orientation of the
kernels built from it is fixed by :meth:`InfluenceFunction.kernel_block`.
"""

from __future__ import annotations

from typing import Any

from nncift.influence.base import InfluenceFunction, Items
from nncift.influence.delift_se import DeliftSE

FUNCTIONS = ("delift_se", "delift_icl")


def build_influence_function(name: str, **kwargs: Any) -> InfluenceFunction:
    """Instantiate the influence function ``name`` (one of :data:`FUNCTIONS`)."""
    if name == "delift_se":
        return DeliftSE()
    if name == "delift_icl":
        raise NotImplementedError(
            "label.function=delift_icl (the DELIFT in-context-learning utility) is not implemented yet "
            "(tracked in issue #3); use label.function=delift_se"
        )
    raise ValueError(f"unknown influence function {name!r} (known: {', '.join(FUNCTIONS)})")


__all__ = ["FUNCTIONS", "DeliftSE", "InfluenceFunction", "Items", "build_influence_function"]
