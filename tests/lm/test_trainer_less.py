"""Opt-in export of the trainable weights and AdamW moments during the DeepSpeed fine-tune
(``ft["export_states_at"]``), which the LESS teacher reads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from nncift.config import RunConfig
from nncift.lm.trainer import finetune_local, read_state, state_path
from tests.conftest import make_rows


def _ft(tiny_lm: str, **kw) -> dict:
    ft = dataclasses.asdict(RunConfig().finetune)
    ft.update(model=tiny_lm, method="lora", lora_dropout=0.0, epochs=2, batch_size=8, micro_batch_size=2)
    ft.update(max_seq_len=96, max_prompt_tokens=48, save_every=100, lr=3e-2, deepspeed="zero0")
    ft.update(kw)
    return ft


def _rows(n: int = 24) -> dict:
    rows = make_rows(n)
    return {"prompt": [r["instruction"] for r in rows], "response": [r["output"] for r in rows]}


STEPS = [1, 3, 6]  # 24 rows / batch 8 = 3 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def zero0_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_export") / "zero0"
    finetune_local(_ft(tiny_lm, export_states_at=STEPS), _rows(), str(out))
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k][n] - b[k][n]).max()) for k in a for n in a[k])


def test_export_holds_the_weights_and_the_adamw_moments(zero0_run):
    out = zero0_run
    assert sorted(p.name for p in (out / "states").iterdir()) == [state_path(out, s).name for s in STEPS]
    progress = {r["step"]: r for r in map(json.loads, (out / "progress.jsonl").read_text().splitlines())}
    for step in STEPS:
        groups, meta = read_state(state_path(out, step))
        assert meta["step"] == step and meta["adam_step"] == step and meta["epoch"] == (step - 1) // 3
        assert meta["lr"] == pytest.approx(progress[step]["lr"], rel=1e-12)  # the rate that step trained with
        assert meta["betas"] == (0.9, 0.999) and meta["eps"] == 1e-8 and meta["weight_decay"] == 0.0
        assert set(groups["param"]) == set(groups["exp_avg"]) == set(groups["exp_avg_sq"])
        assert groups["param"] and all(".lora_" in n for n in groups["param"])  # LoRA: trainable weights only
        assert all(groups["exp_avg_sq"][n].min() >= 0 for n in groups["exp_avg_sq"])
    # after one step m = (1 - b1) g and v = (1 - b2) g^2, so m^2 / v = 0.01 / 0.001 = 10 wherever g != 0
    groups, _ = read_state(state_path(out, 1))
    m = np.concatenate([groups["exp_avg"][n].ravel() for n in groups["exp_avg"]])
    v = np.concatenate([groups["exp_avg_sq"][n].ravel() for n in groups["exp_avg"]])
    ratios = m[v > 0] ** 2 / v[v > 0]
    assert ratios.size > 100 and np.allclose(ratios, 10.0, rtol=1e-4)
    # the last export is the trained adapter, and the weights moved between exports
    from safetensors.numpy import load_file

    adapter = load_file(out / "model" / "adapter_model.safetensors")
    last, _ = read_state(state_path(out, 6))
    first, _ = read_state(state_path(out, 3))
    for name, value in last["param"].items():
        np.testing.assert_array_equal(adapter[name.replace(".default", "")], value)
    assert max(float(np.abs(last["param"][n] - first["param"][n]).max()) for n in last["param"]) > 1e-3


def test_zero2_and_an_interrupted_run_export_the_same_states(zero0_run, tiny_lm, tmp_path):
    # ZeRO-2 keeps its moments in flat fp32 partitions (read back through DeepSpeed's hp-param mapping); the
    # run is interrupted after step 3 and resumed: the step-6 export is written by the resumed process
    ft = _ft(tiny_lm, export_states_at=STEPS, deepspeed="zero2")
    out = tmp_path / "zero2"
    assert finetune_local(ft, _rows(), str(out), stop_after=3) == {"stopped_at": 3}
    assert not state_path(out, 6).exists() and state_path(out, 3).is_file()
    assert finetune_local(ft, _rows(), str(out))["resumed_from"] == 3
    for step in STEPS:
        a, meta_a = read_state(state_path(zero0_run, step))
        b, meta_b = read_state(state_path(out, step))
        assert meta_a == meta_b
        assert _max_diff(a, b) < 1e-6


def test_export_is_opt_in_and_checks_its_steps(tiny_lm, tmp_path):
    finetune_local(_ft(tiny_lm, epochs=1), _rows(), str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model").is_dir() and not (tmp_path / "plain" / "states").exists()
    for bad in ([0], [4], [1.5]):
        with pytest.raises(ValueError, match="export_states_at"):
            finetune_local(_ft(tiny_lm, epochs=1, export_states_at=bad), _rows(), str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="not an exported optimizer state"):
        from nncift.store import write_safetensors

        write_safetensors(tmp_path / "other.safetensors", {"x": np.zeros(2, np.float32)})
        read_state(tmp_path / "other.safetensors")
