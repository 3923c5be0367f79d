from pathlib import Path

import pytest

from nncift.config import RunConfig, apply_overrides, load_config
from nncift.errors import ConfigError


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = RunConfig()
    cfg.validate()
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p).to_dict() == cfg.to_dict()


def test_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("label:\n  fraction: 0.1\nselect:\n  objective: flmi\n")
    cfg = load_config(p, ["label.fraction=0.2", "fit.hidden=50", "data.pool_size=null"])
    assert cfg.label.fraction == 0.2
    assert cfg.fit.hidden == 50
    assert cfg.select.objective == "flmi"
    assert cfg.data.pool_size is None


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("label.fractoin=0.1", "label.fractoin"),
        ("label.fraction=2", "label.fraction"),
        ("fit.hidden=abc", "fit.hidden"),
        ("select.objective=xx", "select.objective"),
        ("nosection.x=1", "nosection"),
        ("badly-formed", "key=value"),
        ("label.probes=some", "label.probes"),
        ("label.probes=-1", "label.probes"),
        ("choose.lexical=word,words", "choose.lexical"),
        ("choose.lexical=char,char", "choose.lexical"),
        ("choose.lexical=", "choose.lexical"),
    ],
)
def test_bad_fields_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("label:\n  fraction: [1,\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_fingerprint_ignores_runtime_fields():
    a = load_config(None, [])
    b = load_config(None, ["label.concurrency=4", "estimate.device=cuda", "ray.executor=local"])
    c = load_config(None, ["label.fraction=0.1"])
    assert a.fingerprint("", "data", "label") == b.fingerprint("", "data", "label")
    assert a.fingerprint("", "data", "label") != c.fingerprint("", "data", "label")
    assert a.fingerprint("", "data") == c.fingerprint("", "data")


def test_apply_overrides_does_not_mutate():
    raw = {"label": {"fraction": 0.1}}
    out = apply_overrides(raw, ["label.fraction=0.3"])
    assert raw["label"]["fraction"] == 0.1 and out["label"]["fraction"] == 0.3


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("jobs", "configs").glob("*.yaml")), ids=str)
def test_every_shipped_config_loads_and_validates(path):
    """The configs under jobs/configs are documentation users copy: each must load and pass validation."""
    cfg = load_config(path, ["data.input=/tmp/corpus.parquet"] if "scale" in path.name else [])
    assert cfg.seed == 0
