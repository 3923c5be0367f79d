"""Stage ``embed``: sentence embeddings of every pool and target row (one definition for every teacher and
the surrogate).

Reads: ``data/pool.parquet``, ``data/target.parquet``.
Writes: ``embed/embeddings.safetensors`` with ``pool`` (M, d) and ``target`` (N, d) float32, unit norm.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nncift.stages.base import Context, Stage
from nncift.store import write_safetensors


def embed_sources(ctx: Context, sources: dict[str, Path], parts: Path) -> tuple[dict[str, np.ndarray], str]:
    """Embed canonical row files exactly as the embed stage embeds the pool and target.

    ``embed.source=model``: the configured encoder and template through the run's executor (``parts``: its
    scratch folder, removed afterwards); ``embed.source=column``: each file's ``embedding`` column,
    L2-normalised (no encoder).

    Args:
        sources: name -> Parquet file of rows (``idx`` 0..rows-1, ``prompt``, ``response``[, ``embedding``]).

    Returns:
        (name -> (rows, d) float32 unit-norm embeddings, the model label recorded in the safetensors metadata).
    """
    from nncift.lm.models import resolve_embedding_model

    c = ctx.cfg.embed
    if c.source == "column":
        return {name: column_embeddings(path) for name, path in sources.items()}, "column"
    kwargs = {
        "model_path": str(resolve_embedding_model(c.model)),
        "device": c.device,
        "batch_size": c.batch_size,
        "max_seq_length": c.max_seq_length,
        "template": c.template,
    }
    emb = ctx.executor.embed(
        {name: str(path) for name, path in sources.items()},
        parts,
        kwargs,
        c.batch_size,
        concurrency=c.concurrency,
        num_cpus=c.num_cpus,
        num_gpus=c.num_gpus,
    )
    shutil.rmtree(parts, ignore_errors=True)
    return emb, kwargs["model_path"]


def column_embeddings(path: Path) -> np.ndarray:
    """(rows, d) float32: the ``embedding`` column of a rows file, L2-normalised, read column-wise."""
    import pyarrow.parquet as pq

    from nncift.errors import DataError

    if "embedding" not in pq.read_schema(path).names:
        raise DataError(f"{path}: no 'embedding' column; rerun the data stage with data.embedding_field set")
    f = pq.ParquetFile(path)
    n = f.metadata.num_rows
    out: np.ndarray | None = None
    at = 0
    for batch in f.iter_batches(batch_size=65536, columns=["embedding"]):  # one batch in memory, not the column
        col = batch.column(0)
        e = col.flatten().to_numpy().reshape(len(col), -1)  # flatten honours a slice offset
        if out is None:
            out = np.empty((n, e.shape[1]), np.float32)
        out[at : at + len(e)] = e
        out[at : at + len(e)] /= np.linalg.norm(out[at : at + len(e)], axis=1, keepdims=True)
        at += len(e)
    return out if out is not None else np.zeros((0, 0), np.float32)


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
