"""The second round of the active label design."""

import numpy as np

from nncift.labels.active import top_predicted_pairs


def _dot(scores: np.ndarray) -> dict:
    """Factors whose product is ``scores`` (rows = items, columns one-hot)."""
    return {"type": "dot", "p": scores.astype(np.float32), "q": np.eye(scores.shape[1], dtype=np.float32)}


def test_top_pairs_per_row_skip_labeled_and_self():
    rng = np.random.default_rng(0)
    scores = rng.permutation(36).reshape(6, 6).astype(float)  # distinct values: no ties
    rows = cols = np.arange(6)
    labeled = (np.array([0, 0, 3]), np.array([np.argmax(scores[0]), 1, 2]))
    r, c = top_predicted_pairs(_dot(scores), rows, cols, labeled, per_row=2, exclude_self=True, row_chunk=4,
                               col_chunk=4)  # fmt: skip
    got = {(int(a), int(b)) for a, b in zip(r, c, strict=True)}
    want = set()
    done = set(zip(labeled[0].tolist(), labeled[1].tolist(), strict=True))
    for i in range(6):
        order = [j for j in np.argsort(-scores[i]) if j != i and (i, j) not in done]
        want |= {(i, int(j)) for j in order[:2]}
    assert got == want and len(r) == 12
    assert np.all(np.diff(c) >= 0)  # grouped by column (one in-context example together)


def test_candidates_restricted_to_the_given_items():
    scores = np.arange(25, dtype=float).reshape(5, 5)
    r, c = top_predicted_pairs(_dot(scores), np.array([1, 3]), np.array([0, 2]), (np.zeros(0, int), np.zeros(0, int)),
                               per_row=5, exclude_self=False)  # fmt: skip
    assert set(r.tolist()) == {1, 3} and set(c.tolist()) == {0, 2} and len(r) == 4
