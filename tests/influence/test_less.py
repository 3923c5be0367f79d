"""The LESS teacher: projection, Adam direction, the utility against a hand computation, prepare/resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nncift.errors import ConfigError, DataError
from nncift.exec.local import LocalExecutor
from nncift.influence import Items
from nncift.influence.less import (
    TILE_ROWS,
    Less,
    LessConfig,
    adam_direction,
    project,
    projection_matrix,
    rademacher_tiles,
    unpack_bits,
    warmup_indices,
)
from tests.conftest import make_rows


def _items(rows: list[dict], prefix: str) -> Items:
    return Items(
        [r["instruction"] for r in rows],
        [r["output"] for r in rows],
        np.zeros((len(rows), 2), np.float32),
        [f"{prefix}{r['id']}" for r in rows],
    )


class SpyExecutor(LocalExecutor):
    """The local executor, recording which fan-outs ran."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def train(self, job, ft, rows, out_dir, **kw):
        self.calls.append(("finetune", len(rows["prompt"])))
        assert job == "sft"
        return super().train(job, ft, rows, out_dir, **kw)

    def map_blocks(self, worker_cls, ctor_kwargs, specs, desc="", **res):
        self.calls.append(("map_blocks", len(specs)))
        return super().map_blocks(worker_cls, ctor_kwargs, specs, desc=desc, **res)


def _config(model: str, **kw) -> LessConfig:
    base = dict(model=model, warmup_fraction=0.5, warmup_epochs=2, batch_size=4, micro_batch_size=2, lr=2e-2,
                lora_r=4, lora_alpha=16, max_seq_len=96, max_prompt_tokens=48, proj_dim=512, feature_block=5)  # fmt: skip
    base.update(kw)
    return LessConfig(**base)


@pytest.fixture(scope="module")
def prepared(tiny_lm, tmp_path_factory):
    """A LESS teacher prepared end to end on the tiny LM: 24 pool items (12 in the warm-up: 3 steps x 2
    epochs), 8 target items; features for 10 pool and 6 target items."""
    rows = make_rows(32, seed=3)
    pool, target = _items(rows[:24], "p"), _items(rows[24:], "t")
    kw = Less.resolve(_config(tiny_lm), "cpu")
    work = tmp_path_factory.mktemp("less") / "teacher"
    pool_lab, target_lab = np.arange(0, 20, 2), np.arange(6)
    spy = SpyExecutor()
    args = dict(pool=pool, target=target, pool_labeled=pool_lab, target_labeled=target_lab, work_dir=work, seed=7)
    out = Less.prepare(kw, executor=spy, **args)
    return {"kw": kw, "out": out, "work": work, "pool": pool, "target": target, "args": args, "spy": spy,
            "fn": Less.build(**out)}  # fmt: skip


# ------------------------------------------------------------------------------------------------ projection
def test_projection_is_seeded_and_independent_of_chunking():
    p = projection_matrix(3, 1000, 64)
    assert p.shape == (1000, 64) and torch.equal(p, projection_matrix(3, 1000, 64))
    assert torch.equal(p.abs(), torch.full_like(p, 1 / math.sqrt(64)))  # Rademacher, scaled
    assert not torch.equal(p, projection_matrix(4, 1000, 64))
    assert torch.equal(projection_matrix(3, 600, 64), p[:600])  # an entry depends on (seed, row, col) only
    assert abs(float(p.sign().mean())) < 0.02 and abs(float(p.sign()[:, 0].mean())) < 0.15
    assert torch.equal(
        rademacher_tiles(3, 1, 3, 64), torch.cat([rademacher_tiles(3, 1, 2, 64), rademacher_tiles(3, 2, 3, 64)])
    )
    packed = np.random.default_rng(0).integers(0, 256, (3, 40), dtype=np.uint8)  # the device path's unpacking
    assert np.array_equal(unpack_bits(torch.from_numpy(packed)).numpy(), np.unpackbits(packed, axis=1))
    g = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    ref = g @ p
    for chunk in (1, TILE_ROWS, 3 * TILE_ROWS, 10**6):  # 1 row -> one tile at a time
        torch.testing.assert_close(project(g, 3, 64, chunk_rows=chunk), ref, rtol=1e-5, atol=1e-5)


def test_projection_approximately_preserves_inner_products():
    # JL: for unit x, y the projected inner product has standard deviation sqrt((1 + <x,y>^2) / k) ~ 0.025
    gen = torch.Generator().manual_seed(1)
    d, k, n = 20_000, 2048, 24
    base = torch.randn(1, d, generator=gen)
    x = torch.nn.functional.normalize(base + 0.8 * torch.randn(n, d, generator=gen), dim=1)
    y = torch.nn.functional.normalize(base + 0.8 * torch.randn(n, d, generator=gen), dim=1)
    true = (x * y).sum(1)
    assert float(true.min()) > 0.3  # correlated pairs: the signal is far above the noise
    px, py = project(x, 11, k), project(y, 11, k)
    err = (px * py).sum(1) - true
    assert float(err.abs().max()) < 0.15 and float(err.abs().mean()) < 0.05
    assert float(((px * px).sum(1) - 1).abs().max()) < 0.2
    cos = torch.nn.functional.cosine_similarity(px, py)
    assert float((cos - true).abs().max()) < 0.15
    # a random matrix, not a fixed one: another seed errs differently
    err2 = (project(x, 12, k) * project(y, 12, k)).sum(1) - true
    assert float((err - err2).abs().max()) > 1e-3


def test_adam_direction_is_less_s_formula():
    gen = torch.Generator().manual_seed(0)
    g, m = torch.randn(50, generator=gen), torch.randn(50, generator=gen) * 1e-2
    v = torch.rand(50, generator=gen) * 1e-3
    b1, b2, eps = 0.9, 0.999, 1e-8
    want = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g**2 + eps)  # obtain_gradients_with_adam
    torch.testing.assert_close(adam_direction(g, m, v, (b1, b2), eps, 10, "less"), want)
    paper = adam_direction(g, m, v, (b1, b2), 0.0, 10, "paper")
    # bias correction is one scalar per checkpoint: with eps = 0 the two forms have the same direction
    torch.testing.assert_close(
        torch.nn.functional.normalize(paper, dim=0),
        torch.nn.functional.normalize(adam_direction(g, m, v, (b1, b2), 0.0, 10, "less"), dim=0),
    )
    torch.testing.assert_close(paper / adam_direction(g, m, v, (b1, b2), 0.0, 10, "less"),
                               torch.full_like(g, math.sqrt(1 - b2**11) / (1 - b1**11)))  # fmt: skip
    with pytest.raises(ValueError, match="adam_transform"):
        adam_direction(g, m, v, (b1, b2), eps, 1, "sign")


# ------------------------------------------------------------------------------------------------ the definition
def _by_hand(
    model: str, kw: dict, work: Path, examples: Items, targets: Items, adam: bool = True, lr_weights: bool = True
) -> np.ndarray:
    """LESS computed directly: plain transformers + peft, autograd, the saved moments, the full matrix
    (``adam=False``: plain gradients on the example side too; ``lr_weights=False``: uniform checkpoint weights,
    both only to show that the comparison can tell)."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nncift.lm.sft import PromptFormatter

    tok = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lcfg = LoraConfig(r=kw["lora_r"], lora_alpha=kw["lora_alpha"], lora_dropout=0.0, bias="none",
                      target_modules=kw["lora_target"].split(","), task_type="CAUSAL_LM")  # fmt: skip
    lm = get_peft_model(base, lcfg).eval()
    named = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
    fmt = PromptFormatter(tok, kw["template"], kw["max_prompt_tokens"], kw["max_seq_len"])
    proj = projection_matrix(kw["seed"], sum(p.numel() for _, p in named), kw["proj_dim"]).double()
    recs = [json.loads(x) for x in (work / "warmup" / "progress.jsonl").read_text().splitlines()]
    lrs = [np.mean([r["lr"] for r in recs if r["epoch"] == e]) for e in range(kw["warmup_epochs"])]
    weights = np.array(lrs) / sum(lrs) if lr_weights else np.full(len(lrs), 1 / len(lrs))
    states = sorted((work / "warmup" / "states").glob("step_*.safetensors"))
    assert len(states) == kw["warmup_epochs"] == len(weights)

    def grad(prompt: str, response: str) -> torch.Tensor:
        loss = lm(**fmt.batch([prompt], [response]).to_torch()).loss
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [p for _, p in named])]).double()

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)

    total = np.zeros((len(examples), len(targets)))
    for w, path in zip(weights, states, strict=True):
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            with torch.no_grad():
                for n, p in named:
                    p.copy_(fh.get_tensor(f"param/{n}"))
            m = torch.cat([fh.get_tensor(f"exp_avg/{n}").reshape(-1) for n, _ in named]).double()
            v = torch.cat([fh.get_tensor(f"exp_avg_sq/{n}").reshape(-1) for n, _ in named]).double()
        b1, b2 = json.loads(meta["betas"])
        eps = float(meta["eps"])
        gammas = []
        for p_, r_ in zip(examples.prompts, examples.responses, strict=True):
            g = grad(p_, r_)
            gammas.append((b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps) if adam else g)
        sgd = [grad(p_, r_) for p_, r_ in zip(targets.prompts, targets.responses, strict=True)]
        total += w * (unit(torch.stack(gammas) @ proj) @ unit(torch.stack(sgd) @ proj).T).numpy()
    return total


def test_utility_equals_the_hand_computed_lr_weighted_cosines(prepared, tiny_lm):
    fn, pool, target = prepared["fn"], prepared["pool"], prepared["target"]
    kw = {**prepared["kw"], "seed": 7}  # less.seed=None: the run's seed
    examples = pool.take([0, 6])
    targets = Items(
        [pool.prompts[4], target.prompts[3]], [pool.responses[4], target.responses[3]],
        np.zeros((2, 2), np.float32), [pool.ids[4], target.ids[3]],
    )  # fmt: skip
    want = _by_hand(tiny_lm, kw, prepared["work"], examples, targets)
    got = fn.utility(examples, targets)
    assert got.shape == (2, 2) and got.dtype == np.float32
    assert np.abs(want).min() > 1e-2 and np.ptp(want) > 1e-2, want  # far from the tolerance
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fn.utility_pairs(examples, targets), np.diag(want), rtol=1e-4, atol=1e-6)
    # the comparison has teeth: the plain example gradient, or uniform checkpoint weights, are far off
    work = prepared["work"]
    assert np.abs(_by_hand(tiny_lm, kw, work, examples, targets, adam=False) - want).max() > 100 * 1e-4
    assert np.abs(_by_hand(tiny_lm, kw, work, examples, targets, lr_weights=False) - want).max() > 10 * 1e-4
    # the two checkpoints are distinct states, weighted by their epochs' average learning rates
    man = json.loads((prepared["work"] / "features" / "manifest.json").read_text())
    assert man["steps"] == [3, 6] and man["lr"][0] > man["lr"][1] and sum(man["weights"]) == pytest.approx(1)
    # kernel orientation: K_FT[i, j] = U(pool i -> target j)
    np.testing.assert_allclose(fn.kernel_block("ft", examples, targets), got, rtol=1e-6)


def test_prepare_resumes_without_recomputing(prepared):
    work, spy = prepared["work"], prepared["spy"]
    assert spy.calls == [("finetune", 12), ("map_blocks", 4)]  # 10 pool items in 2 blocks, 6 targets in 2
    files = sorted((work / "features").glob("*.safetensors")) + sorted((work / "warmup" / "states").iterdir())
    assert [p.name for p in files[:4]] == ["pool_000000.safetensors", "pool_000001.safetensors",
                                           "target_000000.safetensors", "target_000001.safetensors"]  # fmt: skip
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = SpyExecutor()
    assert Less.prepare(prepared["kw"], executor=again, **prepared["args"]) == prepared["out"]
    assert again.calls == [] and {p: p.stat().st_mtime_ns for p in files} == mtimes
    # a lost block is recomputed alone, identically (the features are deterministic)
    from safetensors.numpy import load_file

    lost = work / "features" / "target_000001.safetensors"
    before = load_file(lost)
    lost.unlink()
    again = SpyExecutor()
    Less.prepare(prepared["kw"], executor=again, **prepared["args"])
    assert again.calls == [("map_blocks", 1)]
    after = load_file(lost)
    assert before.keys() == after.keys() == {"sgd"} and np.array_equal(before["sgd"], after["sgd"])
    assert load_file(work / "features" / "pool_000000.safetensors")["adam"].shape == (5, 2, 512)


def test_unknown_ids_are_data_errors(prepared):
    fn, pool, target = prepared["fn"], prepared["pool"], prepared["target"]
    with pytest.raises(DataError, match=r"Adam \(example\) feature for id 'pr1'"):
        fn.utility(pool.take([0, 1]), target.take([0]))  # pool item 1 is not labeled
    with pytest.raises(DataError, match=r"gradient \(target\) feature for id 'tr31'"):
        fn.utility(pool.take([0]), target.take([7]))
    with pytest.raises(DataError, match="Adam"):
        fn.utility(target.take([0]), target.take([0]))  # targets are never examples
    with pytest.raises(DataError, match="needs item ids"):
        fn.utility(Items(["a"], ["b"], np.zeros((1, 2), np.float32)), target.take([0]))


def test_config_validation_names_the_field(tiny_lm, tmp_path):
    for field, value in (("proj_dim", 0), ("warmup_fraction", 0.0), ("warmup_epochs", 0), ("adam_transform", "sign"),
                         ("dtype", "float16"), ("feature_block", 0), ("template", "no placeholder")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"config field 'less\.{field}'"):
            _config(tiny_lm, **{field: value}).validate()
    from nncift.config import load_config

    cfg = load_config(None, ["label.function=less", "less.proj_dim=1024", "less.seed=3"])  # the run config's section
    assert isinstance(cfg.teachers["less"], LessConfig) and cfg.teachers["less"].proj_dim == 1024
    with pytest.raises(ConfigError, match=r"config field 'less\.proj_dim'"):
        load_config(None, ["label.function=less", "less.proj_dim=0"])
    with pytest.raises(ConfigError, match=r"'less\.model'"):
        Less.resolve(_config(str(tmp_path / "missing")), "cpu")
    with pytest.raises(ConfigError, match=r"less\.deepspeed"):
        Less.resolve(_config(tiny_lm, deepspeed="zero9"), "cpu")
    with pytest.raises(ConfigError, match="prepare"):
        Less.build(**Less.resolve(_config(tiny_lm), "cpu"))  # features come from prepare()


def test_registration_traits_and_warmup_subset():
    from nncift.influence import function_traits, teacher_class

    assert teacher_class("less") is Less
    traits = function_traits("less")
    assert traits["kind"] == "pairwise" and not traits["symmetric"] and not traits["exact_is_cheap"]
    a = warmup_indices(200, 0.05, 3)
    assert len(a) == 10 and np.array_equal(a, warmup_indices(200, 0.05, 3)) and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, warmup_indices(200, 0.05, 4))
    assert len(warmup_indices(5, 0.05, 0)) == 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smollm2_end_to_end_on_8_items(tmp_path):
    """The embedded SmolLM2: warm-up, features and the hand computation agree on a real model."""
    from nncift.lm.models import embedded_lm_dir

    rows = make_rows(12, seed=5)
    pool, target = _items(rows[:8], "p"), _items(rows[8:], "t")
    # a small LoRA (r=2 on q, v: 115k parameters) keeps the hand computation's full float64 matrix at 0.9 GB
    cfg = LessConfig(warmup_fraction=0.5, warmup_epochs=2, batch_size=2, micro_batch_size=2, lr=1e-3, lora_r=2,
                     lora_alpha=8, lora_target="q_proj,v_proj", max_seq_len=64, max_prompt_tokens=32, proj_dim=1024,
                     feature_block=4)  # fmt: skip
    kw = Less.resolve(cfg, "cpu")
    assert kw["model"] == str(embedded_lm_dir())
    out = Less.prepare(kw, pool=pool, target=target, pool_labeled=np.arange(8), target_labeled=np.arange(4),
                       work_dir=tmp_path / "teacher", executor=LocalExecutor(), seed=0)  # fmt: skip
    fn = Less.build(**out)
    u = fn.kernel_block("ft", pool, target)
    ff = fn.kernel_block("ff", pool, pool)
    assert u.shape == (8, 4) and ff.shape == (8, 8) and np.isfinite(u).all() and np.isfinite(ff).all()
    assert np.abs(u).max() <= 1 + 1e-5 and np.ptp(u) > 1e-3
    want = _by_hand(kw["model"], {**kw, "seed": 0}, tmp_path / "teacher", pool.take([0, 5]), target.take([1]))
    np.testing.assert_allclose(fn.utility(pool.take([0, 5]), target.take([1])), want, rtol=1e-4, atol=1e-5)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_feature_fan_out_on_ray_equals_local(prepared, ray_session, tmp_path):
    """The gradient-feature blocks computed by Ray Data actors equal the local executor's (same warm-up)."""
    import shutil

    from safetensors.numpy import load_file

    from nncift.config import RayConfig
    from nncift.exec.ray_executor import RayExecutor

    work = tmp_path / "teacher"
    shutil.copytree(prepared["work"], work)
    shutil.rmtree(work / "features")  # the warm-up is reused; every feature block is recomputed on Ray
    out = Less.prepare(prepared["kw"], executor=RayExecutor(RayConfig()), **{**prepared["args"], "work_dir": work})
    local = sorted((prepared["work"] / "features").glob("*.safetensors"))
    assert len(local) == 4
    for path in local:
        a, b = load_file(path), load_file(work / "features" / path.name)
        assert a.keys() == b.keys()
        for k in a:  # other thread counts may round differently: values, not bits
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6)
    fn = Less.build(**out)
    pool, target = prepared["pool"], prepared["target"]
    ex, tg = pool.take(np.arange(0, 6, 2)), target.take(np.arange(3))
    np.testing.assert_allclose(fn.utility(ex, tg), prepared["fn"].utility(ex, tg), rtol=1e-4, atol=1e-6)
