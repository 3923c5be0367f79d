import numpy as np
import torch

from nncift.estimate import EstimateWorker, assemble_dense, read_block
from nncift.network import InfluenceNetwork
from nncift.pairs import block_grid


def _heads(m=37, n=11, d=6, h=5):
    torch.manual_seed(0)
    er, et = torch.randn(m, d), torch.randn(n, d)
    heads, dense = {}, {}
    for kernel, ec in (("ff", er), ("ft", et)):
        net = InfluenceNetwork(d, h)
        p, q = net.project(er, ec)
        w2, b2 = net.head()
        heads[kernel] = {"p": p.numpy(), "q": q.numpy(), "w2": w2, "b2": b2, "lo": -1.0, "hi": 3.0}
        with torch.no_grad():
            ii, jj = np.meshgrid(np.arange(m), np.arange(len(ec)), indexing="ij")
            dense[kernel] = net(er[ii.reshape(-1)], ec[jj.reshape(-1)]).numpy().reshape(m, len(ec)) * 4.0 - 1.0
    return heads, dense


def test_blocks_assemble_to_the_dense_prediction(tmp_path):
    heads, dense = _heads()
    worker = EstimateWorker(heads, str(tmp_path))
    blocks = block_grid("ff", 37, 37, 8) + block_grid("ft", 37, 11, 8, start_id=100)
    for b in blocks:
        worker.run_block(b)
    for kernel, shape in (("ff", (37, 37)), ("ft", (37, 11))):
        np.testing.assert_allclose(assemble_dense(tmp_path, kernel, shape), dense[kernel], rtol=1e-5, atol=1e-5)
    block, vals = read_block(tmp_path / f"{blocks[1].name}.parquet")
    assert block == blocks[1] and vals.shape == (8, 8)


def test_missing_block_is_detected(tmp_path):
    heads, _ = _heads()
    worker = EstimateWorker(heads, str(tmp_path))
    for b in block_grid("ft", 37, 11, 8)[:-1]:
        worker.run_block(b)
    import pytest

    with pytest.raises(RuntimeError, match="without a finished block"):
        assemble_dense(tmp_path, "ft", (37, 11))
