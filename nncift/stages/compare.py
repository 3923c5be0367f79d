"""Stage ``compare``: fine-tune and evaluate every subset of ``eval.subsets`` (each its own stage, skipped
when finished), then the comparison table and plot.

Reads: ``finetune/<subset>/train_summary.json``, ``finetune/<subset>/eval/eval.json``, ``subset.parquet``.
Writes: ``compare/compare.json``, ``compare/compare.md``, ``compare/compare.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from nncift.config import _split
from nncift.selection.subsets import check_subset
from nncift.stages.base import Context, Stage
from nncift.store import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

_METRICS = (
    "rouge_l",
    "rouge_l_std",
    "embedding_similarity",
    "embedding_similarity_std",
    "heldout_loss",
    "heldout_ppl",
    "rows",
)


class CompareStage(Stage):
    name = "compare"
    sections = ("eval",)
    after = ("data",)
    reads = ("finetune/<subset>/train_summary.json", "finetune/<subset>/eval/eval.json")
    writes = ("compare/compare.json", "compare/compare.md", "compare/compare.png")
    always_run = True  # the subsets it lists may change between calls; each subset's stages are skipped

    def identity(self, ctx: Context, **params: Any) -> dict[str, Any]:
        names = _split(ctx.cfg.eval.subsets)
        return {"evaluations": {s: ctx.runner.identity("evaluate", subset=s)[0] for s in names}}

    def validate(self, ctx: Context, **params: Any) -> None:
        for s in _split(ctx.cfg.eval.subsets):
            check_subset(s)

    def skipped_result(self, ctx: Context, **params: Any) -> dict:
        return json.loads(ctx.path("compare", "compare.json").read_text())

    def run(self, ctx: Context, command: str = "", **params: Any) -> dict[str, Any]:
        results, skipped = [], {}
        for s in _split(ctx.cfg.eval.subsets):
            try:
                train = {} if s == "base" else ctx.runner.finished_result("finetune", subset=s)
                ev = ctx.require("evaluate", subset=s)
            except NotImplementedError as exc:
                log.warning("subset '%s' skipped: %s", s, exc)
                skipped[s] = str(exc)
                continue
            ev = json.loads((ctx.store.root / f"finetune/{s}/eval/eval.json").read_text())
            results.append(
                {
                    "subset": s,
                    "train_rows": train.get("rows", 0),
                    "train_steps": train.get("steps", 0),
                    "train_seconds": round(train.get("wall_seconds", 0.0), 1),
                    "train_loss_first": train.get("first_loss"),
                    "train_loss_last": train.get("last_loss"),
                    **{k: ev[k] for k in _METRICS},
                }
            )
        ids = {}
        for r in results:
            f = ctx.store.root / "finetune" / r["subset"] / "subset.parquet"
            if r["subset"] != "base" and f.is_file():
                ids[r["subset"]] = set(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        for r in results:  # how much of the exact function's subset each subset recovers
            r["overlap_with_exact"] = (
                len(ids[r["subset"]] & ids["exact"]) if "exact" in ids and r["subset"] in ids else None
            )
        rep = {
            "command": command,
            "results": results,
            "skipped": skipped,
            "finetune": dataclasses.asdict(ctx.cfg.finetune),
        }
        write_json(ctx.path("compare", "compare.json"), rep)
        write_text(ctx.path("compare", "compare.md"), compare_markdown(rep))
        if results:
            compare_plot(results, ctx.path("compare", "compare.png"))
        return {"subsets": [r["subset"] for r in results], "skipped": sorted(skipped)}


def compare_markdown(rep: dict) -> str:
    """The comparison table (metrics with their standard error over test rows)."""
    res = rep["results"]
    n = res[0]["rows"] if res else 0
    lines = [
        "# Subset comparison",
        "",
        f"Command: `{rep['command']}`" if rep.get("command") else "",
        "",
        f"Held-out test rows: {n}. ROUGE-L and embedding similarity are x100 (mean ± standard error over rows);"
        " held-out loss is the token-weighted NLL of the reference responses; ∩ exact = training rows shared"
        " with the exact-function subset.",
        "",
        "| subset | train rows | ∩ exact | steps | train s | train loss first→last | ROUGE-L | emb. sim. | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        se = np.sqrt(max(1, r["rows"]))
        tl = "–" if r["train_loss_first"] is None else f"{r['train_loss_first']:.3f}→{r['train_loss_last']:.3f}"
        lines.append(
            f"| {r['subset']} | {r['train_rows']} | {'–' if r.get('overlap_with_exact') is None else r['overlap_with_exact']} "
            f"| {r['train_steps']} | {r['train_seconds']} | {tl} | "
            f"{r['rouge_l']:.2f} ± {r['rouge_l_std'] / se:.2f} | "
            f"{r['embedding_similarity']:.2f} ± {r['embedding_similarity_std'] / se:.2f} | {r['heldout_loss']:.4f} |"
        )
    for s, why in rep.get("skipped", {}).items():
        lines.append(f"\n- `{s}` skipped: {why}")
    lines += ["", "![comparison](compare.png)", ""]
    return "\n".join(lines)


def compare_plot(results: list[dict], dest: Path) -> None:
    """Three bar panels (ROUGE-L, embedding similarity, held-out loss) with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["subset"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = (
        ("rouge_l", "rouge_l_std", "ROUGE-L (x100) ↑"),
        ("embedding_similarity", "embedding_similarity_std", "embedding similarity (x100) ↑"),
        ("heldout_loss", None, "held-out loss ↓"),
    )
    x = np.arange(len(names))
    for ax, (key, std, title) in zip(axes, panels, strict=True):
        vals = np.array([r[key] for r in results])
        err = None if std is None else np.array([r[std] / np.sqrt(max(1, r["rows"])) for r in results])
        ax.bar(x, vals, yerr=err, color=[f"C{i}" for i in range(len(names))], capsize=4)
        ax.set_xticks(x, names)
        ax.set_title(title)
        lo, hi = float(vals.min()), float(vals.max())
        pad = (hi - lo) * 0.6 + 1e-6 + (0 if err is None else float(err.max()))
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
