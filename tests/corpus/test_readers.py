import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nncift.config import DataConfig
from nncift.corpus.readers import embedded_sharegpt_path, read_corpus, recover_json_list, split_pool_target
from nncift.errors import DataError
from tests.conftest import make_rows, write_jsonl


def test_jsonl_alpaca_fields(tmp_path):
    rows = [{"instruction": "add", "input": "2 and 3", "output": "5"}, {"instruction": "hi", "output": "hello"}]
    t = read_corpus(write_jsonl(tmp_path / "a.jsonl", rows), DataConfig())
    assert t.column("prompt").to_pylist() == ["add 2 and 3", "hi"]
    assert t.column("response").to_pylist() == ["5", "hello"]
    assert len(set(t.column("id").to_pylist())) == 2  # content-hash ids


def test_json_list_parquet_and_hf_agree(tmp_path):
    rows = make_rows(12)
    ref = read_corpus(write_jsonl(tmp_path / "a.jsonl", rows), DataConfig())
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    for path in ("a.json", "a.parquet", "hf"):
        assert read_corpus(tmp_path / path, DataConfig()).equals(ref), path


def test_prompt_response_fields_and_custom_mapping(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"q": "why", "a": "because", "key": 7}])
    t = read_corpus(p, DataConfig(prompt_field="q", response_field="a", id_field="key"))
    assert t.to_pylist() == [{"id": "7", "prompt": "why", "response": "because"}]


def _sharegpt(i, human="hi", gpt="hello"):
    return {
        "id": f"s{i}",
        "conversations": [{"from": "human", "value": f"{human} {i}"}, {"from": "gpt", "value": f"{gpt} {i}"}],
    }


def test_sharegpt_truncated_file_recovers_complete_records(tmp_path):
    recs = [_sharegpt(i) for i in range(5)] + [{"id": "bad", "conversations": [{"from": "gpt", "value": "x"}]}]
    text = json.dumps(recs, indent=2)
    cut = text[: text.rindex('"from": "gpt"') + 5]  # cut inside the last record
    p = tmp_path / "sg.json"
    p.write_text(cut)
    records, truncated = recover_json_list(p)
    assert truncated and len(records) == 5
    t = read_corpus(p, DataConfig(format="sharegpt"))
    assert t.column("id").to_pylist() == [f"s{i}" for i in range(5)]
    assert t.column("prompt").to_pylist()[0] == "hi 0"


def test_sharegpt_skips_conversations_without_first_turn(tmp_path):
    recs = [
        _sharegpt(0),
        {"id": "x", "conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "y"}]},
        _sharegpt(2),
    ]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(recs))
    assert read_corpus(p, DataConfig()).column("id").to_pylist() == ["s0", "s2"]


@pytest.mark.slow
def test_embedded_sharegpt_package():
    t = read_corpus(None, DataConfig())
    assert t.num_rows > 10_000
    assert embedded_sharegpt_path().name.endswith(".json")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', r"bad\.jsonl:2: malformed JSON"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"bad\.jsonl:2: missing field 'output'"),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "", "output": "d"}\n',
            r"bad\.jsonl:2: field 'instruction' is empty",
        ),
        (
            '{"id": 1, "instruction": "a", "output": "b"}\n{"id": 1, "instruction": "c", "output": "d"}\n',
            r"bad\.jsonl:2: duplicate id '1' \(first seen at .*bad\.jsonl:1\)",
        ),
        ("", r"bad\.jsonl: the file is empty"),
        ("\n\n", r"bad\.jsonl: the file holds no records"),
        ('{"foo": 1}\n', r"bad\.jsonl:1: cannot find prompt/response fields"),
        ("[1, 2]\n", r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=needle):
        read_corpus(p, DataConfig())


def test_bad_json_list_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3 \(record 1\): missing field 'output'"):
        read_corpus(p, DataConfig())
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": 1}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        read_corpus(p, DataConfig())


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_corpus(tmp_path / "nope.jsonl", DataConfig())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"set data\.format"):
        read_corpus(tmp_path / "x.csv", DataConfig())


def test_seeded_split_is_disjoint_and_reproducible(tmp_path):
    t = read_corpus(write_jsonl(tmp_path / "a.jsonl", make_rows(50)), DataConfig())
    cfg = DataConfig(pool_size=30, target_size=10)
    f1, t1 = split_pool_target(t, None, cfg, seed=3)
    f2, t2 = split_pool_target(t, None, cfg, seed=3)
    f3, _ = split_pool_target(t, None, cfg, seed=4)
    assert f1.equals(f2) and t1.equals(t2) and not f1.equals(f3)
    assert (f1.num_rows, t1.num_rows) == (30, 10)
    assert not set(f1.column("id").to_pylist()) & set(t1.column("id").to_pylist())


def test_two_inputs_are_subsampled(tmp_path):
    a = read_corpus(write_jsonl(tmp_path / "a.jsonl", make_rows(40)), DataConfig())
    b = read_corpus(write_jsonl(tmp_path / "b.jsonl", make_rows(20, seed=1)), DataConfig())
    f, t = split_pool_target(a, b, DataConfig(pool_size=25, target_size=None), seed=0)
    assert f.num_rows == 25 and t.num_rows == 20


def test_cli_bad_input_exits_cleanly_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nncift.cli",
            "run",
            "--input",
            str(bad),
            "--run-dir",
            str(run_dir),
            "--set",
            "ray.executor=local",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad.jsonl:2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_unclosed_json_list_is_reported(tmp_path):
    p = tmp_path / "cut.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "out')
    with pytest.raises(DataError, match=r"cut\.json:3: the JSON list is not closed"):
        read_corpus(p, DataConfig(format="json"))


def test_test_split_is_held_out_and_pool_size_comes_first(tmp_path):
    from nncift.corpus.readers import split_data

    t = read_corpus(write_jsonl(tmp_path / "a.jsonl", make_rows(80)), DataConfig())
    f, g, x = split_data(t, None, None, DataConfig(pool_size=30, target_size=10, test_size=15), seed=1)
    ids = [set(tab.column("id").to_pylist()) for tab in (f, g, x)]
    assert [len(s) for s in ids] == [30, 10, 15]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    f0, _ = split_pool_target(t, None, DataConfig(pool_size=30, target_size=10, test_size=0), seed=1)
    assert f0.equals(f)  # carving a test split does not change D_F when pool_size fits
    f2, _, x2 = split_data(t, None, None, DataConfig(pool_size=60, target_size=10, test_size=15), seed=1)
    assert (f2.num_rows, x2.num_rows) == (60, 10)  # only the rows beyond the pool are held out
    f3, _, x3 = split_data(t, None, None, DataConfig(pool_size=None, target_size=10, test_size=15), seed=1)
    assert (f3.num_rows, x3.num_rows) == (55, 15)
    a = read_corpus(write_jsonl(tmp_path / "b.jsonl", make_rows(20, seed=1)), DataConfig())
    _, g4, x4 = split_data(t, a, None, DataConfig(pool_size=30, target_size=12, test_size=5), seed=0)
    assert x4.num_rows == 5 and not set(x4.column("id").to_pylist()) & set(g4.column("id").to_pylist())


def _with_vectors(n: int, dim: int = 6, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = make_rows(n, seed=seed)
    for r in rows:
        r["vec"] = rng.normal(size=dim).round(4).tolist()
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_precomputed_embedding_column_is_kept(tmp_path, fmt):
    import numpy as np

    rows = _with_vectors(12)
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "c.jsonl", rows)
    else:
        path = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    t = read_corpus(path, DataConfig(embedding_field="vec"))
    assert t.column_names == ["id", "prompt", "response", "embedding"]
    got = np.asarray(t.column("embedding").to_pylist(), np.float32)
    want = np.asarray([r["vec"] for r in rows], np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("vec"), r"c\.jsonl:4: field 'vec' \(embedding\) is missing"),
        (lambda r: r.update(vec=[1.0, 2.0]), r"c\.jsonl:4: field 'vec' has 2 dimensions, the first record 6"),
        (lambda r: r.update(vec=[1.0, "x", 0, 0, 0, 0]), r"c\.jsonl:4: field 'vec' holds a value that is not a number"),
        (
            lambda r: r.update(vec=[1.0, None, 0, 0, 0, 0]),
            r"c\.jsonl:4: field 'vec' holds a non-finite value",
        ),
        (lambda r: r.update(vec=[0.0] * 6), r"c\.jsonl:4: field 'vec' is the zero vector"),
    ],
)
def test_bad_embedding_fields_name_the_line(tmp_path, edit, message):
    rows = _with_vectors(6)
    edit(rows[3])
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=message):
        read_corpus(path, DataConfig(embedding_field="vec"))


def test_non_finite_embedding_is_refused(tmp_path):
    rows = _with_vectors(6)
    path = tmp_path / "c.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows).replace(str(rows[2]["vec"][1]), "NaN", 1)
    path.write_text(text)
    with pytest.raises(DataError, match=r"c\.jsonl:3: field 'vec' holds a non-finite value"):
        read_corpus(path, DataConfig(embedding_field="vec"))
