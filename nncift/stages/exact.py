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
import pyarrow.parquet as pq

from nncift.stages.base import Context, Stage
from nncift.store import done_blocks, write_parquet

log = logging.getLogger(__name__)


def budget(ctx: Context) -> int:
    """The subset size: ``select.fraction * M`` (at least 1)."""
    m, _ = ctx.size()
    return max(1, int(ctx.cfg.select.fraction * m))


class ExactSelectStage(Stage):
    name = "exact"
    sections = ("label", "select")
    after = ("embed",)
    reads = ("data/pool.parquet", "data/target.parquet", "embed/embeddings.safetensors")
    writes = ("exact/blocks/", "exact/selection.parquet")

    def config_sections(self, cfg) -> tuple[str, ...]:
        from nncift.stages import STAGES

        return (*STAGES["label"].config_sections(cfg), "select")

    def validate(self, ctx: Context, **params: Any) -> None:
        m, n = ctx.size()
        limit = ctx.cfg.eval.exact_max_pairs
        if m * m + m * n > limit:
            raise NotImplementedError(
                f"the exact-function subset labels all {m * m + m * n:,} pairs, more than "
                f"eval.exact_max_pairs={limit:,}"
            )

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.labels.plan import LabelSet
        from nncift.labels.worker import plan_blocks
        from nncift.selection.greedy import greedy_select
        from nncift.stages.label import label_block_side, run_label_blocks, teacher_kwargs_for

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


def _exact_table(ctx: Context, n_blocks: int | None = None):
    from nncift.labels.worker import gather_labels

    if n_blocks is None:
        n_blocks = int(ctx.store.done_info("exact")["blocks"])
    return gather_labels(ctx.path("exact", "blocks"), n_blocks)


def exact_kernels(ctx: Context, n_blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's full K_FF (M, M) and K_FT (M, N) float32 from the exact stage's labels."""
    m, n = ctx.size()
    t = _exact_table(ctx, n_blocks)
    kern = np.asarray(t.column("kernel").to_pylist())
    r, col, v = t.column("row").to_numpy(), t.column("col").to_numpy(), t.column("value").to_numpy()
    k_ff = np.zeros((m, m), np.float32)
    k_ft = np.zeros((m, n), np.float32)
    ff = kern == "ff"
    k_ff[r[ff], col[ff]] = v[ff]
    k_ft[r[~ff], col[~ff]] = v[~ff]
    return k_ff, k_ft


def exact_scores(ctx: Context, n_blocks: int | None = None) -> np.ndarray:
    """(M,) float32 teacher score of every item of a pointwise run (the exact stage's labels)."""
    m, _ = ctx.size()
    t = _exact_table(ctx, n_blocks)
    out = np.full(m, np.nan, np.float32)
    out[t.column("row").to_numpy()] = t.column("value").to_numpy()
    return out


def exact_indices(ctx: Context) -> np.ndarray:
    """(k,) int64 indices of the exact-function selection (runs the stage unless finished)."""
    ctx.require("exact")
    return pq.read_table(ctx.path("exact", "selection.parquet")).column("index").to_numpy().astype(np.int64)
