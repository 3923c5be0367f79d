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

from nncift.labels.tables import exact_kernels, exact_scores
from nncift.selection.subsets import budget
from nncift.stages.base import Context, Stage
from nncift.store import done_blocks, write_parquet

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
        from nncift.labels.plan import LabelSet
        from nncift.selection.greedy import greedy_select

        m, n = ctx.size()
        rows = np.arange(m, dtype=np.int64)
        if ctx.pointwise():  # every item's score
            sets = [LabelSet("item", "all", rows, np.zeros(m, np.int64), paired=True)]
            extra = (rows, np.zeros(0, np.int64))
        else:
            sets = [LabelSet("ff", "all", rows, rows), LabelSet("ft", "all", rows, np.arange(n, dtype=np.int64))]
            extra = (rows, np.arange(n, dtype=np.int64))
        specs = plan_blocks(SimpleNamespace(sets=sets), label_block_side(ctx))
        block_dir = ctx.path("exact", "blocks")
        ok = done_blocks(block_dir, {f"{s['block_id']:06d}.parquet": s["pairs"] for s in specs})
        todo = [s for s in specs if f"{s['block_id']:06d}.parquet" not in ok]
        total = m if ctx.pointwise() else m * m + m * n
        log.info("exact subset: labeling %d %s in %d blocks (%d done)", total,
                 "items" if ctx.pointwise() else "pairs", len(specs), len(specs) - len(todo))  # fmt: skip
        kwargs = teacher_kwargs_for(ctx, *extra)  # a per-item teacher prepares every item: the full teacher cost
        run_label_blocks(ctx, sets, specs, todo, block_dir, desc="exact labels", kwargs=kwargs)
        s = ctx.cfg.select
        if ctx.pointwise():
            scores = exact_scores(ctx, len(specs))
            idx = np.lexsort((np.arange(m), -scores))[: budget(ctx)]
        else:
            k_ff, k_ft = exact_kernels(ctx, len(specs))
            idx, _ = greedy_select(k_ff, budget(ctx), objective=s.objective, k_ft=k_ft, eta=s.eta, nu=s.nu)
        write_parquet(ctx.path("exact", "selection.parquet"), pa.table({"index": idx.astype(np.int64)}))
        return {"pairs": total, "budget": len(idx), "blocks": len(specs)}
