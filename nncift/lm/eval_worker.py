"""Evaluation of a (fine-tuned) causal LM on the held-out test split.

Metrics, per test row and averaged (x100 where a percentage):

- **ROUGE-L** F-measure between the greedy generation and the reference response: longest common
  subsequence of lower-cased alphanumeric tokens (the tokenisation of Google's ``rouge_score`` without
  stemming), computed with the bit-parallel LCS recurrence (one big-integer update per token).
- **Embedding similarity**: cosine of the pipeline's sentence embeddings (``embed.model``) of generation
  and reference (the paper's BGE column, with our embedder).
- **Held-out loss**: teacher-forced negative log-likelihood of the reference response tokens and EOS,
  token-weighted over the split (and its perplexity).

Generation and loss run in blocks of test rows by :class:`EvalWorker` (a callable class: a plain loop or a
Ray Data actor pool, same outputs); each block is written as Parquet, so an interrupted evaluation resumes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from nncift.store import write_parquet

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens (``rouge_score``'s default tokenizer, no stemming)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (Allison-Dix / Hyyrö bit-parallel, O(|a| |b| / word))."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for j, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << j)
    full = (1 << len(b)) - 1
    v = full
    for tok in a:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] (0 when either side has no tokens)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def embedding_similarity(embedder, predictions: list[str], references: list[str]) -> np.ndarray:
    """(B,) cosine of the unit-norm embeddings of each prediction and its reference."""
    e = embedder.encode(list(predictions) + list(references))
    n = len(predictions)
    return np.einsum("ij,ij->i", e[:n], e[n:]).astype(np.float64)


def load_for_eval(base: str, adapter: str | None, device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer): the base model, with the LoRA adapter merged in, or a fully fine-tuned model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = adapter if adapter is not None else base
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    if adapter is not None and (Path(adapter) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.config.use_cache = True  # training saves use_cache=False; generation needs the KV cache
    return model.to(device).eval(), tok


class EvalWorker:
    """Callable class: test-row blocks -> Parquet blocks of generations and per-row losses.

    Args:
        base: base model directory. adapter: fine-tuned model/adapter directory (None = the base model).
        rows: ``prompt`` / ``response`` lists of the test split.
        out_dir: block folder.
        fmt_kwargs: :class:`~nncift.lm.sft.PromptFormatter` arguments (the fine-tune's template and limits).
        max_new_tokens, batch_size, device: generation settings.
    """

    def __init__(
        self,
        base: str,
        adapter: str | None,
        rows: dict,
        out_dir: str,
        fmt_kwargs: dict,
        max_new_tokens: int = 96,
        batch_size: int = 8,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ):
        import torch

        from nncift.lm.sft import PromptFormatter

        torch.manual_seed(0)
        self.model, self.tok = load_for_eval(base, adapter, device, trust_remote_code)
        self.fmt = PromptFormatter(self.tok, **fmt_kwargs)
        self.rows = rows
        self.out_dir = Path(out_dir)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch

        ids = self.fmt.prompt_ids(prompts)
        lens = np.array([len(x) for x in ids])
        width = int(lens.max())
        pad = self.fmt.pad
        arr = np.full((len(ids), width), pad, dtype=np.int64)
        real = np.arange(width)[None, :] >= (width - lens)[:, None]  # left padding
        arr[real] = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.as_tensor(arr, device=self.device),
                attention_mask=torch.as_tensor(real.astype(np.int64), device=self.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=self.fmt.eos,
            )
        return self.tok.batch_decode(out[:, width:], skip_special_tokens=True)

    def _losses(self, prompts: list[str], responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B,) summed NLL of the scored tokens and (B,) their counts (teacher forcing)."""
        import torch

        b = self.fmt.batch(prompts, responses).to_torch(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        scored = labels != -100
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
        return nll.sum(1).double().cpu().numpy(), scored.sum(1).cpu().numpy()

    def run_block(self, spec: dict) -> int:
        r0, r1 = int(spec["r0"]), int(spec["r1"])
        preds, sums, counts = [], [], []
        for s in range(r0, r1, self.batch_size):
            e = min(r1, s + self.batch_size)
            p, r = self.rows["prompt"][s:e], self.rows["response"][s:e]
            preds += self._generate(p)
            ls, n = self._losses(p, r)
            sums.append(ls)
            counts.append(n)
        table = pa.table(
            {
                "row": pa.array(np.arange(r0, r1, dtype=np.int64)),
                "prediction": pa.array(preds, pa.string()),
                "nll_sum": pa.array(np.concatenate(sums)),
                "n_tokens": pa.array(np.concatenate(counts).astype(np.int64)),
            }
        )
        write_parquet(self.out_dir / f"{int(spec['block_id']):06d}.parquet", table)
        return r1 - r0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = [self.run_block({k: int(v[i]) for k, v in batch.items()}) for i in range(len(batch["block_id"]))]
        return {"block_id": np.asarray(batch["block_id"]), "rows": np.asarray(n, dtype=np.int64)}


def score(
    predictions: list[str], references: list[str], nll_sum: np.ndarray, n_tokens: np.ndarray, embedder
) -> tuple[dict, dict[str, np.ndarray]]:
    """Aggregate metrics (ROUGE-L and embedding similarity x100, token-weighted held-out loss) and the
    per-row values they average: ``rouge_l``, ``embedding_similarity``, ``nll_per_token`` ((B,) float64)."""
    rl = np.array([rouge_l(p, r) for p, r in zip(predictions, references, strict=True)])
    sim = embedding_similarity(embedder, predictions, references)
    loss = float(np.sum(nll_sum) / max(1, int(np.sum(n_tokens))))
    metrics = {
        "rows": len(predictions),
        "rouge_l": 100.0 * float(rl.mean()),
        "embedding_similarity": 100.0 * float(sim.mean()),
        "heldout_loss": loss,
        "heldout_ppl": float(np.exp(loss)),
        "rouge_l_std": 100.0 * float(rl.std()),
        "embedding_similarity_std": 100.0 * float(sim.std()),
        "empty_generations": int(sum(not p.strip() for p in predictions)),
    }
    per_row = {"rouge_l": rl, "embedding_similarity": sim, "nll_per_token": nll_sum / np.maximum(n_tokens, 1)}
    return metrics, per_row
