"""DELIFT in-context-learning utility (Agarwal et al., DELIFT, arXiv 2411.04425), exact and with shared-prefix KV reuse.

For target t = (x_t, y_t) and in-context example e = (x_e, y_e)::

    U(e -> t) = d(no example) - d(with e),   d = ||1 - p||_2 / sqrt(T)

where p are the teacher-forced probabilities of the gold response tokens of t (the response tokens and the
final EOS, as both reference codebases score) and T their count. Token t is scored with the logits at
position t - 1 (the shift the reference NN-CIFT code misses). Positive means the example helps.

Sequences are tokenised as DELIFT tokenises them: the prompt *text* of each sequence (template, example and
target joined) is tokenised as one string, then the target's separately tokenised response follows::

    no ICL: tok(HEAD_NOICL + x_t + TAIL) + [EOS] + tok(y_t) + [EOS]
    ICL:    tok(HEAD_ICL + x_e + SEP + y_e + MID_ICL + x_t + TAIL) + [EOS] + tok(y_t) + [EOS]

Tokenising template pieces separately would differ at the boundaries (``"Query: "`` + ``"I"`` gives a
lone-space token that joint tokenisation never produces). Prompts and responses are first truncated to
``max_prompt_tokens`` / ``max_response_tokens`` tokens (as text, so the joint tokenisation sees the truncated
text). Prefix reuse caches ``tok(HEAD_ICL + x_e + SEP + y_e + MID_ICL)`` and scores each target on it only
when that is exactly the start of the pair's joint tokenisation; any other target runs as a full sequence.
Only the hidden states of scored positions go through the LM head (log-softmax at the gold tokens only).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nncift.config import ConfigError, _f
from nncift.influence.interface import InfluenceFunction, Items
from nncift.influence.plugins import register

log = logging.getLogger(__name__)

HEAD_NOICL = "Instruction: Please generate a response to the following query.\n\n\nQuery: "
HEAD_ICL = (
    "Instruction:\nUse the following example as a guide to answer the query in the same format and style, "
    "providing a clear and concise response.\n\n\nExample:\n"
)
SEP_ICL = "\n"
MID_ICL = "\n\n\nQuery:\n"
TAIL = "\n"
MODES = ("auto", "prefix", "batched", "single")
# model-loading constructors of the backends other than "hf" (this module), as "module:function"
BACKENDS = {"vllm": "nncift.influence.delift_icl_vllm:build_delift_icl_vllm"}
LOGIT_BYTES = 256 << 20  # float32 logits held at once by the gold-token log-probs
PAD_WASTE = 0.1  # a batch closes when padding would exceed this share of its real tokens ...
MIN_BATCH_TOKENS = 8192  # ... and it already holds this many padded tokens (matrix products stay large)


def length_batches(lengths: list[int], batch_size: int) -> list[slice]:
    """Consecutive batches of ascending ``lengths`` (the sequences of one forward each, right-padded to the
    batch's last length): at most ``batch_size`` each, closed early where adding the next sequence would make
    padding exceed ``PAD_WASTE`` of the real tokens once the batch holds ``MIN_BATCH_TOKENS`` padded tokens.

    Measured on 16 x 64 ShareGPT pairs at 256/256 tokens, batch 64: fixed batches padded prefix-mode suffixes to
    1.8x their real tokens (real / padded 0.55); see docs/gpu.md.
    """
    out, start, real = [], 0, 0
    for j, n in enumerate(lengths):
        size = j - start
        if size and (
            size >= batch_size
            or ((size + 1) * n > (1 + PAD_WASTE) * (real + n) and size * lengths[j - 1] >= MIN_BATCH_TOKENS)
        ):
            out.append(slice(start, j))
            start, real = j, 0
        real += n
    if start < len(lengths):
        out.append(slice(start, len(lengths)))
    return out


@dataclass
class DeliftICLConfig:
    """``delift_icl.*``: the DELIFT in-context-learning utility with a causal LM."""

    model: str | None = _f(None, "LM (local folder with config, weights and tokenizer); None = embedded SmolLM2")
    backend: str = _f("hf", "hf (transformers) | vllm (teacher-forced prompt_logprobs)")
    dtype: str = _f("auto", "LM dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    max_prompt_tokens: int = _f(256, "prompt tokens kept per item")
    max_response_tokens: int = _f(256, "response tokens kept per item")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory")
    mode: str = _f(
        "auto", "auto (the faster of prefix / batched, timed on the first block) | prefix (shared-prefix "
        "attention) | batched | single (same values)", runtime=True,
    )  # fmt: skip
    batch_size: int = _f(16, "sequences per forward", runtime=True)

    def validate(self) -> None:
        """Raise :class:`~nncift.errors.ConfigError` naming the first bad field."""
        checks = (
            (self.backend in {"hf", "vllm"}, "backend", f"got {self.backend!r} (hf | vllm)"),
            (self.dtype in {"auto", "float32", "bfloat16", "float16"}, "dtype", f"got {self.dtype!r}"),
            (self.mode in MODES, "mode", f"got {self.mode!r} ({' | '.join(MODES)})"),
            (self.batch_size > 0, "batch_size", "must be positive"),
            (self.max_prompt_tokens > 0, "max_prompt_tokens", "must be > 0"),
            (self.max_response_tokens > 0, "max_response_tokens", "must be > 0"),
        )
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"config field 'delift_icl.{key}': {msg}")


@dataclass
class Encoded:
    """One row, truncated: prompt and response text (what joint tokenisation sees) and token ids."""

    prompt_text: str
    response_text: str
    prompt: list[int]
    response: list[int]


@register
class DeliftICL(InfluenceFunction):
    """The DELIFT ICL utility with a causal LM (HF transformers backend).

    Args:
        model: a causal LM (``AutoModelForCausalLM``-like: ``.model`` body and ``.lm_head``), in eval mode.
        tokenizer: its tokenizer (needs an EOS token).
        batch_size: sequences per forward.
        max_prompt_tokens / max_response_tokens: truncation of each prompt / response.
        mode: "prefix" (each example's prefix run once, its targets attend over its keys / values shared across
            the batch), "batched" (full sequences, batched), "single" (one padded forward per pair, the
            reference style), or "auto" (the faster of prefix and batched, timed on the first block).
    """

    name = "delift_icl"
    config = DeliftICLConfig
    in_context = True
    auto_probes = 4  # probe columns lift gap closed on both DELIFT tables of bench_fidelity (docs/fidelity.md)
    pairs_per_second = 5.0  # measured: SmolLM2-135M, 48/48 tokens, prefix reuse, 2 CPU cores

    @classmethod
    def resolve(cls, section: DeliftICLConfig, device: str) -> dict[str, Any]:
        from nncift.lm.models import check_model_dir, embedded_lm_dir

        if section.model is not None:
            check_model_dir(section.model, "delift_icl.model")
        return {
            "model": str(embedded_lm_dir()) if section.model is None else section.model,
            "backend": section.backend,
            "device": device,
            "dtype": section.dtype,
            "batch_size": section.batch_size,
            "max_prompt_tokens": section.max_prompt_tokens,
            "max_response_tokens": section.max_response_tokens,
            "mode": section.mode,
            "trust_remote_code": section.trust_remote_code,
        }

    @classmethod
    def build(cls, **kwargs: Any) -> InfluenceFunction:
        """The model-loading constructor: :func:`build_delift_icl`, or the vLLM backend's."""
        backend = kwargs.pop("backend", "hf")
        if backend == "hf":
            return build_delift_icl(**kwargs)
        module, _, func = BACKENDS[backend].partition(":")  # by name: the backend module imports this one
        return getattr(importlib.import_module(module), func)(**kwargs)

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 16,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        mode: str = "prefix",
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        if mode not in MODES:
            raise ValueError(f"mode must be {' | '.join(MODES)}, got {mode!r}")
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        self.batch_size, self.mode = batch_size, mode
        self.max_p, self.max_r = max_prompt_tokens, max_response_tokens
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)
        self._noicl_cache: dict[tuple[str, str], float] = {}
        self._auto: str | None = None  # the mode ``auto`` settled on
        # target pieces (see target_piece): tokenising each item once is exact for pattern-pre-tokenised BPE
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._piecewise = backend is not None and backend.pre_tokenizer is not None and backend.normalizer is None
        self._mid_ids = self._ids(MID_ICL)
        self._pieces: dict[str, list[int] | None] = {}
        # seconds per phase (tokenise / prefix / body / head) when ``profile`` is set (CUDA is synchronised at
        # each phase boundary then, which costs throughput): for benchmarks
        self.profile = False
        self.phases = dict.fromkeys(("tokenise", "prefix", "body", "head"), 0.0)

    # ------------------------------------------------------------------ tokens
    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _ids_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts in one tokenizer call (the fast tokenizers batch them natively)."""
        if not texts:
            return []
        return [list(x) for x in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, items: Items) -> list[Encoded]:
        """Truncate and tokenise each row (batched tokenizer calls; truncated texts re-tokenised)."""
        p_ids, r_ids = self._ids_many(list(items.prompts)), self._ids_many(list(items.responses))
        p_text, r_text = list(items.prompts), list(items.responses)
        cut_p = [i for i, x in enumerate(p_ids) if len(x) > self.max_p]
        cut_r = [i for i, x in enumerate(r_ids) if len(x) > self.max_r]
        for i in cut_p:
            p_text[i] = self.tok.decode(p_ids[i][: self.max_p])
        for i in cut_r:
            r_text[i] = self.tok.decode(r_ids[i][: self.max_r])
        for i, ids in zip(cut_p, self._ids_many([p_text[i] for i in cut_p]), strict=True):
            p_ids[i] = ids
        return [Encoded(p_text[i], r_text[i], p_ids[i], r_ids[i][: self.max_r]) for i in range(len(p_text))]

    def prefix_text(self, ex: Encoded) -> str:
        """The ICL prompt text before the target's prompt (shared by every target paired with ``ex``)."""
        return HEAD_ICL + ex.prompt_text + SEP_ICL + ex.response_text + MID_ICL

    def prefix_ids(self, ex: Encoded) -> list[int]:
        """Token ids of :meth:`prefix_text` (the KV cache of prefix reuse)."""
        return self._ids(self.prefix_text(ex))

    def _with_response(self, prompt_ids: list[int], t: Encoded) -> tuple[list[int], int]:
        """DELIFT's sequence: prompt ids + [EOS] + response ids + [EOS]; and the index of the first scored token."""
        return [*prompt_ids, self.eos, *t.response, self.eos], len(prompt_ids) + 1

    def noicl_ids(self, t: Encoded) -> tuple[list[int], int]:
        """The no-example sequence of target ``t`` and its first scored position."""
        return self._with_response(self._ids(HEAD_NOICL + t.prompt_text + TAIL), t)

    def target_piece(self, t: Encoded) -> list[int] | None:
        """``tok(x_t + TAIL)`` when the joint tokenisation of any ICL prompt provably ends with exactly these ids,
        else None (that target's pairs are tokenised jointly, as DELIFT does).

        Every ICL prompt is ``... + MID_ICL + x_t + TAIL``. With a tokenizer that splits text into pre-tokens
        by a pattern before BPE (byte-level BPE: GPT-2, Llama 3, SmolLM, Qwen) and has no normaliser, tokens
        never cross a pre-token boundary, and the pre-token boundary at ``x_t`` depends only on the fixed
        ``MID_ICL`` before it and ``x_t`` itself. So the check ``tok(MID_ICL + x_t + TAIL) == tok(MID_ICL) +
        tok(x_t + TAIL)``, once per target, decides every pair of that target. Computed once per target text.
        """
        key = t.prompt_text
        if key not in self._pieces:
            piece = self._ids(t.prompt_text + TAIL)
            ok = self._piecewise and self._ids(MID_ICL + t.prompt_text + TAIL) == [*self._mid_ids, *piece]
            self._pieces[key] = piece if ok else None
        return self._pieces[key]

    def icl_ids(
        self, ex: Encoded, t: Encoded, prefix_text: str | None = None, prefix: list[int] | None = None
    ) -> tuple[list[int], int]:
        """The with-example sequence of (``ex``, ``t``) and its first scored position: DELIFT's joint
        tokenisation of the whole prompt text, built from the example's prefix ids and the target's piece where
        :meth:`target_piece` proves them equal (``prefix``: :meth:`prefix_ids` of ``ex``, when known)."""
        piece = self.target_piece(t)
        if piece is not None:
            prefix = self.prefix_ids(ex) if prefix is None else prefix
            if prefix[-len(self._mid_ids) :] == self._mid_ids:
                return self._with_response([*prefix, *piece], t)
        prefix_text = self.prefix_text(ex) if prefix_text is None else prefix_text
        return self._with_response(self._ids(prefix_text + t.prompt_text + TAIL), t)

    def suffix_ids(self, t: Encoded) -> tuple[list[int], int]:
        """Approximate target part of an ICL sequence (its own prompt text tokenised alone) and the number of
        its unscored tokens: for length estimates only; scoring uses :meth:`icl_ids`."""
        return self._with_response(self._ids(t.prompt_text + TAIL), t)[0], len(self._ids(t.prompt_text + TAIL)) + 1

    # ------------------------------------------------------------------ scoring kernels
    @torch.no_grad()
    def _distances(
        self, seqs: list[list[int]], first_scored: list[int], prefix_kv: list | None = None, offset: int = 0
    ) -> np.ndarray:
        """d = ||1 - p||/sqrt(T) of each sequence's tokens from ``first_scored`` on (right-padded batch).

        With ``prefix_kv`` (per layer the (1, Hkv, P, D) keys / values of ``offset`` shared prefix tokens),
        ``seqs`` are suffixes and attend over the prefix through :mod:`~nncift.influence.prefix_attention`.
        """
        from nncift.influence import prefix_attention as pa

        b = len(seqs)
        width = max(len(s) for s in seqs)
        ids = torch.full((b, width), self.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        mask = torch.arange(width)[None, :] < lengths[:, None]
        pos = (torch.arange(width) + offset)[None, :].expand(b, -1)
        # Right padding needs no attention mask: under causal attention a real token never sees the pads
        # after it, and pad outputs are never read. Without a mask the fused causal attention path is used.
        t0 = self._tick()
        with pa.use_shared_prefix_attention(self.model), pa.shared_prefix(prefix_kv):
            hidden = self.model.model(
                input_ids=ids.to(self.device), position_ids=pos.to(self.device), use_cache=False
            ).last_hidden_state
        t0 = self._tock("body", t0)
        # scored token at position j is predicted by the hidden state at j - 1
        first = torch.tensor(first_scored)
        scored = (torch.arange(width)[None, :] >= first[:, None]) & mask
        bi, pj = torch.nonzero(scored, as_tuple=True)
        logp = self._gold_logprobs(hidden[bi.to(self.device), (pj - 1).to(self.device)], ids[bi, pj].to(self.device))
        sq = (1.0 - logp.exp()) ** 2
        sums = torch.zeros(b, dtype=torch.float64, device=self.device).index_add_(0, bi.to(self.device), sq.double())
        counts = scored.sum(1).to(self.device).double()
        out = (sums.sqrt() / counts.sqrt()).cpu().numpy()
        self._tock("head", t0)
        return out

    def _tick(self) -> float:
        if not self.profile:
            return 0.0
        self._sync()
        return time.perf_counter()

    def _tock(self, phase: str, t0: float) -> float:
        """Add the time since ``t0`` to ``phase`` (when profiling); returns the new start."""
        if not self.profile:
            return 0.0
        t1 = self._tick()
        self.phases[phase] += t1 - t0
        return t1

    def _gold_logprobs(self, hidden: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """log p(gold) (n,) float32 from (n, d) hidden states, through the LM head in row chunks of about
        ``LOGIT_BYTES`` of float32 logits (never a full (n, vocab) float32 tensor for a whole batch)."""
        head = self.model.lm_head
        vocab = head.weight.shape[0]
        rows = max(1, LOGIT_BYTES // (4 * vocab))
        out = torch.empty(len(gold), dtype=torch.float32, device=hidden.device)
        for s in range(0, len(gold), rows):
            logits = head(hidden[s : s + rows]).float()
            out[s : s + rows] = logits.gather(1, gold[s : s + rows, None]).squeeze(1) - torch.logsumexp(logits, -1)
        return out

    def no_icl_distance(self, targets: Items) -> np.ndarray:
        """d(no example) per target (computed once per distinct target and cached). Returns (T,) float64."""
        keys = list(zip(targets.prompts, targets.responses, strict=True))
        todo_idx = [i for i, k in enumerate(keys) if k not in self._noicl_cache]
        if todo_idx:
            enc = self.encode(targets.take(np.asarray(todo_idx, np.int64)))
            seqs = dict(zip(todo_idx, (self.noicl_ids(e) for e in enc), strict=True))
            todo = sorted(todo_idx, key=lambda i: len(seqs[i][0]))  # length order: little padding
            for sl in length_batches([len(seqs[i][0]) for i in todo], self.batch_size):
                chunk = todo[sl]
                ds = self._distances([seqs[i][0] for i in chunk], [seqs[i][1] for i in chunk])
                for i, d in zip(chunk, ds, strict=True):
                    self._noicl_cache[keys[i]] = float(d)
        return np.array([self._noicl_cache[k] for k in keys])

    def icl_distance(self, examples: Items, targets: Items) -> np.ndarray:
        """d(with example e) for every (e, t). Returns (E, T) float64."""
        ex_enc, t_enc = self.encode(examples), self.encode(targets)
        out = np.empty((len(ex_enc), len(t_enc)))
        start = 0
        if self.mode == "auto" and self._auto is None:
            start = self._choose_mode(ex_enc, t_enc, out)
        mode = self._auto if self.mode == "auto" else self.mode
        for ei in range(start, len(ex_enc)):
            out[ei] = self._example_row(ex_enc[ei], t_enc, mode)
        return out

    def _example_row(self, ex: Encoded, t_enc: list[Encoded], mode: str) -> np.ndarray:
        """d(with ``ex``) of every target in ``mode``: (T,) float64."""
        row = np.empty(len(t_enc))
        t0 = self._tick()
        prefix = self.prefix_ids(ex)
        prefix_text = self.prefix_text(ex)
        seqs = [self.icl_ids(ex, t, prefix_text, prefix) for t in t_enc]
        self._tock("tokenise", t0)
        full = np.arange(len(seqs))
        if mode == "prefix":
            shared = np.array([seq[: len(prefix)] == prefix for seq, _ in seqs], bool)
            reuse = np.flatnonzero(shared)
            if len(reuse):
                order = reuse[np.argsort([len(seqs[i][0]) for i in reuse], kind="stable")]
                suffixes = [(seqs[i][0][len(prefix) :], seqs[i][1] - len(prefix)) for i in order]
                row[order] = self._prefix_reuse(prefix, suffixes)
            full = np.flatnonzero(~shared)  # a boundary the joint tokenisation merged: full sequences
        step = 1 if mode == "single" else self.batch_size
        order = full[np.argsort([len(seqs[i][0]) for i in full], kind="stable")]
        for sl in length_batches([len(seqs[i][0]) for i in order], step):
            chunk = order[sl]
            row[chunk] = self._distances([seqs[i][0] for i in chunk], [seqs[i][1] for i in chunk])
        return row

    def _choose_mode(self, ex_enc: list[Encoded], t_enc: list[Encoded], out: np.ndarray) -> int:
        """``mode=auto``: time prefix reuse and batched full sequences on the first examples of the first block
        (both give the same values) and keep the faster for the rest of the run. Fills the rows it computed
        into ``out`` and returns how many."""
        timed = min(len(ex_enc), 2)  # the first example warms both paths up; the second is timed when there is one
        secs = dict.fromkeys(("prefix", "batched"), 0.0)
        for ei in range(timed):
            for mode in secs:
                self._sync()
                t0 = time.perf_counter()
                out[ei] = self._example_row(ex_enc[ei], t_enc, mode)
                self._sync()
                if ei == timed - 1:
                    secs[mode] = time.perf_counter() - t0
        self._auto = min(secs, key=secs.get)
        log.info(
            "delift_icl mode=auto: prefix %.3f s, batched %.3f s for %d targets: %s",
            secs["prefix"], secs["batched"], len(t_enc), self._auto,
        )  # fmt: skip
        return timed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _prefix_reuse(self, prefix: list[int], suffixes: list[tuple[list[int], int]]) -> np.ndarray:
        """Run the example prefix once, then score the target suffixes in batches, each attending over the
        prefix's keys / values shared across the batch (:mod:`~nncift.influence.prefix_attention`)."""
        from nncift.influence import prefix_attention as pa

        t0 = self._tick()
        with pa.use_shared_prefix_attention(self.model):
            pre = self.model.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)
        cache = pre.cache if "cache" in getattr(pre, "__dataclass_fields__", {}) else pre.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._tock("prefix", t0)
        res = np.empty(len(suffixes))
        for sl in length_batches([len(suf) for suf, _ in suffixes], self.batch_size):
            chunk = suffixes[sl]
            res[sl] = self._distances(
                [suf for suf, _ in chunk], [n for _, n in chunk], prefix_kv=kv, offset=len(prefix)
            )
        return res

    def icl_distance_pairs(self, examples: Items, targets: Items) -> np.ndarray:
        """d(with example e_k) of target t_k for aligned pairs, as length-sorted batches of full sequences
        (no prefix is shared between pairs). Returns (P,) float64."""
        ex_enc, t_enc = self.encode(examples), self.encode(targets)
        seqs = [self.icl_ids(ex, t) for ex, t in zip(ex_enc, t_enc, strict=True)]
        order = np.argsort([len(s) for s, _ in seqs], kind="stable")
        out = np.empty(len(seqs))
        step = 1 if self.mode == "single" else self.batch_size
        for sl in length_batches([len(seqs[i][0]) for i in order], step):
            chunk = order[sl]
            out[chunk] = self._distances([seqs[i][0] for i in chunk], [seqs[i][1] for i in chunk])
        return out

    # ------------------------------------------------------------------ interface
    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        """U(e -> t) = d_noICL(t) - d_ICL(e, t). Returns (E, T) float32."""
        base = self.no_icl_distance(targets)
        return (base[None, :] - self.icl_distance(examples, targets)).astype(np.float32)

    def utility_pairs(self, examples: Items, targets: Items) -> np.ndarray:
        """U(e_k -> t_k) for aligned pairs (e.g. the self-utilities U(i -> i)). Returns (P,) float32."""
        if len(examples) != len(targets):
            raise ValueError(f"utility_pairs needs aligned pairs, got {len(examples)} examples, {len(targets)} targets")
        if not len(examples):
            return np.zeros(0, np.float32)
        return (self.no_icl_distance(targets) - self.icl_distance_pairs(examples, targets)).astype(np.float32)


def pairs_per_second(fn: DeliftICL, examples: Items, targets: Items) -> tuple[float, np.ndarray]:
    """Time :meth:`DeliftICL.icl_distance` on every pair; returns (pairs/s, values (E, T))."""
    t0 = time.perf_counter()
    vals = fn.icl_distance(examples, targets)
    dt = time.perf_counter() - t0
    return len(examples) * len(targets) / max(dt, 1e-9), vals


def build_delift_icl(
    model: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 16,
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
    mode: str = "prefix",
    trust_remote_code: bool = False,
    threads: int | None = None,
) -> DeliftICL:
    """Load the LM (a local path, or the embedded SmolLM2 when None) and wrap it as :class:`DeliftICL`."""
    from nncift.lm.models import load_causal_lm

    if threads:
        torch.set_num_threads(threads)
    lm, tok = load_causal_lm(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return DeliftICL(lm, tok, batch_size, max_prompt_tokens, max_response_tokens, mode)
