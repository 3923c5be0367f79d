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

import pyarrow as pa

from nncift.errors import ConfigError
from nncift.lm.models import base_model
from nncift.selection.subsets import check_subset, subset_indices, upstream
from nncift.stages.base import Context, Stage
from nncift.store import write_json, write_parquet

log = logging.getLogger(__name__)


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
        summary = ctx.executor.train(
            "sft", ft, data, out, num_workers=c.num_workers, use_gpu=c.use_gpu, stop_after=stop_after
        )
        if "stopped_at" in summary:
            raise _Stopped(summary)
        loss_curve(out / "progress.jsonl", out / "loss_curve.png", title=f"fine-tuning loss: {subset}")
        summary.update(summarise(out / "progress.jsonl"), rows=len(idx), wall_seconds=time.perf_counter() - t0)
        write_json(out / "train_summary.json", summary)
        return {k: v for k, v in summary.items() if k != "seconds"}


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
        return ctx.runner.finished_result("finetune", subset=subset, stop_after=stop_after)  # train_summary.json
    except _Stopped as stop:
        return stop.summary
