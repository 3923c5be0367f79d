"""Subset sizes and the subsets a run compares (the exact-function selection beside the run's own)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from nncift.errors import ConfigError

if TYPE_CHECKING:
    from nncift.stages.base import Context


def budget(ctx: Context) -> int:
    """The subset size: ``select.fraction * M`` (at least 1)."""
    m, _ = ctx.size()
    return max(1, int(ctx.cfg.select.fraction * m))


def exact_indices(ctx: Context) -> np.ndarray:
    """(k,) int64 indices of the exact-function selection (runs the stage unless finished)."""
    ctx.require("exact")
    return pq.read_table(ctx.path("exact", "selection.parquet")).column("index").to_numpy().astype(np.int64)


SUBSETS = ("base", "random", "nncift", "exact", "full")


def check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        raise ConfigError(f"unknown subset {subset!r} (known: {', '.join(SUBSETS)})")


def subset_indices(ctx: Context, subset: str) -> np.ndarray:
    """(k,) int64 indices into D_F of the rows ``subset`` trains on (runs the stages it needs)."""
    from nncift.selection.subsets import budget, exact_indices

    m, _ = ctx.size()
    if subset == "full":
        return np.arange(m, dtype=np.int64)
    if subset == "random":
        rng = np.random.default_rng([ctx.cfg.seed, 7])
        return np.sort(rng.choice(m, budget(ctx), replace=False)).astype(np.int64)
    if subset == "nncift":
        ctx.require("select")
        return pq.read_table(ctx.path("select", "selection.parquet")).column("index").to_numpy().astype(np.int64)
    if subset == "exact":
        return exact_indices(ctx)
    raise ValueError(f"subset {subset!r} has no training rows")


def upstream(ctx: Context, subset: str) -> dict[str, Any]:
    """What a subset's rows depend on (part of the fine-tune's fingerprint)."""
    if subset == "nncift":
        return {"selection": ctx.runner.identity("select")[0]}
    if subset == "exact":
        return {"exact": ctx.runner.identity("exact")[0]}
    if subset == "random":
        return {"random": [ctx.cfg.seed, ctx.cfg.select.fraction]}
    return {}
