"""Stage ``evaluate`` (per subset): generate on the held-out test split with the subset's model and score it
(ROUGE-L, embedding similarity, held-out loss).

Reads: ``data/test.parquet``, ``finetune/<subset>/model/`` (none for ``base``).
Writes, in ``finetune/<subset>/eval/``: ``blocks/<id>.parquet`` (resumable generation blocks),
``predictions.parquet`` (per test row), ``eval.json`` (metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nncift.errors import DataError
from nncift.lm.models import base_model
from nncift.selection.subsets import check_subset
from nncift.stages.base import Context, Stage
from nncift.store import todo_blocks, write_json, write_parquet

log = logging.getLogger(__name__)

EVAL_BLOCK = 32


class EvaluateStage(Stage):
    name = "evaluate"
    sections = ("eval", "embed")
    after = ("data",)
    reads = ("data/test.parquet", "finetune/<subset>/model/")
    writes = ("finetune/<subset>/eval/predictions.parquet", "finetune/<subset>/eval/eval.json")

    def folder(self, subset: str = "nncift", **params: Any) -> str:
        return f"finetune/{subset}/eval"

    def identity(self, ctx: Context, subset: str = "nncift", **params: Any) -> dict[str, Any]:
        check_subset(subset)
        if subset == "base":
            model = hashlib.sha256(json.dumps({"base_model": base_model(ctx)}).encode()).hexdigest()[:16]
        else:
            model = ctx.runner.identity("finetune", subset=subset)[0]
        ft = ctx.cfg.finetune
        return {
            "finetune": model,
            "template": {k: getattr(ft, k) for k in ("template", "max_prompt_tokens", "max_seq_len")},
        }

    def validate(self, ctx: Context, subset: str = "nncift", **params: Any) -> None:
        if pq.read_metadata(ctx.path("data", "test.parquet")).num_rows == 0:
            raise DataError(f"{ctx.store.root}: no held-out test rows; set data.test_size > 0 or data.test")
        if subset != "base":
            ctx.require("finetune", subset=subset)  # the model first, then this stage's folder inside it

    def skipped_result(self, ctx: Context, subset: str = "nncift", **params: Any) -> dict:
        return json.loads((ctx.store.root / self.folder(subset) / "eval.json").read_text())

    def run(self, ctx: Context, subset: str = "nncift", **params: Any) -> dict[str, Any]:
        from nncift.corpus.embedder import Embedder
        from nncift.lm.eval_worker import EvalWorker, score
        from nncift.lm.models import resolve_embedding_model

        adapter = None if subset == "base" else str(ctx.store.root / f"finetune/{subset}" / "model")
        out = ctx.store.root / self.folder(subset)
        test = pq.read_table(ctx.path("data", "test.parquet"))
        c, ft = ctx.cfg.eval, ctx.cfg.finetune
        rows = {"prompt": test.column("prompt").to_pylist(), "response": test.column("response").to_pylist()}
        block_dir = out / "blocks"
        specs = [
            {"block_id": b, "r0": r0, "r1": min(test.num_rows, r0 + EVAL_BLOCK)}
            for b, r0 in enumerate(range(0, test.num_rows, EVAL_BLOCK))
        ]
        todo = todo_blocks(block_dir, specs, lambda s: (f"{s['block_id']:06d}.parquet", s["r1"] - s["r0"]))
        kwargs = {
            "base": base_model(ctx),
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
        ctx.executor.map_blocks(
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
        e = ctx.cfg.embed
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
        write_parquet(out / "predictions.parquet", per_row)
        metrics.update(subset=subset, seconds=time.perf_counter() - t0, model=adapter or base_model(ctx))
        write_json(out / "eval.json", metrics)
        return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and k != "seconds"}
