"""Fine-tune on subsets of D_F, evaluate on the held-out test split, and compare subsets.

Subsets (all of size ``select.fraction * M`` except ``full`` and ``base``):

- ``nncift``: the pipeline's selection (the network's estimated kernels);
- ``exact``: the same selection objective on the kernels of the influence function itself, labeled on
  every pair (affordable only while ``M*M + M*N <= eval.exact_max_pairs``);
- ``random``: a seeded uniform sample;
- ``full``: all of D_F;
- ``base``: no fine-tuning (the base model, the paper's "Initial" row).

Layout::

    <run>/finetune/<subset>/subset.parquet        the training rows (id, idx, prompt, response)
    <run>/finetune/<subset>/checkpoints/...       resumable DeepSpeed checkpoints
    <run>/finetune/<subset>/progress.jsonl        per-step loss; loss_curve.png
    <run>/finetune/<subset>/model/                adapter (LoRA) or full model, safetensors
    <run>/finetune/<subset>/eval/eval.json        metrics; predictions.parquet; blocks/
    <run>/compare/compare.{json,md,png}           the comparison table and plot

Every fine-tune and evaluation is fingerprinted like a pipeline stage (config sections + the selection it
trains on) and refuses a changed configuration unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.config import RunConfig, _split
from nncift.errors import ConfigError, DataError
from nncift.pipeline import Pipeline, stage_sections
from nncift.store import RunDir, atomic_path, done_blocks, write_json, write_parquet, write_text

log = logging.getLogger(__name__)

SUBSETS = ("base", "random", "nncift", "exact", "full")
EVAL_BLOCK = 32


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SubsetRunner:
    """Fine-tunes and evaluates subsets of one run directory.

    Args:
        cfg: the run's configuration (``finetune`` and ``eval`` sections used here).
        run_dir: the pipeline's run directory.
        overwrite: recompute fine-tunes / evaluations whose configuration changed.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, overwrite: bool = False):
        self.cfg = cfg
        self.root = Path(run_dir)
        self.pipe = Pipeline(cfg, run_dir, overwrite=overwrite)
        self.ft_store = RunDir(self.root / "finetune")
        self.overwrite = overwrite

    # ------------------------------------------------------------------ inputs
    def _check(self, subset: str) -> None:
        if subset not in SUBSETS:
            raise ConfigError(f"unknown subset {subset!r} (known: {', '.join(SUBSETS)})")

    def _prepare(self, subset: str) -> None:
        """Run (or skip, when finished) the pipeline stages the subset depends on."""
        until = "select" if subset == "nncift" else ("embed" if subset == "exact" else "data")
        self.pipe.run(until)

    def budget(self) -> int:
        m = self.pipe.store.done_info("data")["M"]
        return max(1, int(self.cfg.select.fraction * m))

    def base_model(self) -> str:
        from nncift.models import embedded_lm_dir

        c = self.cfg.finetune
        if c.model is None:
            return str(embedded_lm_dir())
        if not Path(c.model).expanduser().is_dir():
            raise ConfigError(f"config field 'finetune.model': {c.model!r} is not a local model directory")
        return str(Path(c.model).expanduser())

    def subset_indices(self, subset: str) -> np.ndarray:
        """(k,) int64 indices into D_F of the rows ``subset`` trains on."""
        m = self.pipe.store.done_info("data")["M"]
        if subset == "full":
            return np.arange(m, dtype=np.int64)
        if subset == "random":
            rng = np.random.default_rng([self.cfg.seed, 7])
            return np.sort(rng.choice(m, self.budget(), replace=False)).astype(np.int64)
        if subset == "nncift":
            sel = pq.read_table(self.pipe.store.path("select", "selection.parquet"))
            return sel.column("index").to_numpy().astype(np.int64)
        if subset == "exact":
            return self.exact_selection()
        raise ValueError(f"subset {subset!r} has no training rows")

    def _upstream(self, subset: str) -> dict:
        """What the subset's rows depend on, for the fingerprint."""
        if subset == "nncift":
            return {"selection": self.cfg.fingerprint(*stage_sections("select"))}
        if subset == "exact":
            return {"exact": self.cfg.fingerprint("", "data", "embed", "label", "select")}
        if subset == "random":
            return {"random": [self.cfg.seed, self.cfg.select.fraction]}
        return {}

    # ------------------------------------------------------------------ exact-function subset
    def exact_selection(self) -> np.ndarray:
        """Selection on the influence function's own kernels, labeled on every pair (cached)."""
        from nncift.label import gather_labels, plan_blocks
        from nncift.pairs import LabelSet
        from nncift.select import greedy_select

        d = self.pipe.store.done_info("data")
        m, n = d["M"], d["N"]
        pairs = m * m + m * n
        limit = self.cfg.eval.exact_max_pairs
        if pairs > limit:
            raise NotImplementedError(
                f"the exact-function subset labels all {pairs:,} pairs, more than eval.exact_max_pairs={limit:,}"
            )
        out = self.root / "finetune" / "exact"
        cached = out / "exact_selection.parquet"
        key = self._upstream("exact")["exact"]
        if cached.is_file() and pq.read_metadata(cached).metadata.get(b"fingerprint", b"").decode() == key:
            return pq.read_table(cached).column("index").to_numpy()
        rows = np.arange(m, dtype=np.int64)
        sets = [LabelSet("ff", "all", rows, rows), LabelSet("ft", "all", rows, np.arange(n, dtype=np.int64))]
        specs = plan_blocks(SimpleNamespace(sets=sets), self.pipe.label_block_side())
        block_dir = out / "exact_labels" / key
        ok = done_blocks(block_dir, {f"{s['block_id']:06d}.parquet": s["pairs"] for s in specs})
        todo = [s for s in specs if f"{s['block_id']:06d}.parquet" not in ok]
        log.info("exact subset: labeling %d pairs in %d blocks (%d done)", pairs, len(specs), len(specs) - len(todo))

        self.pipe.run_label_blocks(sets, specs, todo, block_dir, desc="exact labels")
        t = gather_labels(block_dir, len(specs))
        kern = np.asarray(t.column("kernel").to_pylist())
        r, col, v = t.column("row").to_numpy(), t.column("col").to_numpy(), t.column("value").to_numpy()
        k_ff = np.zeros((m, m), np.float32)
        k_ft = np.zeros((m, n), np.float32)
        ff = kern == "ff"
        k_ff[r[ff], col[ff]] = v[ff]
        k_ft[r[~ff], col[~ff]] = v[~ff]
        s = self.cfg.select
        idx, _ = greedy_select(k_ff, self.budget(), objective=s.objective, k_ft=k_ft, eta=s.eta, nu=s.nu)
        write_parquet(cached, pa.table({"index": idx.astype(np.int64)}), metadata={"fingerprint": key})
        return idx.astype(np.int64)

    # ------------------------------------------------------------------ fine-tune
    def _ft_identity(self, subset: str) -> tuple[str, dict]:
        prov = self.cfg.provenance(*stage_sections("data"), "finetune")
        prov["subset"] = {"name": subset, **self._upstream(subset), "base_model": self.base_model()}
        return _hash(prov), prov

    def finetune(self, subset: str, stop_after: int | None = None) -> dict:
        """Fine-tune on ``subset`` (resuming from its newest checkpoint); returns the training summary."""
        self._check(subset)
        if subset == "base":
            raise ConfigError("subset 'base' is the model without fine-tuning: nothing to train")
        self._prepare(subset)
        fp, prov = self._ft_identity(subset)
        out = self.ft_store.stage_dir(subset)
        if not self.ft_store.begin(subset, fp, prov, overwrite=self.overwrite):
            log.info("fine-tune '%s' already done, skipping", subset)
            return json.loads((out / "train_summary.json").read_text())
        idx = self.subset_indices(subset)
        pool, _ = self.pipe.tables()
        rows = pool.take(pa.array(idx)).select(["id", "idx", "prompt", "response"])
        write_parquet(out / "subset.parquet", rows)
        ft = dataclasses.asdict(self.cfg.finetune)
        ft["model"] = self.base_model()
        data = {"prompt": rows.column("prompt").to_pylist(), "response": rows.column("response").to_pylist()}
        c = self.cfg.finetune
        log.info(
            "fine-tune '%s': %d rows, %s on %s, %s", subset, len(idx), c.method, Path(ft["model"]).name, c.deepspeed
        )
        from nncift.finetune import check_resume

        use_ray = self.pipe._ray()
        start = check_resume(out, c.num_workers if use_ray else 1, c.deepspeed)
        if start:
            log.info("fine-tune '%s': resuming from step %d", subset, start)
        t0 = time.perf_counter()
        if use_ray:
            from nncift.distributed import finetune_ray

            summary = finetune_ray(ft, data, out, num_workers=c.num_workers, use_gpu=c.use_gpu, stop_after=stop_after)
        else:
            from nncift.finetune import finetune_local

            summary = finetune_local(ft, data, str(out), use_gpu=c.use_gpu, stop_after=stop_after)
        if "stopped_at" in summary:
            return summary
        from nncift.finetune import loss_curve, summarise

        loss_curve(out / "progress.jsonl", out / "loss_curve.png", title=f"fine-tuning loss: {subset}")
        summary.update(summarise(out / "progress.jsonl"), rows=len(idx), wall_seconds=time.perf_counter() - t0)
        write_json(out / "train_summary.json", summary)
        self.ft_store.finish(subset, fp, prov, **{k: v for k, v in summary.items() if k != "seconds"})
        return summary

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, subset: str) -> dict:
        """Generate on the test split with the subset's model and score it; writes ``eval.json``."""
        from nncift.distributed import map_blocks
        from nncift.embed import Embedder
        from nncift.evaluate import EvalWorker, score
        from nncift.models import resolve_embedding_model

        self._check(subset)
        self.pipe.run("data")
        test = pq.read_table(self.pipe.store.path("data", "test.parquet"))
        if test.num_rows == 0:
            raise DataError(f"{self.root}: no held-out test rows; set data.test_size > 0 or data.test")
        if subset == "base":
            adapter, ft_fp = None, _hash({"base_model": self.base_model()})
        else:
            ft_done = self.ft_store.done_info(subset)
            if ft_done is None:
                self.finetune(subset)
                ft_done = self.ft_store.done_info(subset)
            adapter, ft_fp = str(self.ft_store.stage_dir(subset) / "model"), ft_done["fingerprint"]
        store = RunDir(self.ft_store.stage_dir(subset))
        prov = {"finetune": ft_fp, **self.cfg.provenance("eval", "embed")}
        prov["template"] = {k: getattr(self.cfg.finetune, k) for k in ("template", "max_prompt_tokens", "max_seq_len")}
        fp = _hash(prov)
        if not store.begin("eval", fp, prov, overwrite=self.overwrite):
            return json.loads(store.path("eval", "eval.json").read_text())
        c, ft = self.cfg.eval, self.cfg.finetune
        rows = {"prompt": test.column("prompt").to_pylist(), "response": test.column("response").to_pylist()}
        block_dir = store.path("eval", "blocks")
        specs = [
            {"block_id": b, "r0": r0, "r1": min(test.num_rows, r0 + EVAL_BLOCK)}
            for b, r0 in enumerate(range(0, test.num_rows, EVAL_BLOCK))
        ]
        ok = done_blocks(block_dir, {f"{s['block_id']:06d}.parquet": s["r1"] - s["r0"] for s in specs})
        todo = [s for s in specs if f"{s['block_id']:06d}.parquet" not in ok]
        kwargs = {
            "base": self.base_model(),
            "adapter": adapter,
            "rows": rows,
            "out_dir": str(block_dir),
            "fmt_kwargs": {
                "template": ft.template,
                "max_prompt_tokens": ft.max_prompt_tokens,
                "max_seq_len": ft.max_seq_len,
            },
            "max_new_tokens": c.max_new_tokens,
            "batch_size": c.batch_size,
            "device": c.device,
            "trust_remote_code": ft.trust_remote_code,
        }
        log.info(
            "evaluate '%s': %d test rows in %d blocks (%d done)",
            subset,
            test.num_rows,
            len(specs),
            len(specs) - len(todo),
        )
        t0 = time.perf_counter()
        executor = "ray" if self.pipe._ray() else "local"
        map_blocks(
            executor,
            EvalWorker,
            kwargs,
            todo,
            desc=f"evaluate {subset}",
            concurrency=c.concurrency,
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
        )
        blocks = pa.concat_tables([pq.read_table(block_dir / f"{s['block_id']:06d}.parquet") for s in specs])
        preds = blocks.column("prediction").to_pylist()
        nll, ntok = blocks.column("nll_sum").to_numpy(), blocks.column("n_tokens").to_numpy()
        e = self.cfg.embed
        embedder = Embedder(
            str(resolve_embedding_model(e.model)), batch_size=e.batch_size, max_seq_length=e.max_seq_length
        )
        metrics, values = score(preds, rows["response"], nll, ntok, embedder)
        per_row = pa.table(
            {
                "id": test.column("id"),
                "prompt": test.column("prompt"),
                "reference": test.column("response"),
                "prediction": pa.array(preds, pa.string()),
                **{k: pa.array(v) for k, v in values.items()},
            }
        )
        write_parquet(store.path("eval", "predictions.parquet"), per_row)
        metrics.update(subset=subset, seconds=time.perf_counter() - t0, model=adapter or self.base_model())
        write_json(store.path("eval", "eval.json"), metrics)
        store.finish("eval", fp, prov, **{k: v for k, v in metrics.items() if isinstance(v, int | float | str)})
        return metrics

    # ------------------------------------------------------------------ compare
    def compare(self, subsets: list[str] | None = None, command: str = "") -> dict:
        """Fine-tune and evaluate each subset (skipping finished ones); write the table and the plot."""
        names = subsets or _split(self.cfg.eval.subsets)
        for s in names:
            self._check(s)
        results, skipped = [], {}
        for s in names:
            try:
                train = {} if s == "base" else self.finetune(s)
                ev = self.evaluate(s)
            except NotImplementedError as exc:
                log.warning("subset '%s' skipped: %s", s, exc)
                skipped[s] = str(exc)
                continue
            results.append(
                {
                    "subset": s,
                    "train_rows": train.get("rows", 0),
                    "train_steps": train.get("steps", 0),
                    "train_seconds": round(train.get("wall_seconds", 0.0), 1),
                    "train_loss_first": train.get("first_loss"),
                    "train_loss_last": train.get("last_loss"),
                    **{
                        k: ev[k]
                        for k in (
                            "rouge_l",
                            "rouge_l_std",
                            "embedding_similarity",
                            "embedding_similarity_std",
                            "heldout_loss",
                            "heldout_ppl",
                            "rows",
                        )
                    },
                }
            )
        ids = {}
        for r in results:
            f = self.ft_store.stage_dir(r["subset"]) / "subset.parquet"
            if r["subset"] != "base" and f.is_file():
                ids[r["subset"]] = set(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        for r in results:  # how much of the exact function's subset each subset recovers
            r["overlap_with_exact"] = (
                len(ids[r["subset"]] & ids["exact"]) if "exact" in ids and r["subset"] in ids else None
            )
        out = self.root / "compare"
        rep = {
            "command": command,
            "results": results,
            "skipped": skipped,
            "finetune": dataclasses.asdict(self.cfg.finetune),
        }
        write_json(out / "compare.json", rep)
        write_text(out / "compare.md", compare_markdown(rep))
        if results:
            compare_plot(results, out / "compare.png")
        return rep


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
