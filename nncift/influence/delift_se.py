"""DELIFT (SE): cosine similarity of sentence embeddings (the DELIFT paper, App. C.1 of NN-CIFT)."""

from __future__ import annotations

import numpy as np

from nncift.influence.interface import InfluenceFunction, Items
from nncift.influence.plugins import register


@register
class DeliftSE(InfluenceFunction):
    """U(e -> t) = cos(emb_e, emb_t); symmetric, model-independent.

    Uses the pipeline's cached unit-norm embeddings (one embedding definition everywhere), so the value
    is a plain dot product.
    """

    name = "delift_se"
    symmetric = True
    auto_probes = 0  # a symmetric cosine: the free estimates read it whole (docs/fidelity.md)
    exact_is_cheap = True

    def utility(self, examples: Items, targets: Items) -> np.ndarray:
        """Returns (E, T) float32 cosines."""
        return (examples.embeddings @ targets.embeddings.T).astype(np.float32)

    def utility_pairs(self, examples: Items, targets: Items) -> np.ndarray:
        """Returns (P,) float32 cosines of aligned pairs."""
        return np.einsum("pd,pd->p", examples.embeddings, targets.embeddings).astype(np.float32)
