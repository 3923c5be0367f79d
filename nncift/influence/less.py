"""LESS (Xia et al., 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning") as a pairwise teacher.

Definition (checked against ``princeton-nlp/LESS``: ``less/data_selection/get_info.py``,
``collect_grad_reps.py``, ``matching.py``, ``get_training_dataset.py``, ``scripts/train/*.sh``, README)::

    U(e -> t) = sum_i  w_i * cos( P Gamma_i(e),  P g_i(t) ),      w_i = lr_i / sum_j lr_j

1. Warm-up: a LoRA fine-tune on a seeded random ``warmup_fraction`` of D_F (LESS: 5%) for ``warmup_epochs``
   epochs (LESS: 4), with our DeepSpeed fine-tune (:func:`nncift.lm.trainer.sft_train`), which exports the LoRA
   weights and their AdamW moments after the last step of every epoch (``export_states_at``). Checkpoint i is
   the end of epoch i.
2. Gradients, at each checkpoint, on the LoRA parameters only (flattened in ``named_parameters`` order), of
   the mean token NLL of the response tokens (and the final EOS: the labels of our SFT batches, as LESS's
   ``encode_with_*_format``), one item at a time (LESS: batch size 1), dropout off (eval mode).
   Pool items (D_F, the "training" side) get the Adam update direction; every item used as a target gets
   the plain gradient ``g`` (LESS: "for validation data, we always use sgd"). Pool items are targets too
   (K_FF), so they get both.
3. Adam direction, ``adam_transform=less`` (default, as ``obtain_gradients_with_adam``)::

       m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,   Gamma = m' / sqrt(v' + eps)

   with ``m, v`` the checkpoint's ``exp_avg``/``exp_avg_sq``. The released code has no bias correction and
   puts eps inside the square root; ``adam_transform=paper`` uses the bias-corrected form of the paper,
   ``m'/(1-b1^s) / (sqrt(v'/(1-b2^s)) + eps)`` with ``s`` = the checkpoint's Adam step count + 1 (after the
   normalisation below the two differ only through eps). ``b1, b2, eps`` are the optimizer's own (saved with
   the moments; LESS hard-codes 0.9, 0.999, 1e-8, which are also our fine-tune's).
4. Projection: a dense Rademacher (+-1) random matrix ``P`` (``proj_dim`` x n_params, LESS: TRAK's projector,
   8192 dims), identical for pool and target features and for every checkpoint (LESS: ``seed=0``,
   ``model_id=0`` everywhere), generated tile by tile from ``seed`` (:func:`rademacher_tiles`), so any
   chunking gives the same matrix; scaled by ``1/sqrt(proj_dim)`` (inner products preserved in expectation;
   irrelevant after normalisation).
5. Each projected feature is L2-normalised (``merge_and_normalize_info``); ``U`` is the sum over checkpoints
   of the cosines weighted by the average learning rate of the checkpoint's epoch, renormalised to sum to 1
   (README: "average lr of the epoch"; ``matching.py`` renormalises the weights).

Deviations from LESS (all deliberate):

- Pairwise: LESS aggregates the scores of a task's validation examples (mean per subtask, max over
  subtasks); here every (example, target) pair is one value, and aggregation is the selection's business.
- Precision: warm-up in fp32 (LESS: bf16) so the exported moments are the exact fp32 AdamW state; gradients
  in ``dtype`` (default float32; LESS: bfloat16) and projected in float32 (LESS: float16 inputs).
- Prompt format: our SFT formatting (:class:`nncift.lm.sft.PromptFormatter`: the tokenizer's chat template, or
  ``template``), not LESS's tulu ``<|user|>``/``<|assistant|>`` format; the warm-up and the gradients use the
  same one.
- Schedule: our fine-tune's linear warmup (its first step already trains at ``1/warmup`` of the peak) and
  linear decay; HF's (LESS's) first step runs at rate 0. Global batches drop the last incomplete batch of an
  epoch (HF keeps it), so the epoch ends at ``floor(n / batch_size)`` steps.
- LoRA defaults sized for CPUs: r=8, alpha=32 (LESS: 128 / 512, the same alpha/r = 4), dropout 0.1 and
  targets q,k,v,o as LESS; lr 2e-5, warmup ratio 0.03, no weight decay, grad clip 1.0, batch 32 as LESS.
- Paper form of the Adam direction (``adam_transform=paper``): written from the paper's section 3.1, which
  was not re-read here; the default follows the released code, which was.
- Checkpoint weights sum to 1 (as ``matching.py``): ``U`` is ``sum_i lr_i cos_i`` divided by ``sum_i lr_i``,
  a constant factor per run that keeps the labels in [-1, 1].
- Projection matrix: our own seeded Rademacher generator (the bits of ``numpy.random.default_rng([seed,
  tile])``), not TRAK's/``fast_jl``'s random stream: a different, equally distributed matrix.

Cost: all of it is in :meth:`Less.prepare` (warm-up, then per labeled item and checkpoint one forward and
one backward, plus the projection: ``2 * rows * n_params * proj_dim`` flops per block and the generation of
the ``n_params x proj_dim`` matrix once per block, so large ``feature_block`` amortise it; memory of a block
is ``feature_block * checkpoints * 2 * n_params * 4`` bytes of gradients). Labeling is a lookup and one
matmul, hence the large :attr:`Less.pairs_per_second`. Measured with the embedded SmolLM2-135M, the default
LoRA (921,600 parameters), 128-token items, one CPU thread: warm-up 0.8 s per item-epoch; one forward and
backward 0.7 s per item and checkpoint; projecting to 8192 dims ~18 s per block pass plus ~0.1 s per row; so
with 4 checkpoints and ``feature_block=32`` about 4.4 s per pool item and 3.9 s per target item.

Files under the teacher's ``work_dir``: ``settings.json`` (what the files were computed with),
``warmup/`` (the fine-tune folder, ``states/step_N.safetensors`` per epoch), ``features/pool_NNNNNN`` and
``features/target_NNNNNN.safetensors`` (per block: ``adam`` and/or ``sgd`` of shape (B, C, proj_dim), ids and
steps as metadata), ``features/manifest.json`` (checkpoint steps, average lrs, weights, files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nncift.config import _f
from nncift.errors import ConfigError, DataError, run_worker_batch
from nncift.influence.interface import InfluenceFunction, Items
from nncift.influence.plugins import register

log = logging.getLogger(__name__)

TILE_ROWS = 256  # rows (gradient coordinates) of P drawn from one seeded stream: entries never depend on chunking
ADAM_TRANSFORMS = ("less", "paper")
SIDES = ("pool", "target")
FEATURE_FORMAT = "nncift-less-features-v1"


@dataclass
class LessConfig:
    """``less.*``: the LESS teacher (LoRA warm-up, Adam/SGD gradient features, lr-weighted cosine)."""

    model: str | None = _f(None, "causal LM (local folder with config, weights, tokenizer); None = embedded SmolLM2")
    warmup_fraction: float = _f(0.05, "fraction of D_F (seeded random) the warm-up LoRA is trained on")
    warmup_epochs: int = _f(4, "warm-up epochs; one checkpoint (Adam state) at the end of each")
    lora_r: int = _f(8, "LoRA rank of the warm-up (LESS: 128)")
    lora_alpha: int = _f(32, "LoRA alpha (LESS: 512, alpha/r = 4)")
    lora_dropout: float = _f(0.1, "LoRA dropout during the warm-up (off for the gradients)")
    lora_target: str = _f("q_proj,k_proj,v_proj,o_proj", "peft target_modules: comma-separated names or all-linear")
    lr: float = _f(2e-5, "warm-up peak learning rate (linear warmup and decay)")
    warmup_ratio: float = _f(0.03, "fraction of the warm-up steps spent warming the learning rate up")
    batch_size: int = _f(32, "warm-up global batch (clamped to the warm-up rows)")
    max_seq_len: int = _f(384, "tokens per item (prompt + response + EOS), warm-up and gradients")
    max_prompt_tokens: int = _f(192, "raw prompt tokens kept before the template is applied")
    template: str = _f("auto", "auto (chat template if any) | chat | a format string with {prompt}")
    proj_dim: int = _f(8192, "dimension of the random projection of the gradients")
    adam_transform: str = _f("less", "less (released code: m'/sqrt(v'+eps)) | paper (bias-corrected)")
    seed: int | None = _f(None, "warm-up subset, LoRA init, data order and projection seed; None = the run's seed")
    dtype: str = _f("float32", "dtype of the model the gradients are taken with: float32 | bfloat16")
    trust_remote_code: bool = _f(False, "allow custom model code from the model directory")
    deepspeed: str = _f("zero0", "warm-up DeepSpeed config: zero0 | zero1 | zero2 | zero3 or a JSON path", runtime=True)
    micro_batch_size: int = _f(4, "warm-up sequences per forward on one worker", runtime=True)
    num_workers: int = _f(1, "warm-up data-parallel workers (ray executor)", runtime=True)
    feature_block: int = _f(32, "items per gradient-feature block (memory ~ block x 8 x n_params x 4 B)", runtime=True)
    concurrency: int = _f(1, "gradient-feature actors (ray executor)", runtime=True)
    num_cpus: float = _f(1.0, "CPUs per gradient-feature actor", runtime=True)
    threads: int | None = _f(None, "torch threads per gradient-feature worker (None = torch's default)", runtime=True)

    def validate(self) -> None:
        """Raise :class:`~nncift.errors.ConfigError` naming the first bad field."""
        checks = (
            (0.0 < self.warmup_fraction <= 1.0, "warmup_fraction", "must be in (0, 1]"),
            (self.warmup_epochs >= 1, "warmup_epochs", "must be >= 1"),
            (self.lora_r >= 1, "lora_r", "must be >= 1"),
            (self.lora_alpha > 0, "lora_alpha", "must be > 0"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)"),
            (bool(str(self.lora_target).strip(" ,")), "lora_target", "must name at least one module"),
            (self.lr > 0, "lr", "must be > 0"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.max_seq_len >= 2, "max_seq_len", "must be >= 2"),
            (self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1"),
            (
                self.template in ("auto", "chat") or "{prompt}" in self.template,
                "template",
                f"must be auto, chat or contain '{{prompt}}', got {self.template!r}",
            ),
            (self.proj_dim >= 1, "proj_dim", f"must be >= 1, got {self.proj_dim}"),
            (self.adam_transform in ADAM_TRANSFORMS, "adam_transform", f"got {self.adam_transform!r} (less | paper)"),
            (self.dtype in ("float32", "bfloat16"), "dtype", f"got {self.dtype!r} (float32 | bfloat16)"),
            (self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1"),
            (self.num_workers >= 1, "num_workers", "must be >= 1"),
            (self.feature_block >= 1, "feature_block", "must be >= 1"),
            (self.concurrency >= 1, "concurrency", "must be >= 1"),
            (self.num_cpus > 0, "num_cpus", "must be > 0"),
            (self.threads is None or self.threads >= 1, "threads", "must be >= 1 or None"),
        )
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"config field 'less.{key}': {msg}")


# ---------------------------------------------------------------------------------------------------- projection
def rademacher_tiles(seed: int, t0: int, t1: int, proj_dim: int, device: Any = "cpu") -> Any:
    """Rows ``t0 * TILE_ROWS ... t1 * TILE_ROWS - 1`` of the projection matrix, unscaled.

    Tile ``t`` (``TILE_ROWS`` rows) is drawn from its own stream, ``numpy.random.default_rng([seed, t])``
    (seed-sequence keyed: tiles and seeds never share a stream), one bit per entry (most significant bit
    first; 1 -> -1, 0 -> +1), so an entry depends only on ``(seed, row, column)``: never on how the rows
    are chunked, nor on the device (bits are drawn on the CPU; a GPU receives them packed and expands them).

    Returns:
        ((t1 - t0) * TILE_ROWS, proj_dim) float32 tensor of +-1 on ``device``.
    """
    import torch

    device = torch.device(device)
    n = TILE_ROWS * proj_dim
    nb = (n + 7) // 8
    raw = np.frombuffer(b"".join(np.random.default_rng([int(seed), t]).bytes(nb) for t in range(t0, t1)), np.uint8)
    raw = raw.reshape(t1 - t0, nb)
    if device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(raw, axis=1)[:, :n])
    else:  # ship the packed bits (8x smaller), unpack on the device
        bits = unpack_bits(torch.from_numpy(raw.copy()).to(device))[:, :n]
    # +-1.0 by bit pattern: the IEEE float 1.0 with the drawn bit as its sign (no gather, no branch)
    signed = bits.to(torch.int32).bitwise_left_shift_(31).bitwise_or_(0x3F800000)
    return signed.view(torch.float32).reshape(-1, proj_dim)


def unpack_bits(packed: Any) -> Any:
    """Torch twin of ``numpy.unpackbits(..., axis=1)`` (most significant bit first), for any device.

    Args:
        packed: (R, B) uint8 tensor.

    Returns:
        (R, 8 * B) uint8 tensor of 0/1.
    """
    import torch

    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).reshape(packed.shape[0], -1)


def projection_matrix(seed: int, grad_dim: int, proj_dim: int) -> Any:
    """The whole projection matrix (for tests and small ``grad_dim``): :func:`project` is ``G @ P``.

    Returns:
        (grad_dim, proj_dim) float32 tensor, entries ``+-1/sqrt(proj_dim)``.
    """

    return rademacher_tiles(seed, 0, math.ceil(grad_dim / TILE_ROWS), proj_dim)[:grad_dim] / math.sqrt(proj_dim)


def project(grads: Any, seed: int, proj_dim: int, chunk_rows: int = 16 * TILE_ROWS) -> Any:
    """Random projection ``grads @ P`` with ``P`` (:func:`projection_matrix`) generated ``chunk_rows`` rows at
    a time, never whole (a chunk is ``chunk_rows * proj_dim * 4`` bytes: 128 MiB by default at 8192 dims).

    Args:
        grads: (R, D) float tensor (any device; the matrix is expanded there).
        seed: projection seed. proj_dim: k.
        chunk_rows: rows of ``P`` materialised at once (rounded up to a multiple of :data:`TILE_ROWS`); the
            result does not depend on it beyond float summation order.

    Returns:
        (R, proj_dim) float32 tensor.
    """
    import torch

    grads = grads.float()
    r, d = grads.shape
    per = max(1, math.ceil(chunk_rows / TILE_ROWS))
    out = torch.zeros(r, proj_dim, dtype=torch.float32, device=grads.device)
    n_tiles = math.ceil(d / TILE_ROWS)
    for t0 in range(0, n_tiles, per):
        t1 = min(n_tiles, t0 + per)
        a, b = t0 * TILE_ROWS, min(d, t1 * TILE_ROWS)
        out.addmm_(grads[:, a:b], rademacher_tiles(seed, t0, t1, proj_dim, grads.device)[: b - a])
    return out.mul_(1.0 / math.sqrt(proj_dim))


def adam_direction(g: Any, m: Any, v: Any, betas: tuple[float, float], eps: float, adam_step: int, mode: str) -> Any:
    """LESS's Adam update direction of gradient ``g`` from the checkpoint's moments ``m``, ``v``.

    Args:
        g, m, v: (D,) float32 tensors. betas, eps: the optimizer's. adam_step: steps it has taken.
        mode: ``less`` (``m'/sqrt(v'+eps)``, the released code) or ``paper`` (bias-corrected with step
            ``adam_step + 1``: ``m'/(1-b1^s) / (sqrt(v'/(1-b2^s)) + eps)``).

    Returns:
        (D,) float32 tensor.
    """
    b1, b2 = betas
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * g * g
    if mode == "less":
        return m2 / (v2 + eps).sqrt()
    if mode == "paper":
        s = int(adam_step) + 1
        return (m2 / (1 - b1**s)) / ((v2 / (1 - b2**s)).sqrt() + eps)
    raise ValueError(f"adam_transform must be less | paper, got {mode!r}")


# ---------------------------------------------------------------------------------------------------- model
def lora_targets(spec: str) -> str | list[str]:
    """peft ``target_modules`` from ``less.lora_target`` (as :mod:`nncift.lm.trainer` parses it)."""
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def load_lora_model(
    model: str,
    lora_r: int,
    lora_alpha: int,
    lora_target: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """The base LM wrapped with the warm-up's LoRA structure (weights to be loaded from a state), in eval mode.

    Returns:
        (peft model, tokenizer, [(name, parameter)] of the trainable LoRA parameters in flattening order).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    base.config.use_cache = False
    cfg = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=lora_targets(lora_target),
        bias="none",
        task_type="CAUSAL_LM",
    )
    lm = get_peft_model(base, cfg).to(device).eval()
    params = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
    return lm, tok, params


class LessFeatureWorker:
    """Callable class: block specs -> gradient-feature files ``<out_dir>/<side>_<block:06d>.safetensors``.

    Each block holds, for its items and every checkpoint, the L2-normalised projected features:
    ``adam`` (pool side only) and ``sgd``, each (B, C, proj_dim) float32; metadata ``ids`` and ``steps``
    (JSON lists). A block spec is ``{block_id, side (0 pool, 1 target), block, i0, i1}``: items
    ``i0 .. i1 - 1`` of that side's item lists.

    Args:
        model, lora_r, lora_alpha, lora_target, dtype, device, trust_remote_code: see :func:`load_lora_model`.
        states: exported optimizer states (:func:`nncift.lm.trainer.read_state` files), one per checkpoint.
        template, max_prompt_tokens, max_seq_len: the warm-up's formatting (:class:`nncift.lm.sft.PromptFormatter`).
        proj_dim, seed: the projection. adam_transform: ``less`` | ``paper`` (:func:`adam_direction`).
        items: ``{"pool": {"ids", "prompts", "responses"}, "target": {...}}`` (the labeled items of each side).
        out_dir: the feature folder. threads: torch threads (None: unchanged).
    """

    def __init__(
        self,
        model: str,
        lora_r: int,
        lora_alpha: int,
        lora_target: str,
        states: list[str],
        items: dict[str, dict[str, list[str]]],
        out_dir: str,
        proj_dim: int = 8192,
        seed: int = 0,
        adam_transform: str = "less",
        template: str = "auto",
        max_prompt_tokens: int = 192,
        max_seq_len: int = 384,
        dtype: str = "float32",
        device: str = "cpu",
        trust_remote_code: bool = False,
        threads: int | None = None,
    ):
        import torch

        from nncift.lm.sft import PromptFormatter
        from nncift.lm.trainer import read_state

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.lm, tok, self.params = load_lora_model(
            model, lora_r, lora_alpha, lora_target, dtype, device, trust_remote_code
        )
        self.fmt = PromptFormatter(tok, template, max_prompt_tokens, max_seq_len)
        self.names = [n for n, _ in self.params]
        self.grad_dim = sum(p.numel() for _, p in self.params)
        self.states = []
        for path in states:
            groups, meta = read_state(path)
            missing = [n for n in self.names if n not in groups["param"]]
            if missing or len(groups["param"]) != len(self.names):
                raise DataError(
                    f"{path}: the exported state does not match the LoRA structure (missing {missing[:1]}, "
                    f"{len(groups['param'])} tensors for {len(self.names)} parameters)"
                )
            flat = {
                k: torch.from_numpy(np.concatenate([groups[k][n].reshape(-1) for n in self.names])).to(self.device)
                for k in ("exp_avg", "exp_avg_sq")
            }
            self.states.append({"params": {n: groups["param"][n] for n in self.names}, "meta": meta, **flat})
        self.steps = [int(s["meta"]["step"]) for s in self.states]
        self.items = items
        self.out_dir = Path(out_dir)
        self.proj_dim, self.seed, self.mode = int(proj_dim), int(seed), adam_transform

    def _load(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params:
                p.copy_(torch.from_numpy(state["params"][n]).to(p.device, p.dtype))

    def gradient(self, prompt: str, response: str) -> Any:
        """(D,) float32 gradient of the item's mean response-token NLL w.r.t. the LoRA parameters, at the
        weights currently loaded."""
        import torch

        batch = self.fmt.batch([prompt], [response]).to_torch(self.device)
        loss = self.lm(**batch).loss
        grads = torch.autograd.grad(loss, [p for _, p in self.params])
        return torch.cat([g.reshape(-1).float() for g in grads])

    def features(self, side: str, i0: int, i1: int) -> dict[str, np.ndarray]:
        """Normalised projected features of items ``i0 .. i1 - 1`` of ``side``.

        Returns:
            ``{"sgd": (B, C, k)}`` plus ``"adam": (B, C, k)`` on the pool side, float32.
        """
        import torch

        prompts = self.items[side]["prompts"][i0:i1]
        responses = self.items[side]["responses"][i0:i1]
        b, c = len(prompts), len(self.states)
        adam = side == "pool"
        rows = torch.empty((2 if adam else 1) * c * b, self.grad_dim, dtype=torch.float32, device=self.device)
        for ci, st in enumerate(self.states):
            self._load(st)
            meta = st["meta"]
            for j in range(b):
                g = self.gradient(prompts[j], responses[j])
                rows[ci * b + j] = g
                if adam:
                    rows[(c + ci) * b + j] = adam_direction(
                        g, st["exp_avg"], st["exp_avg_sq"], meta["betas"], meta["eps"], meta["adam_step"], self.mode
                    )
        proj = torch.nn.functional.normalize(project(rows, self.seed, self.proj_dim), dim=1)
        proj = proj.reshape(-1, c, b, self.proj_dim).permute(0, 2, 1, 3).cpu().numpy()
        out = {"sgd": np.ascontiguousarray(proj[0])}
        if adam:
            out["adam"] = np.ascontiguousarray(proj[1])
        return out

    def run_block(self, spec: dict) -> int:
        """Compute and write one block (atomically); returns its item count."""
        from nncift.store import write_safetensors

        side = SIDES[int(spec["side"])]
        i0, i1 = int(spec["i0"]), int(spec["i1"])
        t0 = time.perf_counter()
        feats = self.features(side, i0, i1)
        meta = {
            "format": FEATURE_FORMAT,
            "side": side,
            "ids": json.dumps([str(x) for x in self.items[side]["ids"][i0:i1]]),
            "steps": json.dumps(self.steps),
            "proj_dim": str(self.proj_dim),
            "seed": str(self.seed),
        }
        write_safetensors(feature_path(self.out_dir, side, int(spec["block"])), feats, metadata=meta)
        dt = time.perf_counter() - t0
        log.info("less features %s block %06d: %d items in %.1f s", side, int(spec["block"]), i1 - i0, dt)
        return i1 - i0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute each block of the batch; a user-fixable error is returned in ``error`` (see
        :func:`nncift.errors.raise_worker_errors`)."""
        return run_worker_batch(batch, self.run_block, "items")


def feature_path(out_dir: str | Path, side: str, block: int) -> Path:
    """The feature file of block ``block`` of ``side`` (``pool`` | ``target``)."""
    return Path(out_dir) / f"{side}_{int(block):06d}.safetensors"


def _block_ids(path: Path) -> list[str] | None:
    """The ids a feature file holds, or None if it is not a complete feature file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
    except Exception:  # truncated or foreign file: safetensors raises several types
        return None
    if meta.get("format") != FEATURE_FORMAT:
        return None
    return list(json.loads(meta["ids"]))


def epoch_lrs(progress: str | Path, epochs: int) -> list[float]:
    """Average learning rate of each warm-up epoch, from the fine-tune's ``progress.jsonl`` (LESS weights
    checkpoint i by the average lr of epoch i)."""
    recs = [json.loads(ln) for ln in Path(progress).read_text().splitlines() if ln.strip()]
    out = []
    for e in range(epochs):
        lrs = [float(r["lr"]) for r in recs if int(r["epoch"]) == e]
        if not lrs:
            raise DataError(f"{progress}: no step of warm-up epoch {e} was logged")
        out.append(float(np.mean(lrs)))
    return out


# ---------------------------------------------------------------------------------------------------- teacher
@register
class Less(InfluenceFunction):
    """LESS: ``U(e -> t) = sum_i w_i cos(P Gamma_i(e), P g_i(t))`` from precomputed gradient features.

    Built (in label workers) from :meth:`prepare`'s output; labeling is a lookup by :attr:`Items.ids` and
    one matmul. Only items :meth:`prepare` computed features for (the labeled ones) can be scored: examples
    need an Adam feature (labeled pool items), targets a plain-gradient feature (labeled pool or target
    items); any other id raises :class:`~nncift.errors.DataError`.

    Args:
        feature_dir: the ``features`` folder written by :meth:`prepare` (with its ``manifest.json``).
    """

    name = "less"
    config = LessConfig
    symmetric = False
    exact_is_cheap = False
    pairs_per_second = 1e5  # a lookup + matmul once the features exist; the real cost is in prepare()
    cost_unit = "item"  # one gradient feature per distinct item

    @classmethod
    def resolve(cls, section: LessConfig, device: str) -> dict[str, Any]:
        from nncift.lm.models import check_model_dir, embedded_lm_dir
        from nncift.lm.trainer import load_deepspeed_config

        section.validate()
        if section.model is not None:
            check_model_dir(section.model, "less.model")
        try:
            load_deepspeed_config(section.deepspeed)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("finetune.deepspeed", "less.deepspeed")) from None
        model = str(embedded_lm_dir()) if section.model is None else str(Path(section.model).expanduser().resolve())
        return {**dataclasses.asdict(section), "model": model, "device": device}

    @classmethod
    def build(cls, **kwargs: Any) -> Less:
        """The teacher over :meth:`prepare`'s features (``feature_dir``)."""
        if not kwargs.get("feature_dir"):
            raise ConfigError(
                "label.function=less: the teacher has no gradient features; they are computed by "
                "Less.prepare() (the label stage runs it before any block)"
            )
        return cls(kwargs["feature_dir"])

    # ------------------------------------------------------------------ driver side
    @classmethod
    def prepare(
        cls,
        kwargs: dict[str, Any],
        *,
        pool: Items,
        target: Items,
        pool_labeled: np.ndarray,
        target_labeled: np.ndarray,
        work_dir: Any,
        executor: Any,
        seed: int,
    ) -> dict[str, Any]:
        """Warm-up LoRA fine-tune, then the gradient features of the labeled items (resumable).

        Args:
            kwargs: :meth:`resolve`'s output.
            pool, target: D_F (M items) and D_T (N items), with ids.
            pool_labeled, target_labeled: (L_F,), (L_T,) int64 indices of the items that need features.
            work_dir: this teacher's folder. executor: runs the warm-up (``finetune``) and the feature blocks
                (``map_blocks``). seed: the run's seed (used when ``less.seed`` is None).

        Returns:
            ``{"feature_dir": str}``, the keyword arguments of :meth:`build`.
        """
        kw = dict(kwargs)
        kw["seed"] = int(seed if kw.get("seed") is None else kw["seed"])
        for side, items in (("pool", pool), ("target", target)):
            if items.ids is None:
                raise DataError(f"less.prepare: the {side} items have no ids (features are stored by id)")
        work = Path(work_dir)
        warm_idx = warmup_indices(len(pool), kw["warmup_fraction"], kw["seed"])
        _check_settings(work, kw, [pool.ids[i] for i in warm_idx])
        states, lrs = _warmup(kw, pool, warm_idx, work / "warmup", executor)
        weights = [lr / sum(lrs) for lr in lrs]
        feat_dir = work / "features"
        _features(kw, pool, target, pool_labeled, target_labeled, states, feat_dir, executor)
        from nncift.store import write_json

        files = {s: sorted(p.name for p in feat_dir.glob(f"{s}_*.safetensors")) for s in SIDES}
        manifest = {
            "format": FEATURE_FORMAT,
            "steps": [int(Path(p).stem.split("_")[1]) for p in states],
            "lr": lrs,
            "weights": weights,
            "proj_dim": int(kw["proj_dim"]),
            "seed": kw["seed"],
            "adam_transform": kw["adam_transform"],
            "files": files,
        }
        write_json(feat_dir / "manifest.json", manifest)
        log.info("less: features of %d pool + %d target items in %s (checkpoint weights %s)",
                 len(pool_labeled), len(target_labeled), feat_dir, [round(w, 4) for w in weights])  # fmt: skip
        return {"feature_dir": str(feat_dir)}

    # ------------------------------------------------------------------ label side
    def __init__(self, feature_dir: str | Path):
        from safetensors import safe_open

        self.feature_dir = Path(feature_dir)
        man_path = self.feature_dir / "manifest.json"
        if not man_path.is_file():
            raise DataError(f"{man_path}: no LESS feature manifest (run Less.prepare first)")
        self.manifest = json.loads(man_path.read_text())
        w = np.asarray(self.manifest["weights"], np.float32)
        k, c = int(self.manifest["proj_dim"]), len(w)
        adam, sgd, self.adam_ids, self.sgd_ids = [], [], [], []
        for side in SIDES:
            for name in self.manifest["files"][side]:
                path = self.feature_dir / name
                with safe_open(str(path), framework="numpy") as fh:
                    meta = fh.metadata() or {}
                    ids = json.loads(meta["ids"])
                    if json.loads(meta["steps"]) != self.manifest["steps"]:
                        raise DataError(
                            f"{path}: computed at checkpoints {meta['steps']}, not {self.manifest['steps']}"
                        )
                    s = fh.get_tensor("sgd")
                    sgd.append(s.reshape(len(ids), c * k))
                    self.sgd_ids += ids
                    if side == "pool":
                        # the checkpoint weights folded into the example side: U = A @ S.T in one matmul
                        adam.append((fh.get_tensor("adam") * w[None, :, None]).reshape(len(ids), c * k))
                        self.adam_ids += ids
        self.adam = np.concatenate(adam) if adam else np.zeros((0, c * k), np.float32)
        self.sgd = np.concatenate(sgd) if sgd else np.zeros((0, c * k), np.float32)
        self.adam_index = {x: i for i, x in enumerate(self.adam_ids)}
        self.sgd_index = {x: i for i, x in enumerate(self.sgd_ids)}
        log.info("less teacher: %d example and %d target features (%d checkpoints x %d dims)",
                 len(self.adam_ids), len(self.sgd_ids), c, k)  # fmt: skip

    def _rows(self, items: Items, index: dict[str, int], what: str) -> np.ndarray:
        if items.ids is None:
            raise DataError("label.function=less needs item ids (features are stored by id)")
        rows = np.fromiter((index.get(str(x), -1) for x in items.ids), dtype=np.int64, count=len(items.ids))
        bad = np.flatnonzero(rows < 0)
        if len(bad):
            raise DataError(
                f"less: no {what} feature for id {items.ids[bad[0]]!r} ({len(bad)} of {len(rows)} ids missing; "
                f"features exist only for the items Less.prepare was given as labeled)"
            )
        return rows

    def example_features(self, examples: Items) -> np.ndarray:
        """(E, C*k) checkpoint-weighted Adam features of the examples."""
        return self.adam[self._rows(examples, self.adam_index, "Adam (example)")]

    def target_features(self, targets: Items) -> np.ndarray:
        """(T, C*k) plain-gradient features of the targets."""
        return self.sgd[self._rows(targets, self.sgd_index, "gradient (target)")]

    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        """U(e -> t) for every pair. Returns (E, T) float32."""
        return (self.example_features(examples) @ self.target_features(targets).T).astype(np.float32)

    def utility_pairs(self, examples: Items, targets: Items) -> np.ndarray:
        """U(e_k -> t_k) for aligned pairs. Returns (P,) float32."""
        if len(examples) != len(targets):
            raise ValueError(f"utility_pairs needs aligned pairs, got {len(examples)} examples, {len(targets)} targets")
        a, s = self.example_features(examples), self.target_features(targets)
        return np.einsum("pk,pk->p", a, s).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- prepare steps
def warmup_indices(m: int, fraction: float, seed: int) -> np.ndarray:
    """(n,) sorted int64 indices of the warm-up subset: ``max(1, int(fraction * m))`` items of D_F (LESS:
    ``int(len * percentage)``) drawn without replacement with ``default_rng(seed)``."""
    n = min(m, max(1, int(fraction * m)))
    return np.sort(np.random.default_rng(seed).choice(m, size=n, replace=False)).astype(np.int64)


_RESULT_FIELDS = (
    "model", "warmup_fraction", "warmup_epochs", "lora_r", "lora_alpha", "lora_dropout", "lora_target", "lr",
    "warmup_ratio", "batch_size", "max_seq_len", "max_prompt_tokens", "template", "proj_dim", "adam_transform",
    "seed", "dtype", "trust_remote_code",
)  # fmt: skip


def _check_settings(work: Path, kw: dict[str, Any], warm_ids: list[str]) -> None:
    """Record what the teacher's files are computed with; files of other settings are discarded."""
    from nncift.store import write_json

    settings = {k: kw[k] for k in _RESULT_FIELDS}
    settings["warmup_ids"] = hashlib.sha256("\x00".join(map(str, warm_ids)).encode()).hexdigest()
    path = work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old == settings:
            return
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        log.warning("less: %s was computed with other settings (%s): recomputing", work, ", ".join(changed))
        for sub in ("warmup", "features"):
            shutil.rmtree(work / sub, ignore_errors=True)
    write_json(path, settings)


def warmup_ft(kw: dict[str, Any], n_rows: int, use_gpu: bool) -> dict[str, Any]:
    """The ``ft`` dict of the warm-up fine-tune (:func:`nncift.lm.trainer.sft_train`), with a state export
    at the end of every epoch. The global batch is clamped to the rows (and to a multiple of the workers)."""
    from nncift.config import FinetuneConfig
    from nncift.lm.trainer import plan_steps

    workers = int(kw["num_workers"])
    bs = min(int(kw["batch_size"]), n_rows)
    bs -= bs % workers
    if bs < 1:
        raise ConfigError(
            f"config field 'less.warmup_fraction': {n_rows} warm-up rows cannot feed less.num_workers={workers}"
        )
    micro = max(1, min(int(kw["micro_batch_size"]), bs // workers))
    while bs % (micro * workers):
        micro -= 1
    if bs != kw["batch_size"]:
        log.warning("less: warm-up global batch %d clamped to %d (%d warm-up rows)", kw["batch_size"], bs, n_rows)
    per_epoch, _ = plan_steps(n_rows, bs, int(kw["warmup_epochs"]))
    ft = dataclasses.asdict(FinetuneConfig())
    ft.update(
        model=kw["model"], method="lora", lora_r=kw["lora_r"], lora_alpha=kw["lora_alpha"],
        lora_dropout=kw["lora_dropout"], lora_target=kw["lora_target"], deepspeed=kw["deepspeed"], precision="fp32",
        epochs=int(kw["warmup_epochs"]), batch_size=bs, lr=kw["lr"], warmup_ratio=kw["warmup_ratio"],
        weight_decay=0.0, grad_clip=1.0, max_seq_len=kw["max_seq_len"], max_prompt_tokens=kw["max_prompt_tokens"],
        template=kw["template"], trust_remote_code=kw["trust_remote_code"], seed=kw["seed"],
        micro_batch_size=micro, num_workers=workers, use_gpu=use_gpu, save_every=per_epoch, keep_checkpoints=1,
        export_states_at=[per_epoch * (e + 1) for e in range(int(kw["warmup_epochs"]))],
    )  # fmt: skip
    return ft


def _warmup(
    kw: dict[str, Any], pool: Items, idx: np.ndarray, out: Path, executor: Any
) -> tuple[list[str], list[float]]:
    """Run (or reuse) the warm-up; returns the state files of its epochs and their average learning rates."""
    from nncift.lm.trainer import state_path

    use_gpu = str(kw["device"]).startswith("cuda")
    ft = warmup_ft(kw, len(idx), use_gpu)
    states = [state_path(out, s) for s in ft["export_states_at"]]
    done = (out / "train_summary.json").is_file()
    if done and not all(p.is_file() for p in states):
        log.warning("less: %s finished without its epoch states: training it again", out)
        shutil.rmtree(out)
        done = False
    if done:
        log.info("less: warm-up already done in %s", out)
    else:
        shutil.rmtree(out.parent / "features", ignore_errors=True)  # features of an earlier warm-up are stale
        rows = {"prompt": [pool.prompts[i] for i in idx], "response": [pool.responses[i] for i in idx]}
        log.info("less: warm-up LoRA on %d of %d pool items, %d epochs of %d steps",
                 len(idx), len(pool), ft["epochs"], ft["export_states_at"][0])  # fmt: skip
        executor.train("sft", ft, rows, out, num_workers=ft["num_workers"], use_gpu=use_gpu)
        missing = [p.name for p in states if not p.is_file()]
        if missing:
            raise DataError(f"{out}: the warm-up wrote no optimizer state {missing[0]}")
    return [str(p) for p in states], epoch_lrs(out / "progress.jsonl", ft["epochs"])


def _features(
    kw: dict[str, Any],
    pool: Items,
    target: Items,
    pool_labeled: np.ndarray,
    target_labeled: np.ndarray,
    states: list[str],
    feat_dir: Path,
    executor: Any,
) -> None:
    """Compute the features of the requested items that no complete feature file on disk holds yet.

    Finished files are kept whatever items they hold (a later request for more items, e.g. the choose stage's
    held-out rows, computes only the new ones, in new blocks numbered after the existing ones; a resumed
    request computes nothing). The requested items missing from the files are cut into ``feature_block``
    blocks."""
    sides = {
        "pool": (pool, np.asarray(pool_labeled, np.int64)),
        "target": (target, np.asarray(target_labeled, np.int64)),
    }
    items, specs, todo = {}, [], []
    feat_dir.mkdir(parents=True, exist_ok=True)
    for code, (side, (its, lab)) in enumerate(sides.items()):
        have: set[str] = set()
        last = -1
        for path in sorted(feat_dir.glob(f"{side}_*.safetensors")):
            ids = _block_ids(path)
            if ids is None:
                log.warning("less: %s is not a complete feature file: recomputing its items", path)
                path.unlink()
                continue
            have.update(ids)
            last = max(last, int(path.stem.split("_")[1]))
        need = [i for i in lab if str(its.ids[i]) not in have]
        items[side] = {
            "ids": [str(its.ids[i]) for i in need],
            "prompts": [its.prompts[i] for i in need],
            "responses": [its.responses[i] for i in need],
        }
        bs = int(kw["feature_block"])
        for b, i0 in enumerate(range(0, len(need), bs), start=last + 1):
            spec = {"block_id": len(specs), "side": code, "block": b, "i0": i0, "i1": min(len(need), i0 + bs)}
            specs.append(spec)
            todo.append(spec)
    log.info("less: %d new feature blocks (%d pool + %d target items already on disk)", len(specs),
             len(sides["pool"][1]) - len(items["pool"]["ids"]), len(sides["target"][1]) - len(items["target"]["ids"]))  # fmt: skip
    if not todo:
        return
    device = str(kw["device"])
    ctor = {
        "model": kw["model"],
        "lora_r": kw["lora_r"],
        "lora_alpha": kw["lora_alpha"],
        "lora_target": kw["lora_target"],
        "states": states,
        "items": items,
        "out_dir": str(feat_dir),
        "proj_dim": int(kw["proj_dim"]),
        "seed": int(kw["seed"]),
        "adam_transform": kw["adam_transform"],
        "template": kw["template"],
        "max_prompt_tokens": int(kw["max_prompt_tokens"]),
        "max_seq_len": int(kw["max_seq_len"]),
        "dtype": kw["dtype"],
        "device": device,
        "trust_remote_code": bool(kw["trust_remote_code"]),
        "threads": kw.get("threads"),
    }
    executor.map_blocks(
        LessFeatureWorker,
        ctor,
        todo,
        desc="less features",
        concurrency=int(kw["concurrency"]),
        num_cpus=float(kw["num_cpus"]),
        num_gpus=1.0 if device.startswith("cuda") else 0.0,
    )
