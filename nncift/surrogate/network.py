"""Surrogates of the teacher: the paper's InfluenceNetwork (an MLP on a pair of embeddings) and a
two-tower bilinear network, both cheap for all-pairs estimation.

Every surrogate maps a pair of embeddings ``(e_i, e_j)`` to a score in the scaled label space and exposes
:meth:`Surrogate.estimator`, the per-item factors the blockwise estimation kernels consume:

- ``mlp`` (``fit.kind=mlp``, the paper's network, kept for parity): ``[e_i; 0; e_j]`` -> Linear(2d+1 -> h)
  -> ReLU -> Linear(h -> 1). Writing ``W1 = [A | c | B]`` gives ``W1 [e_i; 0; e_j] + b1 = A e_i + B e_j + b1``:
  each item is projected once (O(d h)) and every pair then costs O(h) (factors ``p``, ``q``, ``w2``, ``b2``).
- ``bilinear`` (``fit.kind=bilinear``): two towers with a low-rank bilinear term and per-item biases,

      s(i, j) = <U e_i, V e_j> + u . e_i + v . e_j + b  [+ alpha <e_i, e_j>  with fit.cosine_prior],

  with ``U = V`` and ``u = v`` when the teacher is symmetric. All pairs of a block are one GEMM of the
  augmented factors ``P = [U e_i | u.e_i + b | 1 (| alpha e_i)]`` and ``Q = [V e_j | 1 | v.e_j (| e_j)]``.
  An MLP on concatenated embeddings struggles to learn even a dot product (Rendle et al., RecSys 2020);
  on the measured kernels the bilinear form closes far more of the selection gap (see docs/fidelity.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nncift.registry import Registry
from nncift.store import read_safetensors, write_json, write_safetensors

LEGACY_KIND = "mlp"  # the kind of a network saved before its JSON recorded one: the paper's MLP was the only one


@dataclass
class Scaler:
    """Affine map of raw labels to [0, 1] fitted on the training labels (min-max, guarded)."""

    lo: float
    hi: float

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        values = np.asarray(values)
        if not len(values) or not np.isfinite(values).all():
            raise ValueError(f"Scaler.fit needs finite labels ({int((~np.isfinite(values)).sum())} non-finite)")
        lo, hi = float(np.min(values)), float(np.max(values))
        if not hi > lo:
            hi = lo + 1.0  # constant labels: any affine map works; avoid 0/0
        return cls(lo, hi)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.lo) / (self.hi - self.lo)).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * (self.hi - self.lo) + self.lo).astype(np.float32)


class Surrogate(nn.Module):
    """Base class: a pair scorer with per-item factors for blockwise all-pairs estimation."""

    kind: str = "base"
    pointwise: bool = False  # scores single items (pointwise teachers), chosen by the teacher, not by fit.kind

    def forward(self, e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Scores of paired rows: (P, d), (P, d) -> (P,) float32."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Constructor arguments besides ``dim`` (saved with the weights)."""
        raise NotImplementedError

    @torch.no_grad()
    def estimator(self, e_rows: torch.Tensor, e_cols: torch.Tensor) -> dict[str, Any]:  # pragma: no cover
        """Per-item factors of the estimation kernels (see :class:`nncift.kernels.estimate_worker.EstimateWorker`)."""
        raise NotImplementedError

    @torch.no_grad()
    def score_all(self, e_rows: torch.Tensor, e_cols: torch.Tensor) -> torch.Tensor:
        """Every pair: (R, d), (C, d) -> (R, C) float32 (small inputs; estimation uses the block kernels)."""
        from nncift.surrogate.predict import predict_factors

        return torch.as_tensor(predict_factors(_to_numpy(self.estimator(e_rows, e_cols))))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, scaler: Scaler, extra: dict | None = None) -> None:
        """``<path>.safetensors`` (weights) + ``<path>.json`` (kind, shape, scaler, metrics)."""
        path = Path(path)
        tensors = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
        write_safetensors(path.with_suffix(".safetensors"), tensors)
        write_json(
            path.with_suffix(".json"),
            {"kind": self.kind, "dim": self.dim, **self.params(), "scaler": asdict(scaler), **(extra or {})},
        )

    @classmethod
    def load(cls, path: str | Path) -> tuple[Surrogate, Scaler, dict]:
        """Load any surrogate saved by :meth:`save` (the kind is read from the JSON)."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        ctor = NETWORKS.get(meta.get("kind", LEGACY_KIND))  # an old save without a kind: LEGACY_KIND
        names = ctor.PARAMS
        net = ctor(meta["dim"], **{k: meta[k] for k in names if k in meta})
        state = {k: torch.from_numpy(v) for k, v in read_safetensors(path.with_suffix(".safetensors")).items()}
        net.load_state_dict(state)
        net.eval()
        return net, Scaler(**meta["scaler"]), meta


class InfluenceNetwork(Surrogate):
    """The paper's network (``kind=mlp``): Linear(2d+1 -> hidden) -> ReLU -> Linear(hidden -> 1) on ``[e_i; 0; e_j]``.

    Args:
        dim: embedding dimension d.
        hidden: hidden width h (paper: 100).
    """

    kind = "mlp"
    PARAMS = ("hidden",)

    def __init__(self, dim: int, hidden: int = 100):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.fc1 = nn.Linear(2 * dim + 1, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def params(self) -> dict[str, Any]:
        return {"hidden": self.hidden}

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

    @torch.no_grad()
    def estimator(self, e_rows: torch.Tensor, e_cols: torch.Tensor) -> dict[str, Any]:
        """``{"type": "mlp", "p": (R, h), "q": (C, h), "w2": (h,), "b2": float}`` (float32 numpy)."""
        p, q = self.project(e_rows, e_cols)
        w2, b2 = self.head()
        return {"type": "mlp", "p": p.cpu().numpy(), "q": q.cpu().numpy(), "w2": w2, "b2": b2}


class BilinearNetwork(Surrogate):
    """Two towers with a low-rank bilinear term and per-item biases (``kind=bilinear``).

    ``s(i, j) = <U e_i, V e_j> + u.e_i + v.e_j + b (+ alpha <e_i, e_j>)``.

    Args:
        dim: embedding dimension d.
        rank: width r of the towers.
        symmetric: one tower and one bias head for both sides (``s(i, j) = s(j, i)``), for symmetric teachers.
        cosine_prior: add ``alpha <e_i, e_j>`` with a learned ``alpha`` (initialised to 1): the embedding
            cosine as a prior, which makes an embedding-cosine teacher trivial.
    """

    kind = "bilinear"
    PARAMS = ("rank", "symmetric", "cosine_prior")

    def __init__(self, dim: int, rank: int = 128, symmetric: bool = False, cosine_prior: bool = False):
        super().__init__()
        self.dim, self.rank, self.symmetric, self.cosine_prior = dim, rank, bool(symmetric), bool(cosine_prior)
        self.row_tower = nn.Linear(dim, rank, bias=False)
        self.row_bias = nn.Linear(dim, 1, bias=False)
        if not self.symmetric:
            self.col_tower = nn.Linear(dim, rank, bias=False)
            self.col_bias = nn.Linear(dim, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        if self.cosine_prior:
            self.alpha = nn.Parameter(torch.ones(()))

    def params(self) -> dict[str, Any]:
        return {"rank": self.rank, "symmetric": self.symmetric, "cosine_prior": self.cosine_prior}

    def _cols(self) -> tuple[nn.Linear, nn.Linear]:
        return (self.row_tower, self.row_bias) if self.symmetric else (self.col_tower, self.col_bias)

    def forward(self, e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:
        """(P, d), (P, d) -> (P,) float32."""
        col_tower, col_bias = self._cols()
        out = (self.row_tower(e_i) * col_tower(e_j)).sum(-1)
        out = out + self.row_bias(e_i).squeeze(-1) + col_bias(e_j).squeeze(-1) + self.bias
        if self.cosine_prior:
            out = out + self.alpha * (e_i * e_j).sum(-1)
        return out

    @torch.no_grad()
    def estimator(self, e_rows: torch.Tensor, e_cols: torch.Tensor) -> dict[str, Any]:
        """``{"type": "dot", "p": (R, k), "q": (C, k)}`` with ``score = p @ q.T``.

        k = r + 2; with the cosine prior the bilinear part ``e_i (alpha I + U^T V) e_j`` is folded into one
        (d, d) form, so k = d + 2 (not r + d + 2).
        """
        col_tower, col_bias = self._cols()
        ones_r = torch.ones(len(e_rows), 1, dtype=e_rows.dtype, device=e_rows.device)
        ones_c = torch.ones(len(e_cols), 1, dtype=e_cols.dtype, device=e_cols.device)
        if self.cosine_prior:
            form = self.alpha * torch.eye(self.dim, dtype=e_rows.dtype, device=e_rows.device)
            form = form + self.row_tower.weight.T @ col_tower.weight
            p = [e_rows @ form, self.row_bias(e_rows) + self.bias, ones_r]
            q = [e_cols, ones_c, col_bias(e_cols)]
        else:
            p = [self.row_tower(e_rows), self.row_bias(e_rows) + self.bias, ones_r]
            q = [col_tower(e_cols), ones_c, col_bias(e_cols)]
        return {"type": "dot", "p": torch.cat(p, 1).cpu().numpy(), "q": torch.cat(q, 1).cpu().numpy()}


class PointwiseNetwork(Surrogate):
    """The pointwise InfluenceNetwork (``kind=pointwise``, used for pointwise teachers such as SelectIT):
    Linear(d -> hidden) -> ReLU -> Linear(hidden -> 1) on one item's embedding, plus a learned multiple of a
    constant (the bias). ``forward`` ignores its second argument so the pair fit loop trains it unchanged
    (labels are (item, 0) pairs).

    Args:
        dim: embedding dimension d.
        hidden: hidden width h.
    """

    kind = "pointwise"
    pointwise = True
    PARAMS = ("hidden",)

    def __init__(self, dim: int, hidden: int = 100):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def params(self) -> dict[str, Any]:
        return {"hidden": self.hidden}

    def forward(self, e_i: torch.Tensor, e_j: torch.Tensor | None = None) -> torch.Tensor:
        """(P, d) -> (P,) scores (``e_j`` ignored)."""
        return self.fc2(torch.relu(self.fc1(e_i))).squeeze(-1)

    @torch.no_grad()
    def score_items(self, e: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Scores of every item, in row chunks: (M, d) -> (M,) float32 (in the scaled label space)."""
        out = np.empty(len(e), np.float32)
        for r0 in range(0, len(e), chunk):
            out[r0 : r0 + chunk] = self(torch.as_tensor(e[r0 : r0 + chunk])).numpy()
        return out

    @torch.no_grad()
    def estimator(self, e_rows: torch.Tensor, e_cols: torch.Tensor) -> dict[str, Any]:
        raise TypeError("a pointwise surrogate scores items (score_items), it has no pair kernel")


# every surrogate by its ``kind``; ``fit.kind`` offers the pairwise ones (pointwise: set by the teacher)
NETWORKS: Registry[type[Surrogate]] = Registry("network kind")
NETWORKS.register(InfluenceNetwork.kind)(InfluenceNetwork)
NETWORKS.register(BilinearNetwork.kind)(BilinearNetwork)
NETWORKS.register(PointwiseNetwork.kind)(PointwiseNetwork)
KINDS = NETWORKS.names()


def build_network(kind: str, dim: int, **params: Any) -> Surrogate:
    """A fresh surrogate of ``kind`` (one of :data:`NETWORKS`); ``params`` not used by that kind are ignored."""
    ctor = NETWORKS.get(kind)
    return ctor(dim, **{k: v for k, v in params.items() if k in ctor.PARAMS})


def network_from_config(cfg: dict[str, Any], dim: int) -> Surrogate:
    """A fresh surrogate from a fit configuration (``kind`` plus its parameters; other keys ignored)."""
    if "kind" not in cfg:
        raise ValueError(f"a fit configuration names its network kind ('kind': one of {', '.join(KINDS)})")
    return build_network(cfg["kind"], dim, **{k: v for k, v in cfg.items() if k != "kind"})


def load_network(path: str | Path) -> tuple[Surrogate, Scaler, dict]:
    """Load a saved surrogate of any kind: (network in eval mode, label scaler, metadata)."""
    return Surrogate.load(path)


def _to_numpy(factors: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in factors.items()}
