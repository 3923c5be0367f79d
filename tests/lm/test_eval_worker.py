"""Evaluation metrics on known strings, and the worker's held-out loss against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from nncift.lm.eval_worker import lcs_length, rouge_l, rouge_tokens


def _lcs_dp(a, b):
    t = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i, j] = t[i - 1, j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1, j], t[i, j - 1])
    return int(t[-1, -1])


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("dog", "cat") == 0.0
    # LCS("police killed the gunman", "police kill the gunman") = police the gunman = 3 -> P = R = 3/4
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert rouge_l("Hello, WORLD!", "hello big world again") == pytest.approx(2 / 3)
    assert rouge_tokens("It's 3.5 km!") == ["it", "s", "3", "5", "km"]


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 5, rng.integers(0, 40)).astype(str).tolist()
        b = rng.integers(0, 5, rng.integers(0, 90)).astype(str).tolist()
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_matches_rouge_score_package():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the fox"),
        ("def f(x): return sorted(x)", "Use sorted(x) to return a sorted copy of x."),
        ("1 2 3 4 5", "5 4 3 2 1"),
    ]
    for p, r in pairs:
        assert rouge_l(p, r) == pytest.approx(scorer.score(r, p)["rougeL"].fmeasure)


def test_embedding_similarity_of_identical_strings_is_one(tiny_st_model):
    from nncift.corpus.embedder import Embedder
    from nncift.lm.eval_worker import embedding_similarity

    emb = Embedder(tiny_st_model)
    sim = embedding_similarity(emb, ["sort a list", "bake bread"], ["sort a list", "python json parse"])
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[1] < 0.999


def test_eval_worker_loss_and_generation(tiny_lm, tmp_path):
    """Per-row NLL sums equal the HF loss x scored tokens; generations are deterministic strings."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nncift.lm.eval_worker import EvalWorker
    from nncift.lm.sft import PromptFormatter

    rows = {"prompt": ["sort a list", "hi", "bake bread"], "response": ["use sorted(x)", "hello", "flour oven salt"]}
    fk = {"template": "auto", "max_prompt_tokens": 32, "max_seq_len": 64}
    w = EvalWorker(tiny_lm, None, rows, str(tmp_path), fk, max_new_tokens=5, batch_size=2)
    assert w.run_block({"block_id": 0, "r0": 0, "r1": 3}) == 3
    t = pq.read_table(tmp_path / "000000.parquet").to_pydict()
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(tiny_lm), **fk)
    for i in range(3):
        b = fmt.batch([rows["prompt"][i]], [rows["response"][i]]).to_torch()
        with torch.no_grad():
            loss = float(model(**b).loss)
        assert t["nll_sum"][i] / t["n_tokens"][i] == pytest.approx(loss, rel=1e-4)
    w2 = EvalWorker(tiny_lm, None, rows, str(tmp_path / "again"), fk, max_new_tokens=5, batch_size=3)
    w2.run_block({"block_id": 0, "r0": 0, "r1": 3})
    assert pq.read_table(tmp_path / "again" / "000000.parquet").column("prediction").to_pylist() == t["prediction"]
