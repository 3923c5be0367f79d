import numpy as np
import pytest

from nncift.labels.plan import block_grid, plan_labels, sample_fraction


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


def test_spread_design_coverage_seeds_and_no_leakage():
    plan = plan_labels(300, 60, 0.5, 8, 100, seed=4, design="spread", partners=7, diagonal=True)
    again = plan_labels(300, 60, 0.5, 8, 100, seed=4, design="spread", partners=7, diagonal=True)
    other = plan_labels(300, 60, 0.5, 8, 100, seed=5, design="spread", partners=7, diagonal=True)
    assert all(
        np.array_equal(a.rows, b.rows) and np.array_equal(a.cols, b.cols)
        for a, b in zip(plan.sets, again.sets, strict=True)
    )
    assert not np.array_equal(plan.pool_labeled, other.pool_labeled)
    pool_l, targ_l = set(plan.pool_labeled.tolist()), set(plan.target_labeled.tolist())
    assert len(pool_l) == 150 and len(targ_l) == 30
    q1 = [s for s in plan.sets if s.quadrant == "q1"]
    for kernel, col_l in (("ff", pool_l), ("ft", targ_l)):
        sets = [s for s in q1 if s.kernel == kernel]
        # every labeled pool item is the example of exactly one rectangle (K_FF: columns, K_FT: rows)
        examples = np.concatenate([s.cols if kernel == "ff" else s.rows for s in sets])
        assert sorted(examples.tolist()) == sorted(pool_l)
        assert sum(s.num_pairs for s in sets) == 150 * 7
        for s in sets:  # held-out items never appear in a training pair
            assert set(s.rows.tolist()) <= pool_l and set(s.cols.tolist()) <= col_l
            assert len(s.rows) <= 7 and len(s.cols) <= 7
            if kernel == "ff":
                assert not set(s.rows.tolist()) & set(s.cols.tolist())  # no self pair
    # the spread design touches many more items than a block of the same cost would (sqrt(1050) ~ 32)
    rows_ff = np.unique(np.concatenate([s.rows for s in q1 if s.kernel == "ff"]))
    assert len(rows_ff) > 100
    diag = [s for s in plan.sets if s.quadrant == "diag"]
    assert len(diag) == 1 and diag[0].paired and diag[0].num_pairs == 300
    assert np.array_equal(diag[0].rows, np.arange(300)) and np.array_equal(diag[0].cols, np.arange(300))
    assert plan.diag_pairs == 300 and plan.train_pairs == 2 * 150 * 7
    # Q2-Q4 rectangles stay disjoint from the labeled items exactly as in the block design
    for s in plan.sets:
        if s.quadrant in ("q2", "q4"):
            assert not set(s.rows.tolist()) & pool_l


def test_unknown_design_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown label design 'grid'"):
        plan_labels(10, 5, 0.5, 2, 0, seed=0, design="grid")


def test_label_blocks_cover_every_planned_pair_exactly_once():
    from collections import Counter

    from nncift.labels.label_worker import plan_blocks

    plan = plan_labels(90, 30, 0.6, 4, 64, seed=0, design="spread", partners=5, diagonal=True)
    plan.sets.append(plan_labels(90, 30, 0.2, 4, 0, seed=1).sets[0])  # plus one large dense rectangle
    specs = plan_blocks(plan, 12)
    seen = Counter()
    for spec in specs:
        for set_id in range(spec["set_id"], spec["set_end"]):
            s = plan.sets[set_id]
            if spec["set_end"] > spec["set_id"] + 1:
                assert s.num_pairs <= 144 and not s.paired
                pairs = [(r, c) for r in s.rows for c in s.cols]
            elif s.paired:
                pairs = list(zip(s.rows[spec["r0"] : spec["r1"]], s.cols[spec["r0"] : spec["r1"]], strict=True))
            else:
                pairs = [(r, c) for r in s.rows[spec["r0"] : spec["r1"]] for c in s.cols[spec["c0"] : spec["c1"]]]
            seen.update((set_id, int(r), int(c)) for r, c in pairs)
    expected = Counter()
    for set_id, s in enumerate(plan.sets):
        if s.paired:
            expected.update((set_id, int(r), int(c)) for r, c in zip(s.rows, s.cols, strict=True))
        else:
            expected.update((set_id, int(r), int(c)) for r in s.rows for c in s.cols)
    assert seen == expected
    packed = [s for s in specs if s["set_end"] > s["set_id"] + 1]
    assert packed and all(sum(plan.sets[i].num_pairs for i in range(s["set_id"], s["set_end"])) <= 144 for s in packed)
    assert len({plan.sets[i].kernel for s in packed for i in range(s["set_id"], s["set_end"])}) == 2


@pytest.mark.parametrize("design", ["spread", "block"])
def test_label_budget_caps_every_teacher_pair_and_keeps_the_evaluation_sets(design):
    from nncift.labels.plan import cap_plan

    plan = plan_labels(300, 80, 0.5, 20, 400, seed=3, design=design, partners=10, diagonal=True)
    fixed = sum(s.num_pairs for s in plan.sets if s.quadrant != "q1")
    budget = fixed + plan.train_pairs // 3
    capped = cap_plan(plan, budget, seed=3)
    total = sum(s.num_pairs for s in capped.sets)
    assert total <= budget and capped.train_pairs >= 0.8 * plan.train_pairs // 3  # the budget is used
    assert {s.kernel for s in capped.sets if s.quadrant == "q1"} == {"ff", "ft"}  # neither kernel starved
    kept = [(s.kernel, s.quadrant, tuple(s.rows), tuple(s.cols)) for s in capped.sets if s.quadrant != "q1"]
    assert kept == [(s.kernel, s.quadrant, tuple(s.rows), tuple(s.cols)) for s in plan.sets if s.quadrant != "q1"]
    labeled = set(plan.pool_labeled.tolist())  # training rows stay among the labeled items (Q2-Q4 honest)
    assert all(set(s.rows.tolist()) <= labeled for s in capped.sets if s.quadrant == "q1")
    assert cap_plan(plan, None, 3) is plan and cap_plan(plan, 10**9, 3) is plan
    with pytest.raises(ValueError, match="leaves no training pairs"):
        cap_plan(plan, fixed, seed=3)


def test_label_budget_of_a_pointwise_plan():
    from nncift.labels.plan import cap_plan, plan_items

    plan = plan_items(500, 0.5, 10, 40, seed=0)
    capped = cap_plan(plan, 100, seed=0)
    assert sum(s.num_pairs for s in capped.sets) == 100 and capped.train_pairs == 60
