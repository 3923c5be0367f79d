"""Sentence embeddings: a callable class usable in a plain loop or as a Ray Data actor."""

from __future__ import annotations

import logging

import numpy as np

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
