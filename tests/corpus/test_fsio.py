"""Inputs given as ``pyarrow.fs`` URIs (:mod:`nncift.corpus.fsio`): ``file://`` inputs give byte-identical data-stage
outputs to the same plain paths; a non-local (in-memory ``mock://``) filesystem is read through the filesystem
API only (listing, globbing, byte ranges, Parquet); bad URIs are one-line DataErrors. No network."""

from __future__ import annotations

import builtins
import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nncift.config import load_config
from nncift.corpus import fsio, ingest
from nncift.errors import DataError
from nncift.runner import Runner
from tests.conftest import make_rows, write_jsonl

SPLITS = ("pool", "target", "test")
SIZES = ["data.pool_size=60", "data.target_size=20", "data.test_size=15"]


def _cfg(*over: str):
    return load_config(None, ["ray.executor=local", *SIZES, *over])


def _outputs(cfg, run_dir) -> dict[str, bytes]:
    """The data stage's output files, as bytes."""
    Runner(cfg, run_dir).run_stage("data")
    return {s: (run_dir / "data" / f"{s}.parquet").read_bytes() for s in SPLITS}


def _rows(n: int, seed: int = 0) -> list[dict]:
    rows = make_rows(n, seed=seed)
    for r in rows:
        r.pop("id")
    return rows + [dict(r) for r in rows[3:9]]  # duplicates in later ranges


def _uri(path) -> str:
    return f"file://{path}"


@pytest.fixture
def mock_fs():
    """The in-memory filesystem behind ``mock:///`` URIs (pyarrow's ``_MockFileSystem``), fresh per test: the
    filesystem of a URI root is built once per process, so every later ``mock:///`` URI reaches this one."""
    fsio._root_filesystem.cache_clear()
    fs = fsio.resolve("mock:///")[0]
    assert fs.type_name == "mock"
    yield fs
    fsio._root_filesystem.cache_clear()


def _put(fs, path: str, data: bytes) -> None:
    if "/" in path:
        fs.create_dir(path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as out:
        out.write(data)


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet_bytes(rows: list[dict], row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ file:// == plain paths
def test_file_uri_jsonl_byte_ranges_target_and_test_identical(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", _rows(150))
    target = write_jsonl(tmp_path / "target.jsonl", _rows(40, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", _rows(30, seed=2))
    common = ["data.read_block_bytes=700", "data.target_size=25", "data.partitions=3"]
    plain = _cfg(f"data.input={pool}", f"data.target={target}", f"data.test={test}", *common)
    uri = _cfg(f"data.input={_uri(pool)}", f"data.target={_uri(target)}", f"data.test={_uri(test)}", *common)
    files = ingest.expand_inputs(uri.data)
    assert [f.path for f in files] == [_uri(pool), _uri(target), _uri(test)]
    plain_files = ingest.expand_inputs(plain.data)
    assert [(f.fmt, f.size, f.mtime_ns) for f in files] == [(f.fmt, f.size, f.mtime_ns) for f in plain_files]
    specs = ingest.plan_reads(files, 700)
    assert specs == ingest.plan_reads(plain_files, 700)
    assert sum(s["file"] == 0 for s in specs) > 10  # the pool is cut into many byte ranges
    assert _outputs(uri, tmp_path / "uri") == _outputs(plain, tmp_path / "plain")


def test_file_uri_parquet_identical(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(_parquet_bytes(_rows(130), row_group_size=17))
    common = ["data.read_block_bytes=1500"]
    plain, uri = _cfg(f"data.input={path}", *common), _cfg(f"data.input={_uri(path)}", *common)
    assert len(ingest.plan_reads(ingest.expand_inputs(uri.data), 1500)) > 2  # row-group runs
    assert _outputs(uri, tmp_path / "uri") == _outputs(plain, tmp_path / "plain")


def test_file_uri_prefix_and_glob_identical(tmp_path):
    rows = _rows(150)
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    (shards / ".hidden").mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(len(rows)), 3)):
        write_jsonl(shards / ("sub" if i == 2 else "") / f"part-{i}.jsonl", [rows[j] for j in chunk])
    write_jsonl(shards / ".hidden" / "part-9.jsonl", _rows(5, seed=9))  # skipped, as by the local reader
    (shards / "notes.txt").write_text("not a shard")
    want = _outputs(_cfg(f"data.input={shards}", "data.read_block_bytes=900"), tmp_path / "plain")
    for i, spec in enumerate([_uri(shards), _uri(shards) + "/", _uri(shards) + "/**/part-*.jsonl"]):
        cfg = _cfg(f"data.input={spec}", "data.read_block_bytes=900")
        got = [f.path for f in ingest.expand_inputs(cfg.data)]
        assert got == [_uri(shards / "part-0.jsonl"), _uri(shards / "part-1.jsonl"), _uri(shards / "sub/part-2.jsonl")]
        assert _outputs(cfg, tmp_path / f"uri{i}") == want, spec
    one_level = _cfg(f"data.input={_uri(shards)}/part-*.jsonl")  # * stays inside one path component
    assert [f.path for f in ingest.expand_inputs(one_level.data)] == [_uri(shards / f"part-{i}.jsonl") for i in (0, 1)]


def test_file_uri_percent_decoded_and_named_back(tmp_path):
    d = tmp_path / "my data"
    d.mkdir()
    write_jsonl(d / "a b.jsonl", _rows(5))
    files = [e.spec for e in fsio.list_files(_uri(tmp_path).replace(" ", "%20") + "/my%20data")]
    assert files == [_uri(d / "a b.jsonl").replace(" ", "%20")]
    assert fsio.resolve(files[0])[1] == str(d / "a b.jsonl")
    assert fsio.read_bytes(files[0]) == (d / "a b.jsonl").read_bytes()


# ------------------------------------------------------------------------------------ a non-local filesystem
def test_mock_filesystem_goes_through_the_filesystem_api(mock_fs, monkeypatch):
    rows = _rows(40)
    _put(mock_fs, "bucket/c/a.jsonl", _jsonl_bytes(rows))
    _put(mock_fs, "bucket/c/deep/b.parquet", _parquet_bytes(rows, row_group_size=7))
    _put(mock_fs, "bucket/c/.tmp/x.jsonl", b"{}\n")

    def no_open(*args, **kwargs):
        raise AssertionError(f"open() called: {args}")

    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(io, "open", no_open)
    assert [e.spec for e in fsio.list_files("mock:///bucket/c")] == [
        "mock:///bucket/c/.tmp/x.jsonl",
        "mock:///bucket/c/a.jsonl",
        "mock:///bucket/c/deep/b.parquet",
    ]
    assert [e.spec for e in fsio.glob("mock:///bucket/c/*.jsonl")] == ["mock:///bucket/c/a.jsonl"]
    assert [e.spec for e in fsio.glob("mock:///bucket/**/*.parquet")] == ["mock:///bucket/c/deep/b.parquet"]
    assert [e.spec for e in fsio.glob("mock:///bucket/c/*/*")] == ["mock:///bucket/c/deep/b.parquet"]  # no hidden match
    assert [e.spec for e in fsio.glob("mock:///bucket/c/x*")] == []
    data = _jsonl_bytes(rows)
    assert fsio.stat("mock:///bucket/c/a.jsonl")[0] == len(data)
    assert fsio.read_bytes("mock:///bucket/c/a.jsonl", 100, 50) == data[100:150]
    listed = fsio.list_files("mock:///bucket/c")[1]
    assert (listed.size, listed.mtime_ns) == fsio.stat("mock:///bucket/c/a.jsonl") and listed.mtime_ns > 0
    cuts = ingest.line_cuts("mock:///bucket/c/a.jsonl", len(data), 300)
    assert len(cuts) > 5 and all(data[c - 1 : c] == b"\n" for c in cuts[1:-1])
    with fsio.parquet_file("mock:///bucket/c/deep/b.parquet") as pf:
        assert pf.metadata.num_row_groups == 7 and pf.read().to_pylist() == rows


def test_mock_filesystem_data_stage_equals_local(mock_fs, tmp_path):
    rows, target = _rows(120), _rows(40, seed=1)
    _put(mock_fs, "b/pool/part-0.jsonl", _jsonl_bytes(rows[:70]))
    _put(mock_fs, "b/pool/part-1.parquet", _parquet_bytes(rows[70:], row_group_size=9))
    _put(mock_fs, "b/target.jsonl", _jsonl_bytes(target))
    local = tmp_path / "pool"
    local.mkdir()
    write_jsonl(local / "part-0.jsonl", rows[:70])
    pq.write_table(pa.Table.from_pylist(rows[70:]), local / "part-1.parquet", row_group_size=9)
    write_jsonl(tmp_path / "target.jsonl", target)
    common = ["data.read_block_bytes=800", "data.target_size=25"]
    mock = _cfg("data.input=mock:///b/pool", "data.target=mock:///b/target.jsonl", *common)
    plain = _cfg(f"data.input={local}", f"data.target={tmp_path / 'target.jsonl'}", *common)
    assert len(ingest.plan_reads(ingest.expand_inputs(mock.data), 800)) > 5
    assert _outputs(mock, tmp_path / "mock") == _outputs(plain, tmp_path / "plain")


def test_mock_filesystem_malformed_line_names_the_uri(mock_fs, tmp_path):
    text = [json.dumps(r) for r in _rows(200)]
    text[136] = '{"instruction": "a", "output": }'
    _put(mock_fs, "b/c.jsonl", ("\n".join(text) + "\n").encode())
    cfg = _cfg("data.input=mock:///b/c.jsonl", "data.read_block_bytes=1000")
    with pytest.raises(DataError, match=r"^mock:///b/c\.jsonl:137: malformed JSON"):
        Runner(cfg, tmp_path / "run").run_stage("data")


# ------------------------------------------------------------------------------------ errors
def test_file_uri_malformed_line_in_a_later_range_names_uri_and_line(tmp_path):
    text = [json.dumps(r) for r in _rows(200)]
    text[136] = '{"instruction": "a", "output": }'
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(text) + "\n")
    cfg = _cfg(f"data.input={_uri(path)}", "data.read_block_bytes=1000")
    assert ingest.plan_reads(ingest.expand_inputs(cfg.data), 1000)[0]["stop"] < path.stat().st_size // 2
    with pytest.raises(DataError, match=rf"^file://{path}:137: malformed JSON"):
        Runner(cfg, tmp_path / "run").run_stage("data")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("spec", "regex"),
    [
        ("foo://x/c.jsonl", r"^foo://x/c\.jsonl: cannot open the filesystem of this URI \(.*Unrecognized filesystem"),
        ("file://{d}/shards/*.jsonl", r"^file://{d}/shards/\*\.jsonl: no such file or directory \(the pattern"),
        ("file://{d}/nope.jsonl", r"^file://{d}/nope\.jsonl: no such file or directory$"),
        ("file://{d}/empty", r"^file://{d}/empty: no \.jsonl, \.ndjson, \.parquet or \.json file under this prefix"),
        ("file://{d}/hf", r"^file://{d}/hf: not supported: HF dataset directories must be local; convert to Parquet"),
        ("file://{d}/c.txt", r"^file://{d}/c\.txt: cannot infer the format from the suffix '\.txt'"),
        ("file://{d}/z.jsonl", r"^file://{d}/z\.jsonl: the file is empty$"),
    ],
    ids=["unknown-scheme", "no-match", "missing", "no-shard", "hf-dir", "unknown-suffix", "empty"],
)
def test_bad_uris_are_one_line_data_errors(tmp_path, spec, regex):
    (tmp_path / "shards").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text("{}")
    (tmp_path / "c.txt").write_text("x")
    (tmp_path / "z.jsonl").write_bytes(b"")
    d = str(tmp_path)
    cfg = _cfg(f"data.input={spec.replace('{d}', d)}")
    with pytest.raises(DataError) as err:
        ingest.expand_inputs(cfg.data)
    assert "\n" not in str(err.value)
    assert re.search(regex.replace("{d}", re.escape(d)), str(err.value)), str(err.value)


def test_hf_format_with_a_uri_is_refused(tmp_path):
    cfg = _cfg(f"data.input={_uri(tmp_path)}", "data.format=hf")
    with pytest.raises(DataError, match="HF dataset directories must be local"):
        ingest.expand_inputs(cfg.data)


def test_resolve_plain_paths_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = fsio.resolve("rel/c.jsonl")
    assert fs.type_name == "local" and path == str(tmp_path / "rel" / "c.jsonl")
    assert not fsio.is_uri("/abs/c.jsonl") and not fsio.is_uri(tmp_path) and fsio.is_uri("s3://b/k")
    assert fsio.suffix("s3://b/d/x.JSONL") == ".jsonl" and fsio.suffix("s3://b/d/.x") == ""
