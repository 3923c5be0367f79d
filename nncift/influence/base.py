"""The influence-function interface and the item container it consumes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class Items:
    """A batch of rows as the influence functions see them.

    Attributes:
        prompts: (B,) prompt strings.
        responses: (B,) response strings.
        embeddings: (B, d) float32 unit-norm embeddings.
        ids: (B,) row ids (the table teacher looks values up by id); None when unknown.
    """

    prompts: list[str]
    responses: list[str]
    embeddings: np.ndarray
    ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: np.ndarray) -> Items:
        idx = np.asarray(idx, dtype=np.int64)
        return Items(
            [self.prompts[i] for i in idx],
            [self.responses[i] for i in idx],
            self.embeddings[idx],
            None if self.ids is None else [self.ids[i] for i in idx],
        )


class InfluenceFunction(ABC):
    """An expensive pairwise influence function.

    Subclasses implement :meth:`utility` (and, for speed, :meth:`utility_pairs`). Positive values mean the
    example helps the target.

    Attributes:
        name: registry name.
        symmetric: ``U(a -> b) == U(b -> a)`` for every pair (surrogates may then share one tower).
        exact_is_cheap: every pair can be computed at negligible cost (embedding cosine, a lookup table), so
            a run can afford the full kernel as fidelity ground truth.
        pairs_per_second: a rough labeling rate, used only to size label blocks.
    """

    name: str = "base"
    symmetric: bool = False
    exact_is_cheap: bool = False
    pairs_per_second: float = 1e6  # a rough rate for sizing label blocks (label.pairs_per_second overrides)

    @abstractmethod
    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        """U(example -> target) for every pair.

        Returns:
            (len(examples), len(targets)) float32.
        """

    def utility_pairs(self, examples: Items, targets: Items) -> np.ndarray:
        """U(examples[k] -> targets[k]) for aligned pairs (default: one :meth:`utility` call per pair;
        the built-in functions override it with a batched computation).

        Returns:
            (len(examples),) float32.
        """
        if len(examples) != len(targets):
            raise ValueError(f"utility_pairs needs aligned pairs, got {len(examples)} examples, {len(targets)} targets")
        out = np.empty(len(examples), np.float32)
        for k in range(len(examples)):
            out[k] = self.utility(examples.take([k]), targets.take([k]))[0, 0]
        return out

    def kernel_block(self, kernel: str, rows: Items, cols: Items) -> np.ndarray:
        """A block of K_FF or K_FT with rows from D_F.

        ``K_FF[i, j] = U(j -> i)`` (how well pool item j serves pool item i: the facility-location
        orientation) and ``K_FT[i, j] = U(i -> j)`` (how much pool item i helps target j).

        Returns:
            (len(rows), len(cols)) float32.
        """
        if kernel == "ff":
            return np.ascontiguousarray(self.utility(cols, rows).T, dtype=np.float32)
        if kernel == "ft":
            return np.ascontiguousarray(self.utility(rows, cols), dtype=np.float32)
        raise ValueError(f"kernel must be 'ff' or 'ft', got {kernel!r}")

    def kernel_pairs(self, kernel: str, rows: Items, cols: Items) -> np.ndarray:
        """Entries ``K[rows[k], cols[k]]`` of K_FF or K_FT for aligned pairs (same orientation as
        :meth:`kernel_block`).

        Returns:
            (len(rows),) float32.
        """
        if kernel == "ff":
            return np.asarray(self.utility_pairs(cols, rows), dtype=np.float32)
        if kernel == "ft":
            return np.asarray(self.utility_pairs(rows, cols), dtype=np.float32)
        raise ValueError(f"kernel must be 'ff' or 'ft', got {kernel!r}")
