import numpy as np
import pytest

from nncift.influence import DeliftSE, Items, build_influence_function
from nncift.influence.interface import InfluenceFunction


class Asymmetric(InfluenceFunction):
    """U(e -> t) = 10 * index(e) + index(t): makes the orientation visible."""

    def utility(self, examples, targets):
        e = np.array([int(p) for p in examples.prompts])[:, None]
        t = np.array([int(p) for p in targets.prompts])[None, :]
        return (10 * e + t).astype(np.float32)


def _items(ids):
    return Items([str(i) for i in ids], ["r"] * len(ids), np.zeros((len(ids), 2), np.float32))


def test_kernel_orientation():
    fn = Asymmetric()
    rows, cols = _items([1, 2]), _items([3, 4, 5])
    # K_FF[i, j] = U(j -> i): column item is the example
    np.testing.assert_array_equal(fn.kernel_block("ff", rows, cols), [[31, 41, 51], [32, 42, 52]])
    # K_FT[i, j] = U(i -> j): pool row item is the example
    np.testing.assert_array_equal(fn.kernel_block("ft", rows, cols), [[13, 14, 15], [23, 24, 25]])
    with pytest.raises(ValueError):
        fn.kernel_block("tt", rows, cols)


def test_delift_se_is_cosine():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(5, 4)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    items = Items(["p"] * 5, ["r"] * 5, e)
    k = DeliftSE().kernel_block("ft", items, items.take(np.array([0, 3])))
    np.testing.assert_allclose(k, e @ e[[0, 3]].T, rtol=1e-6)
    np.testing.assert_allclose(np.diag(DeliftSE().utility(items, items)), 1.0, rtol=1e-6)


def test_registry(tiny_lm):
    from nncift.errors import MissingDependencyError
    from nncift.influence.delift_icl import DeliftICL

    assert isinstance(build_influence_function("delift_icl", model=tiny_lm), DeliftICL)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"\[vllm\]"):
            build_influence_function("delift_icl", model=tiny_lm, backend="vllm")
    with pytest.raises(ValueError, match="unknown influence function"):
        build_influence_function("not_a_teacher")
