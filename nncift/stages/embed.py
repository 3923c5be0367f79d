"""Stage ``embed``: sentence embeddings of every pool and target row (one definition for every teacher and
the surrogate).

Reads: ``data/pool.parquet``, ``data/target.parquet``.
Writes: ``embed/embeddings.safetensors`` with ``pool`` (M, d) and ``target`` (N, d) float32, unit norm.
"""

from __future__ import annotations

import shutil
from typing import Any

from nncift.stages.base import Context, Stage
from nncift.store import write_safetensors


class EmbedStage(Stage):
    name = "embed"
    sections = ("embed",)
    after = ("data",)
    reads = ("data/pool.parquet", "data/target.parquet")
    writes = ("embed/embeddings.safetensors",)

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        from nncift.models import resolve_embedding_model

        c = ctx.cfg.embed
        kwargs = {
            "model_path": str(resolve_embedding_model(c.model)),
            "device": c.device,
            "batch_size": c.batch_size,
            "max_seq_length": c.max_seq_length,
            "template": c.template,
        }
        sources = {side: str(ctx.path("data", f"{side}.parquet")) for side in ("pool", "target")}
        emb = ctx.executor.embed(
            sources,
            ctx.path("embed", "parts"),
            kwargs,
            c.batch_size,
            concurrency=c.concurrency,
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
        )
        write_safetensors(
            ctx.path("embed", "embeddings.safetensors"),
            {"pool": emb["pool"], "target": emb["target"]},
            metadata={"model": kwargs["model_path"]},
        )
        shutil.rmtree(ctx.path("embed", "parts"), ignore_errors=True)
        return {"dim": int(emb["pool"].shape[1]), "texts": len(emb["pool"]) + len(emb["target"])}
