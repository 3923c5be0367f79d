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
    """

    prompts: list[str]
    responses: list[str]
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx: np.ndarray) -> Items:
        idx = np.asarray(idx, dtype=np.int64)
        return Items([self.prompts[i] for i in idx], [self.responses[i] for i in idx], self.embeddings[idx])


class InfluenceFunction(ABC):
    """An expensive pairwise influence function.

    Subclasses implement :meth:`utility`. Positive values mean the example helps the target.
    """

    name: str = "base"

    @abstractmethod
    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        """U(example -> target) for every pair.

        Returns:
            (len(examples), len(targets)) float32.
        """

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
