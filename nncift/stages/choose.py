"""Stage ``choose``: the estimate the run keeps, decided on its own held-out labels (:mod:`nncift.surrogate.candidates`).

Builds the candidate estimates of each kernel (the fitted network, the zero-label cosines, the exact
diagonal with a constant or calibrated-cosine off-diagonal, the network shrunk toward the calibrated cosine,
additive per-item effects), scores them with the held-out facility-location criterion (a second, small round
of teacher labels on held-out rows), and keeps one (``choose.mode``). Pointwise teachers and the top-k
objective use the same idea on held-out items (:func:`nncift.surrogate.candidates.score_items`).

Reads: ``embed/embeddings.safetensors``, ``fit/network_*``, ``label/labels.parquet``, ``data/*.parquet``.
Writes: ``choose/views.safetensors`` (+ ``choose/lexical.safetensors``, the fitted lexical transform),
``choose/recipes.safetensors`` + ``choose/recipes.json`` (every candidate), ``choose/pairs.parquet`` (the
pairs the criterion needs, saved before any is labeled), ``choose/blocks/``, ``choose/labels.parquet`` and
``choose/choice.json`` (every candidate's held-out score, the choice and the teacher pairs it cost).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.console import CONSOLE
from nncift.labels.fanout import label_sets
from nncift.stages.base import Context, Stage
from nncift.store import write_json, write_parquet
from nncift.surrogate.recipes import item_views, network_head, save_recipes, teacher_lm, view_blocks, wanted

log = logging.getLogger(__name__)


class ChooseStage(Stage):
    name = "choose"
    sections = ("choose",)
    after = ("fit",)
    reads = ("embed/embeddings.safetensors", "fit/network_ff.safetensors", "label/labels.parquet")
    writes = ("choose/views.safetensors", "choose/recipes.safetensors", "choose/pairs.parquet", "choose/blocks/",
              "choose/labels.parquet", "choose/choice.json")  # fmt: skip

    def config_sections(self, cfg) -> tuple[str, ...]:
        """``choose`` and ``select`` (the criterion solves the run's own objective on held-out rows)."""
        return ("choose", "select")

    def validate(self, ctx: Context, **params: Any) -> None:
        """A forced ``choose.mode`` must be a candidate this run builds (checked before anything is written)."""
        from nncift.errors import ConfigError
        from nncift.surrogate.candidates import ITEM_CANDIDATES

        c, mode = ctx.cfg.choose, ctx.cfg.choose.mode
        if mode in ("held_out", "surrogate"):
            return
        why = None
        if ctx.pointwise():
            why = (
                None
                if mode in ITEM_CANDIDATES
                else "a pointwise teacher's candidates are " + ", ".join(ITEM_CANDIDATES)
            )
        elif mode in ITEM_CANDIDATES and mode != "surrogate":
            why = "it scores items: a pairwise teacher's candidates are estimates of K_FF / K_FT"
        elif mode == "diag_const" and ctx.diagonal() is None:
            why = "it needs the exact diagonal (label.diagonal=true, a teacher that pays per pair)"
        elif mode in ("lexical", "diag_lexical") and c.views != "lexical":
            why = "it needs choose.views=lexical"
        elif mode.startswith("shrink_") and ctx.cfg.fit.kind != "bilinear":
            why = "it blends the bilinear network (fit.kind=bilinear)"
        elif mode.startswith("additive_lm"):
            if teacher_lm(ctx) is None:
                why = "it needs teacher-LM features (choose.teacher_features=lm)"
            elif c.lm_layers != "auto" and mode[len("additive_lm") :] not in c.lm_layers.split(","):
                why = f"layer {mode[len('additive_lm') :]} is not in choose.lm_layers={c.lm_layers}"
        if why:
            raise ConfigError(f"config field 'choose.mode': {mode!r} does not apply to this run: {why}")

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        if ctx.pointwise():
            from nncift.surrogate.item_choice import choose_items

            return choose_items(ctx)
        from nncift.labels.plan import LabelSet
        from nncift.surrogate import candidates as ch

        c, sc = ctx.cfg.choose, ctx.cfg.select
        m, n = ctx.size()
        views = item_views(ctx)
        labels = ctx.labels()
        diag = ctx.diagonal()
        kinds = wanted(ctx)
        # per kernel, each view's (row vectors, column vectors): K_FF's columns are the pool, K_FT's the targets
        kviews = {k: {v: (p, t if k == "ft" else p) for v, (p, t) in views.items()} for k in ("ff", "ft")}
        recipes, nets = {}, {}
        for kernel in ("ff", "ft"):
            net, scaler, nets[kernel] = network_head(ctx, kernel, kviews[kernel]["embedding"][1])
            (rc, y), (prc, py) = labels[kernel]["q1"], labels[kernel]["probe"]
            recipes[kernel] = ch.build_recipes(kernel, (rc[0], rc[1], y), kviews[kernel], net, scaler,
                                               diag is not None, kinds, probes=(prc[0], prc[1], py),
                                               blocks=view_blocks(c))  # fmt: skip
        recipes = ch.narrow_family(recipes, keep=c.mode)
        save_recipes(ctx, recipes)
        names = [r.name for r in recipes["ff"]]
        info: dict[str, Any] = {"candidates": names, "mode": c.mode}
        if c.mode != "held_out" or len(names) == 1:
            if c.mode not in ("held_out", "surrogate") and c.mode not in names:
                from nncift.errors import ConfigError

                raise ConfigError(f"config field 'choose.mode': {c.mode!r} does not apply to this run (its candidates: "
                                  f"{', '.join(names)})")  # fmt: skip
            chosen = c.mode if c.mode in names else "surrogate"
            write_json(ctx.path("choose", "choice.json"), {"chosen": chosen, "mode": c.mode, "candidates": names,
                                                           "teacher_pairs": 0, "scores": None})  # fmt: skip
            log.info("choose: %s (choose.mode=%s; no held-out labels)", chosen, c.mode, extra=CONSOLE)
            return {**info, "chosen": chosen, "teacher_pairs": 0}
        if sc.objective == "topk":
            from nncift.surrogate.item_choice import choose_topk

            return {**info, **choose_topk(ctx, recipes, views, nets, diag)}
        per_item = ctx.teacher().cost_unit == "item"
        if per_item:  # featurise only the held-out rows; the candidates pick among already featurised items
            from nncift.labels.fanout import label_plan, used_items
            from nncift.surrogate.item_choice import held_out_rows

            pool_used, target_used = used_items(label_plan(ctx))
            crit = ch.criterion_items(held_out_rows(ctx, m, exclude=pool_used), pool_used, target_used, sc.fraction,
                                      c.top)  # fmt: skip
        else:
            crit = ch.criterion_rows(m, c.rows, c.whole_pool, sc.fraction, ctx.cfg.seed, c.top, c.whole_top)
        rows, n_rows = crit.rows, len(crit.rows)
        est = {k: ch.Estimates(recipes[k], kviews[k], nets[k], diag if k == "ff" else None) for k in ("ff", "ft")}
        probes = ch.probe_criterion(est["ff"], est["ft"], crit, sc.objective, sc.eta, sc.nu)
        known = self._known(ctx, labels, diag, m, n)
        pairs = self._pairs(ctx, ch.probe_pairs(probes, rows), known)
        kern = np.asarray(pairs.column("kernel").to_pylist(), dtype=object)
        pr, pc = pairs.column("row").to_numpy(), pairs.column("col").to_numpy()
        sets = [LabelSet(k, "choose", pr[kern == k], pc[kern == k], paired=True) for k in ("ff", "ft")
                if (kern == k).any()]  # fmt: skip
        table, teacher_s = label_sets(ctx, sets, np.unique(np.concatenate([pr, pc[kern == "ff"]])),
                                      np.unique(pc[kern == "ft"]))  # fmt: skip
        new_labels = {"kernel": np.asarray(table.column("kernel").to_pylist(), dtype=object),
                      "row": table.column("row").to_numpy(), "col": table.column("col").to_numpy(),
                      "value": table.column("value").to_numpy()}  # fmt: skip
        for kernel in ("ff", "ft"):
            sel = new_labels["kernel"] == kernel
            known[kernel] = known[kernel].extended(new_labels["row"][sel], new_labels["col"][sel],
                                                   new_labels["value"][sel])  # fmt: skip
        per_row = ch.score_probes(probes, rows, known["ff"], known["ft"], sc.objective, sc.eta, sc.nu)
        free = {r.name: r.free for r in recipes["ff"]}
        dec, _ = ch.decide_criterion(crit, per_row, probes, known["ff"], free, c.z, c.z_near)
        cost = len(new_labels["row"])
        extra: dict[str, Any] = {}
        if per_item:  # the teacher's own unit: items it featurised for the choice and for nothing else
            new_pool = np.setdiff1d(np.unique(np.concatenate([pr, pc[kern == "ff"]])), pool_used)
            extra = {"teacher_items": len(new_pool) + len(np.setdiff1d(pc[kern == "ft"], target_used)),
                     "columns": len(crit.cols)}  # fmt: skip
        write_json(
            ctx.path("choose", "choice.json"),
            {**dec, "mode": c.mode, "candidates": names, "teacher_pairs": cost, "teacher_seconds": teacher_s,
             "budget": crit.budget,
             "held_out_rows": rows, "objective": sc.objective,
             "factor_width": {r.name: r.factor_width for r in recipes["ff"]}, **extra},
        )  # fmt: skip
        s = dec["scores"]
        log.info("choose: %s (%s, %d teacher pairs); coverage / neighbour scores: %s", dec["chosen"],
                 f"every row of the pool ({n_rows}; choose.whole_pool={c.whole_pool})" if crit.whole
                 else f"{n_rows} held-out rows", cost, ", ".join(f"{k} {v['fl']['mean']:.4f}/{v['near']['mean']:.4f}"
                                         for k, v in sorted(s.items(), key=lambda kv: -kv[1]["fl"]["mean"])), extra=CONSOLE)  # fmt: skip
        return {**info, "chosen": dec["chosen"], "teacher_pairs": cost, "teacher_seconds": teacher_s, "rows": n_rows,
                **extra}  # fmt: skip

    @staticmethod
    def _known(ctx: Context, labels: dict, diag: np.ndarray | None, m: int, n: int) -> dict[str, Any]:
        """Per kernel, the teacher values the criterion may read: training labels, probe columns and the exact
        diagonal (never the Q2-Q4 rectangles of the report)."""
        from nncift.surrogate import candidates as ch

        out = {}
        for kernel, n_cols in (("ff", m), ("ft", n)):
            (rc, y), (prc, py) = labels[kernel]["q1"], labels[kernel]["probe"]
            rows, cols, vals = [rc[0], prc[0]], [rc[1], prc[1]], [y, py]
            if kernel == "ff" and diag is not None:
                rows.append(np.arange(m))
                cols.append(np.arange(m))
                vals.append(diag)
            out[kernel] = ch.Known(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), n_cols)
        return out

    @staticmethod
    def _pairs(ctx: Context, need: dict[str, tuple], known: dict) -> pa.Table:
        """The pairs to label (those not already known), saved in ``choose/pairs.parquet`` before labeling so a
        resumed run labels the same ones."""
        path = ctx.path("choose", "pairs.parquet")
        if path.is_file():
            return pq.read_table(path)
        parts = []
        for kernel, (rows, cols) in need.items():
            _, found = known[kernel].lookup(rows, cols)
            parts.append(pa.table({"kernel": [kernel] * int((~found).sum()), "row": rows[~found], "col": cols[~found]}))
        table = pa.concat_tables(parts) if parts else pa.table({"kernel": pa.array([], pa.string()),
                                                                "row": pa.array([], pa.int64()),
                                                                "col": pa.array([], pa.int64())})  # fmt: skip
        write_parquet(path, table)
        return table
