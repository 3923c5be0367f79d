import numpy as np
import pytest

from nncift.surrogate.numba_kernels import TopK, predict_block_np


def test_numba_predict_equals_numpy_reference():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(37, 20)).astype(np.float32), rng.normal(size=(1100, 20)).astype(np.float32)
    w = rng.normal(size=20).astype(np.float32)
    ref = np.maximum(p[:, None, :] + q[None, :, :], 0) @ w + 0.25
    np.testing.assert_allclose(predict_block_np(p, q.T, w, 0.25), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_streaming_topk_equals_dense_topk(k):
    rng = np.random.default_rng(k)
    dense = rng.normal(size=(23, 137)).astype(np.float32)
    dense[3, :] = 0.5  # ties: lower columns must win
    tk = TopK(23, k)
    for c0 in range(0, 137, 30):
        tk.update(dense[:, c0 : c0 + 30], c0)
    cols, vals = tk.result()
    order = np.lexsort((np.broadcast_to(np.arange(137), dense.shape), -dense), axis=1)[:, :k]
    np.testing.assert_array_equal(cols, order)
    np.testing.assert_array_equal(vals, np.take_along_axis(dense, order, 1))
