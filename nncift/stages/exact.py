"""Stage ``exact``: the selection objective on the teacher's own kernels labeled on every pair (the
``exact`` subset of a comparison; affordable only while ``M*M + M*N <= eval.exact_max_pairs``).

Reads: ``data/*.parquet``, ``embed/embeddings.safetensors``.
Writes: ``exact/blocks/<id>.parquet`` (every teacher pair, resumable), ``exact/selection.parquet`` (``index``).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from nncift.labels.tables import block_key, exact_kernels, exact_scores
from nncift.selection.subsets import budget
from nncift.stages.base import Context, Stage
from nncift.store import todo_blocks, write_parquet

log = logging.getLogger(__name__)


class ExactSelectStage(Stage):
    name = "exact"
    sections = ("label", "select")
    after = ("embed",)
    reads = ("data/pool.parquet", "data/target.parquet", "embed/embeddings.safetensors")
    writes = ("exact/blocks/", "exact/selection.parquet")

    def config_sections(self, cfg) -> tuple[str, ...]:
        from nncift.labels.fanout import label_sections

        return (*label_sections(cfg), "select")

    def validate(self, ctx: Context, **params: Any) -> None:
        m, n = ctx.size()
        limit = ctx.cfg.eval.exact_max_pairs
        if m * m + m * n > limit:
            raise NotImplementedError(
                f"the exact-function subset labels all {m * m + m * n:,} pairs, more than "
                f"eval.exact_max_pairs={limit:,}"
            )

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.labels.fanout import label_block_side, run_label_blocks, teacher_kwargs_for
        from nncift.labels.label_worker import plan_blocks
        from nncift.selection.greedy import greedy_select

        m, n = ctx.size()
        kind = ctx.kind()
        sets, extra = kind.exact_sets(m, n)
        specs = plan_blocks(SimpleNamespace(sets=sets), label_block_side(ctx))
        block_dir = ctx.path("exact", "blocks")
        todo = todo_blocks(block_dir, specs, block_key)
        total = kind.total(m, n)
        log.info("exact subset: labeling %d %s in %d blocks (%d done)", total, kind.unit, len(specs),
                 len(specs) - len(todo))  # fmt: skip
        kwargs = teacher_kwargs_for(ctx, *extra)  # a per-item teacher prepares every item: the full teacher cost
        run_label_blocks(ctx, sets, specs, todo, block_dir, desc="exact labels", kwargs=kwargs)
        s = ctx.cfg.select
        if kind.pointwise:
            scores = exact_scores(ctx, len(specs))
            idx = np.lexsort((np.arange(m), -scores))[: budget(ctx)]
        else:
            k_ff, k_ft = exact_kernels(ctx, len(specs))
            idx, _ = greedy_select(k_ff, budget(ctx), objective=s.objective, k_ft=k_ft, eta=s.eta, nu=s.nu)
        write_parquet(ctx.path("exact", "selection.parquet"), pa.table({"index": idx.astype(np.int64)}))
        return {"pairs": total, "budget": len(idx), "blocks": len(specs)}
