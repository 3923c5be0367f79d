"""The label plan a run draws: ``label.probes=auto`` (and ``choose.teacher_features=auto``) follow the teacher
whose values the run reads."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nncift.config import load_config
from nncift.runner import Runner
from tests.conftest import make_rows, write_jsonl


@pytest.mark.parametrize(
    ("function", "provenance", "probes", "want"),
    [
        ("delift_se", None, "auto", 0),  # a text-similarity teacher: nothing to probe
        ("table", None, "auto", 0),  # values of unknown nature
        ("table", "delift_icl", "auto", 4),  # a table of DELIFT ICL values: DELIFT ICL's probes
        ("table", "delift_icl", "0", 0),  # an explicit count wins
        ("delift_se", None, "2", 2),
    ],
)
def test_probes_auto_follow_the_teacher_the_values_come_from(tmp_path, function, provenance, probes, want):
    from nncift.labels.fanout import label_plan, label_probes
    from nncift.surrogate.recipes import teacher_lm

    runner = _runner(tmp_path, function, {"function": provenance, "teacher_config": {}} if provenance else None,
                     [f"label.probes={probes}"])  # fmt: skip
    assert label_probes(runner.ctx) == want
    plan = label_plan(runner.ctx)
    probe_sets = [s for s in plan.sets if s.quadrant == "probe"]
    assert len(probe_sets) == want and plan.probe_pairs == want * (24 - 1)
    # the teacher-LM features follow the same source: on for DELIFT ICL values (the embedded LM), off otherwise
    assert (teacher_lm(runner.ctx) is not None) == (provenance == "delift_icl")


def test_a_tables_lm_missing_here_turns_auto_features_off_and_refuses_explicit_ones(tmp_path, caplog):
    from nncift.errors import ConfigError
    from nncift.surrogate.recipes import teacher_lm

    prov = {"function": "delift_icl", "teacher_config": {"model": str(tmp_path / "not_here")}}
    assert teacher_lm(_runner(tmp_path / "a", "table", prov, []).ctx) is None
    assert "not on this machine" in caplog.text
    with pytest.raises(ConfigError, match=r"choose\.teacher_features.*not_here"):
        teacher_lm(_runner(tmp_path / "b", "table", prov, ["choose.teacher_features=lm"]).ctx)
    lm_dir = tmp_path / "lm_here"
    lm_dir.mkdir()
    prov["teacher_config"]["model"] = str(lm_dir)
    assert teacher_lm(_runner(tmp_path / "c", "table", prov, []).ctx) == str(lm_dir)


def _runner(tmp_path, function: str, provenance: dict | None, extra: list[str]) -> Runner:
    """An embedded run on 24 pool + 6 target generated items whose teacher is ``function`` (a table: of ones, with
    ``provenance`` beside it)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = make_rows(30, seed=1)
    emb = np.random.default_rng(0).normal(size=(30, 4))
    for i, r in enumerate(rows):
        r["emb"] = emb[i].tolist()
    pool = write_jsonl(tmp_path / "pool.jsonl", rows[:24])
    target = write_jsonl(tmp_path / "target.jsonl", rows[24:])
    ids = [r["id"] for r in rows]
    table = tmp_path / "teacher.parquet"
    pq.write_table(pa.table({"example_id": [a for a in ids for _ in ids], "target_id": ids * len(ids),
                             "value": np.ones(len(ids) ** 2, np.float32)}), table)  # fmt: skip
    if provenance:
        table.with_suffix(".json").write_text(json.dumps(provenance))
    over = [f"data.input={pool}", f"data.target={target}", "data.test_size=0", "data.embedding_field=emb",
            "embed.source=column", f"label.function={function}", f"table.path={table}", "label.fraction=0.5",
            "ray.executor=local", *extra]  # fmt: skip
    runner = Runner(load_config(None, over), tmp_path / "run")
    runner.run("embed")
    return runner
