"""Supervised fine-tuning batches: prompt + response + EOS, loss only on the response.

The reference trainer fed only the prompt to the model and padded the labels with the EOS id, so the loss
fell on padding. Here every example is ``prompt_ids + response_ids + [EOS]`` with

- labels ``-100`` on every prompt token and on every padding position (by position, never by token id:
  the pad token of many chat models *is* their EOS, which must be learned at the end of the response);
- an attention mask that is 0 exactly on padding;
- truncation of the prompt to ``max_prompt_tokens`` (its beginning is kept, the template around it is
  never cut) and of the response so the whole sequence fits ``max_seq_len``.

Prompts are rendered with the tokenizer's chat template when it has one (``template="auto"``), or with a
plain format string containing ``{prompt}``. Generation at evaluation time uses the same rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class SFTBatch:
    """A right-padded batch.

    Attributes:
        input_ids: (B, L) int64.
        attention_mask: (B, L) int64, 1 on real tokens.
        labels: (B, L) int64, ``-100`` on prompt and padding positions.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    def to_torch(self, device="cpu") -> dict:
        import torch

        return {k: torch.as_tensor(getattr(self, k), device=device) for k in ("input_ids", "attention_mask", "labels")}


class PromptFormatter:
    """Renders and tokenises prompts and responses for one tokenizer.

    Args:
        tokenizer: a HF tokenizer with an EOS token.
        template: "auto" (chat template if the tokenizer has one, else :data:`PLAIN_TEMPLATE`), "chat",
            or a format string with ``{prompt}``.
        max_prompt_tokens: tokens of the raw prompt kept before rendering.
        max_seq_len: tokens of the whole example (prompt + response + EOS).
    """

    def __init__(self, tokenizer, template: str = "auto", max_prompt_tokens: int = 256, max_seq_len: int = 512):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ValueError("finetune.template=chat but the tokenizer has no chat template")
        if template not in ("auto", "chat") and "{prompt}" not in template:
            raise ValueError(f"finetune.template must be auto, chat or contain '{{prompt}}', got {template!r}")
        self.tok = tokenizer
        self.chat = template == "chat" or (template == "auto" and has_chat)
        self.template = PLAIN_TEMPLATE if template in ("auto", "chat") else template
        self.max_prompt_tokens = max_prompt_tokens
        self.max_seq_len = max_seq_len
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of the rendered prompts (the generation prefix), raw prompts truncated first."""
        raw = self._ids(prompts)
        cut = [
            p if len(r) <= self.max_prompt_tokens else self.tok.decode(r[: self.max_prompt_tokens])
            for p, r in zip(prompts, raw, strict=True)
        ]
        if self.chat:
            rendered = [
                self.tok.apply_chat_template(
                    [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
                )
                for c in cut
            ]
        else:
            rendered = [self.template.format(prompt=c) for c in cut]
        return self._ids(rendered)

    def examples(self, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[int]]:
        """Full sequences and the number of prompt tokens of each (prompt + response + EOS, truncated)."""
        pids = self.prompt_ids(prompts)
        rids = self._ids(responses)
        seqs, n_prompt = [], []
        for p, r in zip(pids, rids, strict=True):
            p = p[: self.max_seq_len - 1]  # at least one scored token (the EOS) always remains
            room = self.max_seq_len - len(p) - 1
            seqs.append([*p, *r[:room], self.eos])
            n_prompt.append(len(p))
        return seqs, n_prompt

    def batch(self, prompts: list[str], responses: list[str]) -> SFTBatch:
        """Tokenise and collate one batch (see :func:`collate`)."""
        seqs, n_prompt = self.examples(prompts, responses)
        return collate(seqs, n_prompt, self.pad)


def collate(seqs: list[list[int]], n_prompt: list[int], pad_id: int) -> SFTBatch:
    """Right-pad ``seqs`` and mask the labels of prompt and padding positions (vectorised).

    Args:
        seqs: B token lists. n_prompt: (B,) prompt lengths (those positions get label -100).
        pad_id: id written at padding positions (their label is -100 and attention 0 whatever it is).
    """
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lens.max()) if len(seqs) else 0
    pos = np.arange(width)[None, :]
    real = pos < lens[:, None]
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    ids[real] = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lens.sum()))
    labels = np.where(real & (pos >= np.asarray(n_prompt, dtype=np.int64)[:, None]), ids, IGNORE)
    return SFTBatch(ids, real.astype(np.int64), labels)
