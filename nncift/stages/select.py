"""Stage ``select``: the teacher's own selection objective (facility location, FLMI, FLCG or top-k) on the
estimated kernels; top-k of the estimated scores for a pointwise teacher.

Reads: ``estimate/`` (dense tiles, sparse top-k stripes, or item scores), ``data/pool.parquet``.
Writes: ``select/selection.parquet`` (``id``, ``rank``, ``gain``, ``index``; metadata: objective, budget,
value, layout) and ``select/selected.jsonl`` (the chosen rows).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from nncift.stages.base import Context, Stage
from nncift.store import write_parquet, write_text


def select_dense(ctx: Context, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Greedy on the dense estimated kernels: (indices, gains, objective value)."""
    from nncift.select import greedy_select, minmax_scale, objective_value
    from nncift.stages.estimate import dense_kernels

    c = ctx.cfg.select
    if c.algorithm != "lazy":
        raise NotImplementedError(
            f"select.algorithm={c.algorithm} runs on the sparse layout: set estimate.layout=sparse"
        )
    k_ff, k_ft = dense_kernels(ctx)
    idx, gains = greedy_select(k_ff, budget, objective=c.objective, k_ft=k_ft, eta=c.eta, nu=c.nu)
    value = objective_value(minmax_scale(k_ff), idx, c.objective, minmax_scale(k_ft), c.eta, c.nu)
    return idx, gains, value


def select_sparse(ctx: Context, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Selection on the per-row top-k kernels; nothing of size M x M or M x N is allocated."""
    from nncift import select_sparse as ss
    from nncift.estimate import read_row_means, read_sparse, sparse_extent

    c = ctx.cfg.select
    block_dir = ctx.path("estimate", "blocks")
    m, _ = ctx.size()
    if c.objective == "topk":  # each K_FT row's mean over every target (recorded by the estimate stage)
        return ss.topk_scores(read_row_means(block_dir, "ft", m), *sparse_extent(block_dir, "ft"), budget)
    ff_cols, ff_vals = read_sparse(block_dir, "ff", m)
    ft_vals = read_sparse(block_dir, "ft", m)[1] if c.objective in ("flmi", "flcg") else None
    kern, floor = ss.fl_kernel_from_topk(
        ff_cols,
        ff_vals,
        sparse_extent(block_dir, "ff"),
        ft_vals,
        sparse_extent(block_dir, "ft") if ft_vals is not None else None,
        c.objective,
        c.eta,
        c.nu,
    )
    if c.algorithm == "lazy":
        idx, gains = ss.sparse_lazy_greedy(kern, budget, floor)
    elif c.algorithm == "stochastic":
        idx, gains = ss.stochastic_greedy(kern, budget, c.eps, ctx.cfg.seed, floor)
    else:
        if floor is not None:
            raise NotImplementedError("select.algorithm=greedi supports fl and flmi (not flcg)")
        idx, gains = ctx.executor.greedi(kern, ss.partition_items(m, c.parts, ctx.cfg.seed), budget)
    return idx, gains, ss.sparse_objective(kern, idx, floor)


def select_items(ctx: Context, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k of a pointwise run's estimated scores (ties by index)."""
    from nncift.stages.estimate import item_scores

    s = item_scores(ctx)
    order = np.lexsort((np.arange(len(s)), -s))[:budget].astype(np.int64)
    return order, s[order].astype(np.float64), float(s[order].sum())


class SelectStage(Stage):
    name = "select"
    sections = ("select",)
    after = ("estimate",)
    reads = ("estimate/", "data/pool.parquet")
    writes = ("select/selection.parquet", "select/selected.jsonl")

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        c = ctx.cfg.select
        pool, _ = ctx.tables()
        m = pool.num_rows
        budget = max(1, int(c.fraction * m))
        layout = json.loads(ctx.path("estimate", "kernels.json").read_text())["layout"]
        pick = {"dense": select_dense, "sparse": select_sparse, "items": select_items}[layout]
        idx, gains, value = pick(ctx, budget)
        objective = "topk" if layout == "items" else c.objective
        ids = pool.column("id").to_pylist()
        write_parquet(
            ctx.path("select", "selection.parquet"),
            pa.table(
                {
                    "id": [ids[i] for i in idx],
                    "rank": np.arange(len(idx), dtype=np.int64),
                    "gain": np.asarray(gains, np.float64),
                    "index": idx,
                }
            ),
            metadata={"objective": objective, "budget": budget, "value": value, "layout": layout},
        )
        chosen = pool.take(pa.array(idx))
        lines = [json.dumps(r, ensure_ascii=False) for r in chosen.to_pylist()]
        write_text(ctx.path("select", "selected.jsonl"), "\n".join(lines) + "\n")
        return {
            "objective": objective,
            "budget": budget,
            "value": value,
            "layout": layout,
            "algorithm": "topk" if layout == "items" else c.algorithm,
        }
