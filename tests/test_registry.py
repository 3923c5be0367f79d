"""The registries of the user's choices and the configuration values derived from them."""

import dataclasses
import typing

import numpy as np
import pytest

from nncift.config import Resources, RunConfig, load_config
from nncift.corpus.readers import FORMATS, Format, _detect_format
from nncift.errors import ConfigError
from nncift.labels.plan import DESIGNS, plan_labels
from nncift.registry import Registry
from nncift.selection.from_kernels import ALGORITHMS, LAYOUTS
from nncift.selection.greedy import OBJECTIVES, Objective, greedy_select
from nncift.surrogate.network import NETWORKS, build_network
from nncift.surrogate.predict import HEADS, predict_factors


def test_registry_lists_known_names_in_registration_order():
    reg = Registry("shape")
    square = reg.register("square")(lambda x: x * x)
    reg.register("cube")(lambda x: x**3)
    assert reg.names() == ("square", "cube") and list(reg) == ["square", "cube"] and len(reg) == 2
    assert reg.get("square") is square and "cube" in reg and "line" not in reg
    with pytest.raises(ValueError, match=r"unknown shape 'line' \(known: square, cube\)"):
        reg.get("line")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("square")(abs)


# every registry next to its code, and the configuration field taking its names
CHOICES = [
    ("select.objective", OBJECTIVES.names()),
    ("select.algorithm", ALGORITHMS.names()),
    ("estimate.layout", ("auto", *(n for n, lay in LAYOUTS.items() if not lay.pointwise))),
    ("label.design", DESIGNS.names()),
    ("data.format", ("auto", *FORMATS.names())),
    ("fit.kind", tuple(n for n, net in NETWORKS.items() if not net.pointwise)),
]


@pytest.mark.parametrize(("key", "names"), CHOICES, ids=[k for k, _ in CHOICES])
def test_config_accepts_exactly_the_registered_names(key, names):
    section, name = key.split(".")
    for value in names:
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == value
    with pytest.raises(ConfigError, match=rf"config field '{key}'"):
        load_config(None, [f"{key}=no_such_{name}"])


def test_the_registries_hold_the_documented_names():
    assert OBJECTIVES.names() == ("fl", "flmi", "flcg", "topk")
    assert ALGORITHMS.names() == ("lazy", "stochastic", "greedi")
    assert LAYOUTS.names() == ("dense", "sparse", "items")
    assert DESIGNS.names() == ("block", "spread", "active")
    assert set(FORMATS.names()) == {"jsonl", "json", "parquet", "hf", "sharegpt"}
    assert HEADS.names() == ("mlp", "dot")


@pytest.mark.parametrize(("key", "value"), [("estimate.layout", "items"), ("fit.kind", "pointwise")])
def test_choices_made_by_the_teacher_are_not_config_values(key, value):
    with pytest.raises(ConfigError, match=rf"config field '{key}'"):
        load_config(None, [f"{key}={value}"])


def test_a_registered_objective_becomes_a_config_value(monkeypatch):
    # a floor of 0 is plain facility location: the same picks as fl
    monkeypatch.setitem(OBJECTIVES._entries, "fl0", Objective(floor=lambda nu, c: 0.0 * c))
    assert load_config(None, ["select.objective=fl0"]).select.objective == "fl0"
    rng = np.random.default_rng(0)
    k_ff, k_ft = rng.random((20, 20), np.float32), rng.random((20, 4), np.float32)
    a = greedy_select(k_ff, 5, objective="fl0", k_ft=k_ft)
    np.testing.assert_array_equal(a[0], greedy_select(k_ff, 5, objective="fl")[0])


def test_a_registered_format_is_detected_and_accepted(monkeypatch, tmp_path):
    monkeypatch.setitem(FORMATS._entries, "tsv", Format(lambda path, cfg: [], (".tsv",)))
    (tmp_path / "a.tsv").write_text("a\tb\n")
    assert _detect_format(tmp_path / "a.tsv") == "tsv"
    assert load_config(None, ["data.format=tsv"]).data.format == "tsv"


def test_format_detection_reads_the_table(tmp_path):
    (tmp_path / "chat.json").write_text('[{"conversations": []}]')
    (tmp_path / "rows.json").write_text('[{"prompt": "p", "response": "r"}]')
    (tmp_path / "d").mkdir()
    assert [_detect_format(tmp_path / n) for n in ("chat.json", "rows.json", "d")] == ["sharegpt", "json", "hf"]


def test_every_network_head_is_registered():
    import torch

    e = torch.randn(4, 6)
    for kind in ("mlp", "bilinear"):
        f = build_network(kind, 6).estimator(e, e)
        assert f["type"] in HEADS and predict_factors(f).shape == (4, 4)
    with pytest.raises(ValueError, match="'type'"):
        predict_factors({"p": np.zeros((2, 3), np.float32), "q": np.zeros((2, 3), np.float32)})


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown label design 'grid' \(known: block, spread, active\)"):
        plan_labels(10, 5, 0.5, 2, 0, 0, design="grid")
    with pytest.raises(ValueError, match=r"unknown objective 'xx' \(known: fl, flmi, flcg, topk\)"):
        greedy_select(np.eye(3, dtype=np.float32), 1, objective="xx")
    with pytest.raises(ValueError, match=r"unknown network kind 'tree' \(known: mlp, bilinear, pointwise\)"):
        build_network("tree", 4)


# ---------------------------------------------------------------------------------------------- resources
ALL = ("concurrency", "num_cpus", "num_gpus", "device")
ACTORS = {"data": ("concurrency",), "embed": ALL, "label": ALL, "estimate": ALL, "eval": ALL}
SECTIONS = [(section, name) for section, names in ACTORS.items() for name in names]


def test_the_sections_running_actors_share_resources():
    """Each Resources field of a section has the type, help and runtime metadata written once in Resources."""
    hints = typing.get_type_hints(RunConfig)
    ref = {f.name: f for f in dataclasses.fields(Resources)}
    for section, name in SECTIONS:
        cls = hints[section]
        f = {g.name: g for g in dataclasses.fields(cls)}[name]
        assert typing.get_type_hints(cls)[name] == typing.get_type_hints(Resources)[name], (section, name)
        assert f.metadata == ref[name].metadata, (section, name)
    # no other section field carries a Resources definition
    for section, cls in hints.items():
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.name in ref and f.metadata == ref[f.name].metadata:
                    assert f.name in ACTORS.get(section, ()), (section, f.name)


@pytest.mark.parametrize(("section", "name"), SECTIONS, ids=[f"{s}.{n}" for s, n in SECTIONS])
def test_resources_are_checked_in_their_section(section, name):
    bad = {"concurrency": 0, "num_cpus": 0, "num_gpus": -1, "device": "tpu"}[name]
    with pytest.raises(ConfigError, match=rf"config field '{section}\.{name}'"):
        load_config(None, [f"{section}.{name}={bad}"])
    base = load_config(None, [])
    good = {"concurrency": 3, "num_cpus": 0.5, "num_gpus": 1, "device": "cuda:1"}[name]
    changed = load_config(None, [f"{section}.{name}={good}"])
    assert changed.fingerprint(section) == base.fingerprint(section)  # runtime: out of the fingerprint
