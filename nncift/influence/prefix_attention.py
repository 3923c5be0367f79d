"""Attention of a batch of suffixes over one shared prefix, without copying the prefix per sequence.

DELIFT scores every target t of a block after the same in-context example e: B sequences share the prefix
``tok(e)`` (P tokens) and differ in their suffix (S tokens each). Copying the prefix's keys and values into
each of the B sequences (a batch-expanded KV cache) costs B x P x layers of memory traffic per batch and makes
the attention take a masked, unfused path. Here attention is split in two exact parts and merged by their
log-sum-exp (the decomposition of Hydragen, Juravsky et al. 2024, and of FlashInfer's cascade attention):

* suffix part: each sequence's causal self-attention over its own S keys (a fused causal kernel);
* prefix part: every query of every sequence over the P shared keys, with no mask. Folding the batch and the
  query-group of grouped-query attention into the query axis makes it *one* attention of B x g x S queries
  over P keys per KV head: the prefix keys are read once per batch, not B x g times;
* merge: ``o = o_s * sigmoid(lse_s - lse_p) + o_p * sigmoid(lse_p - lse_s)`` (exact softmax over both parts).

:func:`shared_prefix` installs the prefix's per-layer keys and values for the forwards inside it; the model's
attention implementation must be :data:`ATTN_NAME` (see :func:`use_shared_prefix_attention`). Outside the
context the same function is plain causal attention (right padding needs no mask), so the model runs its
no-example and full-sequence forwards unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

ATTN_NAME = "nncift_shared_prefix"
_state = threading.local()
_fallback_logged: set[str] = set()
_registered: list[bool] = []


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """Scaled dot-product attention that also returns the softmax normaliser.

    Args:
        q: (B, H, Sq, D); k, v: (B, H, Sk, D), same dtype and heads.
        causal: top-left causal mask (query i sees keys <= i; used with Sq == Sk).

    Returns:
        (out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) float32: log of the sum of exp(scores) per query).
        Fused kernels where the device has one (flash / memory-efficient on CUDA, flash on CPU); plain
        matrix products otherwise.
    """
    try:
        if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
            return out, lse.float()
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, causal, scale=scale
            )[:2]
            return out, lse[..., : q.shape[2]].float()
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
            return out, lse.float()
    except (RuntimeError, AttributeError, NotImplementedError) as err:  # an op this torch build lacks
        key = f"{q.device.type}/{q.dtype}"
        if key not in _fallback_logged:
            _fallback_logged.add(key)
            log.warning("fused attention with log-sum-exp unavailable on %s (%s): plain matrix products", key, err)
    return attend_reference(q, k, v, causal, scale)


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """:func:`attend` by plain matrix products in float32 (the reference the fused paths are tested against)."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), lse


def shared_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of B suffixes that all follow one shared prefix.

    Args:
        q: (B, H, S, D) suffix queries (positions P..P+S-1 already rotated).
        k, v: (B, Hkv, S, D) suffix keys / values; H = g * Hkv (grouped-query attention).
        k_pre, v_pre: (1, Hkv, P, D) the prefix's keys / values.

    Returns:
        (B, H, S, D) attention output, equal to causal attention over ``[prefix; suffix]`` per sequence.
    """
    b, h, s, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    ks, vs = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    o_s, lse_s = attend(q, ks, vs, True, scale)
    # (B, Hkv, g, S, D) -> (1, Hkv, B*g*S, D): one unmasked attention per KV head over the P shared keys
    qf = q.reshape(b, hkv, g, s, d).permute(1, 0, 2, 3, 4).reshape(1, hkv, b * g * s, d)
    o_p, lse_p = attend(qf, k_pre.to(q.dtype), v_pre.to(q.dtype), False, scale)
    o_p = o_p.reshape(hkv, b, g, s, d).permute(1, 0, 2, 3, 4).reshape(b, h, s, d)
    lse_p = lse_p.reshape(hkv, b, g, s).permute(1, 0, 2, 3).reshape(b, h, s)
    w_s = torch.sigmoid(lse_s - lse_p)[..., None]
    return (o_s.float() * w_s + o_p.float() * (1.0 - w_s)).to(q.dtype)


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The transformers attention interface (``config._attn_implementation == ATTN_NAME``).

    Inside :func:`shared_prefix`: :func:`shared_prefix_attention` with the layer's prefix keys / values.
    Outside: plain causal attention (sequences are right-padded: a real token never sees the pads after it).
    """
    if kwargs.get("sliding_window") or kwargs.get("softcap") is not None:
        raise NotImplementedError(
            "delift_icl prefix mode supports plain causal attention only (this model uses a sliding window or "
            "soft-capping): set delift_icl.mode=batched"
        )
    # ``attention_mask`` is ignored: the teacher never passes a padding mask (right padding), so any mask a
    # transformers version builds is the plain causal one applied here
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    prefix = getattr(_state, "prefix", None)
    if prefix is None:
        g = query.shape[1] // key.shape[1]
        if g > 1:
            key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    else:
        k_pre, v_pre = prefix[module.layer_idx]
        out = shared_prefix_attention(query, key, value, k_pre, v_pre, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :data:`ATTN_NAME` with transformers' attention interface (once per process)."""
    if _registered:
        return
    _registered.append(True)
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention_forward)
    try:  # no mask for this implementation in every transformers version (the causal structure is applied here)
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    except ImportError:
        pass


def _no_mask(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def use_shared_prefix_attention(model) -> Iterator[None]:
    """Run ``model``'s forwards inside with :data:`ATTN_NAME` as its attention implementation (restored after).

    Its mask function builds no mask, so forwards inside get ``attention_mask=None`` and the attention function
    applies the causal structure itself.
    """
    register()
    configs = getattr(model, "_nncift_attn_configs", None)
    if configs is None:  # every distinct config object of the model's modules, found once per model
        configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        model._nncift_attn_configs = configs
    old = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = ATTN_NAME
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]


@contextlib.contextmanager
def shared_prefix(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Forwards inside attend over ``layers[i] = (keys, values)``, each (1, Hkv, P, D), before their own tokens."""
    _state.prefix = layers
    try:
        yield
    finally:
        _state.prefix = None
