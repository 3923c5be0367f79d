"""Stages as objects, one runner, teachers as plugins (with their own config section), and the pointwise path."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest

from nncift.config import _f, load_config
from nncift.errors import ConfigError
from nncift.influence import Items, PointwiseInfluenceFunction, register, teachers
from nncift.runner import Runner
from nncift.stages import PIPELINE, STAGES

LOCAL = ["ray.executor=local"]


@dataclass
class ProbeConfig:
    """``probe.*``: a test teacher's own section."""

    axis: int = _f(0, "embedding coordinate the score reads")
    scale: float = _f(2.0, "multiplier")

    def validate(self) -> None:
        if self.scale <= 0:
            raise ConfigError("config field 'probe.scale': must be positive")


@register
class ProbeScore(PointwiseInfluenceFunction):
    """A pointwise teacher defined entirely in this module: s(item) = scale * e[axis] + 0.5 * e[axis + 1]."""

    name = "probe"
    config = ProbeConfig
    calls = 0

    def __init__(self, axis: int = 0, scale: float = 2.0):
        self.axis, self.scale = axis, scale

    @classmethod
    def resolve(cls, section: ProbeConfig, device: str) -> dict:
        return {"axis": section.axis, "scale": section.scale}

    def score(self, items: Items) -> np.ndarray:
        e = items.embeddings
        return (self.scale * e[:, self.axis] + 0.5 * e[:, self.axis + 1]).astype(np.float32)


def test_a_plugin_teacher_brings_its_own_config_section(tmp_path):
    assert "probe" in teachers()
    cfg = load_config(None, ["label.function=probe", "probe.scale=3"])
    assert cfg.probe.scale == 3.0 and cfg.to_dict()["probe"] == {"axis": 0, "scale": 3.0}
    with pytest.raises(ConfigError, match=r"'probe\.scale': must be positive"):
        load_config(None, ["probe.scale=-1"])
    with pytest.raises(ConfigError, match=r"unknown config field 'probe\.scael'"):
        load_config(None, ["probe.scael=1"])
    # the label stage (and everything after it) depends on the teacher's section, not on other teachers'
    runner = Runner(cfg, tmp_path / "r")
    assert runner.sections("label")[-2:] == ("label", "probe")
    assert "probe" in runner.sections("select") and "delift_icl" not in runner.sections("select")
    other = Runner(load_config(None, ["label.function=probe", "probe.scale=4"]), tmp_path / "r")
    assert runner.identity("label")[0] != other.identity("label")[0]
    assert runner.identity("embed")[0] == other.identity("embed")[0]
    same = Runner(load_config(None, ["label.function=probe", "probe.scale=3", "delift_icl.mode=batched"]), tmp_path)
    assert runner.identity("label")[0] == same.identity("label")[0]


def test_stages_declare_themselves_and_the_pipeline_order_is_one_list():
    assert [s.name for s in PIPELINE] == ["data", "embed", "label", "fit", "choose", "estimate", "select", "report"]
    for st in STAGES.values():
        assert st.name and st.writes
        assert "Writes" in __import__(type(st).__module__, fromlist=["_"]).__doc__  # the module documents its I/O
        assert all(up in STAGES for up in st.after)
        assert type(st).run is not type(st).__mro__[-2].run  # every stage implements run
    # each pipeline stage comes after the previous one
    for prev, st in itertools.pairwise(PIPELINE):
        assert prev.name in st.after


def test_pointwise_teacher_end_to_end(tmp_path, corpus, tiny_overrides):
    """Labels items, fits the pointwise network, estimates a score per item, selects the top-k."""
    over = [f"data.input={corpus}", *tiny_overrides, *LOCAL, "label.function=probe", "label.fraction=0.5",
            "label.eval_pairs=30", "fit.epochs=80", "fit.patience=10", "fit.lr=3e-3", "select.fraction=0.2"]  # fmt: skip
    runner = Runner(load_config(None, over), tmp_path / "run")
    runner.run("report")
    run = tmp_path / "run"
    labels = pq.read_table(run / "label" / "labels.parquet")
    assert set(labels.column("kernel").to_pylist()) == {"item"}
    assert set(labels.column("quadrant").to_pylist()) == {"q1", "q2"}
    pool, _ = runner.ctx.items()
    truth = ProbeScore(0, 2.0).score(pool)
    q = labels.column("quadrant").to_numpy(zero_copy_only=False)
    rows, vals = labels.column("row").to_numpy(), labels.column("value").to_numpy()
    np.testing.assert_allclose(vals, truth[rows], rtol=1e-5, atol=1e-6)  # the teacher's own values
    assert len(set(rows[q == "q1"]) & set(rows[q == "q2"])) == 0  # held-out items never train
    scores = pq.read_table(run / "estimate" / "scores.parquet").column("score").to_numpy()
    assert scores.shape == (len(pool),)
    from scipy.stats import spearmanr

    held = np.setdiff1d(np.arange(len(pool)), rows[q == "q1"])
    assert spearmanr(scores[held], truth[held]).statistic > 0.6  # it generalises to unlabeled items
    sel = pq.read_table(run / "select" / "selection.parquet")
    idx = sel.column("index").to_numpy()
    assert len(idx) == int(0.2 * len(pool)) and json.loads(sel.schema.metadata[b"objective"]) == "topk"
    np.testing.assert_array_equal(np.sort(idx), np.sort(np.argsort(-scores, kind="stable")[: len(idx)]))
    true_top = set(np.argsort(-truth)[: len(idx)].tolist())
    assert len(true_top & set(idx.tolist())) >= 0.5 * len(idx)  # picks what the teacher would
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["label"]["kind"] == "pointwise" and "item" in rep["network"]
    rss = [rep["peak_rss_mib"][s] for s in ("data", "embed", "label", "fit", "estimate", "select")]
    assert min(rss) > 10  # each stage's own driver peak (MiB)
    assert rep["fidelity"]["measured"] is False and "pointwise" in rep["fidelity"]["reason"]
    assert (
        "item scores" in (run / "report" / "report.md").read_text()
        or "K_ITEM" in (run / "report" / "report.md").read_text()
    )
    assert runner.run("report") == dict.fromkeys((s.name for s in PIPELINE), "skipped")  # resumes: all skipped


def test_runner_runs_upstream_stages_and_refuses_changed_ones(tmp_path, corpus, tiny_overrides):
    from nncift.errors import ProvenanceError

    over = [f"data.input={corpus}", *tiny_overrides, *LOCAL]
    r = Runner(load_config(None, over), tmp_path / "run")
    r.run_stage("embed")  # runs data first
    assert r.store.is_done("data") and r.store.is_done("embed") and not r.store.is_done("label")
    r2 = Runner(load_config(None, [*over, "embed.max_seq_length=64"]), tmp_path / "run")
    with pytest.raises(ProvenanceError, match=r"embed\.max_seq_length: 128 -> 64"):
        r2.run_stage("embed")


def test_label_budget_is_respected_by_the_label_stage(tmp_path, corpus, tiny_overrides):
    over = [f"data.input={corpus}", *tiny_overrides, *LOCAL, "label.max_pairs=2450"]
    runner = Runner(load_config(None, over), tmp_path / "run")
    runner.run_stage("label")
    labels = pq.read_table(tmp_path / "run" / "label" / "labels.parquet")
    done = runner.store.done_info("label")
    assert labels.num_rows <= 2450 and done["max_pairs"] == 2450 and done["train_pairs"] > 0
    unbudgeted = Runner(load_config(None, over[:-1]), tmp_path / "free")
    unbudgeted.run_stage("label")
    assert unbudgeted.store.done_info("label")["pairs_labeled"] > 2450  # the cap did bind


def test_precomputed_embeddings_skip_the_encoder(tmp_path, tiny_overrides):
    """embed.source=column: the inputs' vectors, normalised, go through every stage; no encoder is loaded."""
    from tests.conftest import make_rows, write_jsonl

    rng = np.random.default_rng(0)
    rows = make_rows(150, seed=1)
    centers = rng.normal(size=(4, 16))
    for i, r in enumerate(rows):
        r["emb"] = (centers[i % 4] + 0.3 * rng.normal(size=16)).tolist()
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    over = [f"data.input={corpus}", *tiny_overrides, *LOCAL, "data.embedding_field=emb", "embed.source=column",
            f"embed.model={tmp_path / 'no-such-encoder'}"]  # fmt: skip
    runner = Runner(load_config(None, over), tmp_path / "run")
    runner.run("report")
    e_pool, e_target = runner.ctx.embeddings()
    assert e_pool.shape[1] == 16 and e_target.shape[1] == 16
    np.testing.assert_allclose(np.linalg.norm(e_pool, axis=1), 1.0, rtol=1e-5)
    pool, _ = runner.ctx.tables()
    by_id = {r["id"]: np.asarray(r["emb"], np.float32) for r in rows}
    first = by_id[pool.column("id")[0].as_py()]
    np.testing.assert_allclose(e_pool[0], first / np.linalg.norm(first), rtol=1e-5)
    assert runner.store.done_info("embed")["source"] == "column"
    rep = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert rep["fidelity"]["measured"]  # DELIFT-SE: the teacher reads the same vectors
    with pytest.raises(ConfigError, match=r"embed\.source.*needs data\.embedding_field"):
        load_config(None, ["embed.source=column"])


def test_scale_path_at_small_m(tmp_path):
    """The 1M benchmark's configuration (embedding column, label budget, candidate search, GreeDi) at M=1500:
    candidate stripes probing every cell give the exhaustive run's selection value; the recall is reported."""
    from nncift.corpus.synthetic import scale_overrides, write_corpus

    corpus = write_corpus(tmp_path / "c.parquet", 1600, dim=16, clusters=8)
    base = [*scale_overrides(corpus, 100, 20_000), *LOCAL, "estimate.block_size=256", "estimate.topk=16",
            "estimate.candidates_min_cols=10", "estimate.extent_sample=100000"]  # fmt: skip
    ivf = Runner(load_config(None, [*base, "estimate.nlist=8", "estimate.nprobe=8"]), tmp_path / "ivf")
    ivf.run("select")
    exh = Runner(load_config(None, [*base, "estimate.candidates=exhaustive"]), tmp_path / "exh")
    exh.run("select")
    done = ivf.store.done_info("estimate")
    assert set(done["candidate_recall"]) == {"ff", "ft"} and min(done["candidate_recall"].values()) > 0.95
    assert ivf.store.done_info("label")["pairs_labeled"] <= 20_000
    from nncift.store import read_parquet_metadata

    values = {r: read_parquet_metadata(tmp_path / r / "select" / "selection.parquet")["value"] for r in ("ivf", "exh")}
    assert values["ivf"] == pytest.approx(values["exh"], rel=1e-4)


def test_each_stage_marker_holds_its_own_peak_rss():
    """The peak-RSS window restarts per stage: a large allocation in one stage does not show in the next."""
    import os

    from nncift.runner import peak_rss_mib, reset_peak_rss

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs: peaks are lifetime peaks on this platform")
    reset_peak_rss()
    base = peak_rss_mib()
    big = np.ones(400 * 2**20 // 8)  # 400 MiB touched
    assert peak_rss_mib() > base + 300
    del big
    reset_peak_rss()
    assert peak_rss_mib() < base + 200
