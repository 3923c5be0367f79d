"""Selection on a run's estimated kernels (dense tiles, sparse stripes or item scores, through
:mod:`nncift.kernels.kernel_io`): the objective of ``select.*`` and the ``selection.parquet`` it writes.

Three independent axes, as in submodlib: the objective (:data:`nncift.selection.greedy.OBJECTIVES`), the
greedy (:data:`ALGORITHMS`, ``select.algorithm``) and the layout the kernels were estimated in
(:data:`LAYOUTS`, ``estimate.layout``). An unsupported combination raises NotImplementedError naming the
setting to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from nncift.kernels.kernel_io import read_meta
from nncift.registry import Registry
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
    if not ALGORITHMS.get(c.algorithm).dense:
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
    from nncift.kernels.kernel_io import read_row_means, sparse_extent
    from nncift.selection import sparse as ss
    from nncift.selection.greedy import OBJECTIVES

    c = ctx.cfg.select
    if OBJECTIVES.get(c.objective).modular:  # each K_FT row's mean over every target (recorded by the estimate)
        return ss.topk_scores(read_row_means(block_dir, "ft", m), *sparse_extent(block_dir, "ft"), budget)
    return ALGORITHMS.get(c.algorithm).sparse(ctx, block_dir, m, budget)


def _sparse_kernel(ctx: Context, block_dir: Path, m: int) -> tuple[Any, np.ndarray | None]:
    """The scaled sparse facility-location kernel of ``select.objective`` and its floor, read whole from the
    stripes."""
    from nncift.kernels.kernel_io import read_sparse, sparse_extent
    from nncift.selection import sparse as ss
    from nncift.selection.greedy import OBJECTIVES

    c = ctx.cfg.select
    ff_cols, ff_vals = read_sparse(block_dir, "ff", m)
    ft_vals = read_sparse(block_dir, "ft", m)[1] if OBJECTIVES.get(c.objective).uses_ft else None
    return ss.fl_kernel_from_topk(
        ff_cols,
        ff_vals,
        sparse_extent(block_dir, "ff"),
        ft_vals,
        sparse_extent(block_dir, "ft") if ft_vals is not None else None,
        c.objective,
        c.eta,
        c.nu,
    )


def _lazy(ctx: Context, block_dir: Path, m: int, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    from nncift.selection import sparse as ss

    kern, floor = _sparse_kernel(ctx, block_dir, m)
    idx, gains = ss.sparse_lazy_greedy(kern, budget, floor)
    return idx, gains, ss.sparse_objective(kern, idx, floor)


def _stochastic(ctx: Context, block_dir: Path, m: int, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    from nncift.selection import sparse as ss

    kern, floor = _sparse_kernel(ctx, block_dir, m)
    idx, gains = ss.stochastic_greedy(kern, budget, ctx.cfg.select.eps, ctx.cfg.seed, floor)
    return idx, gains, ss.sparse_objective(kern, idx, floor)


def _greedi(ctx: Context, block_dir: Path, m: int, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """GreeDi: each part's task reads its own sub-kernel from the stripes, then the merge."""
    from nncift.selection import sparse as ss
    from nncift.selection.greedy import OBJECTIVES

    c = ctx.cfg.select
    if OBJECTIVES.get(c.objective).floor is not None:
        raise NotImplementedError(f"select.algorithm=greedi supports fl and flmi (not {c.objective})")
    src = ss.StripeSource(str(block_dir), m, c.objective, c.eta)
    parts = ss.partition_items(m, c.parts, ctx.cfg.seed)  # round 1: one task per part, then the merge
    local = ctx.executor.map_tasks(ss.greedi_local_round, src, [(p, budget) for p in parts], desc="greedi")
    idx, gains = ss.greedi_merge(src, local, budget)
    return idx, gains, ss.sparse_objective(ss.stripe_kernel(src, cols=idx)[0], idx)


def select_items(ctx: Context, kernel_dir: Path, m: int, budget: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-k of a pointwise run's estimated scores (the item scores of ``kernel_dir`` for m items; ties by index)."""
    from nncift.kernels.kernel_io import item_scores

    s = item_scores(kernel_dir, m)
    order = np.lexsort((np.arange(len(s)), -s))[:budget].astype(np.int64)
    return order, s[order].astype(np.float64), float(s[order].sum())


Selector = Callable[["Context", Path, int, int], tuple[np.ndarray, np.ndarray, float]]


@dataclass(frozen=True)
class Algorithm:
    """One greedy of ``select.algorithm``.

    Attributes:
        sparse: ``(ctx, block_dir, m, budget) -> (indices, gains, value)`` on the sparse layout's stripes
            (facility-location objectives; a modular one is the same top-k for every algorithm).
        dense: whether it runs on the dense layout too (the exact lazy greedy of :mod:`nncift.selection.greedy`).
    """

    sparse: Selector
    dense: bool = False


ALGORITHMS: Registry[Algorithm] = Registry("algorithm")
ALGORITHMS.register("lazy")(Algorithm(_lazy, dense=True))
ALGORITHMS.register("stochastic")(Algorithm(_stochastic))
ALGORITHMS.register("greedi")(Algorithm(_greedi))


@dataclass(frozen=True)
class Layout:
    """How the estimate stage stored a run's kernels (``kernels.json``'s ``layout``).

    Attributes:
        select: ``(ctx, kernel_dir, m, budget) -> (indices, gains, value)``.
        pointwise: the item scores of a pointwise teacher: always their top-k (whatever ``select.objective``
            and ``select.algorithm`` say); set by the teacher, not an ``estimate.layout`` value.
    """

    select: Selector
    pointwise: bool = False


LAYOUTS: Registry[Layout] = Registry("layout")
LAYOUTS.register("dense")(Layout(lambda ctx, d, m, budget: select_dense(ctx, d / "blocks", m, budget)))
LAYOUTS.register("sparse")(Layout(lambda ctx, d, m, budget: select_sparse(ctx, d / "blocks", m, budget)))
LAYOUTS.register("items")(Layout(select_items, pointwise=True))


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
    lay = LAYOUTS.get(layout)
    idx, gains, value = lay.select(ctx, kernel_dir, m, budget)
    objective = "topk" if lay.pointwise else c.objective
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
        "algorithm": "topk" if lay.pointwise else c.algorithm,
    }
