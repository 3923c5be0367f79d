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
        if c.source == "column":
            return self._from_column(ctx)
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

    def _from_column(self, ctx: Context) -> dict[str, Any]:
        """``embed.source=column``: the inputs' precomputed vectors (checked by the data stage), L2-normalised,
        read column-wise from the Parquet files (no encoder)."""
        import numpy as np
        import pyarrow.parquet as pq

        from nncift.errors import DataError

        emb = {}
        for side in ("pool", "target"):
            path = ctx.path("data", f"{side}.parquet")
            if "embedding" not in pq.read_schema(path).names:
                raise DataError(f"{path}: no 'embedding' column; rerun the data stage with data.embedding_field set")
            col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
            e = col.values.to_numpy().reshape(len(col), -1).astype(np.float32)
            emb[side] = e / np.linalg.norm(e, axis=1, keepdims=True)
        if emb["pool"].shape[1] != emb["target"].shape[1]:
            raise DataError(
                f"data.embedding_field: pool vectors have {emb['pool'].shape[1]} dimensions, target vectors "
                f"{emb['target'].shape[1]}"
            )
        write_safetensors(ctx.path("embed", "embeddings.safetensors"), emb, metadata={"model": "column"})
        return {"dim": int(emb["pool"].shape[1]), "texts": 0, "source": "column"}
