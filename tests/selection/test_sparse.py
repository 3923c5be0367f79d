import numpy as np
import pytest

from nncift.selection.greedy import lazy_greedy, minmax_scale
from nncift.selection.sparse import (
    SparseKernel,
    greedi_local_round,
    greedi_merge,
    partition_items,
    sparse_lazy_greedy,
    sparse_objective,
    stochastic_greedy,
)
from nncift.surrogate.numba_kernels import TopK


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


def _write_stripes(tmp_path, kd, k, kernel="ff", stripe=64):
    """Per-row top-k stripes of a dense kernel, as the estimate stage writes them."""
    from nncift.kernels.kernel_io import write_sparse_block
    from nncift.labels.plan import Block
    from nncift.surrogate.numba_kernels import TopK

    m, n = kd.shape
    for i, r0 in enumerate(range(0, m, stripe)):
        r1 = min(m, r0 + stripe)
        tk = TopK(r1 - r0, k)
        tk.update(kd[r0:r1].astype(np.float32), 0)
        cols, vals = tk.result()
        block = Block(kernel, i, r0, r1, 0, n)
        write_sparse_block(tmp_path / f"{block.name}.parquet", block, cols, vals, k, (float(kd.min()), float(kd.max())))


@pytest.mark.parametrize("objective", ["fl", "flmi"])
def test_greedi_from_stripes_equals_greedi_on_the_gathered_kernel(tmp_path, objective):
    """GreeDi whose parts read their sub-kernels from the Parquet stripes picks exactly what GreeDi on the
    whole gathered kernel picks (same entries, same order), and the merge kernel holds only the union."""
    from nncift.kernels.kernel_io import read_sparse, sparse_extent
    from nncift.selection.sparse import StripeSource, fl_kernel_from_topk, restrict, stripe_kernel

    m = 330
    kd = _dense(m=m, seed=11)
    kt = np.random.default_rng(12).normal(size=(m, 40)).astype(np.float32)
    _write_stripes(tmp_path, kd, 20)
    _write_stripes(tmp_path, kt, 8, kernel="ft")
    ff_cols, ff_vals = read_sparse(tmp_path, "ff", m)
    ft_vals = read_sparse(tmp_path, "ft", m)[1]
    whole, _ = fl_kernel_from_topk(ff_cols, ff_vals, sparse_extent(tmp_path, "ff"), ft_vals,
                                   sparse_extent(tmp_path, "ft"), objective, eta=0.8)  # fmt: skip
    src = StripeSource(str(tmp_path), m, objective, eta=0.8)
    parts = partition_items(m, 3, seed=2)
    for p in parts:  # round 1's sub-kernels are identical, entry for entry
        a, ids_a = restrict(whole, p)
        b, ids_b = stripe_kernel(src, items=p)
        np.testing.assert_array_equal(ids_a, ids_b)
        for x, y in ((a.indptr, b.indptr), (a.rows, b.rows), (a.vals, b.vals)):
            np.testing.assert_array_equal(x, y)
    ref = greedi_merge(whole, [greedi_local_round(whole, p, 30) for p in parts], 30)
    got = greedi_merge(src, [greedi_local_round(src, p, 30) for p in parts], 30)
    np.testing.assert_array_equal(ref[0], got[0])
    np.testing.assert_array_equal(ref[1], got[1])
    sel = stripe_kernel(src, cols=got[0])[0]
    assert sparse_objective(sel, got[0]) == sparse_objective(whole, ref[0])
    assert len(sel.vals) < len(whole.vals)  # only the selected columns were kept
