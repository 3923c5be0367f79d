"""fit.device: the local executor's fit on a chosen device (auto = CUDA when fit.use_gpu and one exists),
the same weights as the CPU fit, CPU weights back; checked at the config boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nncift.config import load_config
from nncift.errors import ConfigError
from nncift.exec.local import LocalExecutor
from nncift.surrogate.fitting import PairLabels, fit_device, fit_loop, split_train_val

LOCAL = ["ray.executor=local"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _task(n: int = 30, d: int = 6):
    rng = np.random.default_rng(0)
    e = rng.normal(size=(n, d)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    labels = PairLabels(rows.reshape(-1), cols.reshape(-1), rng.uniform(size=n * n).astype(np.float32))
    tr, va = split_train_val(n * n, 0.1, 0)
    return e, (e, labels.take(tr), labels.take(va))


def _cfg(**kw) -> dict:
    cfg = {"kind": "bilinear", "rank": 4, "lr": 1e-2, "epochs": 3, "batch_size": 64, "patience": 2, "seed": 0}
    return {**cfg, **kw}


def _assert_same_fit(a, b, rtol=0.0, atol=0.0):
    (sa, ha), (sb, hb) = a, b
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].device.type == "cpu" and sb[k].device.type == "cpu"
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol)
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb]
    for x, y in zip(ha, hb, strict=True):
        assert x["val_mse"] == pytest.approx(y["val_mse"], rel=max(rtol, 1e-12), abs=atol)


def test_fit_device_auto_picks_cuda_only_when_asked_and_present(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fit_device("auto", use_gpu=False) == "cpu"
    with caplog.at_level("WARNING"):
        assert fit_device("auto", use_gpu=True) == "cpu"  # no CUDA here: the CPU, with a warning
    assert "no CUDA device" in caplog.text
    assert fit_device("cpu", use_gpu=True) == "cpu"
    assert fit_device("cuda:1", use_gpu=False) == "cuda:1"  # explicit devices are kept (checked by the config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fit_device("auto", use_gpu=True) == "cuda"
    assert fit_device("auto", use_gpu=False) == "cpu"


@pytest.mark.parametrize("kind", ["bilinear", "mlp"])
def test_an_explicit_cpu_fit_equals_the_default_fit_bit_for_bit(kind):
    e, task = _task()
    cfg = _cfg(kind=kind, hidden=8, weight_decay=0.01)
    _assert_same_fit(fit_loop(cfg, e, *task), fit_loop(cfg, e, *task, device="cpu"))
    _assert_same_fit(fit_loop(cfg, e, *task), fit_loop(cfg, e, *task, device=torch.device("cpu")))


def test_the_local_executor_fits_on_the_resolved_device(monkeypatch):
    import nncift.surrogate.fitting

    e, task = _task()
    seen = []
    real = nncift.surrogate.fitting.fit_loop

    def spy(*a, **kw):
        seen.append(kw.get("device"))
        return real(*a, **kw)

    monkeypatch.setattr(nncift.surrogate.fitting, "fit_loop", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ex = LocalExecutor()
    base = ex.train("surrogate", _cfg(), e, {"a": task})["a"]
    _assert_same_fit(
        base, ex.train("surrogate", _cfg(), e, {"a": task}, use_gpu=True, device="auto", num_workers=2)["a"]
    )
    _assert_same_fit(base, ex.train("surrogate", _cfg(), e, {"a": task}, device="cpu")["a"])
    assert seen == ["cpu", "cpu", "cpu"]


def test_fit_device_is_checked_at_the_config_boundary(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = load_config(None, LOCAL)
    assert cfg.fit.device == "auto"
    assert load_config(None, [*LOCAL, "fit.use_gpu=true"]).fit.device == "auto"  # auto falls back at fit time
    for bad in ("gpu", "cuda:x", "cuda:-1", "mps"):
        with pytest.raises(ConfigError, match=r"fit\.device.*auto \| cpu \| cuda \| cuda:N"):
            load_config(None, [*LOCAL, f"fit.device={bad}"])
    for dev in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=r"'fit\.device'.*no CUDA device"):
            load_config(None, [*LOCAL, f"fit.device={dev}"])
    # the Ray executor's Train workers take GPUs by fit.use_gpu (its driver need not have one)
    with pytest.raises(ConfigError, match=r"'fit\.device'.*fit\.use_gpu=true"):
        load_config(None, ["ray.executor=ray", "fit.device=cuda"])
    assert load_config(None, ["ray.executor=ray", "fit.device=cuda", "fit.use_gpu=true"]).fit.device == "cuda"
    # a runtime field: a run may be resumed on another device
    assert cfg.fingerprint("fit") == load_config(None, [*LOCAL, "fit.device=cpu"]).fingerprint("fit")


def test_fit_device_names_a_missing_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(None, [*LOCAL, "fit.device=cuda:1"]).fit.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"'fit\.device': cuda:2 asked but there are only 2 CUDA devices"):
        load_config(None, [*LOCAL, "fit.device=cuda:2"])


def test_the_fit_stage_passes_fit_device_to_the_local_executor(tmp_path, corpus, tiny_overrides, monkeypatch):
    from nncift.runner import Runner

    seen = []
    real = LocalExecutor._fit

    def spy(self, *a, **kw):
        seen.append((kw.get("device"), kw.get("use_gpu")))
        return real(self, *a, **kw)

    monkeypatch.setattr(LocalExecutor, "_fit", spy)
    over = [f"data.input={corpus}", *tiny_overrides, *LOCAL, "fit.device=cpu", "fit.use_gpu=true"]
    runner = Runner(load_config(None, over), tmp_path / "run")
    runner.run_stage("fit")
    assert seen == [("cpu", True)]
    assert (tmp_path / "run" / "fit" / "network_ff.safetensors").is_file()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["bilinear", "mlp"])
def test_a_cuda_fit_equals_the_cpu_fit(kind):
    e, task = _task(40, 8)
    cfg = _cfg(kind=kind, hidden=16, epochs=4)
    cpu = fit_loop(cfg, e, *task, device="cpu")
    gpu = fit_loop(cfg, e, *task, device="cuda")
    _assert_same_fit(cpu, gpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_the_local_executor_fits_on_cuda_with_use_gpu():
    e, task = _task(40, 8)
    ex = LocalExecutor()
    cpu = ex.train("surrogate", _cfg(), e, {"a": task}, device="cpu")["a"]
    gpu = ex.train("surrogate", _cfg(), e, {"a": task}, use_gpu=True)["a"]  # fit.device=auto
    _assert_same_fit(cpu, gpu, rtol=1e-4, atol=1e-4)
    assert load_config(None, [*LOCAL, "fit.device=cuda:0"]).fit.device == "cuda:0"
