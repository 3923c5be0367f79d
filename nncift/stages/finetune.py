"""Stage ``finetune`` (per subset): DeepSpeed fine-tuning of the base LM on one subset of D_F.

Subsets (all of size ``select.fraction * M`` except ``full`` and ``base``): ``nncift`` (the pipeline's
selection), ``exact`` (the same objective on the teacher's own kernels, stage ``exact``), ``random`` (a seeded
uniform sample), ``full`` (all of D_F); ``base`` is the model without fine-tuning (nothing to train).

Reads: ``data/pool.parquet`` and the subset's selection.
Writes, in ``finetune/<subset>/``: ``subset.parquet`` (the training rows), ``checkpoints/`` (resumable
DeepSpeed checkpoints), ``progress.jsonl`` and ``loss_curve.png``, ``model/`` (safetensors: the LoRA adapter
or the full model), ``train_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nncift.errors import ConfigError
from nncift.stages.base import Context, Stage
from nncift.store import write_json, write_parquet

log = logging.getLogger(__name__)

SUBSETS = ("base", "random", "nncift", "exact", "full")


def check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        raise ConfigError(f"unknown subset {subset!r} (known: {', '.join(SUBSETS)})")


def base_model(ctx: Context) -> str:
    """The base LM folder (``finetune.model``; None = the embedded SmolLM2)."""
    from nncift.lm.models import embedded_lm_dir

    c = ctx.cfg.finetune
    if c.model is None:
        return str(embedded_lm_dir())
    if not Path(c.model).expanduser().is_dir():
        raise ConfigError(f"config field 'finetune.model': {c.model!r} is not a local model directory")
    return str(Path(c.model).expanduser())


def subset_indices(ctx: Context, subset: str) -> np.ndarray:
    """(k,) int64 indices into D_F of the rows ``subset`` trains on (runs the stages it needs)."""
    from nncift.stages.exact import budget, exact_indices

    m, _ = ctx.size()
    if subset == "full":
        return np.arange(m, dtype=np.int64)
    if subset == "random":
        rng = np.random.default_rng([ctx.cfg.seed, 7])
        return np.sort(rng.choice(m, budget(ctx), replace=False)).astype(np.int64)
    if subset == "nncift":
        ctx.require("select")
        return pq.read_table(ctx.path("select", "selection.parquet")).column("index").to_numpy().astype(np.int64)
    if subset == "exact":
        return exact_indices(ctx)
    raise ValueError(f"subset {subset!r} has no training rows")


def upstream(ctx: Context, subset: str) -> dict[str, Any]:
    """What a subset's rows depend on (part of the fine-tune's fingerprint)."""
    if subset == "nncift":
        return {"selection": ctx.runner.identity("select")[0]}
    if subset == "exact":
        return {"exact": ctx.runner.identity("exact")[0]}
    if subset == "random":
        return {"random": [ctx.cfg.seed, ctx.cfg.select.fraction]}
    return {}


class FinetuneStage(Stage):
    name = "finetune"
    sections = ("finetune",)
    after = ("data",)
    reads = ("data/pool.parquet", "select/selection.parquet", "exact/selection.parquet")
    writes = (
        "finetune/<subset>/subset.parquet",
        "finetune/<subset>/checkpoints/",
        "finetune/<subset>/model/",
        "finetune/<subset>/train_summary.json",
    )

    def folder(self, subset: str = "nncift", **params: Any) -> str:
        return f"finetune/{subset}"

    def identity(self, ctx: Context, subset: str = "nncift", **params: Any) -> dict[str, Any]:
        check_subset(subset)
        return {"subset": subset, **upstream(ctx, subset), "base_model": base_model(ctx)}

    def validate(self, ctx: Context, subset: str = "nncift", **params: Any) -> None:
        if subset == "base":
            raise ConfigError("subset 'base' is the model without fine-tuning: nothing to train")

    def skipped_result(self, ctx: Context, subset: str = "nncift", **params: Any) -> dict:
        return json.loads((ctx.store.root / self.folder(subset) / "train_summary.json").read_text())

    def run(self, ctx: Context, subset: str = "nncift", stop_after: int | None = None, **params: Any) -> dict:
        from nncift.lm.trainer import check_resume, loss_curve, summarise

        out = ctx.store.root / self.folder(subset)
        idx = subset_indices(ctx, subset)
        pool, _ = ctx.tables()
        rows = pool.take(pa.array(idx)).select(["id", "idx", "prompt", "response"])
        write_parquet(out / "subset.parquet", rows)
        c = ctx.cfg.finetune
        ft = dataclasses.asdict(c)
        ft["model"] = base_model(ctx)
        data = {"prompt": rows.column("prompt").to_pylist(), "response": rows.column("response").to_pylist()}
        log.info(
            "fine-tune '%s': %d rows, %s on %s, %s", subset, len(idx), c.method, Path(ft["model"]).name, c.deepspeed
        )
        start = check_resume(out, c.num_workers if ctx.executor.name == "ray" else 1, c.deepspeed)
        if start:
            log.info("fine-tune '%s': resuming from step %d", subset, start)
        t0 = time.perf_counter()
        summary = ctx.executor.finetune(
            ft, data, out, num_workers=c.num_workers, use_gpu=c.use_gpu, stop_after=stop_after
        )
        if "stopped_at" in summary:
            raise _Stopped(summary)
        loss_curve(out / "progress.jsonl", out / "loss_curve.png", title=f"fine-tuning loss: {subset}")
        summary.update(summarise(out / "progress.jsonl"), rows=len(idx), wall_seconds=time.perf_counter() - t0)
        write_json(out / "train_summary.json", summary)
        return {k: v for k, v in summary.items() if k != "seconds"}


STAGE = FinetuneStage()


class _Stopped(Exception):
    """A fine-tune stopped on purpose (``stop_after``, to test resumption): no completion marker."""

    def __init__(self, summary: dict):
        super().__init__(f"stopped at step {summary['stopped_at']}")
        self.summary = summary


def finetune(ctx: Context, subset: str, stop_after: int | None = None) -> dict:
    """Fine-tune on ``subset`` (resuming from its newest checkpoint); returns the training summary
    (``{"stopped_at": step}`` when ``stop_after`` stopped it)."""
    check_subset(subset)
    try:
        ctx.require("finetune", subset=subset, stop_after=stop_after)
    except _Stopped as stop:
        return stop.summary
    return STAGE.skipped_result(ctx, subset)  # train_summary.json, whether just computed or found finished
