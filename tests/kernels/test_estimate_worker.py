import numpy as np
import pytest
import torch

from nncift.kernels.estimate_worker import EstimateWorker
from nncift.kernels.kernel_io import assemble_dense, read_block, read_row_means, read_sparse, sparse_extent
from nncift.labels.plan import Block, block_grid
from nncift.surrogate.network import InfluenceNetwork


def _heads(m=37, n=11, d=6, h=5):
    torch.manual_seed(0)
    er, et = torch.randn(m, d), torch.randn(n, d)
    heads, dense = {}, {}
    for kernel, ec in (("ff", er), ("ft", et)):
        net = InfluenceNetwork(d, h)
        p, q = net.project(er, ec)
        w2, b2 = net.head()
        heads[kernel] = {"type": "mlp", "p": p.numpy(), "q": q.numpy(), "w2": w2, "b2": b2, "lo": -1.0, "hi": 3.0}
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
    with pytest.raises(RuntimeError, match="without a finished block"):
        assemble_dense(tmp_path, "ft", (37, 11))


# ---------------------------------------------------------------------------- torch engine (sparse stripes)


def _factor_heads(kind: str, m=53, n=11, f=12, seed=1):
    """ff (M x M, exact diagonal) and ft (M x N, no diagonal) heads of one kind, in raw units lo=-1, hi=3."""
    rng = np.random.default_rng(seed)
    heads = {}
    for kernel, cols in (("ff", m), ("ft", n)):
        h = {"type": kind, "p": rng.normal(size=(m, f)).astype(np.float32), "lo": -1.0, "hi": 3.0}
        h["q"] = rng.normal(size=(cols, f)).astype(np.float32)
        if kind == "mlp":
            h["w2"], h["b2"] = rng.normal(size=f).astype(np.float32), 0.25
        h["diag"] = rng.normal(size=m).astype(np.float32) * 3 if kernel == "ff" else None
        heads[kernel] = h
    return heads


def _run_stripes(heads, out, stripe=16, **kw):
    """Every row stripe of both kernels through one sparse worker; returns {kernel: (cols, vals, means, ext)}."""
    w = EstimateWorker(heads, str(out), layout="sparse", **kw)
    m = len(heads["ff"]["p"])
    for kernel in ("ff", "ft"):
        n_cols = len(heads[kernel]["q"])
        for i, r0 in enumerate(range(0, m, stripe)):
            w.run_block(Block(kernel, i, r0, min(m, r0 + stripe), 0, n_cols))
    return {k: (*read_sparse(out, k, m), read_row_means(out, k, m), sparse_extent(out, k)) for k in ("ff", "ft")}


def _dense_raw(head):
    """The full matrix in raw units with the exact diagonal, from the numpy engine (the reference)."""
    w = EstimateWorker({"k": head}, "/nonexistent", layout="dense")
    m, n = len(head["p"]), len(head["q"])
    return w.predict_raw("k", 0, m, 0, n)


def _assert_same_topk(a, b, full, tol):
    """Two (cols, vals) top-k results agree: values (sorted per row) within ``tol``; columns where the value is
    separated by more than ``tol`` from its neighbours in the row's full ordering (near-ties may swap)."""
    (ca, va), (cb, vb) = a, b
    assert ca.shape == cb.shape
    np.testing.assert_allclose(va, vb, rtol=0, atol=tol)
    srt = -np.sort(-full, axis=1)
    k = ca.shape[1]
    ext = np.concatenate([np.full((len(srt), 1), np.inf), srt, np.full((len(srt), 1), -np.inf)], axis=1)
    sep = (ext[:, :k] - ext[:, 1 : k + 1] > tol) & (ext[:, 1 : k + 1] - ext[:, 2 : k + 2] > tol)
    assert sep.mean() > 0.9  # the comparison is not vacuous
    np.testing.assert_array_equal(ca[sep], cb[sep])


@pytest.mark.parametrize("kind", ["dot", "mlp"])
def test_torch_engine_equals_numpy_engine(tmp_path, kind):
    # 53 columns in chunks of 5 (not a multiple; chunks narrower than k); K_FT has 11 columns < topk = 16
    heads = _factor_heads(kind)
    kw = {"topk": 16, "col_chunk": 5}
    ref = _run_stripes(heads, tmp_path / "np", engine="numpy", **kw)
    got = _run_stripes(heads, tmp_path / "torch", engine="torch", **kw)
    for kernel in ("ff", "ft"):
        full = _dense_raw(heads[kernel])
        (c0, v0, m0, e0), (c1, v1, m1, e1) = ref[kernel], got[kernel]
        assert c1.shape == (53, min(16, full.shape[1]))
        _assert_same_topk((c0, v0), (c1, v1), full, 1e-5)
        np.testing.assert_allclose(m1, m0, rtol=0, atol=1e-5)
        np.testing.assert_allclose(m0, full.astype(np.float64).mean(1), rtol=0, atol=1e-5)
        np.testing.assert_allclose(e1, e0, rtol=0, atol=1e-5)
        assert np.all(np.diff(v1, axis=1) <= 0)  # rows in value-descending order
    # the exact diagonal is in the kept values: every row's own column, with the teacher's value
    c, v = got["ff"][0], got["ff"][1]
    diag, rows = heads["ff"]["diag"], np.arange(53)
    own = c == rows[:, None]
    np.testing.assert_array_equal(v[own], diag[np.nonzero(own)[0]])
    assert own.any(axis=1)[diag > np.sort(_dense_raw(heads["ff"]), axis=1)[:, -16]].all()


def test_torch_dense_tiles_equal_numpy(tmp_path):
    heads = _factor_heads("dot")
    a = EstimateWorker(heads, str(tmp_path), engine="numpy").predict_raw("ff", 3, 40, 7, 53)
    b = EstimateWorker(heads, str(tmp_path), engine="torch").predict_raw("ff", 3, 40, 7, 53)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_bf16_within_tolerance_of_fp32(tmp_path):
    # rank 64, 300 items: bf16 factors (fp32 output), the kept entries re-scored in fp32
    heads = _factor_heads("dot", m=300, n=40, f=64, seed=2)
    kw = {"topk": 16, "col_chunk": 64}
    ref = _run_stripes(heads, tmp_path / "fp32", stripe=128, engine="numpy", **kw)
    got = _run_stripes(heads, tmp_path / "bf16", stripe=128, precision="bf16", **kw)  # auto: the torch engine
    for kernel in ("ff", "ft"):
        (c0, v0, m0, e0), (c1, v1, m1, e1) = ref[kernel], got[kernel]
        tol = 1e-2 * (e0[1] - e0[0])  # 1% of the kernel's value range
        np.testing.assert_allclose(v1, v0, rtol=0, atol=tol)
        np.testing.assert_allclose(m1, m0, rtol=0, atol=tol)
        np.testing.assert_allclose(e1, e0, rtol=0, atol=tol)
        overlap = np.mean([len(np.intersect1d(a, b)) / len(a) for a, b in zip(c0, c1, strict=True)])
        assert overlap > 0.95, overlap
        # kept values are exact fp32 scores of their columns (re-scored), the diagonal the teacher's
        full = _dense_raw(heads[kernel])
        np.testing.assert_allclose(v1, np.take_along_axis(full, c1, 1), rtol=0, atol=1e-6 * (e0[1] - e0[0]))


def test_tf32_on_cpu_is_fp32_and_bad_engine_is_refused(tmp_path):
    heads = _factor_heads("dot")
    a = _run_stripes(heads, tmp_path / "a", topk=8, col_chunk=16, engine="torch")
    b = _run_stripes(heads, tmp_path / "b", topk=8, col_chunk=16, engine="torch", precision="tf32")
    for kernel in ("ff", "ft"):
        np.testing.assert_allclose(a[kernel][1], b[kernel][1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="numpy engine"):
        EstimateWorker(heads, str(tmp_path), engine="numpy", precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        EstimateWorker(heads, str(tmp_path), precision="fp16")
    assert EstimateWorker(heads, str(tmp_path)).engine == "numpy"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["estimate.precision=fp16"], "estimate.precision"),
        (["estimate.engine=jax"], "estimate.engine"),
        (["estimate.engine=numpy", "estimate.device=cuda"], "estimate.engine"),
        (["estimate.engine=numpy", "estimate.precision=bf16"], "estimate.engine"),
    ],
)
def test_estimate_precision_and_engine_are_validated(override, needle):
    from nncift.config import load_config
    from nncift.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config(None, override)
    cfg = load_config(None, ["estimate.precision=bf16", "estimate.engine=torch"])
    assert (cfg.estimate.precision, cfg.estimate.engine) == ("bf16", "torch")


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_extend_worker_merges_new_columns_on_either_engine(tmp_path, engine):
    from nncift.kernels.estimate_worker import ExtendWorker

    heads = _factor_heads("dot", m=40, n=11)
    ff = {**heads["ff"], "diag": heads["ff"]["diag"][:30]}  # 30 pool items, 10 new ones (their own estimate)
    base, out, fresh = tmp_path / "base", tmp_path / "out", tmp_path / "fresh"
    pool = {"ff": {**ff, "p": ff["p"][:30], "q": ff["q"][:30]}}
    b = EstimateWorker(pool, str(base), layout="sparse", topk=8, col_chunk=7)
    e = ExtendWorker({"ff": ff}, str(out), str(base), layout="sparse", topk=8, col_chunk=7, engine=engine)
    f = EstimateWorker({"ff": ff}, str(fresh), layout="sparse", topk=8, col_chunk=7)
    for i, r0 in enumerate(range(0, 30, 16)):
        b.run_block(Block("ff", i, r0, min(30, r0 + 16), 0, 30))
        e.run_block(Block("ff", i, r0, min(30, r0 + 16), 30, 40))
        f.run_block(Block("ff", i, r0, min(30, r0 + 16), 0, 40))
    full = _dense_raw({**ff, "p": ff["p"][:30]})
    _assert_same_topk(read_sparse(fresh, "ff", 30), read_sparse(out, "ff", 30), full, 1e-5)
    np.testing.assert_allclose(read_row_means(out, "ff", 30), read_row_means(fresh, "ff", 30), atol=1e-5)
    np.testing.assert_allclose(sparse_extent(out, "ff"), sparse_extent(fresh, "ff"), atol=1e-5)


@pytest.mark.parametrize(("lo", "hi", "ties"), [(-1.0, 3.0, False), (3.0, -1.0, False), (-1.0, 3.0, True)])
def test_torch_grouped_topk_wide_chunks(tmp_path, lo, hi, ties):
    # 1200 columns in one chunk: the two-step (column group) top-k, a partial last group; a negative scale
    # (chunks in raw units); integer factors with many tied values (any tied column may be kept)
    heads = _factor_heads("dot", m=1200, n=1200, f=8, seed=4)
    for h in heads.values():
        h["lo"], h["hi"] = lo, hi
        if ties:
            h["p"], h["q"] = np.round(h["p"]), np.round(h["q"])
    ref = _run_stripes(heads, tmp_path / "np", stripe=400, topk=8, engine="numpy")
    got = _run_stripes(heads, tmp_path / "torch", stripe=400, topk=8, engine="torch")
    for kernel in ("ff", "ft"):
        full = _dense_raw(heads[kernel])
        (c0, v0, m0, e0), (c1, v1, m1, e1) = ref[kernel], got[kernel]
        np.testing.assert_allclose(v1, v0, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.take_along_axis(full, c1, 1), v1)  # each kept column holds its value
        assert all(len(set(r)) == len(r) for r in c1)
        if not ties:
            _assert_same_topk((c0, v0), (c1, v1), full, 1e-5)
        np.testing.assert_allclose(m1, m0, rtol=0, atol=1e-5)
        np.testing.assert_allclose(e1, e0, rtol=0, atol=1e-5)
