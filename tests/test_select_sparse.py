import numpy as np
import pytest

from nncift.kernels import TopK
from nncift.select import lazy_greedy, minmax_scale
from nncift.select_sparse import (
    SparseKernel,
    greedi_local_round,
    greedi_merge,
    partition_items,
    sparse_lazy_greedy,
    sparse_objective,
    stochastic_greedy,
)


def _dense(m=150, d=6, seed=0):
    x = np.random.default_rng(seed).normal(size=(m, d)).astype(np.float32)
    return minmax_scale(x @ x.T)


def _sparse(k_dense, k):
    tk = TopK(k_dense.shape[0], k)
    tk.update(k_dense, 0)
    cols, vals = tk.result()
    return SparseKernel.from_topk(cols, vals, k_dense.shape[1])


def test_sparse_equals_dense_when_k_is_m():
    kd = _dense()
    a, ga = sparse_lazy_greedy(_sparse(kd, kd.shape[1]), 40)
    b, gb = lazy_greedy(kd, 40)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ga, gb, rtol=1e-6)


def test_sparse_floor_equals_dense_flcg():
    kd = _dense(seed=1)
    floor = np.random.default_rng(2).random(kd.shape[0]).astype(np.float32) * 0.5
    np.testing.assert_array_equal(sparse_lazy_greedy(_sparse(kd, 150), 20, floor)[0], lazy_greedy(kd, 20, floor)[0])


def test_stochastic_and_topk_sparse_are_close_to_greedy():
    kd = _dense(m=300, seed=3)
    sk = _sparse(kd, 32)
    greedy = sparse_objective(sk, sparse_lazy_greedy(sk, 30)[0])
    assert sparse_objective(sk, stochastic_greedy(sk, 30, eps=0.05)[0]) >= 0.95 * greedy
    # sparse top-32 selection, scored on the dense kernel, is close to dense greedy
    dense_val = lambda idx: float(kd[:, idx].max(1).sum())  # noqa: E731
    assert dense_val(sparse_lazy_greedy(sk, 30)[0]) >= 0.97 * dense_val(lazy_greedy(kd, 30)[0])


def test_greedi_local_twin_is_close_to_centralised():
    kd = _dense(m=400, seed=4)
    sk = _sparse(kd, 32)
    parts = partition_items(400, 4, seed=0)
    local = [greedi_local_round(sk, p, 40) for p in parts]
    idx, _ = greedi_merge(sk, local, 40)
    assert len(set(idx.tolist())) == 40
    assert sparse_objective(sk, idx) >= 0.98 * sparse_objective(sk, sparse_lazy_greedy(sk, 40)[0])


def test_budget_error():
    with pytest.raises(ValueError, match="budget"):
        sparse_lazy_greedy(_sparse(_dense(m=10), 3), 11)
