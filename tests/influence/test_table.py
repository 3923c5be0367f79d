"""The table teacher: lookup, export round trip, and clear errors on bad tables."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nncift.errors import DataError
from nncift.influence import DeliftSE, Items, build_influence_function
from nncift.influence.table import TableFunction, labels_to_table


def _items(n, prefix, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, 5)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return Items([f"p{i}" for i in range(n)], [f"r{i}" for i in range(n)], e, [f"{prefix}{i}" for i in range(n)])


def _full_table(path, pool, target):
    """Every U(example -> target) of the SE teacher, examples from the pool, targets from pool and target."""
    se = DeliftSE()
    ex, tg, val = [], [], []
    for targets in (pool, target):
        u = se.utility(pool, targets)
        ex += np.repeat(pool.ids, len(targets)).tolist()
        tg += np.tile(targets.ids, len(pool)).tolist()
        val += u.reshape(-1).tolist()
    pq.write_table(pa.table({"example_id": ex, "target_id": tg, "value": np.asarray(val, np.float32)}), path)
    return path


def test_table_reproduces_the_teacher_in_both_kernels(tmp_path):
    pool, target = _items(7, "a"), _items(4, "b", seed=1)
    path = _full_table(tmp_path / "t.parquet", pool, target)
    fn = build_influence_function("table", path=str(path))
    se = DeliftSE()
    for kernel, cols in (("ff", pool), ("ft", target)):
        np.testing.assert_allclose(fn.kernel_block(kernel, pool, cols), se.kernel_block(kernel, pool, cols), rtol=1e-6)
    rows, cols = pool.take([0, 3, 5]), pool.take([3, 3, 1])
    np.testing.assert_allclose(fn.kernel_pairs("ff", rows, cols), se.kernel_pairs("ff", rows, cols), rtol=1e-6)


def test_export_of_labels_round_trips_with_orientation(tmp_path):
    # K_FF[i, j] = U(j -> i): a ff label (row a0, col a1) is example a1 -> target a0
    labels = pa.table(
        {
            "kernel": ["ff", "ft", "ff", "ff"],
            "quadrant": ["q1", "q1", "q1", "diag"],
            "row_id": ["a0", "a0", "a1", "a1"],
            "col_id": ["a1", "b0", "a1", "a1"],
            "row": [0, 0, 1, 1],
            "col": [1, 0, 1, 1],
            "value": np.array([0.5, 0.25, 0.9, 0.9], np.float32),
        }
    )
    t = labels_to_table(labels)
    assert t.num_rows == 3  # the self pair labeled twice is kept once
    pq.write_table(t, tmp_path / "t.parquet")
    fn = TableFunction(tmp_path / "t.parquet")
    assert fn.lookup(["a1", "a0", "a1"], ["a0", "b0", "a1"]).tolist() == [0.5, 0.25, pytest.approx(0.9)]


def test_missing_pair_names_the_ids(tmp_path):
    pool, target = _items(3, "a"), _items(2, "b")
    path = _full_table(tmp_path / "t.parquet", pool, target)
    fn = TableFunction(path)
    stranger = Items(["x"], ["y"], np.zeros((1, 5), np.float32), ["zz"])
    with pytest.raises(DataError, match=r"no value for 3 of 3 pairs needed, e.g. example_id='zz' -> target_id='a0'"):
        fn.kernel_block("ff", pool, stranger)
    assert fn.covers(["a0"], ["b1"]) and not fn.covers(["b1"], ["a0"])


@pytest.mark.parametrize(
    "table,match",
    [
        ({"example_id": ["a"], "target_id": ["b"]}, "has no column 'value'"),
        ({"example_id": ["a", "a"], "target_id": ["b", "b"], "value": [1.0, 2.0]}, "row 1: duplicate pair"),
        ({"example_id": ["a"], "target_id": ["b"], "value": [float("nan")]}, "row 0: value is nan"),
        ({"example_id": ["a", None], "target_id": ["b", "c"], "value": [1.0, 2.0]}, "1 null ids"),
    ],
)
def test_bad_tables_are_refused(tmp_path, table, match):
    pq.write_table(pa.table(table), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=match):
        TableFunction(tmp_path / "t.parquet")


def test_not_parquet_and_missing_file(tmp_path):
    (tmp_path / "t.parquet").write_text("hello")
    with pytest.raises(DataError, match="not a Parquet file"):
        TableFunction(tmp_path / "t.parquet")
    with pytest.raises(DataError, match="file not found"):
        TableFunction(tmp_path / "nope.parquet")


def test_a_table_answers_the_function_its_provenance_names(tmp_path):
    """``auto`` settings follow the values' nature: a table of DELIFT ICL values is DELIFT ICL (probes, teacher-LM
    features); a table without provenance, or naming no registered function, is a table."""
    import json

    from nncift.config import load_config

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"example_id": ["a"], "target_id": ["b"], "value": [1.0]}), path)
    section = load_config(None, [f"table.path={path}"]).table
    assert TableFunction.source(section) == ("table", {"path": str(path), "symmetric": False})
    path.with_suffix(".json").write_text(json.dumps({"function": "delift_icl", "teacher_config": {"model": "/m"}}))
    assert TableFunction.source(section) == ("delift_icl", {"model": "/m"})
    path.with_suffix(".json").write_text(json.dumps({"function": "no_such_teacher"}))
    assert TableFunction.source(section)[0] == "table"
