"""Selection-fidelity metrics against hand-computed cases."""

import numpy as np
import pytest

from nncift.selection import fidelity as fid
from nncift.surrogate.metrics import topk_recall


def _clustered(m=120, k=6, seed=0):
    """A kernel with k well-separated clusters (block structure plus small noise), rows = columns."""
    rng = np.random.default_rng(seed)
    lab = np.arange(m) % k
    kern = np.where(lab[:, None] == lab[None, :], 0.9, 0.1) + rng.uniform(0, 0.05, (m, m))
    return kern.astype(np.float32)


def test_hand_computed_fl_values_and_gap():
    # rows are items to cover, columns candidates; K scaled to [0, 1] already (min 0, max 1)
    k = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.5, 0.5, 1.0]], np.float32)
    res = fid.selection_fidelity(k, None, {"a": np.array([2]), "b": np.array([0])}, budget=1, random_count=30)
    # greedy picks column 2 (coverage 0.5 + 0.5 + 1 = 2.0) over 0 or 1 (1 + 0 + 0.5 = 1.5)
    assert res["exact"] == [2]
    assert res["f_exact"] == pytest.approx(2.0)
    assert res["subsets"]["a"]["gap_closed"] == pytest.approx(1.0)
    assert res["subsets"]["a"]["jaccard"] == 1.0 and res["subsets"]["b"]["jaccard"] == 0.0
    # 30 random singletons: f is 1.5 or 2.0; gap of b = (1.5 - mean) / (2.0 - mean) < 0
    mean = res["f_random_mean"]
    assert 1.5 <= mean <= 2.0
    assert res["subsets"]["b"]["gap_closed"] == pytest.approx((1.5 - mean) / (2.0 - mean))


def test_exact_kernel_closes_the_whole_gap_and_a_random_kernel_about_none():
    true = _clustered(m=200, k=20)
    exact = fid.select(true, None, 20, "fl")
    noise = np.random.default_rng(5).uniform(size=true.shape).astype(np.float32)
    res = fid.selection_fidelity(
        true, None, {"exact": exact, "noise": fid.select(noise, None, 20, "fl")}, 20, random_count=20
    )
    assert res["subsets"]["exact"]["gap_closed"] == pytest.approx(1.0)
    # one item per cluster covers everything: the exact subset is far above random, a noise kernel is not
    assert res["f_exact"] > res["f_random_mean"] + 3 * res["f_random_sd"]
    assert abs(res["subsets"]["noise"]["gap_closed"]) < 0.5


@pytest.mark.parametrize("objective", ["flmi", "flcg", "topk"])
def test_other_objectives_use_their_own_values(objective):
    true = _clustered(m=60)
    ft = np.random.default_rng(1).uniform(size=(60, 7)).astype(np.float32)
    exact = fid.select(true, ft, 9, objective)
    res = fid.selection_fidelity(true, ft, {"exact": exact}, 9, objective=objective)
    assert res["objective"] == objective and res["subsets"]["exact"]["gap_closed"] == pytest.approx(1.0)
    if objective == "topk":  # f = sum of the chosen rows' mean scaled score; top-k is its exact maximiser
        s = (ft - ft.min()) / (ft.max() - ft.min())
        assert res["f_exact"] == pytest.approx(np.sort(s.mean(1))[-9:].sum(), rel=1e-5)


def test_gap_closed_guard_and_helpers():
    assert fid.gap_closed(1.0, 2.0, 2.0) is None  # exact no better than random: undefined
    assert fid.gap_closed(1.5, 2.0, 1.0) == pytest.approx(0.5)
    assert fid.jaccard(np.array([1, 2, 3]), np.array([3, 4])) == pytest.approx(0.25)
    subs = fid.random_subsets(50, 10, 4, seed=3)
    assert all(len(set(s)) == 10 and s.max() < 50 for s in subs)
    assert all(np.array_equal(a, b) for a, b in zip(subs, fid.random_subsets(50, 10, 4, seed=3), strict=True))


def test_cosine_and_teacher_kernels_orientation():
    from nncift.influence import DeliftSE, Items

    rng = np.random.default_rng(0)
    e = rng.normal(size=(9, 4)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    pool, target = Items(["p"] * 6, ["r"] * 6, e[:6]), Items(["p"] * 3, ["r"] * 3, e[6:])
    ff, ft = fid.teacher_kernels(DeliftSE(), pool, target, block=4)
    cff, cft = fid.cosine_kernels(e[:6], e[6:])
    np.testing.assert_allclose(ff, cff, rtol=1e-6)
    np.testing.assert_allclose(ft, cft, rtol=1e-6)


def test_topk_recall_hand_case():
    # 2 rows x 4 columns; k = 2
    rows = np.repeat([0, 1], 4)
    cols = np.tile([10, 11, 12, 13], 2)
    true = np.array([4, 3, 2, 1, 1, 2, 3, 4], float)
    pred = np.array([4, 1, 3, 2, 1, 2, 3, 4], float)  # row 0: top {10, 12} vs {10, 11}; row 1 exact
    assert topk_recall(pred, true, rows, cols, k=2) == pytest.approx((0.5 + 1.0) / 2)
    assert topk_recall(pred, true, rows, cols, k=4) is None  # no row has more than k columns
    scattered = topk_recall(pred, true, np.arange(8), np.arange(8), k=1)
    assert scattered is None


def test_quadrant_baselines_are_scored_against_the_truth():
    from nncift.surrogate.metrics import quadrant_report

    true = np.array([0.0, 0.5, 1.0, 0.5])
    pred = np.array([0.1, 0.4, 0.9, 0.6])
    rep = quadrant_report(pred, true, train_mean=0.25, seed=0)
    assert rep["pairs"] == 4
    assert rep["network"]["mse"] == pytest.approx(0.01) and rep["network"]["mae"] == pytest.approx(0.1)
    # predict-the-training-mean and predict-0 against the labels (the reference code scored them against
    # the predictions and shifted the zero line by -0.1)
    assert rep["baseline_mean"]["mse"] == pytest.approx(np.mean((0.25 - true) ** 2))
    assert rep["baseline_zero"]["mse"] == pytest.approx(np.mean(true**2)) == pytest.approx(0.375)
    u = np.random.default_rng([0, 3]).random(4)
    assert rep["baseline_uniform"]["mse"] == pytest.approx(np.mean((u - true) ** 2))
    assert rep["baseline_mean"]["spearman"] != rep["baseline_mean"]["spearman"]  # constant prediction: NaN


# ------------------------------------------------------------------------------------------ hand-computed, asymmetric
# K_FF[i, j]: how well candidate j covers item i (asymmetric; already min-max scaled: min 0, max 1)
K_FF = np.array([[1.0, 0.2, 0.0, 0.6], [0.0, 1.0, 0.9, 0.1], [0.3, 0.0, 1.0, 0.0], [0.8, 0.4, 0.0, 0.5]], np.float32)
K_FT = np.array([[0.5, 0.1], [0.2, 0.3], [1.0, 0.0], [0.0, 0.4]], np.float32)  # row caps c = (0.5, 0.3, 1.0, 0.4)
# f of every 2-subset, by hand (rows' best coverage; FLMI capped at c; FLCG above c)
HAND = {
    "fl": {(0, 1): 3.1, (0, 2): 3.7, (0, 3): 2.2, (1, 2): 2.6, (1, 3): 2.1, (2, 3): 3.0},
    "flmi": {(0, 1): 1.5, (0, 2): 2.2, (0, 3): 1.3, (1, 2): 1.9, (1, 3): 1.2, (2, 3): 2.2},
    "flcg": {(0, 1): 1.6, (0, 2): 1.5, (0, 3): 0.9, (1, 2): 0.7, (1, 3): 0.9, (2, 3): 0.8},
}
# the greedy's picks on the truth, by hand: FL 0 (column sum 2.1) then 2 (gain 1.6); FLMI 2 then 0 (tie with 3,
# lowest index); FLCG 0 (gain 0.9 over the floor c) then 1 (0.7)
HAND_EXACT = {"fl": (0, 2), "flmi": (0, 2), "flcg": (0, 1)}


@pytest.mark.parametrize("objective", ["fl", "flmi", "flcg"])
def test_hand_computed_asymmetric_kernel_values_random_mean_and_gap(objective):
    est = np.array([1, 3])  # a non-exact subset
    res = fid.selection_fidelity(K_FF, K_FT, {"est": est}, budget=2, objective=objective, random_count=12, seed=4)
    hand = HAND[objective]
    assert tuple(sorted(res["exact"])) == HAND_EXACT[objective]
    assert res["f_exact"] == pytest.approx(hand[HAND_EXACT[objective]], abs=1e-6)
    assert res["subsets"]["est"]["f"] == pytest.approx(hand[(1, 3)], abs=1e-6)
    draws = [tuple(sorted(int(x) for x in r)) for r in fid.random_subsets(4, 2, 12, 4)]
    vals = [hand[d] for d in draws]
    assert len(set(vals)) > 1  # the mean differs from the best or worst draw
    assert res["f_random_mean"] == pytest.approx(np.mean(vals), abs=1e-6)
    assert res["f_random_sd"] == pytest.approx(np.std(vals, ddof=1), abs=1e-6)
    want = (hand[(1, 3)] - np.mean(vals)) / (hand[HAND_EXACT[objective]] - np.mean(vals))
    assert res["subsets"]["est"]["gap_closed"] == pytest.approx(want, abs=1e-6)
    # the orientation matters: the transposed kernel gives other values
    flipped = fid.selection_fidelity(K_FF.T.copy(), K_FT, {"est": est}, 2, objective, random_count=12, seed=4)
    assert flipped["subsets"]["est"]["f"] != pytest.approx(res["subsets"]["est"]["f"], abs=1e-3)


def test_teacher_kernels_orientation_on_an_asymmetric_teacher(tmp_path):
    """K_FF[i, j] = U(pool j -> pool i) and K_FT[i, j] = U(pool i -> target j), read from a table teacher."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nncift.influence import Items, build_influence_function

    ids = [f"p{i}" for i in range(3)] + ["t0", "t1"]
    u = {(e, t): 10 * ids.index(e) + ids.index(t) for e in ids for t in ids}  # U(e -> t), asymmetric
    pq.write_table(pa.table({"example_id": [e for e, _ in u], "target_id": [t for _, t in u],
                             "value": [float(v) for v in u.values()]}), tmp_path / "t.parquet")  # fmt: skip
    fn = build_influence_function("table", path=str(tmp_path / "t.parquet"))
    z = np.zeros((5, 2), np.float32)
    pool = Items(["a"] * 3, ["b"] * 3, z[:3], ids[:3])
    target = Items(["a"] * 2, ["b"] * 2, z[3:], ids[3:])
    ff, ft = fid.teacher_kernels(fn, pool, target, block=2)
    for i in range(3):
        for j in range(3):
            assert ff[i, j] == u[(ids[j], ids[i])]
        for j in range(2):
            assert ft[i, j] == u[(ids[i], ids[3 + j])]
