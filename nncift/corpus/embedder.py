"""Sentence embeddings: a callable class usable in a plain loop or as a Ray Data actor."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nncift.stages.base import Context


log = logging.getLogger(__name__)


class Embedder:
    """Encode the ``text`` column of a batch into L2-normalised float32 embeddings.

    Args:
        model_path: local sentence-transformers directory.
        device: torch device string.
        batch_size: encoder batch size.
        max_seq_length: encoder token limit.

    Call with ``{"text": (B,) str, ...}`` (returns the batch plus ``"embedding"`` (B, d) float32), or with
    canonical rows ``{"idx", "prompt", "response", ...}`` (returns the other columns and ``embedding``).
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        batch_size: int = 64,
        max_seq_length: int = 256,
        template: str = "{prompt}\n{response}",
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.manual_seed(0)
        self.model = SentenceTransformer(str(model_path), device=device)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.template = template

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        """(B,) texts -> (B, d) float32, unit L2 norm."""
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``text`` column, or ``prompt`` + ``response`` rendered with the template -> batch + ``embedding``.

        Canonical rows come back without their text (``prompt`` / ``response`` dropped) plus ``embedding``.
        """
        if "text" in batch:
            out = dict(batch)
            out["embedding"] = self.encode([str(t) for t in batch["text"]])
            return out
        texts = [
            self.template.format(prompt=p, response=r) for p, r in zip(batch["prompt"], batch["response"], strict=True)
        ]
        out = {k: np.asarray(v) for k, v in batch.items() if k not in ("prompt", "response")}
        out["embedding"] = self.encode(texts)
        return out


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
    emb = ctx.executor.map_rows(
        Embedder,
        kwargs,
        {name: str(path) for name, path in sources.items()},
        parts,
        c.batch_size,
        "embedding",
        desc="embed",
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
