"""Shared fixtures: tiny generated corpora, a tiny sentence-transformer built from a config, one Ray."""

from __future__ import annotations

import os

# One OpenMP/BLAS thread per process, set before numpy or torch loads its runtime: the tests' models are tiny, and
# two threads per process on 2 cores shared with Ray actors and subprocesses only contend (the non-Ray tests of
# tests/lm, tests/influence and tests/test_pipeline.py: 117 s with two, 77 s with one; docs/testing.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import json
from pathlib import Path

import numpy as np
import pytest

WORDS = [
    "python",
    "sort",
    "list",
    "reverse",
    "string",
    "json",
    "parse",
    "file",
    "read",
    "write",
    "loop",
    "async",
    "http",
    "request",
    "cat",
    "dog",
    "bird",
    "recipe",
    "bake",
    "bread",
    "flour",
    "oven",
    "soup",
    "salt",
    "history",
    "war",
    "empire",
    "king",
    "river",
    "mountain",
    "math",
    "prime",
    "number",
    "sum",
    "matrix",
    "vector",
    "gradient",
    "loss",
    "train",
    "model",
    "data",
    "table",
    "sql",
    "join",
    "index",
    "query",
    "music",
    "guitar",
    "chord",
    "song",
]


def make_rows(n: int, seed: int = 0, topics: int = 4) -> list[dict]:
    """Synthetic instruction rows drawn from ``topics`` clusters of words (deterministic)."""
    rng = np.random.default_rng(seed)
    groups = np.array_split(np.array(WORDS), topics)
    rows = []
    for i in range(n):
        g = groups[i % topics]
        p = " ".join(rng.choice(g, size=6))
        r = " ".join(rng.choice(g, size=10))
        rows.append({"id": f"r{i}", "instruction": f"explain {p}", "input": "", "output": f"answer {r}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_st_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT sentence-transformer built from a config (random weights, word vocab)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_st")
    bert_dir = root / "bert"
    bert_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), "explain", "answer"]
    # transformers 5 ignores `vocab_file` here (every word became [UNK] and every text the same embedding)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert "[UNK]" not in tok.tokenize("explain python sort")
    tok.save_pretrained(bert_dir)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=64)
    pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    out = root / "st"
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(out))
    return str(out)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", make_rows(160))


@pytest.fixture
def tiny_overrides(tiny_st_model) -> list[str]:
    """Config overrides for a fast end-to-end run on the tiny corpus and model."""
    return tiny_overrides_for(tiny_st_model)


def tiny_overrides_for(tiny_st_model: str) -> list[str]:
    """:func:`tiny_overrides` for a given tiny model (for fixtures wider than one test)."""
    return [
        f"embed.model={tiny_st_model}",
        "data.pool_size=120",
        "data.target_size=40",
        "label.fraction=0.2",
        "label.min_count=8",
        "label.eval_pairs=400",
        "label.block_size=16",
        "fit.hidden=16",
        "fit.rank=16",
        "fit.epochs=4",
        "label.partners=6",
        "estimate.block_size=50",
        "select.fraction=0.2",
    ]


LOGICAL_GPUS = 2


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with 4 logical CPUs so actors never starve 2 real cores. Without
    CUDA it also declares 2 logical GPUs, so that GPU scheduling (``num_gpus`` per actor) is tested on CPU
    machines (tests/exec/test_devices.py); actors that ask for no GPU are unaffected."""
    ray = pytest.importorskip("ray")
    import torch

    if not ray.is_initialized():
        gpus = None if torch.cuda.is_available() else LOGICAL_GPUS  # None: Ray counts the real ones
        ray.init(address="local", num_cpus=4, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + EOS): every string is representable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _tiny_llama(tok):
    """A 2-layer, 32-wide random Llama (seed 0) for the vocabulary and EOS of ``tok``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random Llama with a byte tokenizer, saved as a local model directory."""

    out = tmp_path_factory.mktemp("tiny_lm")
    tok = _byte_tokenizer()
    _tiny_llama(tok).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _bpe_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer *with merges*, trained here on ``corpus`` (so a space merges with the word
    after it, as in real LM tokenizers: ' I' is one token), plus an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def peaked_lm(tmp_path_factory) -> str:
    """A tiny Llama (2 layers, 32 wide) with a trained BPE tokenizer, itself trained for a few hundred steps on
    short word sentences in the DELIFT templates, so that its next-token probabilities are peaked: a random
    LM gives near-uniform probabilities and utilities of ~1e-5, inside any tolerance."""
    import torch

    from nncift.influence.delift_icl import HEAD_ICL, HEAD_NOICL, MID_ICL

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "two", "cats", "runs", "fast", "I", "is"]

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words, size=n))

    corpus = [f"{HEAD_NOICL}{sentence(4)}\n" for _ in range(50)]
    corpus += [f"{HEAD_ICL}{sentence(4)}\n{sentence(3)}{MID_ICL}{sentence(4)}\n" for _ in range(50)]
    tok = _bpe_tokenizer(corpus)
    assert tok.tokenize(" I")[0] == "ĠI"  # a space merges with the next word
    model = _tiny_llama(tok)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        stream = tok(" ".join(corpus[i] for i in rng.integers(0, len(corpus), 8)), add_special_tokens=False)
        ids = stream["input_ids"]
        batch = torch.tensor([ids[i * 32 : (i + 1) * 32] for i in range(min(8, len(ids) // 32))])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("peaked_lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------------------------- recomputed blocks
STAMP_NS = 1_000_000_000 * 10**9  # 2001-09-09: an mtime no block written by a test run can have


def stamp_blocks(*folders: Path) -> dict[Path, int]:
    """Set the mtime of every Parquet block in ``folders`` to :data:`STAMP_NS`; returns path -> inode.

    Block files are written atomically (a new file renamed into place), so a block a later run recomputes
    has another mtime (and inode) whatever the file system's timestamp resolution: :func:`recomputed`."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).glob("*.parquet")):
            os.utime(p, ns=(STAMP_NS, STAMP_NS))
            out[p] = p.stat().st_ino
    return out


def recomputed(stamped: dict[Path, int], *folders: Path) -> set[str]:
    """Names of the blocks in ``folders`` written since :func:`stamp_blocks`: new ones, and stamped ones whose
    mtime or inode changed."""
    out = set()
    for folder in folders:
        for p in Path(folder).glob("*.parquet"):
            st = p.stat()
            if p not in stamped or st.st_mtime_ns != STAMP_NS or st.st_ino != stamped[p]:
                out.add(p.name)
    return out
