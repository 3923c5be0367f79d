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
                 "diag_pairs": 120, "full_seconds_at_run_rate": 5000.0}  # 18,000 pairs at 900 / 250 s  # fmt: skip
    md = "\n".join(_versus_markdown(_rep({"pairs": 18000, "seconds": 6000.0, "function": "delift_icl"})))
    assert "| **this run** (NN-CIFT: labels + choice) | **900** (5.0%) | **250** (4.2%) | **+0.910** |" in md
    assert "| zero-label embedding cosine (free) | 0 | 0 | -0.160 |" in md
    assert "| exact diagonal + constant off-diagonal | 120 | – | +0.500 |" in md
    lines = versus_lines(_rep({"pairs": 18000, "seconds": 6000.0, "function": "delift_icl"}))
    assert lines[0] == (
        "NN-CIFT vs full delift_icl: 900 of 18,000 teacher pairs (5.0%), 250 s of 6,000 s recorded for the full "
        "table (4.2%; 5,000 s at this run's own teacher rate)"
    )
    assert "| full delift_icl at this run's own teacher rate (3.6 pairs/s) | 18,000 | 5,000 | +1.000 |" in md
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


def test_a_run_with_a_costed_truth_table_ends_its_console_with_the_comparison(tmp_path, corpus, tiny_overrides, capsys):
    """End to end: a teacher that is not the embedding cosine (a table), its full kernel as the truth table with
    a recorded cost; ``nncift run`` prints the report path, then the comparison, last."""
    import pyarrow.parquet as pq

    from nncift.cli import main

    over = [f"data.input={corpus}", *tiny_overrides, "ray.executor=local", "label.eval_pairs=0"]
    args = [a for o in over for a in ("--set", o)]
    assert main(["data", "-q", "--run-dir", str(tmp_path / "ids"), *args]) == 0
    ids = {
        s: pq.read_table(tmp_path / "ids" / "data" / f"{s}.parquet").column("id").to_pylist()
        for s in ("pool", "target")
    }
    m, n = len(ids["pool"]), len(ids["target"])
    rng = np.random.default_rng(0)
    ex = [e for e in ids["pool"] for _ in range(m + n)]
    tg = [t for _ in ids["pool"] for t in ids["pool"] + ids["target"]]
    labels = pa.table({"kernel": ["ft"] * len(ex), "row_id": ex, "col_id": tg,
                       "value": rng.normal(size=len(ex)).astype(np.float32)})  # fmt: skip
    table = tmp_path / "full.parquet"
    write_table_file(table, labels, {"function": "table", "M": m, "N": n, "label_seconds": 1000.0})
    capsys.readouterr()
    run = ["run", "-q", "--run-dir", str(tmp_path / "run"), *args, "--set", "label.function=table",
           "--set", f"table.path={table}", "--set", f"fidelity.truth_table={table}"]  # fmt: skip
    assert main(run) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3].startswith("report: ")
    assert out[-2].startswith("NN-CIFT vs full table: ") and f"of {m * (m + n):,} teacher pairs" in out[-2]
    assert out[-1].startswith("gap closed ") and "zero-label cosine" in out[-1]
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert md.rstrip().splitlines()[-1].startswith("| exact diagonal + constant off-diagonal |")
