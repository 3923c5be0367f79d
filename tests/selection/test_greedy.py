import numpy as np
import pytest

from nncift import select_subset
from nncift.selection.greedy import (
    greedy_select,
    lazy_greedy,
    minmax_scale,
    naive_greedy,
    objective_value,
    prepare_objective,
)


def _kernels(m=120, n=30, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, d)).astype(np.float32)
    t = rng.normal(size=(n, d)).astype(np.float32)
    return x @ x.T, x @ t.T


@pytest.mark.parametrize("objective", ["fl", "flmi", "flcg"])
def test_lazy_equals_naive(objective):
    k_ff, k_ft = _kernels()
    k_ff, k_ft = minmax_scale(k_ff), minmax_scale(k_ft)
    k, floor = prepare_objective(k_ff, objective, k_ft, 1.0, 0.5)
    a, ga = lazy_greedy(k, 40, floor)
    b, gb = naive_greedy(k, 40, floor)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ga, gb)
    np.testing.assert_allclose(np.cumsum(ga)[-1], objective_value(k_ff, a, objective, k_ft, 1.0, 0.5), rtol=1e-6)


def test_lazy_equals_naive_with_heavy_ties():
    k = (np.random.default_rng(1).random((80, 80)) < 0.05).astype(np.float32)
    np.testing.assert_array_equal(lazy_greedy(k, 79)[0], naive_greedy(k, 79)[0])


@pytest.mark.parametrize(
    "objective,eta,nu",
    [("fl", 1.0, 1.0), ("flmi", 1.0, 1.0), ("flcg", 1.0, 1.0), ("flmi", 0.6, 1.0), ("flcg", 1.0, 0.4)],
)
def test_objective_matches_submodlib(objective, eta, nu):
    sub = pytest.importorskip("submodlib")
    k_ff, k_ft = _kernels(m=90, n=20, seed=2)
    # an asymmetric K_FF (like DELIFT's): a transposed kernel would give other values and picks
    k_ff = k_ff + np.random.default_rng(3).normal(scale=2.0, size=k_ff.shape).astype(np.float32)
    k_ff, k_ft = minmax_scale(k_ff), minmax_scale(k_ft)
    assert np.abs(k_ff - k_ff.T).max() > 0.1
    m, n = k_ft.shape
    if objective == "fl":
        fn = sub.FacilityLocationFunction(n=m, mode="dense", sijs=k_ff, separate_rep=False)
    elif objective == "flmi":
        fn = sub.FacilityLocationMutualInformationFunction(
            n=m, num_queries=n, data_sijs=k_ff, query_sijs=k_ft, magnificationEta=eta
        )
    else:
        fn = sub.FacilityLocationConditionalGainFunction(
            n=m, num_privates=n, data_sijs=k_ff, private_sijs=k_ft, privacyHardness=nu
        )
    ours = select_subset(k_ff, 25, objective=objective, k_ft=k_ft, scale=False, eta=eta, nu=nu)
    theirs = [
        i
        for i, _ in fn.maximize(
            budget=25, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False, show_progress=False
        )
    ]

    # same objective definition, and a greedy at least as good as submodlib's
    def f(idx, k=k_ff):
        return objective_value(k, np.asarray(idx), objective, k_ft, eta, nu)

    assert fn.evaluate(set(ours.tolist())) == pytest.approx(f(ours), rel=1e-5)
    if objective != "flmi":  # (FLMI's cap can saturate every row, whatever the orientation)
        assert fn.evaluate(set(ours.tolist())) != pytest.approx(f(ours, k_ff.T), rel=1e-3)  # orientation matters
    assert f(ours) >= f(theirs) - 1e-4


def test_topk_and_scale_guard():
    k_ft = np.array([[0.1, 0.2], [0.9, 0.8], [0.5, 0.5], [0.9, 0.8]], np.float32)
    np.testing.assert_array_equal(select_subset(None, 2, objective="topk", k_ft=k_ft), [1, 3])
    assert (minmax_scale(np.ones((3, 3))) == 0).all()


def test_planted_representative_is_picked_first():
    k = np.full((50, 50), 0.1, np.float32)
    k[:, 17] = 0.9
    assert select_subset(k, 1)[0] == 17


def test_input_errors():
    k_ff, _ = _kernels(m=10)
    with pytest.raises(ValueError, match="needs k_ft"):
        select_subset(k_ff, 3, objective="flmi")
    with pytest.raises(ValueError, match="budget"):
        select_subset(k_ff, 11)
    with pytest.raises(ValueError, match="unknown objective"):
        greedy_select(k_ff, 3, objective="nope")
