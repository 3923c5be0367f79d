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
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on the CPU) | float32 | bfloat16")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--targets", type=int, default=targets)
    ap.add_argument("--batch-size", type=int, default=batch, help="target sequences per forward (HF)")
    ap.add_argument("--max-prompt-tokens", type=int, default=tokens)
    ap.add_argument("--max-response-tokens", type=int, default=tokens)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the HF backend")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap


def sharegpt_rows(n: int) -> list[dict]:
    """The first ``n`` D_F rows of the embedded ShareGPT split (seed 0): the same pairs in every benchmark
    (``$NNCIFT_BENCH_ROWS``: a Parquet file of those rows instead, for a GPU machine without the package;
    ``benchmarks/gpu_check_prepare.sh`` writes it)."""
    if os.environ.get("NNCIFT_BENCH_ROWS"):
        import pyarrow.parquet as pq

        rows = pq.read_table(os.environ["NNCIFT_BENCH_ROWS"]).to_pylist()
        if len(rows) < n:
            raise SystemExit(f"{os.environ['NNCIFT_BENCH_ROWS']}: {len(rows)} rows, {n} needed")
        return rows[:n]
    from nncift.config import DataConfig
    from nncift.corpus.readers import read_corpus, split_pool_target

    cfg = DataConfig(pool_size=max(n, 500), target_size=50)
    pool, _ = split_pool_target(read_corpus(None, DataConfig()), None, cfg, 0)
    return pool.to_pylist()[:n]


def items(rows: list[dict]):
    """Rows -> :class:`~nncift.influence.Items` (no embeddings: the ICL function does not use them)."""
    from nncift.influence import Items

    return Items([r["prompt"] for r in rows], [r["response"] for r in rows], np.zeros((len(rows), 1), np.float32))


SHAPES = {  # Llama shapes of real models (SmolLM2's tokenizer and 49,152-token vocabulary, tied head)
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}  # fmt: skip


def random_lm(shape: str, device: str, dtype: str = "auto"):
    """(model, tokenizer): a Llama of a real model's shape with random weights, built on ``device`` (no download:
    the same cost per token as trained weights), and the embedded SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nncift.lm.models import embedded_lm_dir

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                      initializer_range=0.05, rope_theta=100000.0, **SHAPES[shape])  # fmt: skip
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), AutoTokenizer.from_pretrained(embedded_lm_dir())
