"""Fine-tune / evaluate / compare subsets end to end on the tiny corpus, LM and embedder (local executor)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from nncift.cli import main
from tests.conftest import make_rows, write_jsonl


@pytest.fixture
def ft_overrides(tiny_st_model, tiny_lm, tmp_path) -> list[str]:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_rows(140))
    return [
        f"data.input={corpus}",
        f"embed.model={tiny_st_model}",
        "data.pool_size=80",
        "data.target_size=30",
        "data.test_size=12",
        "label.fraction=0.3",
        "label.min_count=8",
        "label.eval_pairs=200",
        "label.block_size=32",
        "fit.hidden=16",
        "fit.epochs=3",
        "estimate.block_size=40",
        "select.fraction=0.2",
        f"finetune.model={tiny_lm}",
        "finetune.method=full",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "finetune.micro_batch_size=2",
        "finetune.num_workers=1",
        "finetune.max_seq_len=96",
        "finetune.max_prompt_tokens=48",
        "finetune.lr=0.005",
        "eval.max_new_tokens=8",
        "eval.batch_size=4",
        "ray.executor=local",
    ]


def _cli(cmd: str, run_dir, overrides, *extra) -> int:
    args = [cmd, "--run-dir", str(run_dir), "-q", *extra]
    for o in overrides:
        args += ["--set", o]
    return main(args)


def test_compare_all_subsets_end_to_end(tmp_path, ft_overrides, capsys):
    run = tmp_path / "run"
    assert _cli("compare", run, ft_overrides, "--subsets", "base,random,nncift,exact,full") == 0
    rep = json.loads((run / "compare" / "compare.json").read_text())
    got = {r["subset"]: r for r in rep["results"]}
    assert list(got) == ["base", "random", "nncift", "exact", "full"]
    assert got["full"]["train_rows"] == 80 and got["random"]["train_rows"] == 16 == got["nncift"]["train_rows"]
    assert got["full"]["train_steps"] == 20 and got["base"]["train_steps"] == 0
    for r in got.values():
        assert r["rows"] == 12 and 0 <= r["rouge_l"] <= 100 and r["heldout_loss"] > 0
    # training on the full pool lowers the held-out loss of the random tiny LM below the base model's
    assert got["full"]["heldout_loss"] < got["base"]["heldout_loss"]
    assert (run / "compare" / "compare.png").stat().st_size > 0
    md = (run / "compare" / "compare.md").read_text()
    assert "| nncift | 16 |" in md and "Command: `nncift compare" in md
    assert got["exact"]["overlap_with_exact"] == 16 and got["base"]["overlap_with_exact"] is None
    sel = pq.read_table(run / "select" / "selection.parquet").column("id").to_pylist()
    assert sorted(pq.read_table(run / "finetune" / "nncift" / "subset.parquet").column("id").to_pylist()) == sorted(sel)
    ev = json.loads((run / "finetune" / "full" / "eval" / "eval.json").read_text())
    assert ev["rows"] == 12 and (run / "finetune" / "full" / "loss_curve.png").is_file()
    preds = pq.read_table(run / "finetune" / "full" / "eval" / "predictions.parquet")
    assert preds.num_rows == 12 and set(preds.column_names) >= {"prediction", "reference", "rouge_l"}
    # a rerun skips everything; a changed fine-tune config is refused with the key named
    assert _cli("compare", run, ft_overrides, "--subsets", "random") == 0
    assert _cli("finetune", run, [*ft_overrides, "finetune.lr=0.001"], "--subset", "random") == 2
    assert "finetune.lr" in capsys.readouterr().err


def test_finetune_bad_subset_and_missing_test_split(tmp_path, ft_overrides, capsys):
    run = tmp_path / "run"
    assert _cli("finetune", run, ft_overrides, "--subset", "best") == 2
    assert "unknown subset 'best'" in capsys.readouterr().err
    assert _cli("evaluate", run, [*ft_overrides, "data.test_size=0"], "--subset", "base") == 2
    assert "no held-out test rows" in capsys.readouterr().err


def test_exact_subset_is_the_selection_on_the_true_kernels(tmp_path, ft_overrides):
    """The exact-function subset runs the same greedy on DELIFT-SE cosines of every pair."""

    from nncift.config import load_config
    from nncift.runner import Runner
    from nncift.selection.greedy import greedy_select
    from nncift.selection.subsets import budget, subset_indices

    cfg = load_config(None, ft_overrides)
    runner = Runner(cfg, tmp_path / "run")
    runner.run("embed")
    ctx = runner.ctx
    e_pool, e_target = ctx.embeddings()
    k_ff = e_pool @ e_pool.T
    want, _ = greedy_select(k_ff, budget(ctx), objective="fl", k_ft=e_pool @ e_target.T)
    got = subset_indices(ctx, "exact")
    # the labels are computed block-wise and the reference in one matmul: float rounding differs between
    # them and between CPUs, so compare what the greedy achieves on the true kernel, not its tie order
    from nncift.selection.greedy import minmax_scale, objective_value

    s = minmax_scale(k_ff)
    assert len(set(got.tolist())) == len(got) == len(want)
    assert objective_value(s, got) == pytest.approx(objective_value(s, want), rel=1e-5)
    assert len(set(got.tolist()) & set(want.tolist())) >= len(want) - 2
    rnd = subset_indices(ctx, "random")
    assert len(set(rnd.tolist())) == len(rnd) == budget(ctx) == 16
