"""Stage ``select``: the teacher's own selection objective (facility location, FLMI, FLCG or top-k) on the
estimated kernels; top-k of the estimated scores for a pointwise teacher.

Reads: ``estimate/`` (dense tiles, sparse top-k stripes, or item scores), ``data/pool.parquet``.
Writes: ``select/selection.parquet`` (``id``, ``rank``, ``gain``, ``index``; metadata: objective, budget,
value, layout) and ``select/selected.jsonl`` (the chosen rows).
"""

from __future__ import annotations

from typing import Any

from nncift.selection.from_kernels import select_on
from nncift.stages.base import Context, Stage


class SelectStage(Stage):
    name = "select"
    sections = ("select",)
    after = ("estimate",)
    reads = ("estimate/", "data/pool.parquet")
    writes = ("select/selection.parquet", "select/selected.jsonl")

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        pool, _ = ctx.tables(["id", "prompt", "response", "idx"])
        return select_on(ctx, ctx.store.stage_dir("estimate"), pool, ctx.store.stage_dir("select"))
