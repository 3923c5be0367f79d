"""The expensive influence functions ("teachers") that NN-CIFT learns to imitate.

Each function implements :meth:`InfluenceFunction.utility` (U(example -> target)); orientation of the
kernels built from it is fixed by :meth:`InfluenceFunction.kernel_block`.
"""

from __future__ import annotations

from typing import Any

from nncift.influence.base import InfluenceFunction, Items
from nncift.influence.delift_se import DeliftSE

FUNCTIONS = ("delift_se", "delift_icl", "table")


def build_influence_function(name: str, **kwargs: Any) -> InfluenceFunction:
    """Instantiate the influence function ``name`` (one of :data:`FUNCTIONS`)."""
    if name == "delift_se":
        return DeliftSE()
    if name == "table":
        from nncift.influence.table import TableFunction

        return TableFunction(kwargs["table"], symmetric=kwargs.get("symmetric", False), field=kwargs.get("field"))
    if name == "delift_icl":
        backend = kwargs.pop("backend", "hf")
        if backend == "vllm":
            from nncift.influence.delift_icl_vllm import build_delift_icl_vllm

            return build_delift_icl_vllm(**kwargs)
        from nncift.influence.delift_icl import build_delift_icl

        return build_delift_icl(**kwargs)
    raise ValueError(f"unknown influence function {name!r} (known: {', '.join(FUNCTIONS)})")


def function_traits(name: str) -> dict[str, Any]:
    """Class-level traits of a function without building it (no model is loaded): ``symmetric``,
    ``exact_is_cheap``, ``pairs_per_second``."""
    if name == "delift_se":
        cls: type[InfluenceFunction] = DeliftSE
    elif name == "table":
        from nncift.influence.table import TableFunction

        cls = TableFunction
    elif name == "delift_icl":
        from nncift.influence.delift_icl import DeliftICL

        cls = DeliftICL
    else:
        raise ValueError(f"unknown influence function {name!r} (known: {', '.join(FUNCTIONS)})")
    return {"symmetric": cls.symmetric, "exact_is_cheap": cls.exact_is_cheap, "pairs_per_second": cls.pairs_per_second}


__all__ = ["FUNCTIONS", "DeliftSE", "InfluenceFunction", "Items", "build_influence_function", "function_traits"]
