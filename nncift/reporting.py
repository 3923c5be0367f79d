"""report.json (machine-readable), report.md (human-readable) and plots for a run directory."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq

from nncift.config import RunConfig
from nncift.store import RunDir, atomic_path, clean_json, write_json, write_text

log = logging.getLogger(__name__)


def build_report(store: RunDir) -> dict:
    """Collect the stage markers and metrics of a finished run into one dict (keys: docs/outputs.md).

    ``store.order`` (the pipeline's stage names, set by the runner) says which stages to collect, in order."""
    STAGES = list(store.order)
    done = {s: store.done_info(s) or {} for s in STAGES}
    metrics = json.loads(store.path("fit", "metrics.json").read_text())
    lab = done["label"]
    rep = {
        "run_dir": str(store.root),
        "seconds": {s: round(done[s].get("seconds", 0.0), 3) for s in STAGES if s != "report" and done[s]},
        "peak_rss_mib": {s: done[s]["peak_rss_mib"] for s in STAGES if done[s].get("peak_rss_mib") is not None},
        "data": {"M": done["data"].get("M"), "N": done["data"].get("N")},
        "label": {
            "function": lab.get("function"),
            "kind": lab.get("kind", "pairwise"),
            "design": lab.get("design", "block"),
            "diag_pairs": lab.get("diag_pairs", 0),
            "probe_pairs": lab.get("probe_pairs", 0),
            "probe_decision": lab.get("probe_decision"),
            "pairs_labeled": lab.get("pairs_labeled"),
            "train_pairs": lab.get("train_pairs"),
            "eval_pairs": lab.get("eval_pairs"),
            "total_pairs": lab.get("total_pairs"),
            "fraction_of_pairs_labeled": (lab.get("pairs_labeled") or 0) / max(1, lab.get("total_pairs") or 1),
        },
        "network": {
            "kind": done["fit"].get("kind"),
            "symmetric": done["fit"].get("symmetric", False),
            "parameters": done["fit"].get("parameters_per_network"),
            **{
                k: {"quadrants": v["quadrants"], "epochs": len(v["history"]), "train_pairs": v["train_pairs"]}
                for k, v in metrics.items()
            },
        },
        "estimate": {
            k: done["estimate"].get(k) for k in ("pairs", "blocks", "layout", "candidates", "candidate_recall")
        },
        "selection": {k: done["select"].get(k) for k in ("objective", "budget", "value")},
    }
    rep["teacher_cost"] = teacher_cost(lab, done.get("choose") or {})
    choice_path = store.path("choose", "choice.json")
    if choice_path.is_file():
        ch = json.loads(choice_path.read_text())
        rep["choice"] = {k: ch.get(k) for k in ("chosen", "mode", "candidates", "teacher_pairs", "rows", "budget",
                                                 "objective", "scores", "z", "z_near", "factor_width", "criterion", "whole_pool")}  # fmt: skip
        if store.path("choose", "recipes.json").is_file():
            free = json.loads(store.path("choose", "recipes.json").read_text())
            rep["choice"]["free"] = {r["name"]: r["free"] for r in next(iter(free.values()))}
        else:  # pointwise candidates
            rep["choice"]["free"] = ch.get("free") or {}
    fid_path = store.path("report", "fidelity.json")
    if fid_path.is_file():
        fid = json.loads(fid_path.read_text())
        rep["fidelity"] = {k: v for k, v in fid.items() if k != "exact"}
    rep["seconds"]["total"] = round(sum(rep["seconds"].values()), 3)
    return rep


def teacher_cost(lab: dict, choose: dict) -> dict:
    """The teacher's cost of the run in its own unit (pairs, or items for a teacher paying per item) and seconds:
    what the selection needed (training, diagonal, probe and choose labels) and what only the report read."""
    unit = "items" if lab.get("cost_unit") == "item" or lab.get("kind") == "pointwise" else "pairs"
    choose_n = int(choose.get("teacher_pairs") or 0)
    seconds = float(lab.get("seconds") or 0.0) + float(choose.get("teacher_seconds") or 0.0)
    if unit == "items" and lab.get("kind") != "pointwise":  # pairwise, paid per distinct item (LESS)
        items = lab.get("items_touched") or {}
        choose_n = int(choose.get("teacher_items", choose_n))
        sel = int(items.get("labeled", 0)) + choose_n
        return {"unit": unit, "selection": sel, "report_only": int(items.get("report", 0)), "choose": choose_n,
                "seconds": seconds, "pairs_labeled": lab.get("pairs_labeled")}  # fmt: skip
    parts = {"training": lab.get("train_pairs") or 0, "diagonal": lab.get("diag_pairs") or 0,
             "probe": lab.get("probe_pairs") or 0, "choose": choose_n}  # fmt: skip
    return {"unit": unit, **parts, "selection": int(sum(parts.values())), "report_only": lab.get("eval_pairs") or 0,
            "seconds": seconds}  # fmt: skip


def _probe_decision_markdown(dec: dict | None) -> str:
    """The label stage's probe decision for a teacher of unknown nature (``label/probes.json``), in words."""
    if not dec:
        return ""
    what = f"{dec['probes']} probe columns" if dec["probes"] else "no probe columns"
    return (f" `label.probes=auto` on a teacher of unknown nature, decided on the K_FF training pairs labeled "
            f"both ways: {what} ({dec['reason']}).")  # fmt: skip


def _cost_markdown(rep: dict) -> list[str]:
    c = rep.get("teacher_cost") or {}
    if not c:
        return []
    lab = rep["label"]
    total = lab.get("total_pairs") or 0
    if c["unit"] == "items" and lab.get("kind") != "pointwise":
        what = (f"{c['selection']:,} items featurised for the selection ({c['choose']:,} of them for the held-out "
                f"choice), {c['report_only']:,} more for the report only")  # fmt: skip
    else:
        parts = [f"{c[k]:,} {name}" for k, name in (("training", "training"), ("diagonal", "exact self-utilities"),
                 ("probe", "probe"), ("choose", "for the held-out choice")) if c[k] or k == "training"]  # fmt: skip
        what = (f"{c['selection']:,} {c['unit']} for the selection ({', '.join(parts)}; "
                f"{c['selection'] / max(1, total):.3g} of all {total:,}), {c['report_only']:,} more for the report only")  # fmt: skip
    return [f"Teacher cost, in the teacher's own unit: {what}; {c['seconds']:.1f} s of teacher time (label and choose "
            "stages).", ""]  # fmt: skip


def _plots(store: RunDir, rep: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    preds = pq.read_table(store.path("fit", "eval_predictions.parquet")).to_pydict()
    kern, quad = np.asarray(preds["kernel"]), np.asarray(preds["quadrant"])
    true, pred = np.asarray(preds["true"]), np.asarray(preds["pred"])
    ks = _kernels(rep)
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4.5), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        q = "q4" if k != "item" else "q2"
        sel = (kern == k) & (quad == q)
        ax.scatter(true[sel], pred[sel], s=4, alpha=0.4)
        lo, hi = (
            (float(min(true[sel].min(), pred[sel].min())), float(max(true[sel].max(), pred[sel].max())))
            if sel.any()
            else (0.0, 1.0)
        )
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(
            title=f"K_{k.upper()} Q4 (unseen rows x unseen cols)" if k != "item" else "item scores Q2 (unseen items)",
            xlabel="teacher (scaled)",
            ylabel="InfluenceNetwork (scaled)",
        )
    fig.tight_layout()
    files.append(_save(fig, store, "pred_vs_true_q4.png"))
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
    names = ("network", "baseline_mean", "baseline_zero", "baseline_uniform")
    for ax, k in zip(axes[0], ks, strict=True):
        qs = list(rep["network"][k]["quadrants"])
        x = np.arange(len(qs))
        for i, nme in enumerate(names):
            ax.bar(
                x + (i - 1.5) * 0.2,
                [rep["network"][k]["quadrants"][q][nme]["mse"] for q in qs],
                0.2,
                label=nme,
            )
        ax.set(
            xticks=x,
            xticklabels=[q.upper() for q in qs],
            title=f"K_{k.upper()} MSE per quadrant",
            yscale="log",
            ylabel="MSE (scaled labels)",
        )
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, store, "mse_per_quadrant.png"))
    fid = rep.get("fidelity") or {}
    if fid.get("measured"):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        zname = (fid["zero_label"].get("name") or "embedding cosine").replace("_", " ")
        names = ["random (mean)", f"zero-label\n({zname})", "NN-CIFT\n(this run)", "teacher\n(exact kernel)"]
        vals = [0.0, fid["zero_label"]["gap_closed"] or 0.0, fid["gap_closed"] or 0.0, 1.0]
        colors = ["#bbbbbb", "#8fb3d9", "#d9822b", "#4a4a4a"]
        ax.bar(names, vals, color=colors)
        for x, v in enumerate(vals):
            ax.text(x, v + (0.02 if v >= 0 else -0.06), f"{v:+.2f}", ha="center", fontsize=9)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(
            ylabel="gap closed",
            title=f"Selection fidelity under the teacher's kernel ({fid['objective']}, budget {fid['budget']})",
        )
        ax.title.set_fontsize(10)
        fig.tight_layout()
        files.append(_save(fig, store, "fidelity.png"))
    plt.close("all")
    return files


def _save(fig, store: RunDir, name: str) -> str:
    path = store.path("report", name)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return name


def versus(rep: dict) -> dict | None:
    """This run against the full teacher whose kernel is the fidelity truth, when that kernel's cost is known
    (``fidelity.truth_cost``): teacher pairs and seconds of both, and the gap closed of the run, of the zero-label
    cosine and of the exact diagonal with a constant off-diagonal (the ``diag_const`` candidate)."""
    fid, cost = rep.get("fidelity") or {}, rep.get("teacher_cost") or {}
    full = fid.get("truth_cost")
    if not full or not fid.get("measured") or cost.get("unit") != "pairs":
        return None
    diag = (fid.get("candidates") or {}).get("diag_const") or {}
    return {
        "function": full.get("function") or rep["label"]["function"],
        "full_pairs": full["pairs"],
        "full_seconds": full["seconds"],
        "run_pairs": int(cost["selection"]),
        "run_seconds": float(cost["seconds"]),
        "gap_closed": fid.get("gap_closed"),
        "zero_label": (fid.get("zero_label") or {}).get("gap_closed"),
        "diag_const": diag.get("gap_closed"),
        "diag_pairs": int(rep["label"].get("diag_pairs") or 0),
        # the full kernel at the teacher rate this run measured (its labels' pairs over their seconds)
        "full_seconds_at_run_rate": full["pairs"] * float(cost["seconds"]) / max(1, int(cost["selection"])),
    }


def _versus_markdown(rep: dict) -> list[str]:
    """The closing section: NN-CIFT against the full teacher (cost and gap closed, beside the free baselines)."""
    v = versus(rep)
    if v is None:
        return []
    fmt = lambda g: "–" if g is None else f"{g:+.3f}"  # noqa: E731
    return [
        f"## NN-CIFT against full {v['function']}",
        "",
        "Gap closed is measured under the full kernel (0 = a random subset, 1 = the full teacher's own selection).",
        "",
        "| | teacher pairs | teacher seconds | gap closed |",
        "|---|---|---|---|",
        f"| full {v['function']} (every pair; the cost the truth table recorded when it was built) | "
        f"{v['full_pairs']:,} | {v['full_seconds']:,.0f} | +1.000 |",
        f"| full {v['function']} at this run's own teacher rate ({v['run_pairs'] / max(v['run_seconds'], 1e-9):.1f} "
        f"pairs/s) | {v['full_pairs']:,} | {v['full_seconds_at_run_rate']:,.0f} | +1.000 |",
        f"| **this run** (NN-CIFT: labels + choice) | **{v['run_pairs']:,}** "
        f"({100 * v['run_pairs'] / v['full_pairs']:.1f}%) | **{v['run_seconds']:,.0f}** "
        f"({100 * v['run_seconds'] / v['full_seconds']:.1f}%) | **{fmt(v['gap_closed'])}** |",
        f"| zero-label embedding cosine (free) | 0 | 0 | {fmt(v['zero_label'])} |",
        f"| exact diagonal + constant off-diagonal | {v['diag_pairs']:,} | – | {fmt(v['diag_const'])} |",
        "",
    ]


def _estimate_markdown(est: dict) -> list[str]:
    """The candidate-search line of the report (nothing for exhaustive estimation)."""
    if not est.get("candidates"):
        return []
    rec = ", ".join(f"K_{k.upper()} {v:.3f}" for k, v in (est.get("candidate_recall") or {}).items())
    return [
        f"Estimation by {est['candidates']} candidate search; top-k recall against exhaustive estimation: {rec}.",
        "",
    ]


def _markdown(rep: dict, plots: list[str]) -> str:
    lines = [
        "# NN-CIFT run report",
        "",
        f"Run directory: `{rep['run_dir']}`. Pool M = {rep['data']['M']}, target N = {rep['data']['N']}.",
        "",
        "## Cost",
        "",
        "| stage | seconds | driver peak RSS of the stage (MiB) |",
        "|---|---|---|",
        *[f"| {s} | {v:.1f} | {rep.get('peak_rss_mib', {}).get(s, '–')} |" for s, v in rep["seconds"].items()],
        "",
        f"Influence function `{rep['label']['function']}` labeled {rep['label']['pairs_labeled']:,} of "
        f"{rep['label']['total_pairs']:,} {'items' if rep['label'].get('kind') == 'pointwise' else 'pairs'} ({100 * rep['label']['fraction_of_pairs_labeled']:.3g}%) "
        f"with the `{rep['label']['design']}` design: {rep['label']['train_pairs']:,} for training, "
        f"{rep['label']['eval_pairs']:,} for the fidelity report"
        + (f", {rep['label']['diag_pairs']:,} exact self-utilities" if rep["label"]["diag_pairs"] else "")
        + (f", {rep['label']['probe_pairs']:,} probe pairs" if rep["label"].get("probe_pairs") else "")
        + "."
        + _probe_decision_markdown(rep["label"].get("probe_decision")),
        "",
        *_cost_markdown(rep),
        *_estimate_markdown(rep.get("estimate") or {}),
        *_fidelity_markdown(rep.get("fidelity")),
        *_choice_markdown(rep.get("choice"), rep.get("fidelity")),
        "## Surrogate fit (labels min-max scaled with the training scaler)",
        "",
        f"`fit.kind={rep['network']['kind']}`"
        + (" (symmetric towers)" if rep["network"]["symmetric"] else "")
        + f", {rep['network']['parameters']:,} parameters per network.",
        "",
    ]
    for k in _kernels(rep):
        lines += [
            f"### K_{k.upper()} ({rep['network'][k]['epochs']} epochs)",
            "",
            "| quadrant | pairs | MSE | MAE | Spearman | top-k recall | MSE mean-baseline | MSE zero | MSE uniform |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for q, v in rep["network"][k]["quadrants"].items():
            sp, rc = v["network"]["spearman"], v["network"].get("topk_recall")
            lines.append(
                f"| {q.upper()} | {v['pairs']} | {v['network']['mse']:.4f} | {v['network']['mae']:.4f} | "
                f"{'n/a' if sp is None else f'{sp:.3f}'} | {'n/a' if rc is None else f'{rc:.2f}'} | "
                f"{v['baseline_mean']['mse']:.4f} | "
                f"{v['baseline_zero']['mse']:.4f} | {v['baseline_uniform']['mse']:.4f} |"
            )
        lines.append("")
    sel = rep["selection"]
    lines += [
        "## Selection",
        "",
        f"Objective `{sel['objective']}`, budget {sel['budget']}, "
        f"objective value {sel['value']:.3f}. Items: `select/selected.jsonl`.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", *_versus_markdown(rep)]
    return "\n".join(lines).rstrip() + "\n"


def _fmt(v: float | None, spec: str = "+.3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _fidelity_markdown(fid: dict | None) -> list[str]:
    """The fidelity section: gap closed, Jaccard and the zero-label baseline (or why it is not measured)."""
    if not fid:
        return []
    if not fid.get("measured"):
        return ["## Selection fidelity", "", f"Not measured: {fid.get('reason')}.", ""]
    z = fid["zero_label"]
    return [
        "## Selection fidelity (under the teacher's own kernel)",
        "",
        f"Objective `{fid['objective']}`, budget {fid['budget']}, ground truth `{fid['truth']}`. "
        f"f = objective on the teacher's min-max-scaled kernels; gap closed = (f − mean f(random)) / "
        f"(f(teacher's subset) − mean f(random)), over {fid['random_subsets']} seeded random subsets.",
        "",
        "| subset | f | gap closed | Jaccard with the teacher's subset |",
        "|---|---|---|---|",
        f"| teacher's own selection (exact kernel) | {fid['f_exact']:.2f} | 1 | 1 |",
        f"| **NN-CIFT (this run)** | {fid['f']:.2f} | **{_fmt(fid['gap_closed'])}** | {fid['jaccard']:.3f} |",
        f"| zero-label baseline ({z.get('name', 'embedding cosine').replace('_', ' ')}, no teacher calls) | "
        f"{z['f']:.2f} | {_fmt(z['gap_closed'])} | "
        f"{z['jaccard']:.3f} |",
        f"| random (mean ± sd) | {fid['f_random_mean']:.2f} ± {fid['f_random_sd']:.2f} | 0 | – |",
        "",
    ]


def _choice_markdown(choice: dict | None, fid: dict | None) -> list[str]:
    """The choice of the estimate: every candidate's held-out scores, the choice and (where the teacher's full
    kernel is known) every candidate's gap closed."""
    if not choice:
        return []
    chosen = choice["chosen"]
    lines = ["## Choice of the estimate (the run's own held-out labels)", ""]
    scores = choice.get("scores")
    cands = (fid or {}).get("candidates") or {}
    if not scores:
        lines += [f"`choose.mode={choice.get('mode')}`: the estimate is **{chosen}** (no held-out choice).", ""]
        if cands:
            lines += ["| candidate | gap closed (teacher's full kernel) |", "|---|---|"]
            lines += [
                f"| {'**' + n + '**' if n == chosen else n} | {_fmt(v['gap_closed'])} |" for n, v in cands.items()
            ]
            lines.append("")
        return lines
    items = choice.get("criterion") == "items"
    first, second = ("top-k value", "order (concordance)") if items else ("coverage", "neighbour quality")
    head = (
        f"| candidate | free | held-out {first} (Δ to best ± se) | held-out {second} (Δ to best ± se) | "
        f"within noise of the best {first} | gap closed (teacher's full {'scores' if items else 'kernel'}) |"
    )
    whole = bool(choice.get("whole_pool"))
    if whole:  # every row of the pool: the objective of each candidate's own selection, not a sample
        head = (
            "| candidate | free | objective of its own selection (Δ to best ± se over rows) | – | "
            "kept if best | gap closed (teacher's full kernel) |"
        )
        where = (
            f"Every row of the pool ({choice['rows']}; `choose.whole_pool`): each candidate's own selection "
            f"(budget {choice.get('budget')}) valued under the teacher's labels of each row's best coverers, "
            f"{choice['teacher_pairs']:,} teacher pairs; the best value is kept. "
        )
    else:
        where = (
            f"{choice['rows']} held-out rows, {choice['teacher_pairs']:,} teacher "
            f"{'items' if choice.get('criterion') == 'items' else 'pairs'} (criterion of `{choice.get('objective')}`, "
            f"budget {choice.get('budget')} per held-out problem). "
        )
    lines += [
        where + f"Chosen: **{chosen}**" + (" (needs no network)." if choice.get("free", {}).get(chosen) else "."),
        "",
        head,
        "|---|---|---|---|---|---|",
    ]
    for n, sc in sorted(scores.items(), key=lambda kv: -kv[1]["fl"]["mean"]):
        fl, near = sc["fl"], sc["near"]
        g = _fmt(cands[n]["gap_closed"]) if n in cands else "–"
        name = f"**{n}** (chosen)" if n == chosen else n
        free = "yes" if choice.get("free", {}).get(n) else "no"
        cov = f"{fl['mean']:.4f} ({-fl['diff_to_best']:+.4f} ± {fl['se']:.4f})"
        nq = f"{near['mean']:.4f}" + (f" ({-near['diff_to_best']:+.4f} ± {near['se']:.4f})" if "se" in near else "")
        nq = "–" if whole else nq
        lines.append(f"| {name} | {free} | {cov} | {nq} | {'yes' if sc['eligible'] else 'no'} | {g} |")
    lines += [
        "",
        'How the choice is made: `nncift.surrogate.candidates` (docs/fidelity.md, "Choosing the estimate").',
        "",
    ]
    return lines


def _kernels(rep: dict) -> list[str]:
    """The surrogates of the run: ff and ft, or the pointwise ``item``."""
    return [k for k in ("ff", "ft", "item") if isinstance(rep["network"].get(k), dict)]


def write_report(store: RunDir, cfg: RunConfig) -> dict:
    """Write report/report.json, report/report.md and the PNG plots."""
    rep = clean_json(build_report(store))
    plots = _plots(store, rep)
    write_json(store.path("report", "report.json"), rep)
    write_text(store.path("report", "report.md"), _markdown(rep, plots))
    log.info("report: %s", store.path("report", "report.md"))
    return {"plots": plots}
