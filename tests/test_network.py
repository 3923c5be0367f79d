import numpy as np
import torch

from nncift.estimate import predict_block
from nncift.network import InfluenceNetwork, Scaler


def _net(d=12, h=7, seed=0):
    torch.manual_seed(seed)
    return InfluenceNetwork(d, h)


def test_factorised_forward_equals_concat_forward():
    net = _net()
    ei, ej = torch.randn(50, 12), torch.randn(50, 12)
    concat = torch.cat([ei, torch.zeros(50, 1), ej], dim=1)
    torch.testing.assert_close(net(ei, ej), net.forward_concat(concat), rtol=1e-5, atol=1e-5)


def test_projected_block_equals_plain_forward_on_all_pairs():
    net = _net()
    er, ec = torch.randn(9, 12), torch.randn(13, 12)
    p, q = net.project(er, ec)
    w2, b2 = net.head()
    block = predict_block(p, q, torch.as_tensor(w2), b2)
    ii, jj = torch.meshgrid(torch.arange(9), torch.arange(13), indexing="ij")
    concat = torch.cat([er[ii.reshape(-1)], torch.zeros(9 * 13, 1), ec[jj.reshape(-1)]], dim=1)
    with torch.no_grad():
        ref = net.forward_concat(concat).reshape(9, 13)
    torch.testing.assert_close(block, ref, rtol=1e-5, atol=1e-5)


def test_tiled_prediction_matches_untiled(monkeypatch):
    import nncift.estimate as est

    net = _net(d=8, h=5)
    p, q = net.project(torch.randn(40, 8), torch.randn(30, 8))
    w2 = torch.as_tensor(net.head()[0])
    full = predict_block(p, q, w2, 0.3)
    monkeypatch.setattr(est, "TILE_BYTES", 5 * 30 * 4 * 3)  # 3 rows per tile
    torch.testing.assert_close(est.predict_block(p, q, w2, 0.3), full)


def test_parameter_count_matches_paper_layout():
    # [C]'s 1024-d embeddings, 2049-long input, hidden 100 -> 205,101 parameters (METHOD.md §2)
    assert InfluenceNetwork(1024, 100).num_parameters() == 205_101


def test_save_load_roundtrip(tmp_path):
    net = _net()
    net.save(tmp_path / "n", Scaler(-0.5, 2.0), extra={"kernel": "ff"})
    again, scaler, meta = InfluenceNetwork.load(tmp_path / "n")
    x = torch.randn(4, 12)
    torch.testing.assert_close(again(x, x), net(x, x))
    assert scaler == Scaler(-0.5, 2.0) and meta["kernel"] == "ff"
    assert (tmp_path / "n.safetensors").is_file()


def test_scaler_guard_constant_labels():
    s = Scaler.fit(np.full(5, 0.7))
    assert np.isfinite(s.transform(np.array([0.7, 1.0]))).all()
    s = Scaler.fit(np.array([-1.0, 3.0]))
    np.testing.assert_allclose(s.inverse(s.transform(np.array([0.0, 2.0]))), [0.0, 2.0], atol=1e-6)
