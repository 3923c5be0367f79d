"""Stage ``report``: selection fidelity under the teacher's full kernel (when it is known), and the run report.

Reads: every earlier stage's markers and metrics, ``select/selection.parquet``.
Writes: ``report/fidelity.json``, ``report/report.json``, ``report/report.md`` and the PNG plots.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from nncift.console import CONSOLE
from nncift.stages.base import Context, Stage
from nncift.store import write_json

log = logging.getLogger(__name__)


def truth_function(ctx: Context):
    """(teacher whose full kernel is the fidelity ground truth, None) or (None, why not)."""
    from nncift.exec.devices import local_gpu_ids, resolve_worker_kwargs
    from nncift.influence import build_influence_function

    fd, lb = ctx.cfg.fidelity, ctx.cfg.label
    if ctx.pointwise():
        return (
            None,
            f"`{lb.function}` is pointwise: item-score fidelity needs every item's teacher score (fidelity.exact)",
        )
    if fd.truth_table:
        path = str(Path(fd.truth_table).resolve())
        return build_influence_function("table", path=path, field="fidelity.truth_table"), None
    if ctx.teacher().exact_is_cheap:
        kwargs = resolve_worker_kwargs(ctx.teacher_kwargs(), local_gpu_ids())  # built here, in the driver
        return build_influence_function(lb.function, **kwargs), None
    return None, (
        f"the full kernel of `{lb.function}` is unknown: set fidelity.truth_table to a full-label table, "
        f"or fidelity.exact=true to label it in this run"
    )


def fidelity(ctx: Context) -> dict[str, Any]:
    """Selection fidelity of this run under the teacher's full kernel (see :mod:`nncift.selection.fidelity`).

    Returns ``{"measured": False, "reason": ...}`` when the full kernel is unknown or too large.
    """
    from nncift.errors import DataError
    from nncift.selection import fidelity as fid

    fd, sc = ctx.cfg.fidelity, ctx.cfg.select
    m, n = ctx.size()
    if ctx.pointwise():
        return item_fidelity(ctx) if fd.exact else {"measured": False, "reason": truth_function(ctx)[1]}
    if m * m + m * n > fd.max_pairs:
        return {"measured": False, "reason": f"M*M + M*N = {m * m + m * n:,} > fidelity.max_pairs = {fd.max_pairs:,}"}
    fn, reason = truth_function(ctx)
    pool, target = ctx.items()
    if fn is None and fd.exact:
        from nncift.labels.tables import exact_kernels

        ctx.require("exact")
        true_ff, true_ft = exact_kernels(ctx)
    elif fn is None:
        return {"measured": False, "reason": reason}
    else:
        try:
            true_ff, true_ft = fid.teacher_kernels(fn, pool, target)
        except DataError as exc:
            return {"measured": False, "reason": f"the truth table does not cover this run: {exc}"}
    est = pq.read_table(ctx.path("select", "selection.parquet")).column("index").to_numpy()
    budget = len(est)
    cos_ff, cos_ft = fid.cosine_kernels(pool.embeddings, target.embeddings)
    zero = fid.select(cos_ff, cos_ft, budget, sc.objective, sc.eta, sc.nu)
    out = fid.selection_fidelity(
        true_ff,
        true_ft,
        {"nncift": est, "zero_label": zero},
        budget,
        sc.objective,
        sc.eta,
        sc.nu,
        fd.random_subsets,
        ctx.cfg.seed,
    )
    out["measured"] = True
    out["truth"] = fd.truth_table or (f"{ctx.cfg.label.function} (every pair labeled: fidelity.exact)" if fn is None
                                      else ctx.cfg.label.function)  # fmt: skip
    out["zero_label"] = out["subsets"].pop("zero_label")
    out.update(out["subsets"].pop("nncift"))
    del out["subsets"]
    out["candidates"] = candidate_fidelity(ctx, true_ff, true_ft, budget, out["exact"])
    if fd.truth_table:
        out["truth_cost"] = truth_cost(fd.truth_table, m, n)
    return out


def truth_cost(path: str, m: int, n: int) -> dict[str, Any] | None:
    """What the full teacher kernel of a truth table cost to compute (its provenance: pairs, seconds, the
    teacher), when it was computed on this run's M x N items; None otherwise."""
    from nncift.influence.table import table_provenance

    prov = table_provenance(path)
    if not prov or prov.get("M") != m or prov.get("N") != n or not prov.get("label_seconds"):
        return None
    return {"pairs": int(prov["pairs"]), "seconds": float(prov["label_seconds"]), "function": prov.get("function"),
            "model": prov.get("model")}  # fmt: skip


def item_fidelity(ctx: Context) -> dict[str, Any]:
    """Top-k fidelity of a pointwise run under every item's teacher score (the exact stage): the run's selection,
    every candidate of the choose stage, the zero-label baseline (response length) and random subsets."""
    import pyarrow.parquet as pq_

    from nncift.labels.tables import exact_scores
    from nncift.selection import fidelity as fid

    ctx.require("exact")
    s = exact_scores(ctx).astype(np.float32)[:, None]  # (M, 1): the top-k objective reads row means
    est = pq_.read_table(ctx.path("select", "selection.parquet")).column("index").to_numpy()
    budget = len(est)
    cands = pq_.read_table(ctx.path("choose", "item_scores.parquet"))
    subsets = {"nncift": est}
    for name in cands.column_names:
        v = cands.column(name).to_numpy()
        subsets[name] = np.lexsort((np.arange(len(v)), -v))[:budget]
    res = fid.selection_fidelity(s, s, subsets, budget, "topk", random_count=ctx.cfg.fidelity.random_subsets,
                                 seed=ctx.cfg.seed)  # fmt: skip
    out = {k: v for k, v in res.items() if k != "subsets"}
    out.update(res["subsets"].pop("nncift"), measured=True, truth=f"{ctx.cfg.label.function} (every item scored)")
    out["zero_label"] = dict(res["subsets"]["response_length"], name="response_length")
    out["candidates"] = res["subsets"]
    return out


def candidate_fidelity(ctx: Context, true_ff, true_ft, budget: int, exact: list[int]) -> dict[str, Any]:
    """Gap closed of every candidate estimate of the choose stage (each selected on its own dense kernels)."""
    from nncift.selection import fidelity as fid
    from nncift.surrogate.recipes import candidate_kernels, item_views, load_recipes

    sc, fd = ctx.cfg.select, ctx.cfg.fidelity
    subsets = {}
    recipes, views = load_recipes(ctx), item_views(ctx)
    for name in recipes["ff"]:
        k_ff, k_ft = candidate_kernels(ctx, name, recipes, views)
        subsets[name] = fid.select(k_ff, k_ft, budget, sc.objective, sc.eta, sc.nu)
    res = fid.selection_fidelity(true_ff, true_ft, subsets, budget, sc.objective, sc.eta, sc.nu, fd.random_subsets,
                                 ctx.cfg.seed, exact=np.asarray(exact, np.int64))  # fmt: skip
    return res["subsets"]


class ReportStage(Stage):
    name = "report"
    sections = ("fidelity",)
    after = ("select",)
    reads = ("*/_DONE.json", "fit/metrics.json", "fit/eval_predictions.parquet", "select/selection.parquet")
    writes = ("report/fidelity.json", "report/report.json", "report/report.md", "report/*.png")

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.reporting import write_report
        from nncift.store import clean_json

        fid = fidelity(ctx)
        write_json(ctx.path("report", "fidelity.json"), clean_json(fid))
        if fid.get("measured"):
            z = fid["zero_label"]["gap_closed"]
            log.info(
                "fidelity: gap closed %.3f (zero-label baseline %.3f), Jaccard with the teacher's subset %.3f",
                fid["gap_closed"] if fid["gap_closed"] is not None else float("nan"),
                z if z is not None else float("nan"),
                fid["jaccard"],
                extra=CONSOLE,
            )
        else:
            log.info("fidelity: not measured (%s)", fid["reason"])
        return write_report(ctx.store, ctx.cfg)


def versus_lines(rep: dict) -> list[str]:
    """The console's closing comparison with the full teacher (when its cost is known; ``rep``: report.json):
    teacher pairs and seconds of this run against the full kernel's, and the gap closed beside the free
    baselines. ``nncift run`` and ``nncift report`` end with these lines."""
    from nncift.reporting import versus

    v = versus(rep)
    if v is None:
        return []
    fmt = lambda g: "n/a" if g is None else f"{g:+.3f}"  # noqa: E731
    return [
        f"NN-CIFT vs full {v['function']}: {v['run_pairs']:,} of {v['full_pairs']:,} teacher pairs "
        f"({100 * v['run_pairs'] / v['full_pairs']:.1f}%), {v['run_seconds']:.0f} s of {v['full_seconds']:,.0f} s "
        f"recorded for the full table ({100 * v['run_seconds'] / v['full_seconds']:.1f}%; "
        f"{v['full_seconds_at_run_rate']:,.0f} s at this run's own teacher rate)",
        f"gap closed {fmt(v['gap_closed'])}; free baselines: zero-label cosine {fmt(v['zero_label'])} (0 pairs), "
        f"exact diagonal + constant {fmt(v['diag_const'])} ({v['diag_pairs']:,} pairs)",
    ]
