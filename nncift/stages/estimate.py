"""Stage ``estimate``: the surrogate's estimate of the full K_FF (M x M) and K_FT (M x N), in blocks over the
executor's workers; or, for a pointwise teacher, one score per pool item.

Reads: ``embed/embeddings.safetensors``, ``fit/network_*``, ``label/labels.parquet`` (the exact diagonal).
Writes: ``estimate/blocks/<ff|ft>_<id>.parquet`` (dense tiles, or per-row top-k stripes on the sparse
layout, each with the stripe's extent and row means), ``estimate/kernels.json`` (shapes, layout);
pointwise: ``estimate/scores.parquet`` (``idx``, ``score``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from nncift.kernels.kernel_io import write_item_scores, write_meta
from nncift.stages.base import Context, Stage
from nncift.store import todo_blocks
from nncift.surrogate.recipes import estimator_heads

log = logging.getLogger(__name__)


def layout(ctx: Context) -> str:
    """dense or sparse, from ``estimate.layout`` (auto: dense while M*M <= ``estimate.dense_max_pairs`` and
    there is no candidate search)."""
    c = ctx.cfg.estimate
    if c.layout != "auto":
        return c.layout
    if c.candidates != "exhaustive":  # candidate search keeps each row's top-k: the sparse layout
        return "sparse"
    m, _ = ctx.size()
    return "dense" if m * m <= c.dense_max_pairs else "sparse"


def factor_file(ctx: Context, heads: dict[str, dict]) -> dict[str, dict]:
    """Write the heads' per-item factors to ``estimate/factors.safetensors`` once and return the heads with
    the arrays replaced by that path (``factors``): workers, local or on Ray, memory-map the file instead of
    receiving copies, and the driver keeps only the mapped pages it touches."""
    from nncift.store import memmap_safetensors, write_safetensors

    path = ctx.path("estimate", "factors.safetensors")
    write_safetensors(path, {f"{k}.{n}": h[n] for k, h in heads.items() for n in ("p", "q")})
    mm = memmap_safetensors(path)
    out = {}
    for k, h in heads.items():
        out[k] = {n: v for n, v in h.items() if n not in ("p", "q")}
        out[k]["factors"] = str(path)
        out[k]["p"], out[k]["q"] = mm[f"{k}.p"], mm[f"{k}.q"]  # the driver's own (mapped) view
    return out


def candidate_indexes(ctx: Context, heads: dict[str, dict], lay: str) -> dict[str, Any]:
    """``estimate.candidates=ivf``: per kernel with at least ``candidates_min_cols`` columns, the path of a MIPS
    index over its column factors (built once, in ``estimate/index_<kernel>.faiss``; reused on resume)."""
    from nncift.errors import ConfigError
    from nncift.surrogate import mips

    c = ctx.cfg.estimate
    if c.candidates != "ivf":
        return {}
    if lay != "sparse":
        raise ConfigError(f"config field 'estimate.candidates': ivf needs the sparse layout (this run is {lay})")
    out = {}
    for kernel, head in heads.items():
        n_cols = len(head["q"])
        if n_cols < c.candidates_min_cols:
            log.info("estimate: kernel %s has %d columns (< estimate.candidates_min_cols): exhaustive", kernel, n_cols)
            continue
        path = ctx.path("estimate", f"index_{kernel}.faiss")
        if not path.is_file():
            nlist = c.nlist or mips.auto_nlist(n_cols)
            t0 = time.perf_counter()
            mips.save_index(mips.build_index(head["q"], nlist, seed=ctx.cfg.seed), path)
            log.info("estimate: kernel %s IVF index, %d cells over %d columns, in %.1f s",
                     kernel, nlist, n_cols, time.perf_counter() - t0)  # fmt: skip
        out[kernel] = path
    return out


def candidate_recall(ctx: Context, head: dict, block_dir, kernel: str, sample: int) -> float:
    """Top-k recall of the written candidate stripes against exhaustive estimation on a seeded row sample."""
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.kernels.kernel_io import read_sparse_rows
    from nncift.surrogate.mips import topk_recall

    n_rows = len(head["p"])
    if sample == 0:
        return float("nan")
    rng = np.random.default_rng([ctx.cfg.seed, 7])
    rows = np.sort(rng.choice(n_rows, min(sample, n_rows), replace=False))
    exact = EstimateWorker({kernel: head}, str(block_dir), layout="sparse", topk=ctx.cfg.estimate.topk)
    return topk_recall(read_sparse_rows(block_dir, kernel, rows), exact.exact_topk(kernel, rows)[0])


class EstimateStage(Stage):
    name = "estimate"
    sections = ("estimate",)
    after = ("choose",)
    reads = (
        "embed/embeddings.safetensors",
        "fit/network_ff.safetensors",
        "fit/network_ft.safetensors",
        "choose/choice.json",
        "choose/recipes.safetensors",
        "choose/views.safetensors",
    )
    writes = ("estimate/blocks/", "estimate/kernels.json", "estimate/scores.parquet", "estimate/factors.safetensors")

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        if ctx.pointwise():
            return self._pointwise(ctx)
        from nncift.kernels.estimate_worker import EstimateWorker
        from nncift.labels.plan import block_grid

        c = ctx.cfg.estimate
        m, n = ctx.size()
        lay = layout(ctx)
        heads = factor_file(ctx, estimator_heads(ctx))
        # dense: tiles; sparse: row stripes spanning every column, each reduced to its own top-k
        sparse = lay == "sparse"
        blocks = block_grid("ff", m, m, c.block_size, col_size=m if sparse else None)
        blocks += block_grid("ft", m, n, c.block_size, start_id=len(blocks), col_size=n if sparse else None)
        block_dir = ctx.path("estimate", "blocks")
        todo = [b.to_dict() for b in todo_blocks(block_dir, blocks, lambda b: (f"{b.name}.parquet", b.r1 - b.r0))]
        log.info("estimate: %d blocks (%d already done), %d pairs", len(blocks), len(blocks) - len(todo), m * m + m * n)
        t0 = time.perf_counter()
        indexes = candidate_indexes(ctx, heads, lay)
        worker_kwargs = {
            "heads": {k: {n: v for n, v in h.items() if n not in ("p", "q")} for k, h in heads.items()},
            "out_dir": str(block_dir),
            "device": c.device,
            "layout": lay,
            "topk": c.topk,
            "col_chunk": c.col_chunk,
            "engine": c.engine,
            "precision": c.precision,
            "candidates": {k: str(v) for k, v in indexes.items()},
            "nprobe": c.nprobe,
            "extent_sample": c.extent_sample,
            "seed": ctx.cfg.seed,
        }
        ctx.fan_out(EstimateWorker, worker_kwargs, todo, "estimate", c)
        dt = time.perf_counter() - t0
        recall = {k: candidate_recall(ctx, heads[k], block_dir, k, c.recall_sample) for k in indexes}
        for k, r in recall.items():
            log.info("estimate: kernel %s candidate top-%d recall %.4f vs exhaustive (%d sampled rows)",
                     k, c.topk, r, min(c.recall_sample, m))  # fmt: skip
        write_meta(
            ctx.store.stage_dir("estimate"),
            {
                "ff": {"shape": [m, m]},
                "ft": {"shape": [m, n]},
                "layout": lay,
                "topk": c.topk,
                "blocks": len(blocks),
                "candidates": {k: {"recall": recall[k], "nprobe": c.nprobe} for k in indexes},
            },
        )
        out = {
            "pairs": m * m + m * n,
            "blocks": len(blocks),
            "map_seconds": dt,
            "layout": lay,
            "pairs_per_second": (m * m + m * n) / max(dt, 1e-9),
        }
        if indexes:
            out["candidates"] = "ivf"
            out["candidate_recall"] = recall
        return out

    def _pointwise(self, ctx: Context) -> dict[str, Any]:
        """Every pool item's score from the chosen pointwise candidate (the choose stage computed them all)."""
        import pyarrow.parquet as pq

        t0 = time.perf_counter()
        chosen = json.loads(ctx.path("choose", "choice.json").read_text())["chosen"]
        scores = pq.read_table(ctx.path("choose", "item_scores.parquet"), columns=[chosen]).column(0).to_numpy()
        scores = scores.astype(np.float32)
        dt = time.perf_counter() - t0
        write_item_scores(ctx.store.stage_dir("estimate"), scores, estimate=chosen)
        return {
            "pairs": len(scores),
            "blocks": 1,
            "map_seconds": dt,
            "layout": "items",
            "pairs_per_second": len(scores) / max(dt, 1e-9),
        }
