"""The bad-input catalogue (docs/bad_inputs.md): every case gives one line naming the file / line / field or
key, exit status 2, no traceback, and nothing half-written.

Each case is (id, files to create, extra CLI arguments, stage to run, expected message regex, what must not be
left behind). ``{d}`` in arguments and messages is the case's folder; ``{run}`` its run directory.
"""

from __future__ import annotations

import contextlib
import json
import re

import numpy as np
import pytest

GOOD = [{"id": f"r{i}", "prompt": f"explain python sort {i}", "response": f"answer list {i}"} for i in range(60)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet_bytes(rows) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def table_bytes(ex, tg, val) -> bytes:
    return parquet_bytes([{"example_id": a, "target_id": b, "value": v} for a, b, v in zip(ex, tg, val, strict=True)])


# (id, files, args, stage, regex); files: name -> bytes; args may use {d} (case folder)
CATALOGUE = [
    # ------------------------------------------------------------------ data files
    ("missing-input", {}, ["--input", "{d}/nope.jsonl"], "data", r"{d}/nope.jsonl: no such file or directory"),
    ("empty-file", {"c.jsonl": b""}, ["--input", "{d}/c.jsonl"], "data", r"c.jsonl: the file is empty"),
    ("binary-file", {"c.jsonl": bytes(range(256)) * 4}, ["--input", "{d}/c.jsonl"], "data",
     r"c.jsonl: a binary file"),
    ("latin1-line", {"c.jsonl": jsonl(GOOD[:3]) + b'{"prompt": "caf\xe9", "response": "x"}\n'},
     ["--input", "{d}/c.jsonl"], "data", r"c.jsonl:4: not UTF-8 text \(byte 0xe9"),
    ("malformed-json-line", {"c.jsonl": jsonl(GOOD[:5]) + b'{"prompt": "a", "response": }\n'},
     ["--input", "{d}/c.jsonl"], "data", r"c.jsonl:6: malformed JSON"),
    ("huge-garbage-line", {"c.jsonl": b"{" + b"x" * 10_000_000 + b"\n"}, ["--input", "{d}/c.jsonl"], "data",
     r"c.jsonl:1: malformed JSON"),
    ("json-not-closed", {"c.json": b'[\n{"prompt": "a", "response": "b"},\n{"prompt": "c"'},
     ["--input", "{d}/c.json"], "data", r"c.json:3: the JSON list is not closed"),
    ("json-scalar", {"c.json": b"42"}, ["--input", "{d}/c.json"], "data", r"c.json:1: expected a JSON list"),
    ("missing-response", {"c.jsonl": jsonl([*GOOD[:3], {"prompt": "only a prompt"}])}, ["--input", "{d}/c.jsonl"],
     "data", r"c.jsonl:4: .*response"),
    ("empty-prompt", {"c.jsonl": jsonl([*GOOD[:3], {"prompt": "  ", "response": "x"}])}, ["--input", "{d}/c.jsonl"],
     "data", r"c.jsonl:4: .*prompt"),
    ("number-as-text", {"c.jsonl": jsonl([*GOOD[:3], {"prompt": 7, "response": "x"}])}, ["--input", "{d}/c.jsonl"],
     "data", r"c.jsonl:4: .*prompt"),
    ("duplicate-id", {"c.jsonl": jsonl([*GOOD[:3], {**GOOD[5], "id": "r1"}])}, ["--input", "{d}/c.jsonl"], "data",
     r"c.jsonl.*duplicate id 'r1'"),
    ("corrupt-parquet", {"c.parquet": b"PAR1 not really"}, ["--input", "{d}/c.parquet"], "data",
     r"c.parquet: not a readable Parquet file"),
    ("parquet-missing-field", {"c.parquet": parquet_bytes([{"prompt": f"a{i}", "reply": "b"} for i in range(50)])},
     ["--input", "{d}/c.parquet"], "data", r"c.parquet record 0: .*response"),
    ("target-shares-pool-ids", {"c.jsonl": jsonl(GOOD), "t.jsonl": jsonl(GOOD[:5])},
     ["--input", "{d}/c.jsonl", "--target", "{d}/t.jsonl"], "data", r"t.jsonl: 5 target rows share their id with the pool, e.g. id 'r0'"),
    ("empty-target", {"c.jsonl": jsonl(GOOD), "t.jsonl": b"\n\n"}, ["--input", "{d}/c.jsonl", "--target",
     "{d}/t.jsonl"], "data", r"t.jsonl: the file holds no records"),
    ("not-a-dataset-dir", {"ds/readme.txt": b"hello"}, ["--input", "{d}/ds"], "data", r"ds: .*not .*dataset"),
    ("format-mismatch", {"c.jsonl": jsonl(GOOD)}, ["--input", "{d}/c.jsonl", "--set", "data.format=parquet"],
     "data", r"c.jsonl: not a readable Parquet file"),
    ("glob-no-match", {}, ["--input", "{d}/shards/*.jsonl"], "data", r"shards/\*.jsonl: no such file or directory"),
    ("duplicate-id-across-shards", {"s/a.jsonl": jsonl(GOOD[:30]), "s/b.jsonl": jsonl([{**GOOD[40], "id": "r7"}])},
     ["--input", "{d}/s"], "data", r"s/b.jsonl:1: duplicate id 'r7' \(first seen at .*s/a.jsonl:8\)"),
    ("shard-embedding-dims", {"s/a.jsonl": jsonl([{**g, "v": [1, 2]} for g in GOOD[:30]]),
     "s/b.jsonl": jsonl([{**g, "v": [1, 2, 3]} for g in GOOD[30:]])}, ["--input", "{d}/s", "--set",
     "data.embedding_field=v"], "data", r"s/b.jsonl:1: field 'v' has 3 dimensions, the first record 2"),
    ("uri-unknown-scheme", {}, ["--input", "foo://bucket/c.jsonl"], "data",
     r"foo://bucket/c.jsonl: cannot open the filesystem of this URI \(Unrecognized filesystem type"),
    ("uri-no-match", {"shards/a.txt": b"x"}, ["--input", "file://{d}/shards/*.jsonl"], "data",
     r"file://{d}/shards/\*.jsonl: no such file or directory \(the pattern matches no file\)"),
    ("uri-prefix-without-shards", {"shards/a.txt": b"x"}, ["--input", "file://{d}/shards"], "data",
     r"file://{d}/shards: no .jsonl, .ndjson, .parquet or .json file under this prefix"),
    ("uri-hf-dir", {"ds/dataset_dict.json": b"{}"}, ["--input", "file://{d}/ds"], "data",
     r"file://{d}/ds: not supported: HF dataset directories must be local; convert to Parquet"),
    # ------------------------------------------------------------------ configuration
    ("unknown-key", {}, ["--set", "fit.widht=3"], "data", r"unknown config field 'fit.widht'"),
    ("max-pairs-too-small", {}, ["--set", "label.max_pairs=10"], "label",
     r"config field 'label\.max_pairs': label\.max_pairs=10 leaves no training pairs"),
    ("max-pairs-active", {}, ["--set", "label.max_pairs=1000", "--set", "label.design=active"], "data",
     r"'label\.max_pairs': is not supported with label\.design=active"),
    ("candidates-dense", {}, ["--set", "estimate.candidates=ivf", "--set", "estimate.layout=dense"], "data",
     r"'estimate\.candidates': ivf keeps each row's top-k: needs estimate\.layout=sparse"),
    ("candidates-mlp", {}, ["--set", "estimate.candidates=ivf", "--set", "fit.kind=mlp"], "data",
     r"'estimate\.candidates': ivf needs a factorised surrogate \(fit\.kind=bilinear\)"),
    ("choose-unknown-mode", {}, ["--set", "choose.mode=magic"], "data", r"config field 'choose\.mode': got 'magic'"),
    ("choose-mode-not-applicable", {}, ["--set", "choose.mode=diag_lexical", "--set", "choose.views=none"], "choose",
     r"'choose\.mode': 'diag_lexical' does not apply to this run: it needs choose\.views=lexical"),
    ("moved-key", {}, ["--set", "label.model=x"], "data", r"config field 'label.model' is now 'delift_icl.model'"),
    ("teacher-section-value", {}, ["--set", "delift_icl.mode=fast"], "data", r"config field 'delift_icl.mode': got 'fast'"),
    ("mistyped-value", {}, ["--set", "fit.rank=big"], "data", r"config field 'fit.rank' expects int"),
    ("out-of-range", {}, ["--set", "label.fraction=2"], "data", r"config field 'label.fraction': must be in"),
    ("budget-zero", {}, ["--set", "select.fraction=0"], "data", r"config field 'select.fraction'"),
    ("unknown-kind", {}, ["--set", "fit.kind=tree"], "data", r"config field 'fit.kind': got 'tree'"),
    ("table-without-path", {}, ["--set", "label.function=table"], "data", r"config field 'table.path'"),
    ("bad-yaml", {"c.yaml": b"label:\n  fraction: [1,\n"}, ["--config", "{d}/c.yaml"], "data", r"c.yaml:\d+: invalid YAML"),
    ("config-not-found", {}, ["--config", "{d}/none.yaml"], "data", r"config file not found: {d}/none.yaml"),
    ("section-not-mapping", {"c.yaml": b"fidelity: 3\n"}, ["--config", "{d}/c.yaml"], "data",
     r"config section 'fidelity' must be a mapping"),
    ("set-without-equals", {}, ["--set", "label.fraction"], "data", r"--set expects key=value"),
    # ------------------------------------------------------------------ models
    ("embed-model-missing", {}, ["--set", "embed.model={d}/no_model"], "embed", r"config field 'embed.model'"),
    ("embed-model-no-tokenizer", {"m/config.json": b"{}"}, ["--set", "embed.model={d}/m"], "embed",
     r"embed.model.*{d}/m"),
    ("icl-model-missing", {}, ["--set", "label.function=delift_icl", "--set", "delift_icl.model={d}/no_lm"], "label",
     r"config field 'delift_icl.model'"),
    ("icl-model-no-tokenizer", {"lm/config.json": b"{}"},
     ["--set", "label.function=delift_icl", "--set", "delift_icl.model={d}/lm"], "label", r"delift_icl.model.*{d}/lm"),
    # ------------------------------------------------------------------ teacher labels
    ("table-missing-pair", {"t.parquet": table_bytes(["x"], ["y"], [0.5])},
     ["--set", "label.function=table", "--set", "table.path={d}/t.parquet"], "label", r"t.parquet has no value for"),
    ("table-nan", {"t.parquet": table_bytes(["x"], ["y"], [float("nan")])},
     ["--set", "label.function=table", "--set", "table.path={d}/t.parquet"], "label", r"t.parquet row 0: value is nan"),
    ("table-not-parquet", {"t.parquet": b"nope"},
     ["--set", "label.function=table", "--set", "table.path={d}/t.parquet"], "label", r"t.parquet is not a Parquet"),
    ("truth-table-missing", {}, ["--set", "fidelity.truth_table={d}/none.parquet"], "report",
     r"fidelity.truth_table: file not found"),
    # ------------------------------------------------------------------ scoring new data (more in test_score.py)
    ("score-not-estimated", {"n.jsonl": jsonl(GOOD[:3])}, ["--input", "{d}/n.jsonl"], "score",
     r"run has no finished estimate stage; run `nncift estimate"),
]  # fmt: skip


def _materialise(case_dir, files):
    for name, data in files.items():
        p = case_dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


# Every case runs on both executors. On Ray, the stages before the failing one run on Ray Data / Ray Train too,
# from a fresh run directory: 3 s (a data case) to 55 s (a report case) per case on 2 cores, about 6 minutes for
# the catalogue, so that run is marked slow. The default selection runs one case per failing stage on Ray, the
# earlier stages of the run directory finished beforehand with the local executor (``ray.executor`` is a runtime
# field: they are skipped), so that only the failing stage runs on Ray.
RAY_PER_STAGE = {
    "data": "malformed-json-line",  # an error a Ray Data read worker returns
    "embed": "embed-model-missing",
    "label": "table-nan",  # the table checked in the driver (it used to kill the label actors' constructors)
    "choose": "choose-mode-not-applicable",
    "report": "truth-table-missing",
    "score": "score-not-estimated",
}


def _executor_params():
    for case in CATALOGUE:
        yield pytest.param(case, "local", id=f"{case[0]}-local")
        yield pytest.param(case, "ray", id=f"{case[0]}-ray", marks=[pytest.mark.ray, pytest.mark.slow])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case,executor", list(_executor_params()))
def test_bad_input(case, executor, request, tmp_path, capsys, corpus, tiny_overrides):
    if executor == "ray":
        request.getfixturevalue("ray_session")  # one Ray for the session; the CLI's executor attaches to it
    _check_case(case, executor, tmp_path, tmp_path / "run", corpus, tiny_overrides, capsys)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_st_model):
    """(run directory finished up to ``select`` with the local executor, its corpus): the earlier stages of the
    per-stage Ray cases (each copies the stages before its own)."""
    from nncift.config import load_config
    from nncift.runner import Runner
    from tests.conftest import make_rows, tiny_overrides_for, write_jsonl

    root = tmp_path_factory.mktemp("finished")
    corpus = write_jsonl(root / "corpus.jsonl", make_rows(160))
    over = [f"data.input={corpus}", *tiny_overrides_for(tiny_st_model), "ray.executor=local"]
    Runner(load_config(None, over), root / "run").run("select")
    return root / "run", corpus


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(RAY_PER_STAGE.values()), ids=list(RAY_PER_STAGE))
def test_bad_input_stage_on_ray(name, ray_session, finished_run, tmp_path, capsys, tiny_overrides):
    """One catalogue case per failing stage on the Ray executor, the stages before it already finished."""
    import shutil

    case = next(c for c in CATALOGUE if c[0] == name)
    assert case[3] == next(k for k, v in RAY_PER_STAGE.items() if v == name)
    done, corpus = finished_run
    run = tmp_path / "run"
    if case[3] != "data" and "--input" not in case[2]:
        from nncift.stages import PIPELINE

        names = [st.name for st in PIPELINE]
        later = names[names.index(case[3]) :] if case[3] in names else []
        shutil.copytree(done, run, ignore=shutil.ignore_patterns(".lock", "logs", *later))  # up to the stage before
    _check_case(case, "ray", tmp_path, run, corpus, tiny_overrides, capsys)


def _check_case(case, executor, d, run, corpus, tiny_overrides, capsys):
    from nncift.cli import main

    _name, files, args, stage, pattern = case
    _materialise(d, files)
    d = str(d)
    args = [a.replace("{d}", d) for a in args]
    base = ["--input", str(corpus)] if "--input" not in args else []
    sets = [x for o in [*tiny_overrides, f"ray.executor={executor}"] for x in ("--set", o)]
    with _ray_console_on_this_stderr(executor):
        rc = main([stage, "-q", "--run-dir", str(run), *base, *sets, *args])
    out = capsys.readouterr().err
    assert rc == 2, (rc, out[-2000:])
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("nncift: error: ")]
    assert len(errors) == 1, out[-2000:]  # one line (progress bars and warnings may precede it)
    err = errors[0]
    assert re.search(pattern.replace("{d}", re.escape(d)), err), err
    assert len(err) < 1000  # never echoes a huge input line
    # nothing half-written: a run that failed before finishing any stage leaves no run directory; a later stage
    # that failed leaves no completion marker
    if stage == "data" or not (run / "data" / "_DONE.json").exists():
        assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())
    assert not (run / stage / "_DONE.json").exists()


@contextlib.contextmanager
def _ray_console_on_this_stderr(executor: str):
    """Ray's console log handlers write to the ``sys.stderr`` of the moment they were made (not of each call,
    as their docstring says): in one pytest process that is an earlier test's closed capture, and their next
    line becomes a '--- Logging error ---' traceback. Point them at this test's stderr for the call."""
    if executor != "ray":
        yield
        return
    import logging
    import sys

    import ray.data  # noqa: F401 -- its logger and console handler exist from the import on

    handlers = [h for name in ("ray", "ray.data") for h in logging.getLogger(name).handlers
                if type(h).__name__ == "PlainRayHandler"]  # fmt: skip
    before = [h.setStream(sys.stderr) for h in handlers]
    try:
        yield
    finally:
        for h, old in zip(handlers, before, strict=True):
            h.setStream(sys.__stderr__ if old is None or getattr(old, "closed", False) else old)


def test_the_catalogue_has_at_least_30_cases():
    assert len({c[0] for c in CATALOGUE}) >= 30


def test_catalogue_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md").read_text()
    missing = [c[0] for c in CATALOGUE if f"`{c[0]}`" not in doc]
    assert not missing, missing


def test_corrupt_run_dir_artifacts(tmp_path, capsys, corpus, tiny_overrides):
    """Run-directory damage: a corrupt completion marker, corrupt or non-finite embeddings, a run dir that is a
    file, a run dir owned by another configuration."""
    from nncift.cli import main

    sets = [x for o in [*tiny_overrides, "ray.executor=local"] for x in ("--set", o)]
    run = tmp_path / "run"

    def call(*extra):
        rc = main(["embed", "-q", "--input", str(corpus), "--run-dir", str(run), *sets, *extra])
        return rc, capsys.readouterr().err.strip()

    assert call()[0] == 0
    (run / "embed" / "_DONE.json").write_text("{not json")
    rc, err = call()
    assert rc == 2 and re.search(r"embed/_DONE.json: corrupt completion marker", err) and "\n" not in err
    (run / "embed" / "_DONE.json").unlink()
    assert call()[0] == 0
    emb = run / "embed" / "embeddings.safetensors"
    from nncift.store import read_safetensors, write_safetensors

    t = read_safetensors(emb)
    t["pool"][3, 1] = np.nan
    write_safetensors(emb, t)
    rc, err = main(["label", "-q", "--input", str(corpus), "--run-dir", str(run), *sets]), capsys.readouterr().err
    assert rc == 2 and re.search(r"embeddings.safetensors: 'pool' has 1 non-finite values \(row 3\)", err)
    emb.write_bytes(emb.read_bytes()[:100])
    rc, err = main(["label", "-q", "--input", str(corpus), "--run-dir", str(run), *sets]), capsys.readouterr().err
    assert rc == 2 and re.search(r"embeddings.safetensors: unreadable", err)
    file_run = tmp_path / "afile"
    file_run.write_text("x")
    rc = main(["data", "-q", "--input", str(corpus), "--run-dir", str(file_run), *sets])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and re.search(r"afile.* not a directory", err) and "\n" not in err


def test_run_dir_owned_by_another_configuration(tmp_path, capsys, corpus, tiny_overrides):
    from nncift.cli import main

    sets = [x for o in [*tiny_overrides, "ray.executor=local"] for x in ("--set", o)]
    args = ["-q", "--input", str(corpus), "--run-dir", str(tmp_path / "run"), *sets]
    assert main(["fit", *args]) == 0
    before = (tmp_path / "run" / "fit" / "_DONE.json").read_text()
    capsys.readouterr()
    assert main(["fit", *args, "--set", "fit.rank=3"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("nncift: error:")]
    assert len(err) == 1 and "stage 'fit'" in err[0] and "fit.rank: 16 -> 3" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "run" / "fit" / "_DONE.json").read_text() == before  # untouched
