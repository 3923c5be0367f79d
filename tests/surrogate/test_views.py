"""The lexical view (nncift.surrogate.views.LexicalView): its blocks (word, character n-grams), their layout in the
view's vectors, and the saved transform."""

from __future__ import annotations

import numpy as np
import pytest

from nncift.surrogate.views import LexicalView

TEXTS = [
    "the runner was running to the finish line",
    "a runner runs and keeps running every morning",
    "cooking pasta with tomato sauce and basil",
    "she cooked the pasta; the sauce needed basil",
    "compile the rust crate with cargo build",
    "cargo builds rust crates and runs their tests",
    "paint the fence before the rain starts",
    "the painter painted a fence in the rain",
] * 2


def test_blocks_sit_side_by_side_and_their_dot_is_the_mean_of_their_cosines():
    view = LexicalView(dim=6, analyzers=("word", "char")).fit(TEXTS)
    x = view.transform(TEXTS[:8])
    assert x.shape == (8, 12) and x.dtype == np.float32
    word, char = view.block_slices()
    assert (word, char) == (slice(0, 6), slice(6, 12))
    np.testing.assert_allclose(np.linalg.norm(x[:, word], axis=1) ** 2, 0.5, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    alone = {a: LexicalView(dim=6, analyzers=(a,)).fit(TEXTS).transform(TEXTS[:8]) for a in ("word", "char")}
    np.testing.assert_allclose(2 * x[:, word] @ x[:, word].T, alone["word"] @ alone["word"].T, atol=1e-5)
    np.testing.assert_allclose(2 * x[:, char] @ x[:, char].T, alone["char"] @ alone["char"].T, atol=1e-5)


def test_the_char_block_reads_shared_stems_the_word_block_misses():
    texts = ["swimmingly", "swimmer", "xylophone"] * 4
    view = LexicalView(dim=4, analyzers=("word", "char")).fit(texts)
    x = view.transform(texts[:3])
    word, char = view.block_slices()
    assert abs(x[0, word] @ x[1, word]) < 1e-6  # no shared word
    assert x[0, char] @ x[1, char] > x[0, char] @ x[2, char] + 0.1  # "swim" shared, nothing with "xylophone"


def test_saved_view_gives_the_same_vectors_and_an_old_file_is_refused(tmp_path):
    from nncift.errors import ProvenanceError
    from nncift.store import write_safetensors

    view = LexicalView(dim=5, analyzers=("char", "word"), seed=3).fit(TEXTS)
    view.save(tmp_path / "lex.safetensors")
    again = LexicalView.load(tmp_path / "lex.safetensors")
    assert again.analyzers == ("char", "word") and again.dim == 5
    np.testing.assert_array_equal(again.transform(TEXTS), view.transform(TEXTS))
    block = view.blocks["word"]
    write_safetensors(tmp_path / "old.safetensors", dict(block), metadata={"view": "lexical"})
    with pytest.raises(ProvenanceError, match=r"old\.safetensors.*rerun the choose stage"):
        LexicalView.load(tmp_path / "old.safetensors")


@pytest.mark.parametrize("analyzers", [(), ("word", "word"), ("words",)])
def test_bad_analyzers_are_refused(analyzers):
    with pytest.raises(ValueError, match="analyzers"):
        LexicalView(analyzers=analyzers)
