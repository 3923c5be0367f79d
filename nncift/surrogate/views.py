"""Cheap item views besides the sentence embedding: per-item vectors that cost O(M + N) to compute and need no
teacher call. Each view gives a zero-label estimate (its cosine) and features for the calibrated free
estimates of :mod:`nncift.surrogate.candidates`; the run keeps a view's estimate only when its own held-out labels say so.

- ``lexical``: hashed TF-IDF n-grams (sublinear tf) reduced by a truncated SVD (latent semantic analysis) and
  L2-normalised, one block per analyzer (``choose.lexical``: word 1-2-grams, character 3-5-grams). It reads what
  a sentence encoder blurs: shared words, names, code tokens, spellings. Fitted on the run's own pool and target
  texts; the fitted transform (per block: idf, kept hashed columns, SVD components) is saved as safetensors so
  new rows (``nncift score``) get the same vectors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nncift.store import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

VIEWS = ("lexical",)
ANALYZERS = ("word", "char")  # the lexical view's block kinds


class LexicalView:
    """Hashed TF-IDF n-grams -> truncated SVD (LSA) -> unit vectors, one block per analyzer.

    ``word`` hashes word 1-2-grams; ``char`` hashes character 3-5-grams within word boundaries (robust to
    inflection, spelling and code identifiers, what a text-surface teacher may read instead of words). Each block
    is fitted on its own (idf, kept columns, SVD), L2-normalised and scaled by ``1/sqrt(B)``; the view's vector is
    the blocks side by side, each ``dim`` wide (zero-padded when the texts give fewer components). So the dot
    product of two items' vectors is the mean of the blocks' cosines, and a block's own cosine is the dot product
    over its columns (:meth:`block_slices`): the run calibrates one weight per block on its labels.

    Args:
        dim: output dimensions per block (the view is ``B * dim`` wide: the estimation cost of its candidates).
        analyzers: the blocks, from ``word`` and ``char`` (``choose.lexical``).
        n_features: hashing space (2**n_bits buckets).
        max_columns: hashed columns kept per block (the most frequent with document frequency >= 2): the size of
            the saved transform is ``dim x max_columns`` float32 per block.
        sample: texts idf and the SVD are fitted on (a seeded sample when there are more), so fitting costs
            O(sample) and every text is hashed once, by :meth:`transform`.
        seed: sampling and SVD seed.
    """

    def __init__(self, dim: int = 256, analyzers: tuple[str, ...] = ("word",), n_features: int = 2**20,
                 max_columns: int = 2**16, sample: int = 20_000, seed: int = 0):  # fmt: skip
        bad = [a for a in analyzers if a not in ANALYZERS]
        if bad or not analyzers or len(set(analyzers)) != len(analyzers):
            raise ValueError(f"lexical view: analyzers {analyzers!r} (distinct names from {', '.join(ANALYZERS)})")
        self.dim, self.analyzers, self.n_features = dim, tuple(analyzers), n_features
        self.max_columns, self.sample, self.seed = max_columns, sample, seed
        self.blocks: dict[str, dict[str, np.ndarray]] = {}  # analyzer -> columns (V,), idf (V,), components (k, V)

    def block_slices(self) -> list[slice]:
        """The columns of each block in the view's vectors, in ``analyzers`` order."""
        return [slice(k * self.dim, (k + 1) * self.dim) for k in range(len(self.analyzers))]

    def _hashed(self, texts: list[str], analyzer: str):
        from sklearn.feature_extraction.text import HashingVectorizer

        kw = {"ngram_range": (1, 2)} if analyzer == "word" else {"analyzer": "char_wb", "ngram_range": (3, 5)}
        hv = HashingVectorizer(n_features=self.n_features, alternate_sign=False, norm=None, **kw)
        x = hv.transform(texts).tocsr()
        x.data = 1.0 + np.log(x.data)  # sublinear tf
        return x

    def fit(self, texts: list[str]) -> LexicalView:
        """Fit each block's idf, kept columns and SVD on ``texts`` (a seeded sample of ``sample``); returns self."""
        from sklearn.decomposition import TruncatedSVD

        rng = np.random.default_rng([self.seed, 13])
        n = len(texts)
        fit_rows = np.sort(rng.choice(n, self.sample, replace=False)) if n > self.sample else np.arange(n)
        sample = [texts[i] for i in fit_rows]
        for analyzer in self.analyzers:
            x = self._hashed(sample, analyzer)
            df = np.bincount(x.indices, minlength=self.n_features)
            keep = np.argsort(-df, kind="stable")[: self.max_columns]
            keep = np.sort(keep[df[keep] >= min(2, int(df.max(initial=0)))])
            if len(keep) < 2:
                raise ValueError(f"lexical view: the texts share fewer than 2 {analyzer} n-grams ({n} texts)")
            block = {"columns": keep.astype(np.int64),
                     "idf": (np.log((1 + len(sample)) / (1 + df[keep])) + 1.0).astype(np.float32)}  # fmt: skip
            k = max(1, min(self.dim, len(keep) - 1, len(sample) - 1))
            svd = TruncatedSVD(k, algorithm="randomized", n_iter=5, random_state=self.seed)
            svd.fit(self._weighted(x, block))
            block["components"] = svd.components_.astype(np.float32)
            self.blocks[analyzer] = block
        return self

    @staticmethod
    def _weighted(x, block: dict[str, np.ndarray]):
        """The kept columns of hashed counts, tf-idf weighted and row-normalised."""
        from sklearn.preprocessing import normalize

        xs = x[:, block["columns"]].multiply(block["idf"][None, :]).tocsr()
        return normalize(xs, norm="l2", copy=False)

    def transform(self, texts: list[str], chunk: int = 8192) -> np.ndarray:
        """(len(texts), B * dim) float32: per block a unit vector scaled by ``1/sqrt(B)`` (a text with no kept
        n-gram of a block has zeros there)."""
        if len(self.blocks) != len(self.analyzers):
            raise RuntimeError("LexicalView.transform before fit/load")
        from tqdm.auto import tqdm

        scale = np.float32(1.0 / np.sqrt(len(self.analyzers)))
        out = np.zeros((len(texts), self.dim * len(self.analyzers)), np.float32)
        with tqdm(total=len(texts), desc="lexical view", unit="item", disable=len(texts) <= chunk, leave=False) as bar:
            for s in range(0, len(texts), chunk):
                for analyzer, cols in zip(self.analyzers, self.block_slices(), strict=True):
                    block = self.blocks[analyzer]
                    x = self._weighted(self._hashed(texts[s : s + chunk], analyzer), block)
                    z = np.asarray(x @ block["components"].T, np.float32)
                    norm = np.linalg.norm(z, axis=1, keepdims=True)
                    z = np.divide(z, norm, out=np.zeros_like(z), where=norm > 0) * scale
                    out[s : s + len(z), cols.start : cols.start + z.shape[1]] = z
                bar.update(min(chunk, len(texts) - s))
        return out

    def save(self, path: str | Path) -> None:
        arrays = {f"{a}.{k}": v for a, block in self.blocks.items() for k, v in block.items()}
        meta = {"view": "lexical", "n_features": str(self.n_features), "seed": str(self.seed), "dim": str(self.dim),
                "analyzers": ",".join(self.analyzers)}  # fmt: skip
        write_safetensors(path, arrays, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LexicalView:
        t = read_safetensors(path)
        from safetensors import safe_open

        with safe_open(str(path), "np") as fh:
            meta = fh.metadata() or {}
        if "analyzers" not in meta:
            from nncift.errors import ProvenanceError

            raise ProvenanceError(f"{path}: a lexical view saved before its blocks (word, char) existed; rerun the "
                                  "choose stage (nncift run ... --overwrite)")  # fmt: skip
        v = cls(dim=int(meta["dim"]), analyzers=tuple(meta["analyzers"].split(",")), n_features=int(meta["n_features"]),
                seed=int(meta["seed"]))  # fmt: skip
        v.blocks = {a: {k: t[f"{a}.{k}"] for k in ("columns", "idf", "components")} for a in v.analyzers}
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
