"""Benchmark: selection fidelity of the surrogates and of the run's held-out choice, on teachers whose full
kernel is known, swept over variant x labeled fraction x seed.

Every configuration runs the pipeline's own pieces on the teacher's values: the label plan
(``nncift.labels.plan.plan_labels``), the fit (``nncift.surrogate.fitting.fit_loop``, the local twin of the Ray fit), and for
``default`` the choose stage's pieces (``nncift.surrogate.candidates``: the candidate estimates, the held-out rows, the
teacher labels they need, the decision), then greedy selection and :func:`nncift.selection.fidelity.selection_fidelity`.
Every candidate's own gap closed is measured too, and a placebo of the additive candidate (its per-item
effects shuffled across items). Printed side by side: the chosen estimate, every candidate, the best free
one (no network), and random subsets (gap closed 0 by definition).

Teachers:
  se       DELIFT-SE on the default demo data (M=2000, N=500; embeddings from `nncift embed`)
  icl      the full DELIFT ICL table built by benchmarks/build_delift_table.py (SmolLM2, 48/48 tokens, 120 x 150)
  textsim  a TF-IDF word 1-2-gram text-similarity kernel the embeddings cannot read (M=800, N=200)
  icl2     a second full DELIFT ICL table nothing was tuned on: other items (seed 1), 32/32 tokens, 100 x 125
           (benchmarks/data/delift_icl_smollm2_t32_s1.parquet); since then `label.probes=auto` was set on icl and icl2
  icl3     a third full DELIFT ICL table, built after every default was set: other items (seed 2), 64/32 tokens,
           90 x 112 (benchmarks/data/delift_icl_smollm2_t64_s2.parquet)
  charsim  a TF-IDF character 3-5-gram cosine (M=800, N=200): a text teacher of another tokenisation than words; the
           lexical view's character block (choose.lexical) was added after measuring it: not an unseen teacher
  char24   a TF-IDF character 2-4-gram cosine with scikit-learn's defaults otherwise (across word boundaries, raw
           term counts; M=800, N=200), added after every default was set: the lexical view reads it only in part
  bm25     BM25 of each target's text as the query against each example's text (M=800, N=200; asymmetric),
           nothing was tuned on it

    .venv/bin/python benchmarks/bench_fidelity.py --fractions 0.3 --seeds 0,1,2,3,4,5,6,7,8,9
    .venv/bin/python benchmarks/bench_fidelity.py --teacher icl2 --variants paper,default --seeds 0
    .venv/bin/python benchmarks/bench_fidelity.py --teacher icl,icl2,icl3 --plain --variants default   # as user tables

``label.probes=auto`` resolves as in a run: 4 on the DELIFT tables (their provenance), 0 on `se` (DELIFT-SE), and
on the other teachers and on ``--plain`` tables (teachers of unknown nature) decided on each plan's own K_FF
training labels (:func:`nncift.labels.probes.decide_probes`); each run's decision is in the results JSON.

Teacher pairs counted per configuration = training pairs (Q1) + the diagonal (when labeled) + the pairs the
held-out choice labels (``default``); the Q2-Q4 evaluation pairs are a measurement, not needed for the
selection, and are not counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "data" / "delift_icl_smollm2.parquet"
log = logging.getLogger("bench_fidelity")


# ---------------------------------------------------------------------------------------------- teachers
def _pipeline(config: str | None, run_dir: Path, overrides: list[str]):
    from nncift.config import load_config
    from nncift.runner import Runner

    cfg = load_config(config, ["ray.executor=local", *overrides])
    pipe = Runner(cfg, run_dir)
    pipe.run("embed")
    return pipe


TABLE2 = ROOT / "benchmarks" / "data" / "delift_icl_smollm2_t32_s1.parquet"
TABLE3 = ROOT / "benchmarks" / "data" / "delift_icl_smollm2_t64_s2.parquet"
TABLES = {"icl": TABLE, "icl2": TABLE2, "icl3": TABLE3}


def bm25(queries: list[str], docs: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """(Q, D) float32 Okapi BM25 of every query against every document (word tokens, idf over the documents)."""
    import re
    from collections import Counter

    tok = [re.findall(r"\w+", d.lower()) for d in docs]
    qtok = [set(re.findall(r"\w+", q.lower())) for q in queries]
    vocab = {w: i for i, w in enumerate(sorted({w for t in tok for w in t} | {w for q in qtok for w in q}))}
    n, avg = len(docs), np.mean([len(t) for t in tok])
    tf = np.zeros((len(docs), len(vocab)), np.float32)
    for i, t in enumerate(tok):
        for w, c in Counter(t).items():
            tf[i, vocab[w]] = c
    df = (tf > 0).sum(0)
    idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
    lens = tf.sum(1, keepdims=True)
    w = tf * (k1 + 1) / (tf + k1 * (1 - b + b * lens / avg))
    q = np.zeros((len(queries), len(vocab)), np.float32)
    for i, t in enumerate(qtok):
        q[i, [vocab[x] for x in t]] = 1.0
    return ((q * idf) @ w.T).astype(np.float32)


TEXT_TEACHERS = ("textsim", "charsim", "char24", "bm25")


def text_kernels(name: str, pool_texts: list[str], target_texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A text teacher's full kernels. ``bm25``: Okapi BM25 of each target's text as the query against each
    example's text (asymmetric). The others, the cosine of scikit-learn TF-IDF vectors fitted on the pool and
    target texts together: ``textsim`` word 1-2-grams (sublinear tf, min_df 2); ``charsim`` character 3-5-grams
    within word boundaries (sublinear tf, min_df 2); ``char24`` character 2-4-grams across word boundaries, raw
    counts.

    Returns:
        K_FF (M, M) (``K_FF[i, j] = U(pool j -> pool i)``), K_FT (M, N) (``U(pool i -> target j)``) float32.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if name == "bm25":  # K_FF[i, j]: item i's text as the query, example j's as the document
        return bm25(pool_texts, pool_texts), bm25(target_texts, pool_texts).T
    if name == "textsim":
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    elif name == "char24":  # scikit-learn's plain character n-grams: across word boundaries, raw counts
        vec = TfidfVectorizer(analyzer="char", ngram_range=(2, 4))
    elif name == "charsim":  # character n-grams within word boundaries: another tokenisation than the view's words
        vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=2)
    else:
        raise ValueError(f"unknown text teacher {name!r} (one of {', '.join(TEXT_TEACHERS)})")
    x = vec.fit_transform(list(pool_texts) + list(target_texts))
    xp, xt = x[: len(pool_texts)], x[len(pool_texts) :]
    return (xp @ xp.T).toarray().astype(np.float32), (xp @ xt.T).toarray().astype(np.float32)


def teacher(name: str, work: Path, plain: bool = False) -> dict:
    """Embeddings, texts, true kernels and a label for one teacher: {e_pool, e_target, texts_pool, texts_target,
    ff, ft, name, symmetric, lm}. ``plain``: a DELIFT table read as a table without provenance (no teacher-LM
    features; ``label.probes=auto`` decided on the labels), as a user's own table file is."""
    from nncift.influence import build_influence_function
    from nncift.selection import fidelity as fid

    if name == "se":
        pipe = _pipeline(str(ROOT / "jobs/configs/delift_se_2000.yaml"), work / "se", [])
        pool, target = pipe.ctx.items()
        ff, ft = fid.teacher_kernels(build_influence_function("delift_se"), pool, target)
    elif name in TABLES:  # a full DELIFT ICL table: its own data settings give the run its ids
        table = TABLES[name]
        if not table.is_file():
            sys.exit(f"{table} is missing: build it with benchmarks/build_delift_table.py (settings in its .json)")
        meta = json.loads(table.with_suffix(".json").read_text())
        pipe = _pipeline(None, work / name, [f"{k}={v}" for k, v in meta["data_overrides"].items()])
        pool, target = pipe.ctx.items()
        ff, ft = fid.teacher_kernels(build_influence_function("table", path=str(table)), pool, target)
    elif name in TEXT_TEACHERS:  # text teachers on the first 800 / 200 items of the SE demo data
        pipe = _pipeline(str(ROOT / "jobs/configs/delift_se_2000.yaml"), work / "se", [])
        pool, target = pipe.ctx.items()
        pool, target = pool.take(np.arange(800)), target.take(np.arange(200))
        ff, ft = text_kernels(name, [p + "\n" + r for p, r in zip(pool.prompts, pool.responses, strict=True)],
                              [p + "\n" + r for p, r in zip(target.prompts, target.responses, strict=True)])  # fmt: skip
    else:
        raise SystemExit(f"unknown teacher {name!r}")
    from nncift.surrogate.views import item_texts

    return {"name": name, "e_pool": pool.embeddings, "e_target": target.embeddings, "ff": ff, "ft": ft,
            "texts_pool": item_texts(pool.prompts, pool.responses),
            "texts_target": item_texts(target.prompts, target.responses),
            "prompts_pool": pool.prompts, "responses_pool": pool.responses,
            "prompts_target": target.prompts, "responses_target": target.responses,
            "lm": name in TABLES and not plain,  # DELIFT tables: teacher-LM features and probes (the `auto` settings)
            "symmetric": name in ("se", "textsim", "charsim", "char24")}  # fmt: skip


# ---------------------------------------------------------------------------------------------- variants
# name -> (fit.kind, label.design, label.diagonal, fit.cosine_prior)
VARIANTS = {
    "paper": ("mlp", "block", False, False),
    "mlp-block-diag": ("mlp", "block", True, False),
    "mlp-spread-diag": ("mlp", "spread", True, False),
    "bilinear-block": ("bilinear", "block", False, False),
    "bilinear-spread": ("bilinear", "spread", False, False),
    "bilinear-block-diag": ("bilinear", "block", True, False),
    "bilinear-spread-diag": ("bilinear", "spread", True, False),
    "default": ("bilinear", "spread", True, True),
    "default-noprior": ("bilinear", "spread", True, False),  # the default run, the network without the prior
    "active": ("bilinear", "active", True, True),
}


def variant_config(cfg, name: str):
    """``cfg`` with the variant's kind, design, diagonal and cosine prior."""
    import dataclasses

    kind, design, diagonal, prior = VARIANTS[name]
    return dataclasses.replace(
        cfg,
        fit=dataclasses.replace(cfg.fit, kind=kind, cosine_prior=prior),
        label=dataclasses.replace(cfg.label, design=design, diagonal=diagonal),
    )


# ---------------------------------------------------------------------------------------------- one run
CHOOSING = ("default", "default-noprior")  # variants that run the choose stage's held-out choice


def lexical_view(t: dict, seed: int, analyzers: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The lexical view of a teacher's items, as the choose stage fits it (cached per teacher, seed, blocks)."""
    from nncift.surrogate.views import LexicalView

    key = f"_lexical_{seed}_{'+'.join(analyzers)}"
    if key not in t:
        view = LexicalView(analyzers=analyzers, seed=seed).fit(t["texts_pool"] + t["texts_target"])
        t[key] = (view.transform(t["texts_pool"]), view.transform(t["texts_target"]))
    return t[key]


def lm_views(t: dict, cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Teacher-LM hidden-state views (``choose.teacher_features``) of a DELIFT table's items, as the choose stage
    computes them with the embedded SmolLM2 (the LM the tables were built with; cached per teacher)."""
    from nncift.lm.models import embedded_lm_dir
    from nncift.surrogate.views import LMView

    if "_lm" not in t:
        c = cfg.choose
        view = LMView(str(embedded_lm_dir()), [], max_tokens=c.lm_tokens)
        view.layers = LMView.auto_layers(view.n_layers()) if c.lm_layers == "auto" else [
            int(x) for x in c.lm_layers.split(",")]  # fmt: skip
        m = len(t["prompts_pool"])
        feats = view.fit_transform(t["prompts_pool"] + t["prompts_target"], t["responses_pool"] + t["responses_target"])
        t["_lm"] = {f"lm{layer}": (x[:m], x[m:]) for layer, x in feats.items()}
    return t["_lm"]


def choose_on_truth(t: dict, cfg, labels: dict, nets: dict, diag, seed: int, kernels: tuple[str, ...],
                    probes: dict | None = None) -> dict:  # fmt: skip
    """The choose stage on the teacher's values: candidates, held-out rows, the pairs they need (looked up in the
    full kernel, as the teacher would label them), the decision; and every candidate's dense kernels."""
    from nncift.surrogate import candidates as ch
    from nncift.surrogate.recipes import lexical_analyzers, view_blocks

    c, sc = cfg.choose, cfg.select
    m = len(t["ff"])
    names = [x.strip() for x in c.candidates.split(",") if x.strip()]
    kinds = ch.CANDIDATES if "auto" in names else tuple(names)
    if c.views == "none":
        kinds = tuple(k for k in kinds if k not in ("lexical", "diag_lexical"))
    views = {"embedding": (t["e_pool"], t["e_target"])}
    blocks = view_blocks(c)
    if c.views == "lexical":
        views["lexical"] = lexical_view(t, seed, lexical_analyzers(c))
    if t.get("lm") and c.teacher_features != "none":
        views.update(lm_views(t, cfg))
    kv = {k: {v: (p, p if k == "ff" else q) for v, (p, q) in views.items()} for k in kernels}
    recipes, est = {}, {}
    for k in kernels:
        net, scaler, _ = nets[k]
        recipes[k] = ch.build_recipes(k, labels[k], kv[k], net, scaler, diag is not None, kinds,
                                      probes=(probes or {}).get(k), blocks=blocks)  # fmt: skip
    recipes = ch.narrow_family(recipes)
    for k in kernels:
        est[k] = ch.Estimates(recipes[k], kv[k], nets[k][2], diag if k == "ff" else None)
    crit = ch.criterion_rows(m, c.rows, c.whole_pool, sc.fraction, seed, c.top, c.whole_top)
    rows = crit.rows
    probes = ch.probe_criterion(est["ff"], est.get("ft"), crit, sc.objective, sc.eta, sc.nu)
    need = ch.probe_pairs(probes, rows)
    known, cost = {}, 0
    for k in need:
        r0, c0, _ = labels[k]
        if (probes or {}).get(k) is not None:
            r0, c0 = np.concatenate([r0, probes[k][0]]), np.concatenate([c0, probes[k][1]])
        if k == "ff" and diag is not None:
            r0, c0 = np.concatenate([r0, np.arange(m)]), np.concatenate([c0, np.arange(m)])
        before = ch.Known(r0, c0, t[k][r0, c0], t[k].shape[1])
        cost += int((~before.lookup(*need[k])[1]).sum())
        known[k] = before.extended(need[k][0], need[k][1], t[k][need[k]])
    fl = ch.score_probes(probes, rows, known["ff"], known.get("ft"), sc.objective, sc.eta, sc.nu)
    free = {r.name: r.free for r in recipes["ff"]}
    dec, near = ch.decide_criterion(crit, fl, probes, known["ff"], free, c.z, c.z_near)
    dense = {n: {k: est[k].rows(n, np.arange(m)) for k in kernels} for n in est["ff"].recipes}
    add = next((r for r in recipes["ff"] if r.name == "additive" or r.name.startswith("additive_lm")), None)
    if add is not None:  # placebo: the additive estimate with its per-item effects shuffled across items
        prng = np.random.default_rng([seed, 31])
        k = dense[add.name]["ff"] - add.r[:, None] - add.c[None, :]
        k = k + add.r[prng.permutation(m)][:, None] + add.c[prng.permutation(m)][None, :]
        if diag is not None:
            np.fill_diagonal(k, diag)
        dense["additive_placebo"] = {**dense[add.name], "ff": k.astype(np.float32)}
    return {
        "decision": dec,
        "dense": dense,
        "cost": cost,
        "free": free,
        "per_row": {n: {"fl": fl[n].round(6).tolist(), "near": near[n].round(6).tolist()} for n in fl},
    }


def probes_for(t: dict, probes: str) -> int | None:
    """``label.probes`` resolved as the label stage resolves it: ``auto`` is DELIFT ICL's 4 on the DELIFT tables
    (their provenance names delift_icl), DELIFT-SE's 0 on `se`, and None (decided on the run's own training
    labels, :func:`nncift.labels.probes.decide_probes`) on the other teachers and on plain tables (``--plain``),
    whose nature a run does not know."""
    from nncift.influence import teacher_class

    if probes != "auto":
        return int(probes)
    if t["lm"]:
        return teacher_class("delift_icl").auto_probes
    return teacher_class("delift_se").auto_probes if t["name"] == "se" else None


def plan_for(t: dict, lb, fraction: float, seed: int, design: str):
    """The run's label plan on a teacher, as the label stage makes it: the probe columns of a teacher of unknown
    nature decided on the K_FF training labels. Returns (plan, probe decision or None)."""
    from nncift.labels.plan import plan_labels
    from nncift.labels.probes import probe_round

    m, n = t["ff"].shape[0], t["ft"].shape[1]
    probes = probes_for(t, lb.probes)
    plan = plan_labels(m, n, fraction, min(lb.min_count, m), lb.eval_pairs, seed, design=design,
                       partners=lb.partners, diagonal=lb.diagonal, probes=probes or 0)  # fmt: skip
    if probes is not None or fraction >= 1.0:
        return plan, None
    q1 = [s for s in plan.sets if s.kernel == "ff" and s.quadrant == "q1"]
    rows = np.concatenate([np.repeat(s.rows, len(s.cols)) for s in q1])
    cols = np.concatenate([np.tile(s.cols, len(s.rows)) for s in q1])
    decision, sets = probe_round(m, plan, rows, cols, t["ff"][rows, cols], seed, lb.max_pairs)
    plan.sets += sets
    return plan, decision


def run_one(t: dict, cfg, variant: str, fraction: float, seed: int, kernels: tuple[str, ...]) -> dict:
    """Label (from the true kernels) -> fit -> [choose] -> estimate -> select -> fidelity, for one configuration."""
    import torch

    from nncift.kernels.estimate_worker import overwrite_diagonal
    from nncift.selection import fidelity as fid
    from nncift.surrogate.fitting import PairLabels, fit_loop, split_train_val
    from nncift.surrogate.metrics import spearman, topk_recall
    from nncift.surrogate.network import Scaler, network_from_config
    from nncift.surrogate.predict import predict_factors

    cfg = variant_config(cfg, variant)
    lb, nw, sc = cfg.label, cfg.fit, cfg.select
    kind, design = nw.kind, lb.design
    m = t["ff"].shape[0]
    plan, decision = plan_for(t, lb, fraction, seed, design)
    sym = {"auto": t["symmetric"], "true": True, "false": False}[nw.symmetric]
    fit_cfg = {"kind": kind, "hidden": nw.hidden, "rank": nw.rank, "symmetric": sym, "cosine_prior": nw.cosine_prior,
               "lr": nw.lr, "weight_decay": nw.weight_decay, "epochs": nw.epochs, "batch_size": nw.batch_size,
               "patience": nw.patience, "seed": seed}  # fmt: skip
    if variant in CHOOSING and sc.objective in ("flmi", "flcg"):
        kernels = tuple(dict.fromkeys((*kernels, "ft")))
    est, q4, round2, nets, q1_labels, t0 = {}, {}, {}, {}, {}, time.perf_counter()
    diag = np.diag(t["ff"]).astype(np.float32) if lb.diagonal else None
    for kernel in kernels:
        true, e_cols = t[kernel], (t["e_pool"] if kernel == "ff" else t["e_target"])
        sets = [s for s in plan.sets if s.kernel == kernel]
        rows = np.concatenate([np.repeat(s.rows, len(s.cols)) for s in sets if s.quadrant == "q1"])
        cols = np.concatenate([np.tile(s.cols, len(s.rows)) for s in sets if s.quadrant == "q1"])
        if kernel == "ff":
            keep = rows != cols
            rows, cols = rows[keep], cols[keep]
        if design == "active":  # the second round, exactly as the label stage plans it
            from nncift.labels.active import second_round

            col_l = plan.pool_labeled if kernel == "ff" else plan.target_labeled
            r2, c2 = second_round(fit_cfg, t["e_pool"], e_cols, (rows, cols, true[rows, cols]), plan.pool_labeled,
                                  col_l, (rows, cols), lb.partners - lb.partners // 2, kernel == "ff",
                                  nw.val_fraction)  # fmt: skip
            rows, cols = np.concatenate([rows, r2]), np.concatenate([cols, c2])
            round2[kernel] = len(r2)
        q1_labels[kernel] = (rows, cols, true[rows, cols])
        scaler = Scaler.fit(true[rows, cols])
        q1 = PairLabels(rows, cols, scaler.transform(true[rows, cols]))
        tr, va = split_train_val(len(q1), nw.val_fraction, seed)
        state, _ = fit_loop(fit_cfg, t["e_pool"], e_cols, q1.take(tr), q1.take(va))
        net = network_from_config(fit_cfg, t["e_pool"].shape[1])
        net.load_state_dict(state)
        net.eval()
        head = net.estimator(torch.as_tensor(t["e_pool"]), torch.as_tensor(e_cols))
        nets[kernel] = (net, scaler, {**head, "lo": scaler.lo, "hi": scaler.hi})
        k = predict_factors(head)
        k = k * np.float32(scaler.hi - scaler.lo) + np.float32(scaler.lo)
        if kernel == "ff" and lb.diagonal:
            overwrite_diagonal(k, diag, 0, m, 0, m)
        est[kernel] = k
        for s in sets:
            if s.quadrant == "q4":
                sub_t, sub_e = true[np.ix_(s.rows, s.cols)], k[np.ix_(s.rows, s.cols)]
                r, c = np.meshgrid(s.rows, s.cols, indexing="ij")
                ok = (r != c).reshape(-1)
                q4[kernel] = {
                    "spearman": spearman(sub_e.reshape(-1)[ok], sub_t.reshape(-1)[ok]),
                    "topk_recall": topk_recall(
                        sub_e.reshape(-1)[ok],
                        sub_t.reshape(-1)[ok],
                        r.reshape(-1)[ok],
                        c.reshape(-1)[ok],
                        cfg.fidelity.topk,
                    ),
                }
    budget = max(1, int(sc.fraction * m))
    pairs = sum(s.num_pairs for s in plan.sets if s.quadrant == "q1" and s.kernel in kernels)
    pairs += plan.diag_pairs + plan.probe_pairs + sum(round2.values())
    out = {"variant": variant, "kind": kind, "design": design, "fraction": fraction, "seed": seed,
           "labeled_items": len(plan.pool_labeled), "q4": q4, "probe_decision": decision}  # fmt: skip
    subsets = {"est": fid.select(est["ff"], est.get("ft"), budget, sc.objective, sc.eta, sc.nu)}
    if variant in CHOOSING:
        probe = {}
        for s_ in (s_ for s_ in plan.sets if s_.quadrant == "probe"):
            r_, c_ = np.repeat(s_.rows, len(s_.cols)), np.tile(s_.cols, len(s_.rows))
            old = probe.get("ff", (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)))
            probe["ff"] = (np.concatenate([old[0], r_]), np.concatenate([old[1], c_]),
                           np.concatenate([old[2], t["ff"][r_, c_]]))  # fmt: skip
        ch = choose_on_truth(t, cfg, q1_labels, nets, diag, seed, kernels, probe)
        pairs += ch["cost"]
        for name, dense in ch["dense"].items():
            subsets[name] = fid.select(dense["ff"], dense.get("ft"), budget, sc.objective, sc.eta, sc.nu)
        chosen = ch["decision"]["chosen"]
        subsets["est"] = subsets[chosen]
        out.update(chosen=chosen, choose_pairs=ch["cost"], free=ch["free"], choice_per_row=ch["per_row"])
    res = fid.selection_fidelity(t["ff"], t["ft"], subsets, budget, sc.objective, sc.eta, sc.nu,
                                 cfg.fidelity.random_subsets, seed)  # fmt: skip
    out.update(teacher_pairs=int(pairs), gap_closed=res["subsets"]["est"]["gap_closed"],
               jaccard=res["subsets"]["est"]["jaccard"], seconds=time.perf_counter() - t0,
               selected=sorted(int(i) for i in subsets["est"]))  # fmt: skip
    if variant in CHOOSING:
        out["candidates"] = {k: v["gap_closed"] for k, v in res["subsets"].items() if k != "est"}
    return out


def baselines(t: dict, cfg) -> dict:
    """Zero-label (embedding cosine) and exact-diagonal-only selections under the teacher's kernel."""
    from nncift.selection import fidelity as fid

    sc = cfg.select
    m = t["ff"].shape[0]
    budget = max(1, int(sc.fraction * m))
    cos_ff, cos_ft = fid.cosine_kernels(t["e_pool"], t["e_target"])
    diag_only = np.full_like(t["ff"], np.median(t["ff"]))
    np.fill_diagonal(diag_only, np.diag(t["ff"]))
    subsets = {
        "zero_label": fid.select(cos_ff, cos_ft, budget, sc.objective, sc.eta, sc.nu),
        "diag_only": fid.select(diag_only, t["ft"] * 0 + np.median(t["ft"]), budget, sc.objective, sc.eta, sc.nu),
    }
    res = fid.selection_fidelity(t["ff"], t["ft"], subsets, budget, sc.objective, sc.eta, sc.nu,
                                 cfg.fidelity.random_subsets, 0)  # fmt: skip
    out = {k: v["gap_closed"] for k, v in res["subsets"].items()}
    if np.ptp(np.diag(t["ff"])) < 1e-4:  # a constant diagonal (cosine teachers): the baseline is meaningless
        out["diag_only"] = None
    out["budget"], out["diag_pairs"] = budget, m
    return out


# ---------------------------------------------------------------------------------------------- report
def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["fraction"]), []).append(r)
    out = []
    for (variant, frac), rs in groups.items():

        def ms(vals: list) -> tuple[float, float]:
            v = np.array([x for x in vals if x is not None], float)
            return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (np.nan, np.nan)

        rec = {"variant": variant, "fraction": frac, "seeds": len(rs),
               "teacher_pairs": int(np.mean([r["teacher_pairs"] for r in rs])),
               "gap_closed": ms([r["gap_closed"] for r in rs]), "jaccard": ms([r["jaccard"] for r in rs])}  # fmt: skip
        if "candidates" in rs[0]:
            from collections import Counter

            names = list(dict.fromkeys(c for r in rs for c in r["candidates"]))  # the additive member varies by seed
            rec["candidates"] = {c: ms([r["candidates"].get(c) for r in rs]) for c in names}
            rec["chosen"] = dict(Counter(r["chosen"] for r in rs).most_common())
            rec["free"] = {k: v for r in rs for k, v in r["free"].items()}
            rec["best_free"] = ms([max(r["candidates"][c] for c in r["free"] if r["free"][c]) for r in rs])
            rec["choose_pairs"] = int(np.mean([r["choose_pairs"] for r in rs]))
        for k in ("ff", "ft"):
            if k in rs[0]["q4"]:
                rec[f"q4_spearman_{k}"] = ms([r["q4"][k]["spearman"] for r in rs])
                rec[f"q4_top10_{k}"] = ms([r["q4"][k]["topk_recall"] for r in rs])
        out.append(rec)
    return out


def print_table(teacher_name: str, summary: list[dict], base: dict) -> None:
    print(f"\n## teacher: {teacher_name}  (selection budget {base['budget']}; mean ± sd over seeds)\n")
    print("variants (fit.kind, label.design, label.diagonal, fit.cosine_prior):")
    for v in dict.fromkeys(r["variant"] for r in summary):
        print(f"  {v}: {VARIANTS[v]}")
    print()
    print("| variant | items labeled | teacher pairs | gap closed | Jaccard | Q4 Spearman K_FF | Q4 top-10 K_FF |")
    print("|---|---|---|---|---|---|---|")
    order = list(VARIANTS)
    for r in sorted(summary, key=lambda r: (order.index(r["variant"]), r["fraction"])):
        g, j = r["gap_closed"], r["jaccard"]
        sp, tk = r.get("q4_spearman_ff", (np.nan, np.nan)), r.get("q4_top10_ff", (np.nan, np.nan))
        print(f"| {r['variant']} | {r['fraction']:.0%} | {r['teacher_pairs']:,} | {g[0]:+.3f} ± {g[1]:.3f} "
              f"| {j[0]:.3f} | {sp[0]:.3f} | {tk[0]:.2f} |")  # fmt: skip
    print(f"| zero-label (embedding cosine) | 0% | 0 | {base['zero_label']:+.3f} | – | – | – |")
    if base["diag_only"] is not None:
        print(f"| exact diagonal only, constant off-diagonal | – | {base['diag_pairs']:,} | {base['diag_only']:+.3f} "
              "| – | – | – |")  # fmt: skip
    print("| random subset | 0% | 0 | +0.000 | – | – | – |")
    for r in (r for r in summary if "candidates" in r):
        print(
            f"\n### `{r['variant']}` at {r['fraction']:.0%}: every candidate of the held-out choice "
            f"({r['seeds']} seeds; the choice cost {r['choose_pairs']:,} teacher pairs on average)\n"
        )
        print("| estimate | needs a network | gap closed | chosen in |")
        print("|---|---|---|---|")
        g = r["gap_closed"]
        print(f"| **the run's choice** | – | **{g[0]:+.3f} ± {g[1]:.3f}** | {r['seeds']} of {r['seeds']} |")
        bf = r["best_free"]
        print(f"| best free estimate of each seed | no | {bf[0]:+.3f} ± {bf[1]:.3f} | – |")
        for c, (mean, sd) in sorted(r["candidates"].items(), key=lambda kv: -kv[1][0]):
            net = "–" if c not in r["free"] else ("no" if r["free"][c] else "yes")
            print(f"| {c} | {net} | {mean:+.3f} ± {sd:.3f} | {r['chosen'].get(c, 0)} |")


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in res["summary"])):
            pts = sorted((r["teacher_pairs"], r["gap_closed"]) for r in res["summary"] if r["variant"] == variant)
            x = [p[0] for p in pts]
            y = [p[1][0] for p in pts]
            e = [p[1][1] for p in pts]
            style = "s-" if variant == "default" else ("o--" if variant == "paper" else ".-")
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=variant, color=f"C{i}")
        ax.axhline(res["baselines"]["zero_label"], color="tab:blue", ls=":", label="zero-label (cosine)")
        ax.axhline(0, color="grey", lw=0.8, label="random")
        ax.axhline(1, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="teacher pairs labeled", ylabel="gap closed", title=f"teacher: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="se,icl,textsim,icl2,bm25,icl3,charsim,char24",
                    help="comma-separated: se | icl | textsim | icl2 | bm25 | icl3 | charsim | char24")  # fmt: skip
    ap.add_argument("--variants", default="paper,default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--fractions", default="0.3", help="fractions of items labeled")
    ap.add_argument("--max-train-pairs", type=int, default=700_000, help="skip block designs above this")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--kernels", default="ff", help="kernels to fit (ff suffices for objective fl)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every run (e.g. label.diagonal=true)")  # fmt: skip
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_fidelity"), help="run directories (embeddings)")
    ap.add_argument("--out", default=None, help="results JSON (default <work>/results.json); the plot goes beside")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--plain", action="store_true",
                    help="read the DELIFT tables as tables without provenance, as a user's own table file: no "
                         "teacher-LM features, label.probes=auto decided on the run's labels")  # fmt: skip
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from nncift.config import load_config

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cfg = load_config(None, args.overrides)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    results = {}
    for name in split(args.teacher):
        t = teacher(name, work, plain=args.plain)
        base = baselines(t, cfg)
        rows = []
        for variant in split(args.variants):
            for frac in map(float, split(args.fractions)):
                lab = max(int(frac * len(t["ff"])), 2)
                if VARIANTS[variant][1] == "block" and lab * lab > args.max_train_pairs:
                    print(
                        f"[{name}] {variant:22s} u={frac:.2f}: skipped ({lab * lab:,} block pairs > --max-train-pairs)"
                    )
                    continue
                for seed in map(int, split(args.seeds)):
                    r = run_one(t, cfg, variant, frac, seed, tuple(split(args.kernels)))
                    rows.append(r)
                    print(f"[{name}] {variant:22s} u={frac:.2f} seed={seed}: pairs {r['teacher_pairs']:>7,} "
                          f"gap {r['gap_closed']:+.3f} jac {r['jaccard']:.3f} "
                          f"q4 {r['q4'].get('ff', {}).get('spearman', float('nan')):.3f} ({r['seconds']:.0f}s)"
                          + (f" chosen {r['chosen']}" if "chosen" in r else ""), flush=True)  # fmt: skip
        summary = summarise(rows)
        print_table(name, summary, base)
        results[name] = {"runs": rows, "summary": summary, "baselines": base}
    out = Path(args.out) if args.out else work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config_overrides": args.overrides, "plain": args.plain, "results": results}, indent=1,
                              default=float))  # fmt: skip
    print(f"results: {out}")
    plot(out.with_suffix(".png"), results)


if __name__ == "__main__":
    main()
