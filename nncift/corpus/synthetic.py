"""Synthetic corpora for benchmarks: clustered unit-norm embeddings (and optional texts), seeded."""

from __future__ import annotations

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


def write_corpus(
    path: str | Path, n: int, dim: int = 128, clusters: int = 64, seed: int = 0, chunk: int = 65536
) -> Path:
    """A Parquet corpus of ``n`` rows for end-to-end scale runs: ``id``, ``instruction``, ``output`` (short
    topic-clustered texts) and ``embedding`` (fixed-size list<float32> of ``dim``, unit norm, clustered: the
    row's topic is its cluster), written in row groups of ``chunk`` so memory stays at one chunk.

    Read it with ``data.embedding_field=embedding`` and ``embed.source=column``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    emb, labels = clustered_embeddings(n, dim, clusters, seed=seed)
    rng = np.random.default_rng([seed, 1])
    vocab = np.asarray([w for ws in _TOPICS for w in ws])
    per = len(_TOPICS[0])
    schema = pa.schema(
        [("id", pa.string()), ("instruction", pa.string()), ("output", pa.string()),
         ("embedding", pa.list_(pa.float32(), dim))]
    )  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            topic = labels[s:e] % len(_TOPICS)
            words = vocab[topic[:, None] * per + rng.integers(0, per, size=(e - s, 18))]
            ins = [f"explain {' '.join(w[:6])} #{i}" for i, w in zip(range(s, e), words, strict=True)]
            out = [" ".join(w[6:]) for w in words]
            vec = pa.FixedSizeListArray.from_arrays(pa.array(emb[s:e].reshape(-1)), dim)
            ids = pa.array([f"s{i}" for i in range(s, e)])
            writer.write_table(pa.Table.from_arrays([ids, pa.array(ins), pa.array(out), vec], schema=schema))
    tmp.replace(path)
    return path


def scale_overrides(corpus: str | Path, targets: int, max_pairs: int) -> list[str]:
    """The config overrides of a large run on a :func:`write_corpus` corpus: its embedding column (no encoder),
    the DELIFT-SE teacher on a label budget, a bilinear surrogate, sparse estimation by candidate search, and
    partitioned (GreeDi) selection. ``benchmarks/bench_pipeline_scale.py`` runs these at 1M rows; the tests
    run them at a small M."""
    return [
        f"data.input={corpus}",
        "data.embedding_field=embedding",
        f"data.target_size={targets}",
        "data.pool_size=null",
        "data.test_size=0",
        "embed.source=column",
        "label.function=delift_se",
        "label.fraction=0.01",
        f"label.max_pairs={max_pairs}",
        "fit.kind=bilinear",
        "fit.epochs=3",
        "fit.batch_size=4096",
        "fit.num_workers=1",
        "estimate.layout=sparse",
        "estimate.candidates=ivf",
        "estimate.block_size=4096",
        "estimate.num_cpus=2",  # Ray gives an actor as many OpenMP threads as CPUs: one actor, one index copy
        "select.fraction=0.1",
        "select.algorithm=greedi",
        "select.parts=4",
    ]
