"""The InfluenceNetwork: a tiny MLP on a pair of embeddings, with an exact factorised first layer.

The paper's network maps ``[e_i; 0; e_j]`` (length 2d + 1) through Linear(2d+1 -> h), ReLU,
Linear(h -> 1). Writing ``W1 = [A | c | B]`` gives ``W1 [e_i; 0; e_j] + b1 = A e_i + B e_j + b1``:
each item is projected once (O(d h)) and every pair then costs O(h) (METHOD.md §7 B).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nncift.store import read_safetensors, write_json, write_safetensors


@dataclass
class Scaler:
    """Affine map of raw labels to [0, 1] fitted on the training labels (min-max, guarded)."""

    lo: float
    hi: float

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        lo, hi = float(np.min(values)), float(np.max(values))
        if not hi > lo:
            hi = lo + 1.0  # constant labels: any affine map works; avoid 0/0
        return cls(lo, hi)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.lo) / (self.hi - self.lo)).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * (self.hi - self.lo) + self.lo).astype(np.float32)


class InfluenceNetwork(nn.Module):
    """MLP on ``[e_i; 0; e_j]``: Linear(2d+1 -> hidden) -> ReLU -> Linear(hidden -> 1).

    Args:
        dim: embedding dimension d.
        hidden: hidden width h (paper: 100).
    """

    def __init__(self, dim: int, hidden: int = 100):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.fc1 = nn.Linear(2 * dim + 1, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward_concat(self, pairs: torch.Tensor) -> torch.Tensor:
        """Plain (reference-style) forward on concatenated features: (P, 2d+1) -> (P,)."""
        return self.fc2(torch.relu(self.fc1(pairs))).squeeze(-1)

    def forward(self, e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:
        """Factorised forward on paired rows: (P, d), (P, d) -> (P,); equals ``forward_concat([e_i; 0; e_j])``."""
        w = self.fc1.weight
        h = e_i @ w[:, : self.dim].T + e_j @ w[:, self.dim + 1 :].T + self.fc1.bias
        return self.fc2(torch.relu(h)).squeeze(-1)

    @torch.no_grad()
    def project(self, e_rows: torch.Tensor, e_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-item halves of the first layer.

        Returns:
            P (R, h) = e_rows A^T + b1 and Q (C, h) = e_cols B^T, float32.
        """
        w = self.fc1.weight
        p = e_rows @ w[:, : self.dim].T + self.fc1.bias
        q = e_cols @ w[:, self.dim + 1 :].T
        return p.contiguous(), q.contiguous()

    def head(self) -> tuple[np.ndarray, float]:
        """Second layer as (w2 (h,) float32, b2)."""
        return (
            self.fc2.weight.detach().cpu().numpy().reshape(-1).astype(np.float32),
            float(self.fc2.bias.detach().cpu().item()),
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, scaler: Scaler, extra: dict | None = None) -> None:
        """``<path>.safetensors`` (weights) + ``<path>.json`` (shape, scaler, metrics)."""
        path = Path(path)
        tensors = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
        write_safetensors(path.with_suffix(".safetensors"), tensors)
        write_json(
            path.with_suffix(".json"),
            {"dim": self.dim, "hidden": self.hidden, "scaler": asdict(scaler), **(extra or {})},
        )

    @classmethod
    def load(cls, path: str | Path) -> tuple[InfluenceNetwork, Scaler, dict]:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        net = cls(meta["dim"], meta["hidden"])
        state = {k: torch.from_numpy(v) for k, v in read_safetensors(path.with_suffix(".safetensors")).items()}
        net.load_state_dict(state)
        net.eval()
        return net, Scaler(**meta["scaler"]), meta
