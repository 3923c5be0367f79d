import numpy as np

from nncift.pairs import block_grid, plan_labels, sample_fraction


def test_sample_fraction_floor_and_cap():
    rng = np.random.default_rng(0)
    assert len(sample_fraction(1000, 0.05, 32, rng)) == 50
    assert len(sample_fraction(100, 0.05, 32, rng)) == 32
    assert len(sample_fraction(10, 0.05, 32, rng)) == 9  # one item always left unlabeled
    assert len(sample_fraction(10, 1.0, 2, rng)) == 10  # full labeling
    idx = sample_fraction(500, 0.1, 2, rng)
    assert np.all(np.diff(idx) > 0)


def test_plan_quadrants_are_disjoint_and_seeded():
    plan = plan_labels(200, 80, 0.1, 8, 100, seed=1)
    again = plan_labels(200, 80, 0.1, 8, 100, seed=1)
    assert np.array_equal(plan.pool_labeled, again.pool_labeled)
    pool_l, targ_l = set(plan.pool_labeled), set(plan.target_labeled)
    assert len(pool_l) == 20 and len(targ_l) == 8
    for s in plan.sets:
        col_l = pool_l if s.kernel == "ff" else targ_l
        rows_in, cols_in = set(s.rows) <= pool_l, set(s.cols) <= col_l
        rows_out, cols_out = not set(s.rows) & pool_l, not set(s.cols) & col_l
        expect = {
            "q1": (rows_in, cols_in),
            "q2": (rows_out, cols_in),
            "q3": (rows_in, cols_out),
            "q4": (rows_out, cols_out),
        }[s.quadrant]
        assert all(expect), (s.kernel, s.quadrant)
    assert {(s.kernel, s.quadrant) for s in plan.sets} == {
        (k, q) for k in ("ff", "ft") for q in ("q1", "q2", "q3", "q4")
    }
    assert plan.train_pairs == 20 * 20 + 20 * 8


def test_block_grid_covers_exactly_once():
    blocks = block_grid("ft", 23, 17, 5)
    cover = np.zeros((23, 17), int)
    for b in blocks:
        cover[b.r0 : b.r1, b.c0 : b.c1] += 1
    assert (cover == 1).all()
    assert len({b.name for b in blocks}) == len(blocks)
