"""Selection on a run's estimated kernels (dense tiles, sparse stripes or item scores, through
:mod:`nncift.kernels.kernel_io`): the objective of ``select.*`` and the ``selection.parquet`` it writes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from nncift.kernels.kernel_io import read_meta
from nncift.store import write_jsonl, write_parquet

if TYPE_CHECKING:
    from nncift.stages.base import Context


def select_dense(ctx: Context, block_dir: Path, m: int, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Greedy on dense kernel tiles: (indices (budget,) int64, gains (budget,) float64, objective value).

    Args:
        block_dir: folder of the dense tiles (``estimate/blocks`` or a score's ``blocks``): K_FF (m, m) and
            K_FT (m, N) float32 are assembled from it.
        m: items (rows and candidates). budget: picks.
    """
    from nncift.kernels.kernel_io import assemble_dense
    from nncift.selection.greedy import greedy_select, minmax_scale, objective_value

    c = ctx.cfg.select
    if c.algorithm != "lazy":
        raise NotImplementedError(
            f"select.algorithm={c.algorithm} runs on the sparse layout: set estimate.layout=sparse"
        )
    _, n = ctx.size()
    k_ff, k_ft = assemble_dense(block_dir, "ff", (m, m)), assemble_dense(block_dir, "ft", (m, n))
    idx, gains = greedy_select(k_ff, budget, objective=c.objective, k_ft=k_ft, eta=c.eta, nu=c.nu)
    value = objective_value(minmax_scale(k_ff), idx, c.objective, minmax_scale(k_ft), c.eta, c.nu)
    return idx, gains, value


def select_sparse(ctx: Context, block_dir: Path, m: int, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Selection on per-row top-k stripes (``block_dir``, m rows); nothing of size m x m or m x N is allocated."""
    from nncift.kernels.kernel_io import read_row_means, read_sparse, sparse_extent
    from nncift.selection import sparse as ss

    c = ctx.cfg.select
    if c.objective == "topk":  # each K_FT row's mean over every target (recorded by the estimate stage)
        return ss.topk_scores(read_row_means(block_dir, "ft", m), *sparse_extent(block_dir, "ft"), budget)
    if c.algorithm == "greedi":  # each part's task reads its own sub-kernel from the stripes
        if c.objective == "flcg":
            raise NotImplementedError("select.algorithm=greedi supports fl and flmi (not flcg)")
        src = ss.StripeSource(str(block_dir), m, c.objective, c.eta)
        idx, gains = ctx.executor.greedi(src, ss.partition_items(m, c.parts, ctx.cfg.seed), budget)
        return idx, gains, ss.sparse_objective(ss.stripe_kernel(src, cols=idx)[0], idx)
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
    else:
        idx, gains = ss.stochastic_greedy(kern, budget, c.eps, ctx.cfg.seed, floor)
    return idx, gains, ss.sparse_objective(kern, idx, floor)


def select_items(ctx: Context, kernel_dir: Path, m: int, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k of a pointwise run's estimated scores (the item scores of ``kernel_dir`` for m items; ties by index)."""
    from nncift.kernels.kernel_io import item_scores

    s = item_scores(kernel_dir, m)
    order = np.lexsort((np.arange(len(s)), -s))[:budget].astype(np.int64)
    return order, s[order].astype(np.float64), float(s[order].sum())


def select_on(ctx: Context, kernel_dir: Path, rows: pa.Table, out_dir: Path) -> dict[str, Any]:
    """The configured selection over the items of ``rows`` (their ``idx`` = 0..len-1 in the kernels) on the
    estimated kernels in ``kernel_dir`` (``kernels.json`` + ``blocks/`` or ``scores.parquet``, as the estimate
    stage writes them); writes ``out_dir/selection.parquet`` and ``out_dir/selected.jsonl``.

    Returns:
        the facts of the selection (objective, budget, value, layout, algorithm).
    """
    c = ctx.cfg.select
    m = rows.num_rows
    budget = max(1, int(c.fraction * m))
    layout = read_meta(kernel_dir)["layout"]
    if layout == "items":
        idx, gains, value = select_items(ctx, kernel_dir, m, budget)
    else:
        pick = select_dense if layout == "dense" else select_sparse
        idx, gains, value = pick(ctx, kernel_dir / "blocks", m, budget)
    objective = "topk" if layout == "items" else c.objective
    take = pa.array(np.asarray(idx, np.int64))
    write_parquet(
        out_dir / "selection.parquet",
        pa.table(
            {
                "id": rows.column("id").take(take).combine_chunks(),
                "rank": np.arange(len(idx), dtype=np.int64),
                "gain": np.asarray(gains, np.float64),
                "index": idx,
            }
        ),
        metadata={"objective": objective, "budget": budget, "value": value, "layout": layout},
    )
    text = [c for c in ("id", "prompt", "response", "idx") if c in rows.column_names]
    write_jsonl(out_dir / "selected.jsonl", rows.select(text).take(take))
    return {
        "objective": objective,
        "budget": budget,
        "value": value,
        "layout": layout,
        "algorithm": "topk" if layout == "items" else c.algorithm,
    }
