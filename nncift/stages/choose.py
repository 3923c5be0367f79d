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

import json
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.console import CONSOLE
from nncift.exec.devices import local_device
from nncift.stages.base import Context, Stage
from nncift.store import done_blocks, read_safetensors, write_json, write_parquet, write_safetensors

log = logging.getLogger(__name__)


def wanted(ctx: Context) -> tuple[str, ...]:
    """The candidate names this run builds (``choose.candidates``; a forced ``choose.mode`` is always built)."""
    from nncift.surrogate.candidates import CANDIDATES

    c = ctx.cfg.choose
    names = [x.strip() for x in c.candidates.split(",") if x.strip()]
    out = set(CANDIDATES) if "auto" in names else set(names)
    if c.mode not in ("held_out", "surrogate"):
        out.add("additive_lm" if c.mode.startswith("additive_lm") else c.mode)
    out.add("surrogate")
    if c.views == "none":
        out -= {"lexical", "diag_lexical"}
    return tuple(n for n in CANDIDATES if n in out)


def teacher_lm(ctx: Context) -> str | None:
    """``choose.teacher_features`` resolved: the LM folder whose hidden states feed ``additive_lm`` (None: off)."""
    c = ctx.cfg.choose
    mode = c.teacher_features
    if mode == "auto":
        mode = "lm" if ctx.cfg.label.function == "delift_icl" else "none"
    if mode != "lm":
        return None
    if c.lm_model:
        return c.lm_model
    if ctx.cfg.label.function == "delift_icl" and ctx.cfg.delift_icl.model:
        return ctx.cfg.delift_icl.model
    from nncift.lm.models import embedded_lm_dir

    return str(embedded_lm_dir())


def _lm_view(ctx: Context, model: str):
    from nncift.surrogate.views import LMView

    c = ctx.cfg.choose
    view = LMView(model, [], max_tokens=c.lm_tokens, device=local_device(ctx.cfg.label.device))
    view.layers = (LMView.auto_layers(view.n_layers()) if c.lm_layers == "auto"
                   else [int(x) for x in c.lm_layers.split(",")])  # fmt: skip
    return view


def item_views(ctx: Context) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (pool (M, d), target (N, d)) float32: ``embedding``; with ``choose.views=lexical`` the lexical view;
    with teacher features, ``lm<L>`` per layer (computed once by this stage, then read from
    ``choose/views.safetensors``)."""
    e_pool, e_target = ctx.embeddings()
    out = {"embedding": (e_pool, e_target)}
    lm = teacher_lm(ctx)
    if ctx.cfg.choose.views != "lexical" and lm is None:
        return out
    path = ctx.path("choose", "views.safetensors")
    if not path.is_file():
        from nncift.surrogate.views import LexicalView, item_texts

        pool, target = ctx.tables(["prompt", "response"])
        cols = [(t.column("prompt").to_pylist(), t.column("response").to_pylist()) for t in (pool, target)]
        arrays = {}
        if ctx.cfg.choose.views == "lexical":
            texts = [item_texts(*c) for c in cols]
            lex = LexicalView(seed=ctx.cfg.seed).fit(texts[0] + texts[1])
            lex.save(ctx.path("choose", "lexical.safetensors"))
            arrays.update({"lexical.pool": lex.transform(texts[0]), "lexical.target": lex.transform(texts[1])})
        if lm is not None:
            view = _lm_view(ctx, lm)
            m = len(cols[0][0])
            log.info("choose: teacher-LM features of %d items (layers %s)", m + len(cols[1][0]), view.layers)
            feats = view.fit_transform(cols[0][0] + cols[1][0], cols[0][1] + cols[1][1])
            for layer, x in feats.items():
                arrays[f"lm{layer}.pool"], arrays[f"lm{layer}.target"] = x[:m], x[m:]
            write_safetensors(ctx.path("choose", "lm_state.safetensors"), view.state())
            write_json(ctx.path("choose", "lm.json"), {"model": lm, "layers": view.layers, "tokens": view.max_tokens})
        write_safetensors(path, arrays)
    t = read_safetensors(path)
    for key in t:
        name = key.rsplit(".", 1)[0]
        out[name] = (t[f"{name}.pool"], t[f"{name}.target"])
    return out


def new_item_views(ctx: Context, e_new: np.ndarray, prompts: list[str] | None, responses: list[str] | None) -> dict:
    """View vectors of new items (``nncift score``): the embedding, the lexical view through the run's fitted
    transform, and the teacher-LM features standardised as the run's were."""
    out = {"embedding": e_new}
    if prompts is None:
        return out
    lex = ctx.path("choose", "lexical.safetensors")
    if lex.is_file():
        from nncift.surrogate.views import LexicalView, item_texts

        out["lexical"] = LexicalView.load(lex).transform(item_texts(prompts, responses))
    lm = ctx.path("choose", "lm.json")
    if lm.is_file():
        from nncift.surrogate.views import LMView

        meta = json.loads(lm.read_text())
        view = LMView(meta["model"], meta["layers"], meta["tokens"], device=local_device(ctx.cfg.label.device))
        view.load_state(read_safetensors(ctx.path("choose", "lm_state.safetensors")))
        out.update({f"lm{layer}": x for layer, x in view.transform(prompts, responses).items()})
    return out


def network_head(ctx: Context, kernel: str, e_cols: np.ndarray) -> tuple[Any, Any, dict]:
    """(network, scaler, estimator head with ``lo`` / ``hi``) of the fitted surrogate of ``kernel``."""
    import torch

    from nncift.surrogate.network import load_network

    e_pool, _ = ctx.embeddings()
    net, scaler, _ = load_network(ctx.path("fit", f"network_{kernel}"))
    head = net.estimator(torch.as_tensor(e_pool), torch.as_tensor(e_cols))
    head.update(lo=scaler.lo, hi=scaler.hi)
    return net, scaler, head


def save_recipes(ctx: Context, recipes: dict[str, list]) -> None:
    arrays, meta = {}, {}
    for kernel, recs in recipes.items():
        meta[kernel] = []
        for r in recs:
            meta[kernel].append(r.meta())
            arrays.update({f"{kernel}.{r.name}.{k}": v for k, v in r.arrays().items()})
    write_safetensors(ctx.path("choose", "recipes.safetensors"), arrays or {"empty": np.zeros(0, np.float32)})
    write_json(ctx.path("choose", "recipes.json"), meta)


def load_recipes(ctx: Context) -> dict[str, dict[str, Any]]:
    """kernel -> name -> :class:`~nncift.surrogate.candidates.Recipe` of every candidate the choose stage built."""
    from nncift.surrogate.candidates import Recipe

    meta = json.loads(ctx.path("choose", "recipes.json").read_text())
    arrays = read_safetensors(ctx.path("choose", "recipes.safetensors"))
    out = {}
    for kernel, recs in meta.items():
        out[kernel] = {}
        for m in recs:
            prefix = f"{kernel}.{m['name']}."
            parts = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            out[kernel][m["name"]] = Recipe.from_parts(m, parts)
    return out


def chosen_recipes(ctx: Context) -> dict[str, Any]:
    """kernel -> the chosen :class:`~nncift.surrogate.candidates.Recipe` (``choose/choice.json``)."""
    choice = json.loads(ctx.path("choose", "choice.json").read_text())
    recs = load_recipes(ctx)
    return {k: recs[k][choice["chosen"]] for k in recs}


def candidate_heads(ctx: Context, recipe, kernel: str, new: dict | None = None, views: dict | None = None) -> dict:
    """The :class:`~nncift.kernels.blocks.EstimateWorker` head of one candidate over the run's items (pool rows;
    pool or target columns), optionally extended by new items (``new``: their view vectors; rows of both
    kernels and columns of K_FF grow by M')."""
    from nncift.surrogate.candidates import dot_factors, effects_for

    diag = ctx.diagonal() if kernel == "ff" else None
    if recipe.network:
        e_pool, e_target = ctx.embeddings()
        net, _, head = network_head(ctx, kernel, e_pool if kernel == "ff" else e_target)
        if new is not None:
            import torch

            extra = net.estimator(torch.as_tensor(new["embedding"]), torch.as_tensor(new["embedding"]))
            head["p"] = np.concatenate([head["p"], extra["p"]])
            if kernel == "ff":
                head["q"] = np.concatenate([head["q"], extra["q"]])
        head["diag"] = diag if recipe.diag else None
        return head
    vr, vt = (item_views(ctx) if views is None else views)[recipe.view]
    vc = vr if kernel == "ff" else vt
    r, c = recipe.r, recipe.c
    if new is not None:
        v_new = new[recipe.view]
        r_new, c_new = effects_for(recipe, new[recipe.effect_view or recipe.view])
        vr = np.concatenate([vr, v_new])
        r = None if r is None else np.concatenate([r, r_new])
        if kernel == "ff":
            vc = np.concatenate([vc, v_new])
            c = None if c is None else np.concatenate([c, c_new])
    p, q = dot_factors(recipe, vr, vc, r, c)
    return {"type": "dot", "p": p, "q": q, "lo": 0.0, "hi": 1.0, "diag": diag if recipe.diag else None}


def label_sets(ctx: Context, sets: list, extra_pool: np.ndarray, extra_target: np.ndarray) -> tuple[pa.Table, float]:
    """Label the choose stage's sets with the teacher (resumable blocks in ``choose/blocks/``, gathered into
    ``choose/labels.parquet``); a teacher with a prepare hook is prepared for the extra items first.

    Returns:
        (the labels, the teacher's seconds: preparation included).
    """
    import time

    from nncift.labels.worker import LABEL_SCHEMA, gather_labels, plan_blocks
    from nncift.stages.label import label_block_side, run_label_blocks, teacher_kwargs_for

    if not sets:
        return LABEL_SCHEMA.empty_table(), 0.0
    specs = plan_blocks(SimpleNamespace(sets=sets), label_block_side(ctx))
    block_dir = ctx.path("choose", "blocks")
    ok = done_blocks(block_dir, {f"{s['block_id']:06d}.parquet": s["pairs"] for s in specs})
    todo = [s for s in specs if f"{s['block_id']:06d}.parquet" not in ok]
    log.info("choose: %d teacher %s for the held-out criterion (%d blocks, %d already done)",
             sum(s.num_pairs for s in sets), "items" if ctx.pointwise() else "pairs", len(specs),
             len(specs) - len(todo))  # fmt: skip
    t0 = time.perf_counter()
    kwargs = teacher_kwargs_for(ctx, extra_pool, extra_target)
    run_label_blocks(ctx, sets, specs, todo, block_dir, desc="label (choose)", kwargs=kwargs)
    seconds = time.perf_counter() - t0
    table = gather_labels(block_dir, len(specs))
    write_parquet(ctx.path("choose", "labels.parquet"), table)
    return table, seconds


def candidate_kernels(ctx: Context, name: str, recipes: dict | None = None, views: dict | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A candidate's dense estimated K_FF (M, M) and K_FT (M, N) float32 (raw units, its diagonal applied): for the
    fidelity report, where the teacher's full kernel fits in memory too (``recipes``: :func:`load_recipes`, read
    and ``views``: :func:`item_views`, read once by a caller looping over candidates)."""
    from nncift.kernels.blocks import overwrite_diagonal, predict_factors

    recs = load_recipes(ctx) if recipes is None else recipes
    out = []
    for kernel in ("ff", "ft"):
        h = candidate_heads(ctx, recs[kernel][name], kernel, views=views)
        k = predict_factors(h) * np.float32(h["hi"] - h["lo"]) + np.float32(h["lo"])
        if h.get("diag") is not None:
            overwrite_diagonal(k, h["diag"], 0, k.shape[0], 0, k.shape[1])
        out.append(np.ascontiguousarray(k, np.float32))
    return out[0], out[1]


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
            from nncift.stages.choose_items import choose_items

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
                                               diag is not None, kinds, probes=(prc[0], prc[1], py))  # fmt: skip
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
            from nncift.stages.choose_items import choose_topk

            return {**info, **choose_topk(ctx, recipes, views, nets, diag)}
        rng = np.random.default_rng([ctx.cfg.seed, 21])
        n_rows = int(min(c.rows, max(2, m // 3)))
        rows = np.sort(rng.choice(m, n_rows, replace=False)).astype(np.int64)
        budget = max(1, round(sc.fraction * n_rows))
        est = {k: ch.Estimates(recipes[k], kviews[k], nets[k], diag if k == "ff" else None) for k in ("ff", "ft")}
        probes = ch.probe_fl(est["ff"], est["ft"], rows, budget, c.top, sc.objective, sc.eta, sc.nu)
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
        near = ch.score_near(probes, rows, known["ff"])
        dec = ch.decide(per_row, near, c.z, c.z_near, free={r.name: r.free for r in recipes["ff"]})
        cost = len(new_labels["row"])
        write_json(
            ctx.path("choose", "choice.json"),
            {**dec, "mode": c.mode, "candidates": names, "teacher_pairs": cost, "teacher_seconds": teacher_s,
             "budget": budget,
             "held_out_rows": rows, "objective": sc.objective,
             "factor_width": {r.name: r.factor_width for r in recipes["ff"]}},
        )  # fmt: skip
        s = dec["scores"]
        log.info("choose: %s (%d held-out rows, %d teacher pairs); coverage / neighbour scores: %s", dec["chosen"],
                 n_rows, cost, ", ".join(f"{k} {v['fl']['mean']:.4f}/{v['near']['mean']:.4f}"
                                         for k, v in sorted(s.items(), key=lambda kv: -kv[1]["fl"]["mean"])), extra=CONSOLE)  # fmt: skip
        return {**info, "chosen": dec["chosen"], "teacher_pairs": cost, "teacher_seconds": teacher_s, "rows": n_rows}

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
