"""Candidate search (estimate.candidates=ivf): the MIPS reduction, the index, and candidate stripes."""

import numpy as np
import pytest

from nncift.kernels.estimate_worker import EstimateWorker
from nncift.kernels.kernel_io import read_row_means, read_sparse, read_sparse_rows, sparse_extent
from nncift.labels.plan import block_grid
from nncift.surrogate import mips


def _dot_heads(m=300, n=40, k=9, seed=0, diag=True, diag_at=1e3):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(m, k)).astype(np.float32)
    heads = {
        "ff": {"type": "dot", "p": e * rng.uniform(0.5, 2.0, size=(m, 1)).astype(np.float32), "q": e.copy()},
        "ft": {"type": "dot", "p": e, "q": rng.normal(size=(n, k)).astype(np.float32)},
    }
    for kern, h in heads.items():
        h.update(
            lo=-2.0,
            hi=3.0,
            diag=rng.uniform(diag_at, 2 * diag_at, m).astype(np.float32) if diag and kern == "ff" else None,
        )
    return heads


def test_augmentation_turns_inner_products_into_distances():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(5, 7)), rng.normal(size=(50, 7)) * rng.uniform(0.1, 3, (50, 1))
    d2 = ((mips.augment_queries(p)[:, None, :] - mips.augment_columns(q)[None]) ** 2).sum(-1)
    by_ip = np.argsort(-(p @ q.T), axis=1, kind="stable")
    by_l2 = np.argsort(d2, axis=1, kind="stable")
    # the same order wherever inner products are not near-tied
    gaps = np.diff(-np.sort(-(p @ q.T), axis=1), axis=1)
    assert np.abs(gaps).min() > 1e-4
    np.testing.assert_array_equal(by_ip, by_l2)


def test_full_probe_search_is_exact_mips():
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(500, 8)).astype(np.float32)
    index = mips.build_index(q, nlist=10, seed=0)
    found = mips.search(index, p, 5, nprobe=10)
    exact = np.argsort(-(p @ q.T), axis=1)[:, :5]
    assert mips.topk_recall(found, exact) == 1.0
    assert mips.topk_recall(mips.search(index, p, 5, nprobe=1), exact) < 1.0  # one cell misses some


def _run(heads, tmp_path, candidates, nprobe, extent_sample, topk=6):
    m = len(heads["ff"]["p"])
    idx = {}
    if candidates:
        for k in heads:
            idx[k] = str(tmp_path / f"index_{k}.faiss")
            mips.save_index(mips.build_index(heads[k]["q"], nlist=8, seed=0), idx[k])
    out = tmp_path / ("cand" if candidates else "exh")
    out.mkdir()
    w = EstimateWorker(heads, str(out), layout="sparse", topk=topk, col_chunk=64, candidates=idx, nprobe=nprobe,
                       extent_sample=extent_sample)  # fmt: skip
    for b in block_grid("ff", m, m, 64, col_size=m) + block_grid("ft", m, len(heads["ft"]["q"]), 64, 100, 40):
        w.run_block(b)
    return out


@pytest.mark.parametrize("diag_at", [1e3, 4.0])  # a dominant diagonal, and one that often misses the top-k
def test_candidate_stripes_equal_exhaustive_ones_when_every_cell_is_probed(tmp_path, diag_at):
    heads = _dot_heads(diag_at=diag_at)
    exh = _run(heads, tmp_path, False, 1, 1)
    cand = _run(heads, tmp_path, True, nprobe=8, extent_sample=10_000)
    m = len(heads["ff"]["p"])
    for kern in ("ff", "ft"):
        ce, ve = read_sparse(exh, kern, m)
        cc, vc = read_sparse(cand, kern, m)
        np.testing.assert_allclose(vc, ve, rtol=1e-5, atol=1e-5)  # values in rank order: tie-order free
        same_set = [set(a) == set(b) for a, b in zip(ce, cc, strict=True)]
        assert np.mean(same_set) > 0.95  # sets differ only where the k-th value is tied
        np.testing.assert_allclose(read_row_means(cand, kern, m), read_row_means(exh, kern, m), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sparse_extent(cand, kern), sparse_extent(exh, kern), rtol=1e-5, atol=1e-5)
    if diag_at < 100:
        return
    # the exact teacher diagonal competes for every K_FF row (it is the largest value here)
    cc, vc = read_sparse(cand, "ff", m)
    np.testing.assert_array_equal(cc[:, 0], np.arange(m))
    np.testing.assert_allclose(vc[:, 0], heads["ff"]["diag"])


def test_partial_probe_keeps_exact_values_of_what_it_finds(tmp_path):
    heads = _dot_heads(diag=False)
    cand = _run(heads, tmp_path, True, nprobe=1, extent_sample=50)
    m = len(heads["ff"]["p"])
    cols, vals = read_sparse(cand, "ff", m)
    h = heads["ff"]
    ok = cols >= 0
    exact = np.einsum("rf,rcf->rc", h["p"], h["q"][np.where(ok, cols, 0)]) * 5.0 - 2.0
    np.testing.assert_allclose(vals[ok], exact[ok], rtol=1e-5, atol=1e-5)
    w = EstimateWorker(heads, str(cand), layout="sparse", topk=6)
    rows = np.arange(0, m, 7)
    recall = mips.topk_recall(read_sparse_rows(cand, "ff", rows), w.exact_topk("ff", rows)[0])
    assert 0.0 < recall <= 1.0


def test_candidates_need_a_factorised_surrogate(tmp_path):
    heads = _dot_heads()
    heads["ff"]["type"] = "mlp"
    with pytest.raises(ValueError, match="factorised"):
        EstimateWorker(heads, str(tmp_path), layout="sparse", candidates={"ff": "x"})


def test_candidate_search_at_production_settings_reports_its_true_recall_and_extent(tmp_path, corpus, tiny_overrides):
    """The estimate stage with candidate search where it is approximate, as in production: nprobe < nlist (cells go
    unscanned, so rows miss some of their top-k) and extent_sample < columns (the extent comes from the kept
    values and a column sample). Checked against the exhaustive kernel computed here from the stage's factors:

    - recall: the recall the stage reports (kernels.json) is the share of the exhaustive top-k entries its
      stripes hold, on the same rows (its recall sample covers every row here); it lies between this share
      counted by column id and counted by value (a found column whose exhaustive value ties the k-th largest
      counts there), so that float rounding of near-ties cannot decide the test; and it is below 1 (the
      search really is approximate here);
    - extent: the select stage min-max scales the kept values by the reported extent, as the dense layout
      scales by the exhaustive one. Every value the stage counts is an estimate of some pair, so the reported
      extent lies within the exhaustive one (up to float32 rounding), every kept value lies within it (the
      scaled kept values are in [0, 1]), and it is tight: at most 1% of the kernel's values lie below its low
      end and at most 1% above its high end.
    """
    import json

    from nncift.config import load_config
    from nncift.runner import Runner
    from nncift.surrogate.recipes import estimator_heads

    nlist, nprobe, sample, topk = 8, 2, 4, 8
    over = [f"data.input={corpus}", *tiny_overrides, "ray.executor=local", "estimate.candidates=ivf",
            "estimate.candidates_min_cols=1", f"estimate.nlist={nlist}", f"estimate.nprobe={nprobe}",
            f"estimate.extent_sample={sample}", f"estimate.topk={topk}"]  # fmt: skip
    cfg = load_config(None, over)
    runner = Runner(cfg, tmp_path / "run")
    runner.run("estimate")
    blocks = tmp_path / "run" / "estimate" / "blocks"
    reported = json.loads((tmp_path / "run" / "estimate" / "kernels.json").read_text())["candidates"]
    m, n = runner.ctx.size()
    assert cfg.estimate.recall_sample >= m  # the stage's recall rows are every row
    heads = estimator_heads(runner.ctx)  # the stage's factors (p, q, lo, hi, exact diagonal)
    assert set(reported) == {"ff", "ft"}
    for kernel, h in heads.items():
        n_cols = m if kernel == "ff" else n
        assert nprobe < nlist and sample < n_cols and topk < n_cols  # production settings, not the exact corner
        exact = np.asarray(h["p"], np.float64) @ np.asarray(h["q"], np.float64).T * (h["hi"] - h["lo"]) + h["lo"]
        if h["diag"] is not None:
            exact[np.arange(m), np.arange(m)] = h["diag"]
        tol = 1e-5 * float(exact.max() - exact.min())
        cols, vals = read_sparse(blocks, kernel, m)
        # recall, computed here: by column id and by value
        truth = np.argsort(-exact, axis=1, kind="stable")[:, :topk]
        kth = np.take_along_axis(exact, truth[:, -1:], axis=1)
        by_id = (truth[:, :, None] == cols[:, None, :]).any(axis=2).sum() / truth.size
        found = np.where(cols >= 0, np.take_along_axis(exact, np.maximum(cols, 0), axis=1), -np.inf)
        by_value = min(1.0, float((found >= kth - tol).sum()) / truth.size)
        r = reported[kernel]["recall"]
        assert by_id - 1e-9 <= r <= by_value + 1e-9, (kernel, r, by_id, by_value)
        assert r < 1.0, (kernel, r)
        # extent
        lo, hi = sparse_extent(blocks, kernel)
        assert exact.min() - tol <= lo <= hi <= exact.max() + tol, (kernel, (lo, hi), (exact.min(), exact.max()))
        kept = vals[cols >= 0]
        assert kept.min() >= lo - tol and kept.max() <= hi + tol, (kernel, (lo, hi), (kept.min(), kept.max()))
        below, above = float((exact < lo - tol).mean()), float((exact > hi + tol).mean())
        assert below <= 0.01 and above <= 0.01, (kernel, (lo, hi), below, above)
