"""SelectIT (Liu et al., 2024, "SelectIT: Selective Instruction Tuning for LLMs via Uncertainty-Aware
Self-Reflection", NeurIPS 2024, arXiv 2402.16705): a pointwise teacher that lets causal LMs rate each
instruction/response pair and weighs the rating by the models' own uncertainty.

An LM reads a rating prompt (one of several paraphrases asking for a score from 1 to K) followed by the item,
and the next-token distribution is read at the position where the score would be written. With P_k the
probability of the rating token ``str(k)``:

* token level:      P'_k = P_k / sum_j P_j  (k = 1..K),   S_base = argmax_k P'_k  (in 1..K),
                    S_token = S_base * 1/(K-1) * sum_i |P'_i - P'_{S_base}|
* sentence level:   with n rating prompts,  S_sent = mean_j S_token_j / (1 + alpha * std_j S_token_j)
                    (population std, ddof=0, as ``np.std``)
* model level:      with N LMs of theta_i parameters,  S_model = sum_i theta_i / (sum_j theta_j) * S_sent_i

Each item is scored by S_model (higher = better); with one LM it is S_sent. S_token lies in [0, K]: 0 for a
uniform P', k for all mass on k. Verified against the paper's equations and the authors' code
(github.com/Blue-Raincoat/SelectIT, ``self_reflection/{token,sentence,model}_level.py``): P' is the plain
renormalisation p_k / sum p (the code also computes an unused exp()), ties in the argmax go to the lowest
score (``np.argmax``), each item is rendered as ``rating prompt + "\\n" + "Instruction:" + x + "\\n" +
"Response:" + y + "\\nThe answer is: \\n"``.

Deviations from the reference code, all deliberate:

* The reference uses one number ``k`` both for the rating scale and for the number of rating prompts (both 5);
  here they are separate settings (``scale`` = K, ``num_prompts`` = n).
* The reference's model-level script hard-codes the weights 7/20, 13/20, 70/90 for LLaMA-2 7B/13B/70B (which
  do not sum to one); this module uses the paper's formula, theta_i / sum_j theta_j, with theta_i counted from
  the loaded model's parameters (tied embeddings counted once).
* The rating prompts are this module's own paraphrases (:data:`RATING_PROMPTS`, with K filled in) rather than
  the reference's text file, whose lines mix "1 to 5", "zero to five" and "0 and 5" and address "each assistant".
  The first ``num_prompts`` of them are used (the reference's sentence level also takes the first k lines).
* When the tokenizer has a chat template (and ``use_chat_template``), the rating text is the user turn and
  the assistant turn is opened with :data:`CHAT_ANSWER_PREFIX` ("The answer is: "), so that an instruct model's
  next token is the score; plain text (the reference's base-model format, with its answer cue) otherwise.
  Chat-rendered text is tokenised without added special tokens (the template has them), plain text with them.
* Prompt and response are truncated to ``max_prompt_tokens`` / ``max_response_tokens`` tokens of each LM's own
  tokenizer (as text, decoded from the kept tokens) before rendering; the reference does not truncate.
* The reference runs one sequence per forward in float16 on GPU; here sequences (all prompts x all items of a
  block) are length-sorted and left-padded into batches with an attention mask and explicit position ids, and
  only the last position's logits are computed. P' is computed as the softmax of the K rating logits, which
  equals p_k / sum_j p_j over the full-vocabulary softmax (and does not underflow).
* Rating tokens are the single tokens that encode "1".."K" (no special tokens); if a digit string encodes to
  several tokens (e.g. SentencePiece adds a prefix-space piece), the vocabulary entry spelled exactly like it is
  used instead (LLaMA-2's "1" = id 29896, as the reference hard-codes); otherwise the model is refused.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nncift.config import _f
from nncift.errors import ConfigError
from nncift.influence.interface import Items, PointwiseInfluenceFunction
from nncift.influence.plugins import register

log = logging.getLogger(__name__)

#: Paraphrased rating prompts (``{k}`` is the top of the scale K); the first ``num_prompts`` are used.
RATING_PROMPTS: tuple[str, ...] = (
    "Rate how accurately the response below follows the instruction, on a scale from 1 to {k} where {k} is "
    "best. Give the score alone on its own line.",
    "Give the response a score between 1 and {k} for how correctly and completely it carries out the "
    "instruction ({k} = excellent). Output only the number.",
    "On a scale of 1 to {k}, with {k} the most accurate, how well does the response answer the instruction? "
    "State the score plainly as a single number.",
    "Judge the quality of the response to the instruction and assign it an integer score from 1 (poor) to "
    "{k} (excellent). Write nothing but the score.",
    "Evaluate whether the response fulfils the instruction precisely and helpfully. Score it from 1 to {k}, "
    "where {k} means fully correct, and show just the score.",
    "How faithful and accurate is the following response to its instruction? Answer with one score from 1 to "
    "{k}, higher meaning better.",
    "Assess the response for correctness and adherence to the instruction, then give a single rating from 1 "
    "to {k} ({k} is the highest) on its own.",
    "Score the answer below on a 1-to-{k} scale according to how well it satisfies the instruction; {k} means "
    "perfect. Reply with the score only.",
    "Please grade the response to the instruction with a number from 1 to {k}, where {k} is the best possible "
    "response. Make the grade clearly visible as a standalone number.",
)
#: Item part of the rating text (after the rating prompt and a newline), as in the reference code.
ITEM_TEMPLATE = "Instruction:{prompt}\nResponse:{response}"
#: Plain-text answer cue ending the rating text (the reference's).
ANSWER_CUE = "\nThe answer is: \n"
#: Opening of the assistant turn when a chat template renders the rating text.
CHAT_ANSWER_PREFIX = "The answer is: "

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SelectITConfig:
    """``selectit.*``: the SelectIT self-reflection rating with one or more causal LMs."""

    models: str = _f(
        "", "comma-separated local LM folders (model-level reflection over several); empty = embedded SmolLM2"
    )
    scale: int = _f(5, "K: rating scale 1..K (each of '1'..'K' must be one token of every LM)")
    num_prompts: int = _f(5, f"n: rating prompts per item (sentence-level reflection), 1..{len(RATING_PROMPTS)}")
    alpha: float = _f(0.2, "sentence-level uncertainty weight: S_sent = mean / (1 + alpha * std)")
    use_chat_template: bool = _f(True, "render the rating text with the tokenizer's chat template when it has one")
    max_prompt_tokens: int = _f(256, "prompt tokens kept per item")
    max_response_tokens: int = _f(256, "response tokens kept per item")
    dtype: str = _f("float32", "LM dtype: float32 | bfloat16 | float16")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directories")
    batch_size: int = _f(16, "sequences per forward", runtime=True)

    def model_list(self) -> list[str]:
        """The entries of :attr:`models` (empty list = the embedded SmolLM2)."""
        return [] if not self.models.strip() else [m.strip() for m in self.models.split(",")]

    def validate(self) -> None:
        """Raise :class:`~nncift.errors.ConfigError` naming the first bad field."""
        entries = [] if not self.models.strip() else self.models.split(",")
        checks = (
            (all(e.strip() for e in entries), "models", f"empty entry in {self.models!r}"),
            (self.scale >= 2, "scale", "must be >= 2"),
            (
                1 <= self.num_prompts <= len(RATING_PROMPTS),
                "num_prompts",
                f"must be in 1..{len(RATING_PROMPTS)}, got {self.num_prompts}",
            ),
            (bool(np.isfinite(self.alpha)) and self.alpha >= 0, "alpha", "must be >= 0"),
            (self.max_prompt_tokens > 0, "max_prompt_tokens", "must be > 0"),
            (self.max_response_tokens > 0, "max_response_tokens", "must be > 0"),
            (self.dtype in _DTYPES, "dtype", f"got {self.dtype!r} ({' | '.join(_DTYPES)})"),
            (self.batch_size > 0, "batch_size", "must be positive"),
        )
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"config field 'selectit.{key}': {msg}")


# ---------------------------------------------------------------------------------------------- formulas
def token_level(probs: np.ndarray) -> np.ndarray:
    """Token-level self-reflection: S_token = S_base * 1/(K-1) * sum_i |P'_i - P'_{S_base}|.

    Args:
        probs: (..., K) renormalised rating-token probabilities P' (rows sum to 1).

    Returns:
        (...,) float64 scores in [0, K]; S_base = argmax + 1 (ties: the lowest score).
    """
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[-1]
    if k < 2:
        raise ValueError(f"token_level needs K >= 2 rating probabilities, got shape {p.shape}")
    base = np.argmax(p, axis=-1)
    p_base = np.take_along_axis(p, base[..., None], axis=-1)
    uncertainty = np.abs(p - p_base).sum(axis=-1) / (k - 1)
    return (base + 1) * uncertainty


def sentence_level(token_scores: np.ndarray, alpha: float = 0.2) -> np.ndarray:
    """Sentence-level self-reflection over rating prompts: S_sent = mean / (1 + alpha * std) (std with ddof=0).

    Args:
        token_scores: (n_prompts, B) S_token of each rating prompt and item.
        alpha: weight of the disagreement between prompts.

    Returns:
        (B,) float64.
    """
    s = np.asarray(token_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 1:
        raise ValueError(f"sentence_level needs (n_prompts, B) token scores, got shape {s.shape}")
    return s.mean(axis=0) / (1.0 + alpha * s.std(axis=0))


def model_level(sentence_scores: np.ndarray, params: Sequence[float] | np.ndarray) -> np.ndarray:
    """Model-level self-reflection: S_model = sum_i theta_i / (sum_j theta_j) * S_sent_i.

    Args:
        sentence_scores: (n_models, B) S_sent of each LM and item.
        params: (n_models,) parameter counts theta_i (positive).

    Returns:
        (B,) float64.
    """
    s = np.asarray(sentence_scores, dtype=np.float64)
    theta = np.asarray(params, dtype=np.float64)
    if s.ndim != 2 or theta.shape != (s.shape[0],):
        raise ValueError(f"model_level needs (n_models, B) scores and (n_models,) params, got {s.shape}, {theta.shape}")
    if not (np.all(np.isfinite(theta)) and np.all(theta > 0)):
        raise ValueError(f"model_level: parameter counts must be positive, got {theta.tolist()}")
    return (theta / theta.sum()) @ s


def rating_token_ids(tokenizer: Any, scale: int) -> list[int]:
    """Token ids of the rating tokens "1".."K" (one token each).

    Returns:
        (K,) ids; :class:`ValueError` naming the first rating that is not a single token of ``tokenizer``.
    """
    ids = []
    for k in range(1, scale + 1):
        s = str(k)
        enc = list(tokenizer(s, add_special_tokens=False)["input_ids"])
        if len(enc) == 1:
            ids.append(int(enc[0]))
            continue
        # SentencePiece tokenizers prepend a space piece to "1"; the bare vocabulary entry is the rating token
        tid = tokenizer.convert_tokens_to_ids(s)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == s:
            ids.append(tid)
            continue
        raise ValueError(
            f"selectit: the rating {s!r} (scale 1..{scale}) is not a single token of this tokenizer "
            f"(it encodes to {len(enc)} tokens {enc}); lower selectit.scale or use another model"
        )
    if len(set(ids)) != scale:
        raise ValueError(f"selectit: the rating tokens 1..{scale} are not distinct token ids: {ids}")
    return ids


@dataclass
class _LM:
    """One rating LM: model, tokenizer, its rating-token ids (K,), pad id, parameter count, chat use."""

    model: Any
    tok: Any
    rating_ids: list[int]
    pad: int
    params: float
    chat: bool
    logits_to_keep: bool


@register
class SelectIT(PointwiseInfluenceFunction):
    """The SelectIT score of each item with one or more causal LMs (token, sentence and model levels).

    Args:
        lms: (model, tokenizer) pairs (``AutoModelForCausalLM``-like, in eval mode); several = model level.
        scale: K, the rating scale 1..K.
        num_prompts: n, the number of rating prompts (the first n of :data:`RATING_PROMPTS`).
        alpha: sentence-level uncertainty weight.
        batch_size: sequences per forward.
        max_prompt_tokens / max_response_tokens: truncation of each prompt / response.
        use_chat_template: render with the tokenizer's chat template when it has one.
        params: (n_models,) model weights theta_i; None = each model's parameter count.
    """

    name = "selectit"
    config = SelectITConfig
    # measured: embedded SmolLM2-135M (float32), 1 LM x 5 prompts, 16 items of ~40/60 words (80 sequences of
    # ~175 tokens), batch 16, 2 torch threads: 55.7 s of process CPU -> 0.575 items/s on 2 full cores (the
    # machine was shared, load ~9.5: wall 160 s, 0.10 items/s). Longer items (256/256-token caps) are slower.
    pairs_per_second = 0.55

    @classmethod
    def resolve(cls, section: SelectITConfig, device: str) -> dict[str, Any]:
        from nncift.lm.models import check_model_dir, embedded_lm_dir

        section.validate()
        paths = section.model_list()
        for p in paths:
            check_model_dir(p, "selectit.models")
        models = [str(Path(p).expanduser().resolve()) for p in paths] or [str(embedded_lm_dir())]
        return {
            "models": models,
            "device": device,
            "dtype": section.dtype,
            "trust_remote_code": section.trust_remote_code,
            "scale": section.scale,
            "num_prompts": section.num_prompts,
            "alpha": section.alpha,
            "use_chat_template": section.use_chat_template,
            "max_prompt_tokens": section.max_prompt_tokens,
            "max_response_tokens": section.max_response_tokens,
            "batch_size": section.batch_size,
        }

    @classmethod
    def build(cls, **kwargs: Any) -> SelectIT:
        """Load the LMs named by :meth:`resolve` (see :func:`build_selectit`)."""
        return build_selectit(**kwargs)

    def __init__(
        self,
        lms: Sequence[tuple[Any, Any]],
        scale: int = 5,
        num_prompts: int = 5,
        alpha: float = 0.2,
        batch_size: int = 16,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        use_chat_template: bool = True,
        params: Sequence[float] | None = None,
    ):
        if not lms:
            raise ValueError("selectit needs at least one (model, tokenizer)")
        if scale < 2:
            raise ValueError(f"scale must be >= 2, got {scale}")
        if not 1 <= num_prompts <= len(RATING_PROMPTS):
            raise ValueError(f"num_prompts must be in 1..{len(RATING_PROMPTS)}, got {num_prompts}")
        if params is not None and len(params) != len(lms):
            raise ValueError(f"params has {len(params)} entries for {len(lms)} models")
        self.scale, self.num_prompts, self.alpha = int(scale), int(num_prompts), float(alpha)
        self.batch_size = int(batch_size)
        self.max_p, self.max_r = int(max_prompt_tokens), int(max_response_tokens)
        self.prompts = [RATING_PROMPTS[j].format(k=self.scale) for j in range(self.num_prompts)]
        self.lms: list[_LM] = []
        for i, (model, tok) in enumerate(lms):
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            theta = float(params[i]) if params is not None else float(sum(p.numel() for p in model.parameters()))
            chat = bool(use_chat_template and getattr(tok, "chat_template", None))
            keep = "logits_to_keep" in inspect.signature(model.forward).parameters
            self.lms.append(_LM(model, tok, rating_token_ids(tok, self.scale), int(pad or 0), theta, chat, keep))

    @property
    def params(self) -> np.ndarray:
        """(n_models,) the model-level weights theta_i (parameter counts unless given)."""
        return np.array([lm.params for lm in self.lms], dtype=np.float64)

    # ------------------------------------------------------------------ text
    def _truncate(self, tok: Any, text: str, limit: int) -> str:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= limit else tok.decode(ids[:limit])

    def render(self, model_index: int, prompt_index: int, prompt: str, response: str) -> str:
        """The rating text of one item for LM ``model_index`` and rating prompt ``prompt_index`` (after
        truncation of ``prompt`` and ``response``)."""
        lm = self.lms[model_index]
        body = (
            self.prompts[prompt_index]
            + "\n"
            + ITEM_TEMPLATE.format(
                prompt=self._truncate(lm.tok, prompt, self.max_p),
                response=self._truncate(lm.tok, response, self.max_r),
            )
        )
        if lm.chat:
            messages = [{"role": "user", "content": body}]
            return lm.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + CHAT_ANSWER_PREFIX
        return body + ANSWER_CUE

    def encode_text(self, model_index: int, text: str) -> list[int]:
        """Token ids of a rendered rating text (special tokens added only to plain text)."""
        lm = self.lms[model_index]
        return list(lm.tok(text, add_special_tokens=not lm.chat)["input_ids"])

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def _last_logits(self, lm: _LM, seqs: list[list[int]]) -> torch.Tensor:
        """Rating-token logits at the last position of each sequence, one left-padded forward. Returns (b, K)."""
        device = next(lm.model.parameters()).device
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), lm.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        kw = {"logits_to_keep": 1} if lm.logits_to_keep else {}
        out = lm.model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), use_cache=False, **kw
        )
        return out.logits[:, -1, lm.rating_ids].float()

    def _probs(self, model_index: int, seqs: list[list[int]]) -> np.ndarray:
        """P' of token sequences, length-sorted into batches of ``batch_size``. Returns (len(seqs), K) float64."""
        lm = self.lms[model_index]
        out = np.empty((len(seqs), self.scale))
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            logits = self._last_logits(lm, [seqs[i] for i in chunk])
            out[chunk] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
        return out

    def _sequences(self, items: Items, model_index: int, prompt_index: int) -> list[list[int]]:
        return [
            self.encode_text(model_index, self.render(model_index, prompt_index, p, r))
            for p, r in zip(items.prompts, items.responses, strict=True)
        ]

    def rating_probs(self, items: Items, model_index: int = 0, prompt_index: int = 0) -> np.ndarray:
        """P'_k, the rating-token probabilities renormalised over "1".."K", for one LM and rating prompt.

        Returns:
            (B, K) float64, rows summing to 1.
        """
        return self._probs(model_index, self._sequences(items, model_index, prompt_index))

    def all_rating_probs(self, items: Items, model_index: int = 0) -> np.ndarray:
        """P' of every rating prompt and item with LM ``model_index`` (the n_prompts x B sequences share the
        length-sorted batches).

        Returns:
            (n_prompts, B, K) float64, rows summing to 1.
        """
        seqs = [s for j in range(self.num_prompts) for s in self._sequences(items, model_index, j)]
        return self._probs(model_index, seqs).reshape(self.num_prompts, len(items), self.scale)

    # ------------------------------------------------------------------ scores
    def levels(self, items: Items) -> dict[str, np.ndarray]:
        """Every level of the score.

        Returns:
            ``probs`` (n_models, n_prompts, B, K) P'; ``token`` (n_models, n_prompts, B) S_token; ``sentence``
            (n_models, B) S_sent; ``model`` (B,) S_model (all float64).
        """
        probs = np.stack([self.all_rating_probs(items, m) for m in range(len(self.lms))])
        tok = token_level(probs)
        sent = np.stack([sentence_level(tok[m], self.alpha) for m in range(len(self.lms))])
        return {"probs": probs, "token": tok, "sentence": sent, "model": model_level(sent, self.params)}

    def score(self, items: Items) -> np.ndarray:
        """The SelectIT score S_model of each item (S_sent with one LM); higher = better.

        Returns:
            (len(items),) float32 in [0, K].
        """
        if not len(items):
            return np.zeros(0, np.float32)
        return self.levels(items)["model"].astype(np.float32)


def build_selectit(
    models: Sequence[str] | str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    scale: int = 5,
    num_prompts: int = 5,
    alpha: float = 0.2,
    use_chat_template: bool = True,
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
    batch_size: int = 16,
) -> SelectIT:
    """Load the LMs (local folders; None or empty = the embedded SmolLM2) and wrap them as :class:`SelectIT`."""
    from nncift.lm.models import load_causal_lm

    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    paths: list[str | None] = list(models) if models else [None]
    lms = [load_causal_lm(p, device=device, dtype=dtype, trust_remote_code=trust_remote_code) for p in paths]
    log.info("selectit: %d rating LM(s), K=%d, %d prompts", len(lms), scale, num_prompts)
    return SelectIT(
        lms,
        scale=scale,
        num_prompts=num_prompts,
        alpha=alpha,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        use_chat_template=use_chat_template,
    )
