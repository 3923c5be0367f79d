"""Cheap item views besides the sentence embedding: per-item vectors that cost O(M + N) to compute and need no
teacher call. Each view gives a zero-label estimate (its cosine) and features for the calibrated free
estimates of :mod:`nncift.surrogate.candidates`; the run keeps a view's estimate only when its own held-out labels say so.

- ``lexical``: hashed word 1-2-gram TF-IDF (sublinear tf) reduced by a truncated SVD (latent semantic
  analysis) to ``dim`` dimensions and L2-normalised. It reads what a sentence encoder blurs: shared words,
  names, code tokens. Fitted on the run's own pool and target texts; the fitted transform (idf, kept hashed
  columns, SVD components) is saved as safetensors so new rows (``nncift score``) get the same vectors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nncift.store import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

VIEWS = ("lexical",)


class LexicalView:
    """Hashed word 1-2-gram TF-IDF -> truncated SVD (LSA) -> unit vectors.

    Args:
        dim: output dimensions (at most the number of kept hashed columns and fitted texts, minus one).
        n_features: hashing space (2**n_bits buckets).
        max_columns: hashed columns kept (the most frequent with document frequency >= 2): the size of the
            saved transform is ``dim x max_columns`` float32.
        sample: texts the SVD is fitted on (a seeded sample when there are more); idf uses every text.
        seed: sampling and SVD seed.
    """

    def __init__(self, dim: int = 256, n_features: int = 2**20, max_columns: int = 2**16, sample: int = 20_000,
                 seed: int = 0):  # fmt: skip
        self.dim, self.n_features, self.max_columns, self.sample, self.seed = dim, n_features, max_columns, sample, seed
        self.columns: np.ndarray | None = None  # (V,) int64 kept hashed columns
        self.idf: np.ndarray | None = None  # (V,) float32
        self.components: np.ndarray | None = None  # (dim', V) float32

    def _hashed(self, texts: list[str]):
        from sklearn.feature_extraction.text import HashingVectorizer

        hv = HashingVectorizer(n_features=self.n_features, alternate_sign=False, norm=None, ngram_range=(1, 2))
        x = hv.transform(texts).tocsr()
        x.data = 1.0 + np.log(x.data)  # sublinear tf
        return x

    def fit(self, texts: list[str]) -> LexicalView:
        """Fit idf, the kept columns and the SVD on ``texts``; returns self."""
        from sklearn.decomposition import TruncatedSVD

        x = self._hashed(texts)
        df = np.bincount(x.indices, minlength=self.n_features)
        order = np.argsort(-df, kind="stable")
        keep = order[: self.max_columns]
        keep = np.sort(keep[df[keep] >= min(2, int(df.max(initial=0)))])
        if len(keep) < 2:
            raise ValueError(f"lexical view: the texts share fewer than 2 word n-grams ({len(texts)} texts)")
        n = x.shape[0]
        self.columns = keep.astype(np.int64)
        self.idf = (np.log((1 + n) / (1 + df[keep])) + 1.0).astype(np.float32)
        xs = self._weighted(x)
        rng = np.random.default_rng([self.seed, 13])
        fit_rows = np.sort(rng.choice(n, self.sample, replace=False)) if n > self.sample else np.arange(n)
        k = max(1, min(self.dim, len(keep) - 1, len(fit_rows) - 1))
        svd = TruncatedSVD(k, algorithm="randomized", n_iter=5, random_state=self.seed)
        svd.fit(xs[fit_rows])
        self.components = svd.components_.astype(np.float32)
        return self

    def _weighted(self, x):
        """The kept columns of hashed counts, tf-idf weighted and row-normalised."""
        from sklearn.preprocessing import normalize

        xs = x[:, self.columns].multiply(self.idf[None, :]).tocsr()
        return normalize(xs, norm="l2", copy=False)

    def transform(self, texts: list[str], chunk: int = 8192) -> np.ndarray:
        """(len(texts), dim') float32 unit vectors (a text with no kept n-gram maps to zeros)."""
        if self.components is None:
            raise RuntimeError("LexicalView.transform before fit/load")
        out = np.zeros((len(texts), self.components.shape[0]), np.float32)
        for s in range(0, len(texts), chunk):
            z = np.asarray(self._weighted(self._hashed(texts[s : s + chunk])) @ self.components.T, np.float32)
            norm = np.linalg.norm(z, axis=1, keepdims=True)
            out[s : s + len(z)] = np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)
        return out

    def save(self, path: str | Path) -> None:
        write_safetensors(
            path,
            {"columns": self.columns, "idf": self.idf, "components": self.components},
            metadata={"view": "lexical", "n_features": str(self.n_features), "seed": str(self.seed)},
        )

    @classmethod
    def load(cls, path: str | Path) -> LexicalView:
        t = read_safetensors(path)
        from safetensors import safe_open

        with safe_open(str(path), "np") as fh:
            meta = fh.metadata() or {}
        v = cls(dim=int(t["components"].shape[0]), n_features=int(meta.get("n_features", 2**20)))
        v.columns, v.idf, v.components = t["columns"], t["idf"], t["components"]
        return v


def item_texts(prompts, responses) -> list[str]:
    """The text of each item a view reads: prompt and response joined by a newline."""
    return [f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)]


class LMView:
    """Per-item hidden states of a causal LM: the mean over the tokens of DELIFT's no-example sequence
    (``HEAD_NOICL + prompt + TAIL``, EOS, response, EOS: the sequence the DELIFT teacher scores for d(t | no
    example)) at chosen layers, standardised per dimension. They describe an item as the teacher LM reads
    it; :mod:`nncift.surrogate.candidates` uses them to predict per-item effects of the additive estimate.

    Args:
        model: local causal-LM folder (None = the embedded SmolLM2).
        layers: hidden-state indices (0 = embeddings, L = last layer).
        max_tokens: prompt and response tokens kept each. batch_size: sequences per forward.
    """

    def __init__(self, model: str | None, layers: list[int], max_tokens: int = 128, batch_size: int = 16,
                 device: str = "cpu", dtype: str = "float32"):  # fmt: skip
        self.model_path, self.layers, self.max_tokens = model, list(layers), max_tokens
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self._lm = None
        self.mean: dict[int, np.ndarray] = {}
        self.std: dict[int, np.ndarray] = {}

    def _load(self):
        if self._lm is None:
            from nncift.influence.delift_icl import DeliftICL
            from nncift.lm.models import load_causal_lm

            model, tok = load_causal_lm(self.model_path, device=self.device, dtype=self.dtype)
            self._lm = DeliftICL(model, tok, self.batch_size, self.max_tokens, self.max_tokens, mode="batched")
        return self._lm

    @staticmethod
    def auto_layers(n_layers: int) -> list[int]:
        """A quarter, a half and three quarters of the depth."""
        return sorted({max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75)})

    def n_layers(self) -> int:
        return int(self._load().model.config.num_hidden_layers)

    def raw(self, prompts: list[str], responses: list[str]) -> dict[int, np.ndarray]:
        """layer -> (n, hidden) float32 mean-pooled hidden states (not standardised)."""
        import torch

        from nncift.influence.interface import Items

        lm = self._load()
        enc = lm.encode(Items(list(prompts), list(responses), np.zeros((len(prompts), 1), np.float32)))
        seqs = [lm.noicl_ids(e)[0] for e in enc]
        order = np.argsort([len(s) for s in seqs], kind="stable")
        out = {layer: None for layer in self.layers}
        with torch.no_grad():
            for s0 in range(0, len(order), self.batch_size):
                chunk = order[s0 : s0 + self.batch_size]
                width = max(len(seqs[i]) for i in chunk)
                ids = torch.full((len(chunk), width), lm.pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.bool)
                for k, i in enumerate(chunk):
                    ids[k, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[k, : len(seqs[i])] = True
                # right padding under causal attention: real tokens never see the pads after them
                hs = lm.model.model(input_ids=ids.to(lm.device), output_hidden_states=True).hidden_states
                w = mask.to(lm.device, hs[0].dtype)[..., None]
                for layer in self.layers:
                    pooled = ((hs[layer] * w).sum(1) / w.sum(1)).float().cpu().numpy()
                    if out[layer] is None:
                        out[layer] = np.empty((len(seqs), pooled.shape[1]), np.float32)
                    out[layer][chunk] = pooled
        return out

    def fit_transform(self, prompts: list[str], responses: list[str]) -> dict[int, np.ndarray]:
        """Features of the run's items, standardised with their own mean and deviation (kept for new items)."""
        raw = self.raw(prompts, responses)
        for layer, x in raw.items():
            self.mean[layer], self.std[layer] = x.mean(0), x.std(0) + 1e-6
        return {layer: self._standard(layer, x) for layer, x in raw.items()}

    def transform(self, prompts: list[str], responses: list[str]) -> dict[int, np.ndarray]:
        """Features of new items, standardised as the run's were."""
        return {layer: self._standard(layer, x) for layer, x in self.raw(prompts, responses).items()}

    def _standard(self, layer: int, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean[layer]) / self.std[layer]).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {f"{k}{layer}": v[layer] for layer in self.layers for k, v in (("mean", self.mean), ("std", self.std))}

    def load_state(self, t: dict[str, np.ndarray]) -> LMView:
        for layer in self.layers:
            self.mean[layer], self.std[layer] = t[f"mean{layer}"], t[f"std{layer}"]
        return self
