"""Benchmark: cost of NN-CIFT against full DELIFT on the same model and data, with the fidelity it buys.

Full DELIFT labels every pair with the DELIFT ICL teacher; NN-CIFT labels the configured design (default
surrogate and label design of nncift), fits, chooses its estimate on held-out rows (a second, small round of
teacher pairs, counted here), estimates every pair and selects. Both use the embedded
SmolLM2-135M-Instruct and the ShareGPT pairs of ``benchmarks/data/delift_icl_smollm2.parquet`` (built by
``build_delift_table.py``, whose provenance records the full labeling's seconds).

In one run this script:
  1. runs every NN-CIFT stage for real on that data with the DELIFT ICL teacher (teacher calls included) and
     reports stage seconds, teacher pairs and pairs/s;
  2. measures the teacher's full-kernel rate again on a sample of pairs (prefix reuse, same settings), beside
     the table build's recorded rate (``--full`` re-labels every pair instead: about an hour on 2 cores);
  3. scores the NN-CIFT subset under the full DELIFT kernel (gap closed, zero-label baseline);
  4. projects both costs to the paper's scale (M = 15k, N = 5k) and to 1M items from the measured unit
     costs, finds the break-even M, and plots cost vs M with the measured points marked.

    .venv/bin/python benchmarks/bench_cost.py                       # CPU, HF backend
    .venv/bin/python benchmarks/bench_cost.py --gpu                 # a GPU machine: vLLM backend on CUDA

Assumptions of the projection (printed with the figures): teacher cost is linear in pairs at the measured
rate (prefix reuse for full DELIFT's example-major blocks and the design's rectangles; the diagonal as
batched full sequences); N = M / 3 (the paper's 15k / 5k); the label design keeps its fraction and partners;
fit time is linear in training pairs; estimation at the measured all-pairs rate of the fitted surrogate
(a 4096 x 4096 block here); selection at the measured rate of the sparse lazy greedy (top-32 per row,
budget 0.3 M) measured here at M = 50k and scaled linearly in M; embedding linear in M + N.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "data" / "delift_icl_smollm2.parquet"
log = logging.getLogger("bench_cost")


def run_nncift(work: Path, prov: dict, overrides: list[str], gpu: bool):
    """All NN-CIFT stages on the table's data with the live DELIFT ICL teacher; fidelity vs the table."""
    from nncift.config import load_config
    from nncift.runner import Runner

    lab = prov.get("teacher_config") or prov["label_config"]  # tables written before teacher sections
    sets = [f"{k}={v}" for k, v in prov["data_overrides"].items()]
    sets += [
        "label.function=delift_icl",
        f"delift_icl.max_prompt_tokens={lab['max_prompt_tokens']}",
        f"delift_icl.max_response_tokens={lab['max_response_tokens']}",
        f"delift_icl.dtype={lab['dtype']}",
        f"fidelity.truth_table={TABLE}",
        "ray.executor=local",
        "label.block_size=30",
    ]
    if gpu:
        sets += ["delift_icl.backend=vllm", "label.device=cuda", "estimate.device=cuda", "embed.device=cuda"]
    cfg = load_config(None, [*sets, *overrides])
    pipe = Runner(cfg, work)
    pipe.run("report")
    return pipe, cfg


def teacher_rate(pipe, n_examples: int = 3, n_targets: int = 30) -> float:
    """Teacher pairs/s of full-kernel labeling (prefix reuse: one example x many targets) on the run's data."""
    from nncift.influence import build_influence_function

    fn = build_influence_function("delift_icl", **pipe.ctx.teacher_kwargs())
    pool, _ = pipe.ctx.items()
    ex, tg = pool.take(np.arange(n_examples)), pool.take(np.arange(n_examples, n_examples + n_targets))
    fn.utility(ex.take([0]), tg.take([0]))  # warm-up
    t0 = time.perf_counter()
    fn.utility(ex, tg)
    return n_examples * n_targets / (time.perf_counter() - t0)


def estimate_rate(pipe) -> float:
    """All-pairs rate (pairs/s) of the fitted K_FF surrogate's factors on a 4096 x 4096 block."""
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.surrogate.recipes import estimator_heads

    head = estimator_heads(pipe.ctx)["ff"]
    reps = -(-4096 // len(head["p"]))
    big = dict(head)
    big["p"] = np.tile(head["p"], (reps, 1))[:4096]
    big["q"] = np.tile(head["q"], (reps, 1))[:4096]
    big["diag"] = None
    w = EstimateWorker({"ff": big}, out_dir=str(pipe.store.root / "tmp_rate"))
    w.predict_raw("ff", 0, 4096, 0, 4096)
    t0 = time.perf_counter()
    w.predict_raw("ff", 0, 4096, 0, 4096)
    return 4096 * 4096 / (time.perf_counter() - t0)


def select_rate(m: int = 50_000, k: int = 32) -> float:
    """Items/s of the sparse lazy greedy (budget 0.3 M) on a random top-k kernel of m items."""
    from nncift.selection.sparse import SparseKernel, sparse_lazy_greedy

    rng = np.random.default_rng(0)
    cols = rng.integers(0, m, size=(m, k))
    vals = rng.uniform(size=(m, k)).astype(np.float32)
    kern = SparseKernel.from_topk(cols, vals, m).scaled()
    t0 = time.perf_counter()
    sparse_lazy_greedy(kern, int(0.3 * m))
    return m / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(TABLE))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_cost"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--full", action="store_true", help="re-label every pair now (about an hour on 2 cores)")
    ap.add_argument("--gpu", action="store_true", help="vLLM teacher and CUDA estimation (a GPU machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prov = json.loads(Path(args.table).with_suffix(".json").read_text())
    work = Path(args.work)

    t0 = time.perf_counter()
    pipe, cfg = run_nncift(work / "nncift", prov, args.overrides, args.gpu)
    done = {s: pipe.store.done_info(s) for s in ("embed", "label", "fit", "choose", "estimate", "select")}
    m, n = pipe.store.done_info("data")["M"], pipe.store.done_info("data")["N"]
    fid = json.loads(pipe.store.path("report", "fidelity.json").read_text())

    full_pairs = m * m + m * n
    if args.full:
        from nncift.config import load_config
        from nncift.runner import Runner

        fcfg = load_config(str(ROOT / "benchmarks" / "configs" / "delift_table.yaml"), args.overrides)
        fpipe = Runner(fcfg, work / "full")
        fpipe.run("label")
        full_seconds = fpipe.store.done_info("label")["seconds"]
        full_src = "re-labeled now"
    else:
        full_seconds = prov["label_seconds"]
        full_src = "recorded by build_delift_table.py"
    rate_now = teacher_rate(pipe)
    rate_full = full_pairs / full_seconds

    lab, cho = done["label"], done["choose"]
    label_pairs = lab["pairs_labeled"] - lab["eval_pairs"]  # eval pairs are a measurement only
    choose_pairs, choose_teacher_s = int(cho.get("teacher_pairs") or 0), float(cho.get("teacher_seconds") or 0.0)
    teacher_pairs = label_pairs + choose_pairs  # everything the selection needed, in the teacher's unit (pairs)
    nn_teacher_s = lab["seconds"] * label_pairs / lab["pairs_labeled"] + choose_teacher_s
    cost = json.loads(pipe.store.path("report", "report.json").read_text())["teacher_cost"]
    stage_s = {
        "embed": done["embed"]["seconds"],
        "label (teacher)": lab["seconds"] * label_pairs / lab["pairs_labeled"],
        "fit": done["fit"]["seconds"],
        "choose (teacher + candidates)": cho["seconds"],
        "estimate": done["estimate"]["seconds"],
        "select": done["select"]["seconds"],
    }
    nn_total = sum(stage_s.values())
    print(f"\n## Cost at M = {m}, N = {n} (measured; teacher cost in the teacher's unit: {cost['unit']})\n")
    print("| stage | full DELIFT s | NN-CIFT s | teacher pairs (full / NN-CIFT) | teacher pairs/s |")
    print("|---|---|---|---|---|")
    print(f"| embed | – | {stage_s['embed']:.1f} | – | – |")
    print(
        f"| label (teacher) | {full_seconds:.0f} ({full_src}) | {stage_s['label (teacher)']:.0f} | {full_pairs:,} / "
        f"{label_pairs:,} | {rate_full:.2f} / {label_pairs / max(stage_s['label (teacher)'], 1e-9):.2f} |"
    )
    print(f"| fit | – | {stage_s['fit']:.1f} | – | – |")
    print(f"| choose (its teacher share {choose_teacher_s:.0f} s) | – | {stage_s['choose (teacher + candidates)']:.1f} | "
          f"– / {choose_pairs:,} | {choose_pairs / max(choose_teacher_s, 1e-9):.2f} |")  # fmt: skip
    for s in ("estimate", "select"):
        print(f"| {s} | – | {stage_s[s]:.1f} | – | – |")
    print(f"| teacher, all the selection needed | {full_seconds:.0f} | {nn_teacher_s:.0f} | {full_pairs:,} / "
          f"{teacher_pairs:,} | |")  # fmt: skip
    print(f"| **total** | **{full_seconds:.0f}** | **{nn_total:.0f}** | | |")
    print(f"\nteacher rate measured now on a full-kernel sample (prefix reuse): {rate_now:.2f} pairs/s")
    print(f"NN-CIFT / full DELIFT wall time at M={m}: {nn_total / full_seconds:.1%}")
    if fid.get("measured"):
        print(
            f"fidelity under the full DELIFT kernel: gap closed {fid['gap_closed']:+.3f} (zero-label baseline "
            f"{fid['zero_label']['gap_closed']:+.3f}), Jaccard {fid['jaccard']:.3f}, budget {fid['budget']}"
        )

    # ----------------------------------------------------------------- projection
    est_pps = estimate_rate(pipe)
    sel_ips = select_rate()
    embed_ips = (m + n) / stage_s["embed"]
    fit_per_pair = stage_s["fit"] / max(1, lab["train_pairs"])
    lc = cfg.label
    from nncift.labels.fanout import label_probes

    n_probes = label_probes(pipe.ctx)
    nn_rate = teacher_pairs / nn_teacher_s

    def design_pairs(mm: float, nn_: float) -> float:
        u = lc.fraction
        if lc.design == "spread":  # partners are capped by the labeled items (half of them in K_FF)
            q1 = u * mm * (min(lc.partners, max(1.0, u * mm / 2)) + min(lc.partners, u * nn_))
        else:
            q1 = (u * mm) ** 2 + (u * mm) * (u * nn_)
        return q1 + (mm if lc.diagonal else 0) + n_probes * mm + choose_pairs  # the held-out choice: ~constant

    def costs(mm: float) -> tuple[float, float]:
        nn_ = mm / 3
        full = (mm * mm + mm * nn_) / rate_full
        q1 = design_pairs(mm, nn_) - (mm if lc.diagonal else 0) - n_probes * mm - choose_pairs
        nn = (
            (mm + nn_) / embed_ips
            + design_pairs(mm, nn_) / nn_rate
            + q1 * fit_per_pair
            + (mm * mm + mm * nn_) / est_pps
            + mm / sel_ips
        )
        return full, nn

    print(
        f"\nunit costs: teacher {rate_full:.2f} pairs/s (full) / {nn_rate:.2f} pairs/s (NN-CIFT design), "
        f"estimation {est_pps:.2e} pairs/s, selection {sel_ips:.0f} items/s, embedding {embed_ips:.1f} items/s, "
        f"fit {fit_per_pair * 1e6:.1f} µs per training pair"
    )
    print(f"design: {lc.design}, fraction {lc.fraction}, partners {lc.partners}, diagonal {lc.diagonal}; N = M / 3")
    print("\n| M | full DELIFT | NN-CIFT | NN-CIFT teacher pairs | ratio |")
    print("|---|---|---|---|---|")
    grid = np.unique(np.round(np.logspace(1, 6, 80)).astype(int))
    curve = [(g, *costs(g)) for g in grid]
    for mm in (m, 15_000, 1_000_000):
        f, c = costs(mm)
        print(f"| {mm:,} | {_dur(f)} | {_dur(c)} | {design_pairs(mm, mm / 3):,.0f} | {c / f:.2%} |")
    even = next((g for g, f, c in curve if c < f), None)
    print(f"\nbreak-even M (NN-CIFT cheaper from, on the grid 10..1e6): {even if even is not None else '> 1e6'}")
    _plot(work / "cost_vs_m.png", curve, (m, full_seconds, nn_total))
    res = {"M": m, "N": n, "stage_seconds": stage_s, "full_seconds": full_seconds, "full_source": full_src,
           "teacher_rate_full": rate_full, "teacher_rate_now": rate_now, "teacher_rate_nncift": nn_rate,
           "teacher_pairs": {"full": full_pairs, "nncift": teacher_pairs, "choose": choose_pairs},
           "teacher_cost": cost, "fidelity": fid,
           "estimate_pairs_per_s": est_pps, "select_items_per_s": sel_ips, "break_even_M": even,
           "projection": {str(mm): dict(zip(("full", "nncift"), costs(mm), strict=True)) for mm in (15_000, 10**6)},
           "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    Path(args.json or work / "cost.json").write_text(json.dumps(res, indent=1, default=float))


def _dur(s: float) -> str:
    for unit, k in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= k:
            return f"{s / k:,.1f} {unit}"
    return f"{s:.1f} s"


def _plot(path: Path, curve: list, measured: tuple[int, float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, f, c = (np.array(x) for x in zip(*curve, strict=True))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(g, f / 3600, label="full DELIFT (projected)")
    ax.plot(g, c / 3600, label="NN-CIFT (projected)")
    ax.scatter([measured[0]], [measured[1] / 3600], marker="o", color="C0", zorder=3, label="full DELIFT (measured)")
    ax.scatter([measured[0]], [measured[2] / 3600], marker="s", color="C1", zorder=3, label="NN-CIFT (measured)")
    ax.axvline(15_000, color="grey", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="pool size M (N = M/3)", ylabel="wall hours (2 CPU cores)",
           title="Data-valuation cost vs pool size")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
