import numpy as np
import pytest
import torch

from nncift.surrogate.network import BilinearNetwork, InfluenceNetwork, Scaler, build_network, load_network
from nncift.surrogate.predict import predict_block


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


def test_tiled_prediction_matches_untiled():
    net = _net(d=8, h=5)
    p, q = net.project(torch.randn(40, 8), torch.randn(30, 8))
    w2 = torch.as_tensor(net.head()[0])
    full = predict_block(p, q, w2, 0.3)
    torch.testing.assert_close(predict_block(p, q, w2, 0.3, tile_bytes=5 * 30 * 4 * 3), full)  # 3 rows per tile


def test_parameter_count_matches_paper_layout():
    # [C]'s 1024-d embeddings, 2049-long input, hidden 100 -> 205,101 parameters (the paper's reference code)
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


# ---------------------------------------------------------------------------------------------- bilinear
def _pairs_all(net, er, ec):
    ii, jj = torch.meshgrid(torch.arange(len(er)), torch.arange(len(ec)), indexing="ij")
    with torch.no_grad():
        return net(er[ii.reshape(-1)], ec[jj.reshape(-1)]).reshape(len(er), len(ec))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("cosine_prior", [False, True])
def test_bilinear_factors_equal_the_pair_forward(symmetric, cosine_prior):
    torch.manual_seed(0)
    net = BilinearNetwork(12, rank=5, symmetric=symmetric, cosine_prior=cosine_prior)
    with torch.no_grad():  # non-trivial biases and prior weight
        net.bias.fill_(0.3)
        if cosine_prior:
            net.alpha.fill_(-0.7)
    er, ec = torch.randn(9, 12), torch.randn(13, 12)
    f = net.estimator(er, ec)
    assert f["type"] == "dot" and f["p"].shape == (9, (12 if cosine_prior else 5) + 2)
    torch.testing.assert_close(torch.as_tensor(f["p"] @ f["q"].T), _pairs_all(net, er, ec), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.score_all(er, ec), _pairs_all(net, er, ec), rtol=1e-5, atol=1e-5)


def test_symmetric_bilinear_is_symmetric_and_shares_its_tower():
    torch.manual_seed(0)
    net = BilinearNetwork(8, rank=4, symmetric=True)
    e = torch.randn(10, 8)
    k = _pairs_all(net, e, e)
    torch.testing.assert_close(k, k.T)
    assert not hasattr(net, "col_tower")
    asym = BilinearNetwork(8, rank=4, symmetric=False)
    assert asym.num_parameters() == net.num_parameters() + 8 * 4 + 8


@pytest.mark.parametrize(
    "kind,params", [("mlp", {"hidden": 6}), ("bilinear", {"rank": 3, "symmetric": True, "cosine_prior": True})]
)
def test_any_kind_save_load_roundtrip(tmp_path, kind, params):
    torch.manual_seed(0)
    net = build_network(kind, 10, **params, unused_key=1)
    net.save(tmp_path / "n", Scaler(0.0, 2.0), extra={"kernel": "ft"})
    again, scaler, meta = load_network(tmp_path / "n")
    assert type(again) is type(net) and meta["kind"] == kind and scaler == Scaler(0.0, 2.0)
    x, y = torch.randn(5, 10), torch.randn(5, 10)
    torch.testing.assert_close(again(x, y), net(x, y))
    f1, f2 = net.estimator(x, y), again.estimator(x, y)
    np.testing.assert_allclose(f1["p"], f2["p"])


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown network kind 'tree'"):
        build_network("tree", 4)


def test_mlp_estimator_matches_its_forward():
    net = _net()
    er, ec = torch.randn(6, 12), torch.randn(7, 12)
    torch.testing.assert_close(net.score_all(er, ec), _pairs_all(net, er, ec), rtol=1e-5, atol=1e-5)
