"""The report's closing comparison with the full teacher, and the table provenance it reads."""

import json

import numpy as np
import pyarrow as pa

from nncift.influence.table import table_provenance, write_table_file
from nncift.reporting import _versus_markdown, versus
from nncift.stages.report import truth_cost, versus_lines


def _rep(truth_cost: dict | None = None, diag: float | None = 0.5) -> dict:
    cands = {"diag_const": {"gap_closed": diag}} if diag is not None else {}
    return {
        "label": {"function": "delift_icl", "diag_pairs": 120},
        "teacher_cost": {"unit": "pairs", "selection": 900, "seconds": 250.0},
        "fidelity": {
            "measured": True,
            "gap_closed": 0.91,
            "zero_label": {"gap_closed": -0.16},
            "candidates": cands,
            "truth_cost": truth_cost,
        },
    }


def test_versus_reads_the_runs_cost_and_the_free_baselines():
    v = versus(_rep({"pairs": 18000, "seconds": 6000.0, "function": "delift_icl"}))
    assert v == {"function": "delift_icl", "full_pairs": 18000, "full_seconds": 6000.0, "run_pairs": 900,
                 "run_seconds": 250.0, "gap_closed": 0.91, "zero_label": -0.16, "diag_const": 0.5,
                 "diag_pairs": 120}  # fmt: skip
    md = "\n".join(_versus_markdown(_rep({"pairs": 18000, "seconds": 6000.0, "function": "delift_icl"})))
    assert "| **this run** (NN-CIFT: labels + choice) | **900** (5.0%) | **250** (4.2%) | **+0.910** |" in md
    assert "| zero-label embedding cosine (free) | 0 | 0 | -0.160 |" in md
    assert "| exact diagonal + constant off-diagonal | 120 | – | +0.500 |" in md
    lines = versus_lines(_rep({"pairs": 18000, "seconds": 6000.0, "function": "delift_icl"}))
    assert lines[0] == "NN-CIFT vs full delift_icl: 900 of 18,000 teacher pairs (5.0%), 250 s of 6,000 s (4.2%)"
    assert "zero-label cosine -0.160 (0 pairs), exact diagonal + constant +0.500 (120 pairs)" in lines[1]


def test_no_comparison_without_the_full_teachers_cost_or_a_diagonal():
    assert versus(_rep(None)) is None and versus_lines(_rep(None)) == [] and _versus_markdown(_rep(None)) == []
    v = versus(_rep({"pairs": 10, "seconds": 1.0}, diag=None))
    assert v["diag_const"] is None and v["function"] == "delift_icl"  # the run's teacher names it


def test_table_provenance_from_the_parquet_metadata_or_the_json_beside(tmp_path):
    labels = pa.table({"kernel": ["ff", "ft"], "row_id": ["a", "a"], "col_id": ["b", "t"],
                       "value": np.array([1.0, 2.0], np.float32)})  # fmt: skip
    out = tmp_path / "t.parquet"
    assert write_table_file(out, labels, {"function": "x", "M": 2, "N": 1, "label_seconds": 3.5}) == 2
    assert table_provenance(out)["label_seconds"] == 3.5 and table_provenance(out)["pairs"] == 2
    assert truth_cost(str(out), 2, 1) == {"pairs": 2, "seconds": 3.5, "function": "x", "model": None}
    assert truth_cost(str(out), 3, 1) is None  # computed on other items: its cost says nothing of this run
    plain = tmp_path / "plain.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"example_id": ["b"], "target_id": ["a"], "value": [1.0]}), plain)
    assert table_provenance(plain) is None
    (tmp_path / "plain.json").write_text(json.dumps({"pairs": 1, "M": 1, "N": 0, "label_seconds": 2.0}))
    assert table_provenance(plain)["label_seconds"] == 2.0
