"""Supervised fine-tuning with a DeepSpeed engine: the per-worker training loop and its local twin.

:func:`sft_train` is the whole training loop of one data-parallel rank. It runs unchanged

- under Ray Train (``nncift.exec.ray_executor.finetune_ray``: one call per ``TorchTrainer`` worker, DeepSpeed
  reusing Ray's process group: gloo on CPU, NCCL on GPUs), and
- in-process (:func:`finetune_local`, world size 1) with ``world`` times the gradient accumulation, which
  is the same optimisation (the same global batches, the same averaged gradient) on one process.

The global batch size (``finetune.batch_size``) is part of the configuration; the micro-batch size and the
number of workers are runtime knobs (``grad_accum = batch_size / (micro_batch_size * workers)``), so a run
may be resumed on more or fewer workers.

Batches: epoch ``e`` visits the rows in the order ``permutation(seed + e)``; global step ``s`` takes the
next ``batch_size`` rows, split into ``workers * grad_accum`` micro-batches, of which rank ``r`` runs
``r * grad_accum ... (r + 1) * grad_accum - 1``. The last incomplete global batch of an epoch is dropped.

Checkpoints (``<out>/checkpoints/step_NNNNNNN``) are DeepSpeed's own (the only format that holds the
partitioned ZeRO optimizer state of every stage; with LoRA only the trainable weights are stored), each
completed by a ``trainer_state.json`` written after every rank has saved. A restarted run resumes from the
newest completed checkpoint. The final model is exported as safetensors (a peft adapter for LoRA, the full
model otherwise), and the loss of every step is appended to ``progress.jsonl``.

Optimizer-state export (opt-in, for gradient-based teachers such as LESS): with ``ft["export_states_at"]`` a
list of global steps, the state after each of those steps is written to ``<out>/states/step_NNNNNNN.safetensors``
(:func:`state_path`, read back with :func:`read_state`): the trainable weights and their AdamW moments
``exp_avg`` / ``exp_avg_sq`` in fp32, plus the rate that step used and the optimizer's betas, eps and step count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from nncift.errors import ConfigError
from nncift.store import write_json

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"


def load_deepspeed_config(name: str) -> dict:
    """A checked-in DeepSpeed config (``zero0``..``zero3`` in cluster/deepspeed/) or a JSON file path."""
    p = Path(name).expanduser()
    if not p.suffix:
        p = DS_CONFIG_DIR / f"{name}.json"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"config field 'finetune.deepspeed': {name!r} is not a file nor one of: {known}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def plan_steps(n_rows: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(steps per epoch, total steps) with drop-last global batches."""
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise ConfigError(f"config field 'finetune.batch_size': {batch_size} is larger than the {n_rows} training rows")
    return per_epoch, per_epoch * epochs


def step_rows(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """(batch_size,) row indices of global step ``step`` (0-based)."""
    per_epoch = n_rows // batch_size
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(n_rows)
    return order[k * batch_size : (k + 1) * batch_size]


def build_ds_config(ft: dict, world: int, use_gpu: bool) -> dict:
    """The DeepSpeed config: the checked-in ZeRO file plus the batch, optimizer and precision (the
    learning-rate schedule is :func:`lr_schedule`, passed to DeepSpeed as a client scheduler).

    The optimizer is AdamW. ``finetune.optimizer=torch_adamw`` (the default) sets DeepSpeed's ``torch_adam``,
    so its engine builds ``torch.optim.AdamW`` on every device: no op is JIT-compiled (DeepSpeed's FusedAdam
    build parses ``TORCH_CUDA_ARCH_LIST`` and fails on entries such as Hopper's ``9.0a``). ``fused_adam``
    leaves ``torch_adam`` off on GPUs (DeepSpeed's FusedAdam, compiled at the first run); it is a CUDA
    kernel, refused without ``use_gpu``.
    """
    optimizer = ft.get("optimizer", "torch_adamw")
    if optimizer not in ("torch_adamw", "fused_adam"):
        raise ConfigError(f"config field 'finetune.optimizer': got {optimizer!r} (torch_adamw | fused_adam)")
    if optimizer == "fused_adam" and not use_gpu:
        raise ConfigError(
            "config field 'finetune.optimizer': fused_adam is a CUDA kernel: it needs finetune.use_gpu=true "
            "(use torch_adamw on the CPU)"
        )
    cfg = load_deepspeed_config(ft["deepspeed"])
    micro = ft["micro_batch_size"]
    if ft["batch_size"] % (micro * world):
        raise ConfigError(
            f"config field 'finetune.batch_size': {ft['batch_size']} is not a multiple of "
            f"micro_batch_size ({micro}) x workers ({world})"
        )
    ga = ft["batch_size"] // (micro * world)
    bf16 = ft["precision"] == "bf16" or (ft["precision"] == "auto" and use_gpu)
    cfg.update(
        {
            "train_batch_size": ft["batch_size"],
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": ga,
            "gradient_clipping": ft["grad_clip"],
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            "bf16": {"enabled": bf16},
            "fp16": {"enabled": False},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": ft["lr"],
                    "betas": [0.9, 0.999],
                    "eps": 1e-8,
                    "weight_decay": ft["weight_decay"],
                    "torch_adam": optimizer == "torch_adamw",  # torch.optim.AdamW: no JIT-built op
                    "adam_w_mode": True,  # decoupled weight decay (AdamW) whichever implementation
                },
            },
        }
    )
    cfg.pop("scheduler", None)  # ours instead: DeepSpeed's linear warmup spends its first 2 steps at lr 0
    return cfg


def lr_schedule(total_steps: int, warmup_ratio: float):
    """LR multiplier per completed step: linear warmup to 1 over ``warmup`` steps (the first step already
    trains at 1/warmup), then linear decay to 1/(total - warmup) at the last step."""
    warm = max(1, round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


def _build_model(ft: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(ft["seed"])
    tok = AutoTokenizer.from_pretrained(ft["model"], trust_remote_code=ft["trust_remote_code"])
    model = AutoModelForCausalLM.from_pretrained(
        ft["model"], dtype=torch.float32, trust_remote_code=ft["trust_remote_code"]
    )
    model.config.use_cache = False
    if ft["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ft["lora_target"]
        lcfg = LoraConfig(
            r=ft["lora_r"],
            lora_alpha=ft["lora_alpha"],
            lora_dropout=ft["lora_dropout"],
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    return model, tok


def _completed_checkpoints(ck_dir: Path) -> list[Path]:
    if not ck_dir.is_dir():
        return []
    return sorted(p for p in ck_dir.iterdir() if p.is_dir() and (p / "trainer_state.json").is_file())


def check_resume(out_dir: str | Path, world: int, deepspeed_config: str) -> int:
    """Step of the newest completed checkpoint in ``out_dir`` (0 if none); refuses a world-size change
    under ZeRO stages >= 1, whose optimizer partitions belong to the ranks that wrote them."""
    done = _completed_checkpoints(Path(out_dir) / "checkpoints")
    if not done:
        return 0
    state = json.loads((done[-1] / "trainer_state.json").read_text())
    stage = load_deepspeed_config(deepspeed_config).get("zero_optimization", {}).get("stage", 0)
    if state.get("world", world) != world and stage > 0:
        raise ConfigError(
            f"{done[-1]} was written by {state['world']} workers (ZeRO partitions are per rank): resume with "
            f"finetune.num_workers={state['world']} (ray.executor=ray), or delete {done[-1].parent} to restart"
        )
    return int(state["step"])


def sft_train(
    ft: dict,
    rows: dict[str, list[str]],
    out_dir: str,
    rank: int = 0,
    world: int = 1,
    use_gpu: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Fine-tune on ``rows`` as rank ``rank`` of ``world`` (torch.distributed must be initialised).

    Args:
        ft: the ``finetune`` config as a dict, with ``model`` resolved to a local directory; optional
            ``export_states_at``: global steps after which the trainable weights and AdamW moments are
            written (:func:`export_state`, :func:`state_path`).
        rows: ``prompt`` and ``response`` lists (the training subset).
        out_dir: run folder of this fine-tune (shared by all ranks).
        stop_after: stop right after the checkpoint of this global step (simulates an interruption).

    Returns:
        Summary dict (steps, final loss, seconds, trainable parameters); only complete on rank 0.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    from nncift.lm.sft import PromptFormatter

    out = Path(out_dir)
    ck_dir = out / "checkpoints"
    n = len(rows["prompt"])
    per_epoch, total = plan_steps(n, ft["batch_size"], ft["epochs"])
    model, tok = _build_model(ft)
    fmt = PromptFormatter(tok, ft["template"], ft["max_prompt_tokens"], ft["max_seq_len"])
    ds_cfg = build_ds_config(ft, world, use_gpu)
    ga = ds_cfg["gradient_accumulation_steps"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)  # before ZeRO-3 partitions them
    factor = lr_schedule(total, ft["warmup_ratio"])
    export_at = _export_steps(ft.get("export_states_at"), total)

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_cfg, lr_scheduler=scheduler
    )
    device = engine.device
    lora = ft["method"] == "lora"

    start = check_resume(out, world, ft["deepspeed"])  # refuses a ZeRO resume on another world size
    if start:
        tag = _completed_checkpoints(ck_dir)[-1]
        engine.load_checkpoint(str(ck_dir), tag=tag.name, load_module_strict=not lora)
        if rank == 0:
            log.info("resumed from %s (step %d of %d)", tag, start, total)
    progress = out / "progress.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if progress.is_file():
            kept = [ln for ln in progress.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
        progress.write_text("".join(ln + "\n" for ln in kept))

    prompts, responses = rows["prompt"], rows["response"]
    bar = None
    if rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="finetune", unit="step")
    t0 = time.perf_counter()
    loss_val = float("nan")
    engine.train()
    for step in range(start, total):
        # dropout masks (LoRA dropout, the model's own) from a seed of (seed, step, rank) alone: a resumed run
        # draws exactly the masks the uninterrupted run drew, with no RNG state to save
        torch.manual_seed((ft["seed"] * 1_000_003 + step * 1_009 + rank) % (2**63))
        idx = step_rows(n, ft["batch_size"], ft["seed"], step).reshape(world * ga, -1)
        lr = float(engine.optimizer.param_groups[0]["lr"])  # the rate this step's update uses
        losses, tokens = [], 0
        for a in range(ga):
            mb = idx[rank * ga + a]
            batch = fmt.batch([prompts[i] for i in mb], [responses[i] for i in mb]).to_torch(device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            tokens += int((batch["labels"] != -100).sum())
        stats = torch.stack([torch.stack(losses).mean(), torch.tensor(float(tokens), device=device)])
        if world > 1:
            dist.all_reduce(stats)
            stats[0] /= world
        loss_val, tok_count = float(stats[0]), int(stats[1])
        if rank == 0:
            rec = {"step": step + 1, "epoch": step // per_epoch, "loss": loss_val, "lr": lr, "tokens": tok_count}
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            with progress.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}")
        if step + 1 in export_at:  # before the checkpoint: a resumed run never lacks an export it skipped
            export_state(engine, state_path(out, step + 1), rank, step=step + 1, epoch=step // per_epoch, lr=lr)
        last = step + 1 == total
        if last or (step + 1) % ft["save_every"] == 0 or step + 1 == stop_after:
            tag = f"step_{step + 1:07d}"
            engine.save_checkpoint(str(ck_dir), tag=tag, save_latest=False, exclude_frozen_parameters=lora)
            dist.barrier()
            if rank == 0:
                write_json(ck_dir / tag / "trainer_state.json", {"step": step + 1, "total": total, "world": world})
                for old in _completed_checkpoints(ck_dir)[: -ft["keep_checkpoints"]]:
                    shutil.rmtree(old, ignore_errors=True)
            dist.barrier()
        if stop_after is not None and step + 1 == stop_after and not last:
            if bar is not None:
                bar.close()
            engine.destroy()
            return {"stopped_at": stop_after}
    if bar is not None:
        bar.close()
    _export(engine, tok, out / "model", lora, rank, ft)
    dist.barrier()
    engine.destroy()
    summary = {
        "steps": total,
        "final_loss": loss_val,
        "seconds": time.perf_counter() - t0,
        "trainable_params": int(n_train),
        "grad_accum": ga,
        "world": world,
        "resumed_from": start,
        "param_dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
    }
    if rank == 0:
        write_json(out / "train_summary.json", summary)
    return summary


STATE_FORMAT = "nncift-adamw-state-v1"


def state_path(out_dir: str | Path, step: int) -> Path:
    """Where :func:`sft_train` writes the optimizer state exported after global step ``step``."""
    return Path(out_dir) / "states" / f"step_{int(step):07d}.safetensors"


def _export_steps(steps: Any, total: int) -> set[int]:
    """``ft["export_states_at"]`` as a set of global steps in ``[1, total]`` (None: no export)."""
    if steps is None:
        return set()
    out = set()
    for s in steps:
        if isinstance(s, bool) or int(s) != s or not 1 <= int(s) <= total:
            raise ValueError(f"export_states_at: {s!r} is not a global step in [1, {total}]")
        out.add(int(s))
    return out


def export_state(engine, dest: Path, rank: int, *, step: int, epoch: int, lr: float) -> None:
    """Write the trainable weights and their AdamW moments, in fp32, from rank 0 (atomically).

    Tensors (one of each per trainable parameter ``name`` of ``engine.module.named_parameters()``):
    ``param/<name>``, ``exp_avg/<name>``, ``exp_avg_sq/<name>``. Metadata (strings): ``format``, ``step``
    (global step), ``epoch`` (0-based epoch of that step), ``lr`` (the rate that step used), ``betas``,
    ``eps``, ``weight_decay`` (JSON), ``adam_step`` (the optimizer's own step count).

    Works with a plain torch optimizer (ZeRO stage 0 in fp32) and with the ZeRO 1-3 / bf16 optimizers whose
    parameters are linked to their fp32 partitions (``deepspeed.utils.safe_get_full_*``, a collective: every
    rank calls this function). Anything else (the stage-0 fp16/bf16 wrapper) raises ``ValueError``.
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    tensors: dict[str, np.ndarray] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # ZeRO partitions / bf16 master weights
            value = safe_get_full_fp32_param(p)
            m, v = safe_get_full_optimizer_state(p, "exp_avg"), safe_get_full_optimizer_state(p, "exp_avg_sq")
        elif p in getattr(inner, "state", {}):
            st = inner.state[p]
            value, m, v = p.detach(), st["exp_avg"], st["exp_avg_sq"]
        else:
            raise ValueError(
                f"export_states_at: no AdamW state found for {name} under {type(opt).__name__} (use fp32 with "
                "ZeRO stage 0, or ZeRO stages 1-3)"
            )
        if rank == 0:
            for key, t in (("param", value), ("exp_avg", m), ("exp_avg_sq", v)):
                tensors[f"{key}/{name}"] = t.detach().to("cpu", torch.float32).numpy()
    if rank != 0:
        return
    group = opt.param_groups[0]
    steps = [st["step"] for st in getattr(inner, "state", {}).values() if isinstance(st, dict) and "step" in st]
    adam_step = int(steps[0]) if steps else int(step)
    meta = {
        "format": STATE_FORMAT,
        "step": str(int(step)),
        "epoch": str(int(epoch)),
        "lr": repr(float(lr)),
        "betas": json.dumps([float(b) for b in group["betas"]]),
        "eps": repr(float(group["eps"])),
        "weight_decay": repr(float(group.get("weight_decay", 0.0))),
        "adam_step": str(adam_step),
    }
    from nncift.store import write_safetensors

    write_safetensors(dest, tensors, metadata=meta)


def read_state(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """An exported optimizer state: ``({"param"|"exp_avg"|"exp_avg_sq": {name: fp32 array}}, meta)`` with
    ``meta`` parsed (``step``, ``epoch``, ``adam_step`` ints; ``lr``, ``eps``, ``weight_decay`` floats;
    ``betas`` a pair of floats)."""
    from safetensors import safe_open

    groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "exp_avg": {}, "exp_avg_sq": {}}
    with safe_open(str(path), framework="numpy") as fh:
        raw = fh.metadata() or {}
        if raw.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not an exported optimizer state (format {raw.get('format')!r})")
        for key in fh.keys():  # noqa: SIM118 - safe_open handles have keys(), not __iter__
            kind, _, name = key.partition("/")
            groups[kind][name] = fh.get_tensor(key)
    meta: dict[str, Any] = {k: int(raw[k]) for k in ("step", "epoch", "adam_step")}
    meta.update({k: float(raw[k]) for k in ("lr", "eps", "weight_decay")})
    meta["betas"] = tuple(json.loads(raw["betas"]))
    return groups, meta


def _export(engine, tok, dest: Path, lora: bool, rank: int, ft: dict) -> None:
    """Write the trained model as safetensors (peft adapter, or the full model) from rank 0, atomically."""
    import tempfile

    import deepspeed

    module = engine.module
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]  # ZeRO-3 partitioned parameters
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank != 0:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=dest.parent))
        try:
            cfg = getattr(module, "config", None)
            if cfg is not None:
                cfg.use_cache = True  # off only for training
            module.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "nncift_finetune.json").write_text(json.dumps({"method": ft["method"], "base_model": ft["model"]}))
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def finetune_local(ft: dict, rows: dict[str, list[str]], out_dir: str, **kw: Any) -> dict:
    """Local twin of the Ray fan-out: one process whose gradient accumulation covers the whole global batch.

    The micro-batches a W-worker run spreads over its ranks are accumulated here in order, so both runs
    take the same optimizer steps on the same averaged gradients.
    """
    import deepspeed
    import torch.distributed as dist

    from nncift.exec.ports import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not kw.get("use_gpu") else "cuda")
    if not dist.is_initialized():
        # a world of one, kept for the life of the process (DeepSpeed caches its groups)
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        for k, v in env.items():
            os.environ[k] = v
        os.environ["MASTER_PORT"] = str(free_port())
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    elif dist.get_world_size() != 1:
        raise RuntimeError("finetune_local needs a process without a multi-rank process group")
    return sft_train(ft, rows, out_dir, rank=0, world=1, **kw)


def loss_curve(progress: Path, dest: Path, title: str = "") -> None:
    """Plot the per-step training loss of ``progress.jsonl`` to ``dest`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in progress.read_text().splitlines() if ln.strip()]
    if not recs:
        return
    steps = np.array([r["step"] for r in recs])
    loss = np.array([r["loss"] for r in recs])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, lw=1, alpha=0.5, label="step loss")
    w = max(3, len(loss) // 10)
    if len(loss) >= 2 * w:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=2, label=f"moving mean ({w})")
    epochs = np.array([r["epoch"] for r in recs])
    for e in np.unique(epochs):
        sel = epochs == e
        ax.hlines(loss[sel].mean(), steps[sel].min(), steps[sel].max(), colors="C3", lw=1.5,
                  label="epoch mean" if e == epochs[0] else None)  # fmt: skip
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title(title or "fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from nncift.store import atomic_path

    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summarise(progress: Path) -> dict:
    """First/last loss and throughput of a finished run's ``progress.jsonl``."""
    recs = [json.loads(ln) for ln in progress.read_text().splitlines() if ln.strip()]
    if not recs:
        return {}
    k = max(1, min(5, len(recs) // 4))
    return {
        "first_loss": float(np.mean([r["loss"] for r in recs[:k]])),
        "last_loss": float(np.mean([r["loss"] for r in recs[-k:]])),
        "tokens": int(sum(r["tokens"] for r in recs)),
        "steps_logged": len(recs),
        "loss_finite": bool(all(math.isfinite(r["loss"]) for r in recs)),
    }
