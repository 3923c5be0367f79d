"""Benchmark: the whole pipeline on a generated million-row corpus on one machine, stage seconds and peak RSS.

A corpus of ``--rows`` rows with an embedding column (:func:`nncift.corpus.synthetic.write_corpus`) runs through
data -> embed (the column) -> label (DELIFT-SE, only the labeled pairs, capped by ``label.max_pairs``) -> fit
(bilinear) -> estimate (sparse top-k by IVF candidate search) -> select (GreeDi) -> report, as one ``Runner``.

Side by side in the same run, the baseline: exhaustive estimation (every column of a row stripe, the
``estimate.candidates=exhaustive`` path) timed on a few stripes and extrapolated to all M*M + M*N pairs, and the
candidates' top-k recall against it (measured by the estimate stage on a row sample).

    .venv/bin/python benchmarks/bench_pipeline_scale.py                    # 1M rows (target: <= 30 min, <= 8 GiB)
    .venv/bin/python benchmarks/bench_pipeline_scale.py --rows 100000      # a quicker look
    .venv/bin/python benchmarks/bench_pipeline_scale.py --set select.parts=8   # any config override
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path


class TreeRss:
    """Peak memory sampled every ``every`` seconds in a thread: this process's RSS, and the proportional set
    size (PSS) of this process plus all its descendants (Ray's raylet, actors and workers). PSS splits each
    shared page (the Ray object store, shared libraries) among the processes mapping it, so the tree's sum is
    the machine memory the run uses, without counting a shared page once per process as an RSS sum would."""

    def __init__(self, every: float = 1.0):
        import psutil

        self.proc, self.every = psutil.Process(), every
        self.peak_self = self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        self.peak_self = max(self.peak_self, self.proc.memory_info().rss)
        tree = 0
        for p in (self.proc, *self.proc.children(recursive=True)):
            with contextlib.suppress(psutil.Error):  # exited between the listing and the read
                tree += p.memory_full_info().pss
        self.peak_tree = max(self.peak_tree, tree)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def exhaustive_baseline(run_dir: Path, stripes: int = 2) -> float:
    """Exhaustive sparse-stripe estimation rate (pairs/s) of the run's fitted K_FF surrogate, every column."""
    import tempfile

    from nncift.config import load_config
    from nncift.exec.local import LocalExecutor
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.labels.plan import Block
    from nncift.runner import Runner
    from nncift.surrogate.recipes import estimator_heads

    cfg = load_config(str(run_dir / "config.yaml"), [])
    runner = Runner(cfg, run_dir, executor=LocalExecutor())
    heads = estimator_heads(runner.ctx)
    m = len(heads["ff"]["p"])
    size = cfg.estimate.block_size
    with tempfile.TemporaryDirectory() as tmp:
        w = EstimateWorker(heads, tmp, layout="sparse", topk=cfg.estimate.topk, col_chunk=cfg.estimate.col_chunk)
        t = time.perf_counter()
        for s in range(stripes):
            w.run_block(Block("ff", s, s * size, (s + 1) * size, 0, m))
        dt = time.perf_counter() - t
    return stripes * size * m / dt


def project(stages: dict[str, float], m: int, est_ff: float, to_m: int, nodes: list[int], cores: int) -> str:
    """A Markdown table: projected wall time of each stage for ``to_m`` items on N nodes of ``cores`` cores,
    from the seconds measured here at ``m`` items on this machine's cores (see docs/scale.md for the model).

    Models: data / embed / label-prep scale linearly in M and split over every core; the label budget and
    the fit are constant in M (a pair budget, the same labels); candidate estimation of K_FF grows as M^1.5
    (M rows, each scanning nprobe cells of M / nlist columns, nlist ~ 4 sqrt(M)) and K_FT linearly, both split
    over every core; GreeDi's first round splits over the parts (one per core), its merge is linear in M on
    one core.
    """
    here = os.cpu_count() or 1
    r = to_m / m
    other_est = max(stages["estimate"] - est_ff, 0.0)
    rows = ["| nodes x cores | data | label | fit | estimate | select | total |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in nodes:
        par = here / (n * cores)  # this machine's core-seconds spread over the cluster's cores
        t = {
            "data": (stages["data"] + stages["embed"]) * r * par,
            "label": stages["label"],
            "fit": stages["fit"],
            "estimate": (est_ff * r**1.5 + other_est * r) * par,
            "select": stages["select"] * r * max(par, 0.5),
        }
        cells = " | ".join(f"{t[k] / 60:.1f} min" for k in ("data", "label", "fit", "estimate", "select"))
        rows.append(f"| {n} x {cores} | {cells} | {sum(t.values()) / 60:.0f} min |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="pool rows M (the corpus has M + targets rows)")
    ap.add_argument("--targets", type=int, default=2000, help="target rows N")
    ap.add_argument("--dim", type=int, default=128, help="embedding dimension of the generated corpus")
    ap.add_argument("--max-pairs", type=int, default=2_000_000, help="label.max_pairs")
    ap.add_argument("--work", default="/tmp/nncift_scale", help="corpus and run directory")
    ap.add_argument("--executor", default="ray", choices=("ray", "local"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--resume", action="store_true", help="keep the finished stages of an earlier run")
    ap.add_argument("--project", type=int, default=10_000_000, help="project the stage times to this many items")
    ap.add_argument("--nodes", default="1,4,16,64", help="node counts of the projection")
    ap.add_argument("--cores-per-node", type=int, default=16)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")

    from nncift.config import load_config
    from nncift.corpus.synthetic import scale_overrides, write_corpus
    from nncift.runner import Runner

    work = Path(args.work)
    corpus = work / f"corpus_{args.rows + args.targets}_{args.dim}.parquet"
    t0 = time.perf_counter()
    if not corpus.is_file():
        write_corpus(corpus, args.rows + args.targets, dim=args.dim)
    gen_s = time.perf_counter() - t0
    overrides = [
        *scale_overrides(corpus, args.targets, args.max_pairs),
        f"ray.executor={args.executor}",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    run_dir = work / "run"
    if run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)  # a benchmark measures every stage: start from nothing
    t0 = time.perf_counter()
    with TreeRss() as rss:
        runner = Runner(cfg, run_dir, overwrite=True)
        runner.run("report")
    wall = time.perf_counter() - t0
    rows = []
    for stage in ("data", "embed", "label", "fit", "estimate", "select", "report"):
        info = runner.store.done_info(stage) or {}
        rows.append((stage, info.get("seconds", float("nan")), info.get("peak_rss_mib", float("nan"))))
    est = runner.store.done_info("estimate")
    lab = runner.store.done_info("label")
    m, n = runner.ctx.size()
    base_rate = exhaustive_baseline(run_dir)
    print(f"\ncorpus: {corpus} ({args.rows + args.targets:,} rows, dim {args.dim}), generated in {gen_s:.1f} s")
    print(f"M = {m:,}, N = {n:,}; executor {args.executor}\n")
    print("| stage | seconds | driver peak RSS (MiB) |\n|---|---:|---:|")
    for stage, sec, mib in rows:
        print(f"| {stage} | {sec:.1f} | {mib:.0f} |")
    print(f"| **total wall** | **{wall:.1f}** | |")
    print(
        f"\npeak memory: driver RSS {rss.peak_self / 2**20:.0f} MiB; driver + Ray processes PSS {rss.peak_tree / 2**20:.0f} MiB"
    )
    share = lab["pairs_labeled"] / (m * m + m * n)
    print(f"teacher pairs: {lab['pairs_labeled']:,} = {share:.2e} of M*M + M*N = {m * m + m * n:.3e}")
    recall = est.get("candidate_recall", {})
    print(f"estimate: {est['map_seconds']:.1f} s, candidate top-{cfg.estimate.topk} recall vs exhaustive: {recall}")
    exh = (m * m + m * n) / base_rate
    print(
        f"baseline, exhaustive estimation measured in this run: {base_rate:.3g} pairs/s -> {exh / 60:.0f} min "
        f"for all {m * m + m * n:.3e} pairs (candidates: {est['map_seconds'] / 60:.1f} min)"
    )
    secs = {stage: sec for stage, sec, _ in rows}
    est_ft = m * n / base_rate if "ft" not in recall else 0.0  # K_FT scored exhaustively: its share
    est_ff = max(secs["estimate"] - est_ft, 0.0)
    nodes = [int(x) for x in args.nodes.split(",")]
    print(f"\nprojection to {args.project:,} items (model: benchmarks/bench_pipeline_scale.py project()):\n")
    print(project(secs, m, est_ff, args.project, nodes, args.cores_per_node))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": m,
                    "targets": n,
                    "stages": {s: {"seconds": sec, "peak_rss_mib": mib} for s, sec, mib in rows},
                    "wall_seconds": wall,
                    "peak_rss_driver_mib": rss.peak_self / 2**20,
                    "peak_pss_tree_mib": rss.peak_tree / 2**20,
                    "teacher_pairs": lab["pairs_labeled"],
                    "candidate_recall": recall,
                    "exhaustive_pairs_per_second": base_rate,
                    "exhaustive_projected_seconds": exh,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
