import json

import pyarrow as pa
import pytest

from nncift.errors import ProvenanceError
from nncift.store import RunDir, atomic_path, read_parquet_metadata, write_json, write_parquet


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "x.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list((tmp_path / "a").iterdir()) == []


def test_atomic_replace_and_parquet_metadata(tmp_path):
    write_json(tmp_path / "x.json", {"a": 1})
    write_json(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    write_parquet(tmp_path / "t.parquet", pa.table({"x": [1, 2]}), metadata={"block": {"r0": 3}})
    assert read_parquet_metadata(tmp_path / "t.parquet")["block"] == {"r0": 3}


def test_begin_finish_skip_refuse_overwrite(tmp_path):
    rd = RunDir(tmp_path / "run", order=("data", "embed", "label"))
    assert rd.begin("data", "fp1", {"x": 1})
    rd.finish("data", "fp1", {"x": 1}, seconds=1.0)
    assert rd.begin("label", "fpL", {})
    rd.finish("label", "fpL", {})
    assert not rd.begin("data", "fp1", {"x": 1})  # same config: skip
    with pytest.raises(ProvenanceError, match="different configuration"):
        rd.begin("data", "fp2", {"x": 2})
    assert rd.begin("data", "fp2", {"x": 2}, overwrite=True)
    assert not rd.is_done("data") and not rd.is_done("label")  # later stages invalidated too


def test_unfinished_stage_with_other_config_is_reset(tmp_path):
    rd = RunDir(tmp_path)
    rd.begin("label", "a", {})
    (rd.stage_dir("label") / "blocks").mkdir()
    (rd.stage_dir("label") / "blocks" / "000000.parquet").write_text("stale")
    rd.begin("label", "b", {})
    assert not (rd.stage_dir("label") / "blocks").exists()
