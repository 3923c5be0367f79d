"""Stage ``embed``: sentence embeddings of every pool and target row (one definition for every teacher and
the surrogate).

Reads: ``data/pool.parquet``, ``data/target.parquet``.
Writes: ``embed/embeddings.safetensors`` with ``pool`` (M, d) and ``target`` (N, d) float32, unit norm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nncift.corpus.embedder import embed_sources
from nncift.stages.base import Context, Stage
from nncift.store import write_safetensors


class EmbedStage(Stage):
    name = "embed"
    sections = ("embed",)
    after = ("data",)
    reads = ("data/pool.parquet", "data/target.parquet")
    writes = ("embed/embeddings.safetensors",)

    def run(self, ctx: Context, **params: Any) -> dict[str, Any]:
        sources = {side: ctx.path("data", f"{side}.parquet") for side in ("pool", "target")}
        emb, model = embed_sources(ctx, sources, ctx.path("embed", "parts"))
        if ctx.cfg.embed.source == "column":
            return self._from_column(ctx, emb)
        write_safetensors(
            ctx.path("embed", "embeddings.safetensors"),
            {"pool": emb["pool"], "target": emb["target"]},
            metadata={"model": model},
        )
        return {"dim": int(emb["pool"].shape[1]), "texts": len(emb["pool"]) + len(emb["target"])}

    def _from_column(self, ctx: Context, emb: dict[str, np.ndarray]) -> dict[str, Any]:
        """``embed.source=column``: the inputs' precomputed vectors (checked by the data stage), L2-normalised,
        read column-wise from the Parquet files (no encoder)."""
        from nncift.errors import DataError

        if emb["pool"].shape[1] != emb["target"].shape[1]:
            raise DataError(
                f"data.embedding_field: pool vectors have {emb['pool'].shape[1]} dimensions, target vectors "
                f"{emb['target'].shape[1]}"
            )
        write_safetensors(ctx.path("embed", "embeddings.safetensors"), emb, metadata={"model": "column"})
        return {"dim": int(emb["pool"].shape[1]), "texts": 0, "source": "column"}
