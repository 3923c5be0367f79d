"""DeepSpeed fine-tuning: batch plan, config checks, loss decrease, exact resume, Ray == local twin."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from nncift.config import RunConfig
from nncift.errors import ConfigError
from nncift.lm.trainer import build_ds_config, check_resume, finetune_local, lr_schedule, plan_steps, step_rows
from tests.conftest import make_rows


def _ft(tiny_lm: str, **kw) -> dict:
    ft = dataclasses.asdict(RunConfig().finetune)
    ft.update(model=tiny_lm, lora_dropout=0.0, epochs=2, batch_size=8, micro_batch_size=2, max_seq_len=96)
    ft.update(max_prompt_tokens=48, save_every=100, lr=1e-2, deepspeed="zero2", method="full")
    ft.update(kw)
    return ft


def _rows(n: int = 48) -> dict:
    rows = make_rows(n)
    return {"prompt": [r["instruction"] for r in rows], "response": [r["output"] for r in rows]}


def _weights(run_dir) -> dict:
    from safetensors.numpy import load_file

    d = run_dir / "model"
    f = d / ("adapter_model.safetensors" if (d / "adapter_config.json").is_file() else "model.safetensors")
    return load_file(f)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_lr_schedule_warms_up_from_the_first_step_and_decays():
    f = lr_schedule(20, 0.2)  # 4 warmup steps
    got = [f(s) for s in range(20)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0] and got[4] == 1.0 and got[-1] == pytest.approx(1 / 16)
    assert got[3:] == sorted(got[3:], reverse=True) and min(got) > 0


def test_batch_plan_covers_each_epoch_once_and_checks_sizes():
    per_epoch, total = plan_steps(50, 8, 3)
    assert (per_epoch, total) == (6, 18)
    epoch0 = np.concatenate([step_rows(50, 8, 0, s) for s in range(6)])
    assert len(set(epoch0.tolist())) == 48  # drop-last: 2 rows wait for the next epoch's order
    assert not np.array_equal(step_rows(50, 8, 0, 0), step_rows(50, 8, 0, 6))
    with pytest.raises(ConfigError, match="larger than the 5 training rows"):
        plan_steps(5, 8, 1)
    ft = _ft("unused", batch_size=6, micro_batch_size=4)
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        build_ds_config(ft, world=1, use_gpu=False)
    ds = build_ds_config(_ft("unused"), world=2, use_gpu=False)
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["torch_adam"] and not ds["bf16"]["enabled"]
    assert build_ds_config(_ft("unused"), 2, use_gpu=True)["bf16"]["enabled"]
    with pytest.raises(ConfigError, match=r"finetune\.deepspeed"):
        build_ds_config(_ft("unused", deepspeed="zero9"), 1, False)


def test_the_default_deepspeed_optimizer_is_torch_adamw_on_every_device():
    for use_gpu in (False, True):
        opt = build_ds_config(_ft("unused"), 2, use_gpu=use_gpu)["optimizer"]
        assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True and opt["params"]["adam_w_mode"] is True
    fused = build_ds_config(_ft("unused", optimizer="fused_adam"), 2, use_gpu=True)["optimizer"]["params"]
    assert fused["torch_adam"] is False and fused["adam_w_mode"] is True  # the JIT-built FusedAdam, opt-in
    with pytest.raises(ConfigError, match=r"finetune\.optimizer.*needs finetune\.use_gpu"):
        build_ds_config(_ft("unused", optimizer="fused_adam"), 2, use_gpu=False)
    with pytest.raises(ConfigError, match=r"finetune\.optimizer"):
        build_ds_config(_ft("unused", optimizer="lamb"), 2, use_gpu=True)


def test_the_default_gpu_deepspeed_config_needs_no_compiled_op(monkeypatch):
    # DeepSpeed's own choice from the generated GPU config (DeepSpeedEngine._configure_basic_optimizer), with a
    # Hopper image's arch list and every op build made to fail: the default builds torch.optim.AdamW
    import functools
    from types import SimpleNamespace

    import torch

    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import builder
    from deepspeed.runtime.config import get_optimizer_name, get_optimizer_params
    from deepspeed.runtime.engine import DeepSpeedEngine

    def no_build(*_a, **_k):
        raise AssertionError("a DeepSpeed op was built")

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")  # what DeepSpeed's FusedAdam JIT build dies on
    for name in ("load", "jit_load", "builder"):
        monkeypatch.setattr(builder.OpBuilder, name, no_build)

    def chosen(ds: dict) -> torch.optim.Optimizer:
        engine = SimpleNamespace(
            optimizer_name=lambda: get_optimizer_name(ds).lower(),
            optimizer_params=lambda: get_optimizer_params(ds),
            zero_use_cpu_optimizer=lambda: False,
        )
        engine.get_optimizer_configuration = functools.partial(DeepSpeedEngine.get_optimizer_configuration, engine)
        return DeepSpeedEngine._configure_basic_optimizer(engine, [torch.nn.Parameter(torch.zeros(3))])

    ft = _ft("unused", weight_decay=0.1)
    opt = chosen(build_ds_config(ft, 2, use_gpu=True))
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["lr"] == ft["lr"] and opt.defaults["weight_decay"] == 0.1
    with pytest.raises(AssertionError, match="op was built"):  # the control: the fused option does compile
        chosen(build_ds_config(_ft("unused", optimizer="fused_adam"), 2, use_gpu=True))


def test_config_validation_names_the_field():
    from nncift.config import load_config

    with pytest.raises(ConfigError, match=r"finetune\.batch_size"):
        load_config(None, ["finetune.batch_size=6", "finetune.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"finetune\.method"):
        load_config(None, ["finetune.method=qlora"])
    with pytest.raises(ConfigError, match=r"eval\.subsets"):
        load_config(None, ["eval.subsets=random,best"])
    assert load_config(None, []).finetune.optimizer == "torch_adamw"
    with pytest.raises(ConfigError, match=r"finetune\.optimizer"):
        load_config(None, ["finetune.optimizer=adam8bit"])
    with pytest.raises(ConfigError, match=r"finetune\.optimizer.*finetune\.use_gpu"):
        load_config(None, ["finetune.optimizer=fused_adam"])
    cfg = load_config(None, ["finetune.optimizer=fused_adam", "finetune.use_gpu=true"])
    assert cfg.fingerprint("finetune") == load_config(None, ["finetune.use_gpu=true"]).fingerprint("finetune")


@pytest.mark.parametrize("method,zero,dropout", [("full", "zero2", 0.0), ("lora", "zero3", 0.05)])
def test_local_loss_decreases_and_resume_is_exact(tiny_lm, tmp_path, method, zero, dropout):
    # LoRA with the default dropout (0.05): a resume must draw the same dropout masks
    ft = _ft(tiny_lm, method=method, deepspeed=zero, lr=1e-2 if method == "full" else 3e-2, lora_dropout=dropout)
    a = finetune_local(ft, _rows(), str(tmp_path / "a"))
    recs = [json.loads(x) for x in (tmp_path / "a" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13)) and a["steps"] == 12
    assert np.mean([r["loss"] for r in recs[-3:]]) < np.mean([r["loss"] for r in recs[:3]]) - 0.05
    assert all(r["tokens"] > 0 for r in recs)
    # warmup round(0.05 * 12) = 1 step: every step trains, the rate decays linearly after the peak
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == pytest.approx(ft["lr"]) and min(lrs) > 0 and lrs == sorted(lrs, reverse=True)
    # interrupted after step 5 (a checkpoint), then resumed: identical weights and loss curve
    assert finetune_local(ft, _rows(), str(tmp_path / "b"), stop_after=5) == {"stopped_at": 5}
    assert not (tmp_path / "b" / "model").exists()
    assert check_resume(tmp_path / "b", 1, zero) == 5
    with pytest.raises(ConfigError, match="written by 1 workers"):
        check_resume(tmp_path / "b", 2, zero)  # ZeRO partitions belong to the ranks that wrote them
    b = finetune_local(ft, _rows(), str(tmp_path / "b"))
    assert b["resumed_from"] == 5 and b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-6)
    assert _max_diff(_weights(tmp_path / "a"), _weights(tmp_path / "b")) < 1e-6
    resumed = [json.loads(x) for x in (tmp_path / "b" / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    if method == "lora":
        assert (tmp_path / "a" / "model" / "adapter_config.json").is_file()
        assert a["trainable_params"] < 20_000


def _ray_twin(tiny_lm, tmp_path, stop_after: int | None) -> dict:
    """2 DeepSpeed ranks (gloo) under Ray Train, interrupted after ``stop_after`` steps and resumed when that is
    set: the loss decreases and the final weights equal the one-process twin's (same global batches)."""
    from nncift.exec.ray_executor import finetune_ray

    ft = _ft(tiny_lm)
    local = finetune_local(ft, _rows(), str(tmp_path / "local"))
    out = tmp_path / "ray"
    if stop_after is not None:
        assert finetune_ray(ft, _rows(), out, num_workers=2, use_gpu=False, stop_after=stop_after) == {
            "stopped_at": stop_after
        }
    res = finetune_ray(ft, _rows(), out, num_workers=2, use_gpu=False)
    assert res["world"] == 2 and res["grad_accum"] == 2
    recs = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert np.mean([r["loss"] for r in recs[-3:]]) < np.mean([r["loss"] for r in recs[:3]]) - 0.05
    assert res["final_loss"] == pytest.approx(local["final_loss"], abs=1e-4)
    assert _max_diff(_weights(out), _weights(tmp_path / "local")) < 1e-4
    return res


@pytest.mark.ray
@pytest.mark.slow  # CI time (37 s on a clean clone): Ray Train's DDP twin in CI is tests/exec (the surrogate fit)
@pytest.mark.timeout(600)
def test_two_ray_workers_equal_the_local_twin(ray_session, tiny_lm, tmp_path):
    assert _ray_twin(tiny_lm, tmp_path, stop_after=None)["resumed_from"] == 0


@pytest.mark.ray
@pytest.mark.slow  # a second Ray Train start (~15 s); the local resume test above runs in CI
@pytest.mark.timeout(600)
def test_an_interrupted_ray_run_resumes_to_the_local_twin(ray_session, tiny_lm, tmp_path):
    assert _ray_twin(tiny_lm, tmp_path, stop_after=4)["resumed_from"] == 4
