"""Synthetic corpora for benchmarks: clustered unit-norm embeddings (and optional texts), seeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def clustered_embeddings(n: int, dim: int = 384, clusters: int = 64, spread: float = 0.35, seed: int = 0):
    """(n, dim) float32 unit-norm embeddings around ``clusters`` random centres, and (n,) cluster labels.

    Generated in chunks so a million rows never need more than the output array.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, size=n)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        x = centres[labels[s:e]] + spread / np.sqrt(dim) * rng.normal(size=(e - s, dim)).astype(np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels


_TOPICS = [
    ["python", "list", "sort", "function", "loop"],
    ["bread", "flour", "oven", "bake", "recipe"],
    ["empire", "river", "king", "war", "history"],
    ["matrix", "vector", "gradient", "loss", "model"],
    ["guitar", "chord", "song", "music", "rhythm"],
]


def write_texts(path: str | Path, n: int, seed: int = 0) -> Path:
    """A JSONL corpus of ``n`` topic-clustered instruction/output rows (for end-to-end scale runs)."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    with path.open("w") as fh:
        for i in range(n):
            words = _TOPICS[i % len(_TOPICS)]
            fh.write(
                json.dumps(
                    {
                        "id": f"s{i}",
                        "instruction": "explain " + " ".join(rng.choice(words, 6)),
                        "output": " ".join(rng.choice(words, 12)),
                    }
                )
                + "\n"
            )
    return path
