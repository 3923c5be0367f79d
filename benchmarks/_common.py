"""Shared pieces of the labeling benchmarks: command-line options and real ShareGPT pairs."""

from __future__ import annotations

import argparse
import os

import numpy as np


def label_parser(doc: str, targets: int, batch: int, tokens: int) -> argparse.ArgumentParser:
    """Options common to the DELIFT ICL benchmarks (model, device, pair counts, truncation, threads)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=None, help="local causal LM directory (default: embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--targets", type=int, default=targets)
    ap.add_argument("--batch-size", type=int, default=batch, help="target sequences per forward (HF)")
    ap.add_argument("--max-prompt-tokens", type=int, default=tokens)
    ap.add_argument("--max-response-tokens", type=int, default=tokens)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the HF backend")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap


def sharegpt_rows(n: int) -> list[dict]:
    """The first ``n`` D_F rows of the embedded ShareGPT split (seed 0): the same pairs in every benchmark."""
    from nncift.config import DataConfig
    from nncift.data import read_corpus, split_pool_target

    cfg = DataConfig(pool_size=max(n, 500), target_size=50)
    pool, _ = split_pool_target(read_corpus(None, DataConfig()), None, cfg, 0)
    return pool.to_pylist()[:n]


def items(rows: list[dict]):
    """Rows -> :class:`~nncift.influence.Items` (no embeddings: the ICL function does not use them)."""
    from nncift.influence import Items

    return Items([r["prompt"] for r in rows], [r["response"] for r in rows], np.zeros((len(rows), 1), np.float32))
