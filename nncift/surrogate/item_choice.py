"""Held-out choice for item scores: the top-k objective of a pairwise teacher (each pool item's mean K_FT row)
and pointwise teachers (one score per item). See :mod:`nncift.stages.choose` for the pairwise objectives.

Top-k selection is separable: its value on a random sample of items is an unbiased estimate of its value on
the pool. So the criterion is the selection itself on held-out items: ``choose.rows`` pool items get their
teacher score (pointwise: the teacher's score; top-k: their mean over ``choose.targets`` seeded targets, one
dense rectangle), each candidate picks the ``select.fraction`` of them it scores highest, and its value is
the mean teacher score of its picks. The held-out items' pairwise order (:func:`concordance`) is the second,
smoother score; :func:`nncift.surrogate.candidates.decide` keeps the candidates within ``choose.z`` paired standard errors of
the best top-k value, then the best order, or the first free candidate within ``choose.z_near`` of it.

Pointwise candidates (:func:`item_candidates`): ``surrogate`` (the pointwise network), ``ridge`` (ridge on the
embedding and the log lengths, penalty by generalised cross-validation), and the free ones ``response_length``,
``prompt_length`` (each signed by its correlation with the training labels). For a pointwise teacher the
training items join the held-out ones, scored out of fold (:func:`out_of_fold`: every candidate, the network
included, refitted on the other folds), which multiplies the criterion's items at no teacher cost.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from nncift.console import CONSOLE
from nncift.store import write_json, write_parquet
from nncift.surrogate.candidates import ITEM_CANDIDATES as ITEM_PREFERENCE  # free first

if TYPE_CHECKING:
    from nncift.stages.base import Context

log = logging.getLogger(__name__)


def held_out_rows(ctx: Context, m: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """The criterion's held-out pool rows: ``min(choose.rows, M // 3)`` seeded items (``M // 10`` for a teacher that
    pays per item: each is one more item to featurise), outside ``exclude`` when enough remain."""
    rng = np.random.default_rng([ctx.cfg.seed, 21])
    pool = np.arange(m) if exclude is None else np.setdiff1d(np.arange(m), exclude)
    if len(pool) < 2:
        pool = np.arange(m)
    share = 10 if ctx.teacher().cost_unit == "item" else 3
    n = int(min(ctx.cfg.choose.rows, max(2, m // share), len(pool)))
    return np.sort(rng.choice(pool, n, replace=False)).astype(np.int64)


def topk_values(scores: dict[str, np.ndarray], truth: np.ndarray, fraction: float) -> dict[str, np.ndarray]:
    """Per held-out item, its teacher value if the candidate picks it (its top ``fraction``, ties by index), else 0.

    Args:
        scores: name -> (R,) the candidate's scores of the held-out items. truth: (R,) teacher values.

    Returns:
        name -> (R,) float64, whose mean is the candidate's held-out top-k value.
    """
    k = max(1, round(fraction * len(truth)))
    out = {}
    for name, s in scores.items():
        pick = np.lexsort((np.arange(len(s)), -np.asarray(s, np.float64)))[:k]
        v = np.zeros(len(truth))
        v[pick] = truth[pick]
        out[name] = v
    return out


def concordance(scores: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per held-out item, the share of the other held-out items the candidate orders as the teacher does (ties
    count half): a smooth, paired companion of the top-k value (Kendall's concordance, item by item).

    Returns:
        name -> (R,) float64 in [0, 1].
    """
    dt = np.sign(truth[:, None] - truth[None, :])
    n = len(truth)
    out = {}
    for name, s in scores.items():
        ds = np.sign(np.asarray(s, np.float64)[:, None] - np.asarray(s, np.float64)[None, :])
        agree = np.where(ds == 0, 0.5, (ds == dt).astype(np.float64))
        np.fill_diagonal(agree, 0.0)
        out[name] = agree.sum(axis=1) / max(1, n - 1)
    return out


def _record(ctx: Context, dec: dict, names: list[str], cost: int, rows: np.ndarray, budget: int, unit: str,
            free: dict[str, bool], seconds: float) -> dict[str, Any]:  # fmt: skip
    write_json(
        ctx.path("choose", "choice.json"),
        {**dec, "mode": ctx.cfg.choose.mode, "candidates": names, "teacher_pairs": cost, "budget": budget,
         "held_out_rows": rows, "objective": "topk", "criterion": "items", "unit": unit, "free": free,
         "teacher_seconds": seconds},
    )  # fmt: skip
    log.info("choose: %s (%d held-out items, %d teacher %s); held-out top-k values: %s", dec["chosen"], len(rows),
             cost, unit, ", ".join(f"{k} {v['fl']['mean']:.4f}" for k, v in
                                   sorted(dec["scores"].items(), key=lambda kv: -kv[1]["fl"]["mean"])), extra=CONSOLE)  # fmt: skip
    return {"chosen": dec["chosen"], "teacher_pairs": cost, "teacher_seconds": seconds, "rows": len(rows)}


# ------------------------------------------------------------------------------------------ top-k (pairwise)
def choose_topk(ctx: Context, recipes: dict, views: dict, nets: dict, diag) -> dict[str, Any]:
    """The top-k objective of a pairwise teacher: candidates are the K_FT recipes; each held-out item's truth is
    its mean teacher value over ``choose.targets`` seeded targets."""
    from nncift.labels.fanout import label_plan, label_sets, used_items
    from nncift.labels.plan import LabelSet
    from nncift.surrogate import candidates as ch

    c, sc = ctx.cfg.choose, ctx.cfg.select
    m, n = ctx.size()
    plan = label_plan(ctx)
    rows = held_out_rows(ctx, m, exclude=used_items(plan)[0])  # never an item the plan labeled or reports on
    rng = np.random.default_rng([ctx.cfg.seed, 22])
    # targets: a per-item teacher reuses labeled (already featurised) targets
    tpool = plan.target_labeled if ctx.teacher().cost_unit == "item" and len(plan.target_labeled) else np.arange(n)
    targets = np.sort(rng.choice(tpool, min(c.targets, len(tpool)), replace=False)).astype(np.int64)
    table, seconds = label_sets(ctx, [LabelSet("ft", "choose", rows, targets)], rows, targets)
    n_held = len(rows)  # held-out items the teacher saw (a per-item teacher featurises each; targets are reused)
    r, v = table.column("row").to_numpy(), table.column("value").to_numpy().astype(np.float64)
    truth = np.bincount(np.searchsorted(rows, r), v, len(rows)) / np.bincount(np.searchsorted(rows, r), None, len(rows))
    kv = {name: (views[name][0], views[name][1]) for name in views}
    est = ch.Estimates(recipes["ft"], kv, nets["ft"], None)
    scores = {name: est.rows(name, rows).mean(axis=1) for name in est.recipes}
    lab, y, oof = topk_out_of_fold(ctx, kv, [r.name for r in recipes["ft"]])
    if len(lab):  # the training rows join, scored out of fold (no teacher cost)
        scores = {k: np.concatenate([v, oof[k]]) for k, v in scores.items()}
        truth, rows = np.concatenate([truth, y]), np.concatenate([rows, lab])
    values = topk_values(scores, truth, sc.fraction)
    free = {rec.name: rec.free for rec in recipes["ft"]}
    dec = ch.decide(values, concordance(scores, truth), c.z, c.z_near, free=free)
    budget = max(1, round(sc.fraction * len(rows)))
    out = _record(ctx, dec, list(scores), int(table.num_rows), rows, budget, "pairs", free, seconds)
    return {**out, "teacher_items": n_held}


def topk_out_of_fold(ctx: Context, views: dict, names: list[str], folds: int = 5
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """Cross-fitted top-k scores of the training rows of K_FT: each fold's rows scored (their mean over every
    target) by every candidate rebuilt, network included, from the training pairs of the other folds' rows;
    the truth of a row is the mean of its training labels.

    Returns:
        (rows (L,) int64, their mean labels (L,), name -> (L,) out-of-fold scores); empty with too few rows.
    """
    import torch

    from nncift.surrogate import candidates as ch
    from nncift.surrogate.fitting import PairLabels, fit_config, fit_loop, split_train_val
    from nncift.surrogate.network import Scaler, network_from_config
    from nncift.surrogate.recipes import view_blocks, wanted

    (rc, y) = ctx.labels()["ft"]["q1"]
    r, c = rc
    lab = np.unique(r)
    if len(lab) < 2 * folds:
        return lab[:0], np.zeros(0), {}
    mean_y = np.bincount(np.searchsorted(lab, r), y, len(lab)) / np.bincount(np.searchsorted(lab, r), None, len(lab))
    fold = np.random.default_rng([ctx.cfg.seed, 25]).permutation(len(lab)) % folds
    e_pool, e_target = ctx.embeddings()
    cfg = fit_config(ctx)
    has_diag = ctx.diagonal() is not None  # the same candidates as the run's
    out: dict[str, np.ndarray] = {n: np.zeros(len(lab)) for n in names}
    for f in range(folds):
        held = lab[fold == f]
        keep = ~np.isin(r, held)
        scaler = Scaler.fit(y[keep])
        pairs = PairLabels(r[keep], c[keep], scaler.transform(y[keep]))
        a, b = split_train_val(len(pairs), ctx.cfg.fit.val_fraction, ctx.cfg.fit.seed)
        state, _ = fit_loop(cfg, e_pool, e_target, pairs.take(a), pairs.take(b))
        net = network_from_config(cfg, e_pool.shape[1])
        net.load_state_dict(state)
        net.eval()
        head = {**net.estimator(torch.as_tensor(e_pool), torch.as_tensor(e_target)), "lo": scaler.lo, "hi": scaler.hi}
        recs = ch.build_recipes("ft", (r[keep], c[keep], y[keep]), views, net, scaler, has_diag, wanted(ctx),
                                blocks=view_blocks(ctx.cfg.choose))  # fmt: skip
        est = ch.Estimates(recs, views, head, None)
        for name in names:
            if name in est.recipes:
                out[name][fold == f] = est.rows(name, held).mean(axis=1)
    return lab, mean_y.astype(np.float64), out


# ------------------------------------------------------------------------------------------ pointwise
def item_candidates(ctx: Context) -> tuple[dict[str, np.ndarray], dict[str, bool], dict[str, Any]]:
    """Every pointwise candidate's score of every pool item (teacher units where it has them), from the run's
    training labels and fitted network.

    Returns:
        (name -> (M,) float64 scores, name -> free, name -> what new items need: the ridge weights, the signs)
    """
    from nncift.surrogate.network import load_network

    e_pool, lens = _item_features(ctx)
    (rc, y) = ctx.labels()["item"]["q1"]
    net, scaler, _ = load_network(ctx.path("fit", "network_item"))
    surrogate = scaler.inverse(net.score_items(e_pool)).astype(np.float64)
    return _item_scores(e_pool, lens, rc[0], y, surrogate)


def _item_features(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    e_pool, _ = ctx.embeddings()
    pool, _ = ctx.tables(["prompt", "response"])
    return e_pool, item_lengths(pool.column("prompt").to_pylist(), pool.column("response").to_pylist())


def _item_scores(e_pool: np.ndarray, lens: np.ndarray, lab: np.ndarray, y: np.ndarray, surrogate: np.ndarray
                 ) -> tuple[dict[str, np.ndarray], dict[str, bool], dict[str, Any]]:  # fmt: skip
    """The candidates' scores from training labels ``(lab, y)`` and a surrogate's scores."""
    from nncift.surrogate import candidates as ch

    scores, free, params = {"surrogate": surrogate}, {"surrogate": False}, {}
    feats = np.concatenate([e_pool, lens], axis=1)
    w = ch.ridge_gcv(feats[lab], y)
    scores["ridge"], free["ridge"] = ch._aug(feats) @ w, False
    params["ridge"] = {"w": w}
    for j, name in enumerate(("prompt_length", "response_length")):
        x = lens[:, j]
        sign = 1.0 if len(lab) < 3 or np.ptp(x[lab]) == 0 else float(np.sign(np.corrcoef(x[lab], y)[0, 1]) or 1.0)
        scores[name], free[name], params[name] = sign * x, True, {"sign": sign, "column": j}
    return scores, free, params


def out_of_fold(ctx: Context, folds: int = 5) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Cross-fitted scores of the training items: each fold's items scored by every candidate fitted (network
    included) on the other folds, so the training labels serve the held-out choice too at no teacher cost.

    Returns:
        (items (L,) int64, their teacher labels (L,), name -> (L,) out-of-fold scores)
    """
    from nncift.surrogate.fitting import PairLabels, fit_config, fit_loop, split_train_val
    from nncift.surrogate.network import Scaler, network_from_config

    e_pool, lens = _item_features(ctx)
    (rc, y) = ctx.labels()["item"]["q1"]
    lab = rc[0]
    cfg = fit_config(ctx)
    out: dict[str, np.ndarray] = {}
    if len(lab) < 2 * folds:
        return lab[:0], y[:0], out
    fold = np.random.default_rng([ctx.cfg.seed, 24]).permutation(len(lab)) % folds
    zero = np.zeros((1, e_pool.shape[1]), np.float32)
    for f in range(folds):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        scaler = Scaler.fit(y[tr])
        pairs = PairLabels(lab[tr], np.zeros(len(tr), np.int64), scaler.transform(y[tr]))
        a, b = split_train_val(len(pairs), ctx.cfg.fit.val_fraction, ctx.cfg.fit.seed)
        state, _ = fit_loop(cfg, e_pool, zero, pairs.take(a), pairs.take(b))
        net = network_from_config(cfg, e_pool.shape[1])
        net.load_state_dict(state)
        net.eval()
        sur = scaler.inverse(net.score_items(e_pool[lab[te]])).astype(np.float64)
        full = np.zeros(len(e_pool))
        full[lab[te]] = sur
        scores, _, _ = _item_scores(e_pool, lens, lab[tr], y[tr], full)
        for name, v in scores.items():
            out.setdefault(name, np.zeros(len(lab)))[te] = v[lab[te]]
    return lab, np.asarray(y, np.float64), out


def new_item_scores(ctx: Context, name: str, e_new: np.ndarray, prompts: list[str], responses: list[str]) -> np.ndarray:
    """The chosen pointwise candidate's scores of new items (``nncift score``): (M',) float32."""
    import json

    from nncift.surrogate import candidates as ch
    from nncift.surrogate.network import load_network

    params = json.loads(ctx.path("choose", "item_params.json").read_text())
    lens = item_lengths(prompts, responses)
    if name == "surrogate":
        net, scaler, _ = load_network(ctx.path("fit", "network_item"))
        return scaler.inverse(net.score_items(e_new)).astype(np.float32)
    if name == "ridge":
        return (ch._aug(np.concatenate([e_new, lens], axis=1)) @ np.asarray(params["ridge"]["w"], np.float32)).astype(
            np.float32
        )
    p = params[name]
    return (float(p["sign"]) * lens[:, int(p["column"])]).astype(np.float32)


def item_lengths(prompts: list[str], responses: list[str]) -> np.ndarray:
    """(n, 2) float32 log(1 + characters) of each prompt and response."""
    return np.log1p(np.array([[len(p), len(r)] for p, r in zip(prompts, responses, strict=True)], np.float32))


def choose_items(ctx: Context) -> dict[str, Any]:
    """Pointwise teacher: label ``choose.rows`` held-out items, keep the best candidate within noise (free
    first), write every candidate's scores (``choose/item_scores.parquet``) for the estimate stage."""
    from nncift.labels.fanout import label_plan, label_sets
    from nncift.labels.plan import LabelSet
    from nncift.surrogate import candidates as ch

    c, sc = ctx.cfg.choose, ctx.cfg.select
    m, _ = ctx.size()
    scores, free, params = item_candidates(ctx)
    write_parquet(ctx.path("choose", "item_scores.parquet"), pa.table({k: v for k, v in scores.items()}))
    write_json(ctx.path("choose", "item_params.json"), {k: {a: np.asarray(b).tolist() for a, b in v.items()}
                                                        for k, v in params.items()})  # fmt: skip
    names = list(scores)
    if c.mode != "held_out":
        chosen = c.mode if c.mode in names else "surrogate"
        write_json(ctx.path("choose", "choice.json"), {"chosen": chosen, "mode": c.mode, "candidates": names,
                                                       "teacher_pairs": 0, "scores": None, "criterion": "items",
                                                       "free": free})  # fmt: skip
        return {"chosen": chosen, "teacher_pairs": 0}
    plan = label_plan(ctx)
    seen = np.unique(np.concatenate([s.rows for s in plan.sets]))
    rows = held_out_rows(ctx, m, exclude=seen)
    table, seconds = label_sets(ctx, [LabelSet("item", "choose", rows, np.zeros(len(rows), np.int64), paired=True)],
                                rows, np.zeros(0, np.int64))  # fmt: skip
    truth = np.empty(len(rows))
    truth[np.searchsorted(rows, table.column("row").to_numpy())] = table.column("value").to_numpy()
    # the held-out items, and the training items scored out of fold (no teacher cost)
    lab, y, oof = out_of_fold(ctx)
    held = {k: np.concatenate([v[rows], oof[k]]) for k, v in scores.items()}
    truth = np.concatenate([truth, y])
    rows = np.concatenate([rows, lab])
    values = topk_values(held, truth, sc.fraction)
    dec = ch.decide(values, concordance(held, truth), c.z, c.z_near, order=ITEM_PREFERENCE, free=free)
    budget = max(1, round(sc.fraction * len(rows)))
    n_new = len(rows) - len(lab)
    return {"candidates": names, **_record(ctx, dec, names, n_new, rows, budget, "items", free, seconds)}
