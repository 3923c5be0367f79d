"""Fitting and evaluating the surrogates: pure loops that know nothing about Ray.

:func:`fit_loop` is the per-worker training loop. The local executor calls it once with
``rank=0, world_size=1``; :mod:`nncift.exec.ray_executor` calls it inside each Ray Train worker with the
DDP-wrapped model. Pairs are index triples (row, col, label) gathered from the embedding matrices on the
fly: no pair feature tensor is ever built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from nncift.surrogate.network import network_from_config

if TYPE_CHECKING:
    from nncift.stages.base import Context

log = logging.getLogger(__name__)


@dataclass
class PairLabels:
    """Labeled pairs by index.

    Attributes:
        rows: (P,) int64 indices into the row embeddings (D_F).
        cols: (P,) int64 indices into the column embeddings (D_F or D_T).
        y: (P,) float32 labels (already scaled).
    """

    rows: np.ndarray
    cols: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> PairLabels:
        return PairLabels(self.rows[idx], self.cols[idx], self.y[idx])


def fit_device(device: str = "auto", use_gpu: bool = False) -> str:
    """The local fit's torch device (``fit.device``): ``auto`` is ``cuda`` when ``use_gpu`` and CUDA is available,
    else ``cpu`` (with a warning when ``use_gpu`` asked for a GPU); ``cpu``, ``cuda`` and ``cuda:N`` are kept."""
    if device != "auto":
        return device
    if not use_gpu:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    log.warning("fit.use_gpu=true but torch finds no CUDA device: the local fit runs on the CPU")
    return "cpu"


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n) into (train, val) index arrays; val has at least one item when n > 1."""
    perm = np.random.default_rng([seed, 2]).permutation(n)
    n_val = min(n - 1, max(1, round(val_fraction * n))) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.no_grad()
def predict_pairs(
    model: nn.Module, e_rows: torch.Tensor, e_cols: torch.Tensor, pairs: PairLabels, batch: int = 65536
) -> np.ndarray:
    """Network outputs for labeled pairs: (P,) float32 (in the scaled label space)."""
    out = []
    for s in range(0, len(pairs), batch):
        r = torch.as_tensor(pairs.rows[s : s + batch], device=e_rows.device)
        c = torch.as_tensor(pairs.cols[s : s + batch], device=e_cols.device)
        out.append(model(e_rows[r], e_cols[c]))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, np.float32)


def train_epoch(
    model: nn.Module,
    e_rows: torch.Tensor,
    e_cols: torch.Tensor,
    pairs: PairLabels,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    epoch_seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """One epoch of global batches of a seeded permutation; each rank takes its slice of every global batch.

    ``batch_size`` is the *global* batch. Each rank's loss is its squared errors summed and divided by the
    global batch size, times the world size, so that DDP's gradient average equals the gradient of the
    global batch's mean loss: the optimizer steps do not depend on the number of workers (up to float
    summation order).

    Returns:
        mean training MSE over the epoch's global batches (this rank's estimate).
    """
    model.train()
    perm = np.random.default_rng(epoch_seed).permutation(len(pairs))
    dev = e_rows.device
    # the epoch's loss sum stays on the device (float64: the sum of Python floats it replaces), so that a GPU
    # step does not wait for the previous one
    total, steps = torch.zeros((), dtype=torch.float64, device=dev), 0
    for s in range(0, len(perm), batch_size):
        batch = perm[s : s + batch_size]
        idx = np.array_split(batch, world_size)[rank]
        r = torch.as_tensor(pairs.rows[idx], device=dev)
        c = torch.as_tensor(pairs.cols[idx], device=dev)
        y = torch.as_tensor(pairs.y[idx], device=dev)
        optimizer.zero_grad(set_to_none=True)
        sq = (model(e_rows[r], e_cols[c]) - y) ** 2
        loss = sq.sum() * (world_size / len(batch))
        loss.backward()
        optimizer.step()
        if len(idx):
            total += sq.detach().mean().double()
        steps += 1
    return float(total) / max(steps, 1)


def fit_loop(
    cfg: dict,
    e_rows: np.ndarray,
    e_cols: np.ndarray,
    train: PairLabels,
    val: PairLabels,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    device: str | torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train with Adam (AdamW with ``weight_decay``) + MSE and early stopping on the validation MSE.

    Args:
        cfg: ``kind`` (a :data:`~nncift.surrogate.network.NETWORKS` name) and its parameters (``hidden``; ``rank``, ``symmetric``,
            ``cosine_prior``), ``lr``, ``epochs``, ``batch_size`` (global, over all ranks), ``patience``, ``seed``.
        e_rows: (R, d) float32 row embeddings. e_cols: (C, d) float32 column embeddings.
        train, val: labeled pairs (scaled labels).
        rank, world_size: this worker's shard.
        wrap: e.g. Ray Train's ``prepare_model`` (DDP); identity when None.
        on_epoch: called with each epoch's metrics.
        device: where the model, the embeddings and each batch live (the local executor's ``fit.device``,
            see :func:`fit_device`); None = where ``wrap`` put the model (Ray Train's device), else the CPU.
            The network is initialised on the CPU first, so every device starts from the same weights.

    Returns:
        (best state dict (unwrapped, CPU tensors), per-epoch history).
    """
    torch.manual_seed(cfg["seed"])
    net = network_from_config(cfg, e_rows.shape[1])
    if device is not None:
        net = net.to(device)
    model = wrap(net) if wrap is not None else net
    wd = float(cfg.get("weight_decay", 0.0))
    opt = (
        torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=wd)
        if wd
        else torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    )
    device = next(model.parameters()).device  # `device`, or where Ray Train's prepare_model put the model
    er = torch.from_numpy(np.array(e_rows, np.float32)).to(device)
    ec = torch.from_numpy(np.array(e_cols, np.float32)).to(device)
    best, best_state, stale, history = math.inf, _cpu_state(net), 0, []
    for epoch in range(cfg["epochs"]):
        tr = train_epoch(model, er, ec, train, opt, cfg["batch_size"], cfg["seed"] * 1000 + epoch, rank, world_size)
        net.eval()
        val_mse = float(np.mean((predict_pairs(net, er, ec, val) - val.y) ** 2)) if len(val) else tr
        rec = {"epoch": epoch, "train_mse": tr, "val_mse": val_mse}
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        if val_mse < best - 1e-9:
            best, stale = val_mse, 0
            best_state = _cpu_state(net)
        else:
            stale += 1
            if stale >= cfg["patience"]:
                log.info("early stop at epoch %d (best val MSE %.5f)", epoch, best)
                break
    return best_state, history


def fit_config(ctx: Context) -> dict[str, Any]:
    """The surrogate's fit configuration (:func:`nncift.surrogate.fitting.fit_loop`)."""
    c = ctx.cfg.fit
    return {
        "kind": "pointwise" if ctx.pointwise() else c.kind,
        "hidden": c.hidden,
        "rank": c.rank,
        "symmetric": symmetric(ctx),
        "cosine_prior": c.cosine_prior,
        "lr": c.lr,
        "weight_decay": c.weight_decay,
        "epochs": c.epochs,
        "batch_size": c.batch_size,
        "patience": c.patience,
        "seed": c.seed,
    }


def symmetric(ctx: Context) -> bool:
    """Whether the surrogate shares one tower (``fit.symmetric``; auto = the teacher's own trait)."""
    c = ctx.cfg.fit
    if c.symmetric != "auto":
        return c.symmetric == "true"
    cls = ctx.teacher()
    section = getattr(ctx.cfg, cls.name) if cls.config is not None else None
    return bool(getattr(section, "symmetric", cls.symmetric))  # a table declares its own symmetry
