"""The candidate estimates of a run, as saved recipes: item views (embedding, lexical, teacher-LM), the network
heads, and each candidate's estimator head or dense kernels (what the choose, estimate, report and score
stages build from ``choose/recipes.json``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nncift.exec.devices import local_device
from nncift.store import read_safetensors, write_json, write_safetensors

if TYPE_CHECKING:
    from nncift.config import ChooseConfig
    from nncift.stages.base import Context

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
    source, settings = ctx.source_teacher()  # a table of DELIFT ICL values counts as DELIFT ICL
    mode = c.teacher_features
    if mode == "auto":
        mode = "lm" if source.in_context else "none"
    if mode != "lm":
        return None
    if c.lm_model:
        return c.lm_model
    model = settings.get("model") if source.in_context else None
    if model and source is not ctx.teacher() and not Path(model).is_dir():
        # a table's provenance names the LM that built it, as a path on the machine that built it
        if c.teacher_features == "auto":
            log.warning("choose.teacher_features=auto: the LM %s named by the table's provenance is not on this "
                        "machine; no teacher-LM features (set choose.lm_model=PATH to use them)", model)  # fmt: skip
            return None
        from nncift.errors import ConfigError

        raise ConfigError(f"config field 'choose.teacher_features': the table's provenance names the LM {model!r}, "
                          "which is not on this machine; set choose.lm_model=PATH")  # fmt: skip
    if model:
        return model
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
            lex = LexicalView(analyzers=lexical_analyzers(ctx.cfg.choose), seed=ctx.cfg.seed).fit(texts[0] + texts[1])
            lex.save(ctx.path("choose", "lexical.safetensors"))
            for side, items in zip(("pool", "target"), texts, strict=True):
                arrays[f"lexical.{side}"] = lexical_vectors(ctx, lex, items)
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


def lexical_vectors(ctx: Context, lex: Any, texts: list[str], chunk: int = 8192) -> np.ndarray:
    """(len(texts), width) float32 lexical vectors, chunks of ``chunk`` texts fanned out over the executor
    (:meth:`map_tasks`: Ray tasks on a cluster, in order in this process locally; the same vectors either way)."""
    from nncift.surrogate.views import LexicalView

    if len(texts) <= chunk:
        return lex.transform(texts)
    tasks = [(texts[s : s + chunk],) for s in range(0, len(texts), chunk)]
    return np.concatenate(ctx.executor.map_tasks(LexicalView.transform, lex, tasks, desc="lexical view"))


def lexical_analyzers(choose: ChooseConfig) -> tuple[str, ...]:
    """The lexical view's blocks (``choose.lexical``)."""
    return tuple(a.strip() for a in choose.lexical.split(",") if a.strip())


def view_blocks(choose: ChooseConfig) -> dict[str, list[slice]]:
    """view name -> its blocks' column slices (the lexical view: one per analyzer), for
    :func:`nncift.surrogate.candidates.build_recipes`."""
    from nncift.surrogate.views import LexicalView

    return {"lexical": LexicalView(analyzers=lexical_analyzers(choose)).block_slices()}


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
    """The :class:`~nncift.kernels.estimate_worker.EstimateWorker` head of one candidate over the run's items (pool rows;
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


def candidate_kernels(ctx: Context, name: str, recipes: dict | None = None, views: dict | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A candidate's dense estimated K_FF (M, M) and K_FT (M, N) float32 (raw units, its diagonal applied): for the
    fidelity report, where the teacher's full kernel fits in memory too (``recipes``: :func:`load_recipes`, read
    and ``views``: :func:`item_views`, read once by a caller looping over candidates)."""
    from nncift.kernels.estimate_worker import overwrite_diagonal
    from nncift.surrogate.predict import predict_factors

    recs = load_recipes(ctx) if recipes is None else recipes
    out = []
    for kernel in ("ff", "ft"):
        h = candidate_heads(ctx, recs[kernel][name], kernel, views=views)
        k = predict_factors(h) * np.float32(h["hi"] - h["lo"]) + np.float32(h["lo"])
        if h.get("diag") is not None:
            overwrite_diagonal(k, h["diag"], 0, k.shape[0], 0, k.shape[1])
        out.append(np.ascontiguousarray(k, np.float32))
    return out[0], out[1]


def estimator_heads(ctx: Context, e_new: np.ndarray | None = None, new_texts: tuple[list, list] | None = None
                    ) -> dict[str, dict]:  # fmt: skip
    """Per kernel, the chosen estimate's factors (the choose stage's choice: the fitted network, or a free or
    blended candidate of :mod:`nncift.surrogate.candidates`) with ``lo`` / ``hi`` and the exact K_FF diagonal where it uses it.

    Args:
        e_new: (M', d) float32 embeddings of scored new items (``nncift score``), or None. When given, the rows
            of both kernels and the columns of K_FF are the M pool items followed by the M' new ones: the
            new items' factors are computed on their own and appended, so the pool's factors are exactly the
            estimate stage's. The exact diagonal stays (M,): the new items' diagonal is the estimate's own.
        new_texts: (prompts, responses) of the new items (the lexical view reads them).

    Returns:
        ``{"ff": head, "ft": head}`` as :class:`nncift.kernels.estimate_worker.EstimateWorker` takes them: ``type``, ``p``
        (M[+M'], k), ``q`` (M[+M'] or N, k), the scaler's ``lo`` / ``hi`` and ``diag`` ((M,) float32 or None).
    """
    new = None
    if e_new is not None:
        prompts, responses = new_texts if new_texts is not None else (None, None)
        new = new_item_views(ctx, e_new, prompts, responses)
    return {kernel: candidate_heads(ctx, recipe, kernel, new) for kernel, recipe in chosen_recipes(ctx).items()}
