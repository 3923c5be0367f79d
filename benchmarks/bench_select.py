"""Benchmark: subset selection speed and quality, each figure next to its baseline in the same run.

1. Dense facility location, 3,000 items, budget 300: ours (vectorised lazy greedy) vs submodlib LazyGreedy
   vs apricot (if installed) vs our naive greedy: seconds and objective.
2. Sparse FL on per-row top-k kernels (k = 32) over 10k, 100k and 1M items (budget 10%): lazy greedy (exact)
   and stochastic greedy: seconds and objective.
3. Partitioned two-round greedy (GreeDi, local twin of the Ray fan-out) vs centralised greedy: objective ratio.

    .venv/bin/python benchmarks/bench_select.py [--sizes 10000 100000 1000000] [--parts 8]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def sparse_kernel(m: int, k: int, dim: int = 64, clusters: int = 200, seed: int = 0):
    """Per-row top-k kernel: k random same-cluster neighbours per item, valued by embedding cosine."""
    from nncift.corpus.synthetic import clustered_embeddings
    from nncift.selection.sparse import SparseKernel

    emb, labels = clustered_embeddings(m, dim, clusters, seed=seed)
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=clusters)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng(seed)
    cols = order[starts[labels][:, None] + (rng.random((m, k)) * sizes[labels][:, None]).astype(np.int64)]
    vals = np.empty((m, k), np.float32)
    for s in range(0, m, 65536):
        e = min(m, s + 65536)
        vals[s:e] = np.einsum("id,ikd->ik", emb[s:e], emb[cols[s:e]])
    return SparseKernel.from_topk(cols, vals, m).scaled()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--greedi-size", type=int, default=100_000)
    args = ap.parse_args()

    from nncift.corpus.synthetic import clustered_embeddings
    from nncift.selection.greedy import lazy_greedy, minmax_scale, naive_greedy
    from nncift.selection.sparse import (
        greedi_local_round,
        greedi_merge,
        partition_items,
        sparse_lazy_greedy,
        sparse_objective,
        stochastic_greedy,
    )

    print("== 1. dense FL, 3,000 items, budget 300 ==")
    x, _ = clustered_embeddings(3000, 64, 30, seed=0)
    kd = minmax_scale(x @ x.T)

    def obj(idx):
        return float(kd[:, np.asarray(idx)].max(1).sum())

    rows = []
    (idx, _), t = timed(lambda: lazy_greedy(kd, 300))
    rows.append(("ours (vectorised lazy greedy)", t, obj(idx)))
    (idx, _), t = timed(lambda: naive_greedy(kd, 300))
    rows.append(("ours naive greedy (reference)", t, obj(idx)))
    try:
        from submodlib import FacilityLocationFunction

        def sub():
            f = FacilityLocationFunction(n=3000, mode="dense", sijs=kd, separate_rep=False)
            return [
                i
                for i, _ in f.maximize(
                    budget=300,
                    optimizer="LazyGreedy",
                    stopIfZeroGain=False,
                    stopIfNegativeGain=False,
                    show_progress=False,
                )
            ]

        idx, t = timed(sub)
        rows.append(("submodlib LazyGreedy", t, obj(idx)))
    except ImportError:
        rows.append(("submodlib (not installed)", float("nan"), float("nan")))
    try:
        from apricot import FacilityLocationSelection

        FacilityLocationSelection(5, metric="precomputed", optimizer="lazy").fit(kd[:10, :10])  # JIT warm-up
        sel = FacilityLocationSelection(300, metric="precomputed", optimizer="lazy")
        _, t = timed(lambda: sel.fit(kd))
        rows.append(("apricot lazy", t, obj(sel.ranking)))
    except ImportError:
        rows.append(("apricot (not installed)", float("nan"), float("nan")))
    for name, t, v in rows:
        print(f"{name:34s} {t:8.2f} s   objective {v:10.2f}")

    print(f"\n== 2. sparse FL, top-{args.k} per row, budget 10% ==")
    for m in args.sizes:
        kern, tb = timed(lambda m=m: sparse_kernel(m, args.k))
        budget = m // 10
        (idx, _), tl = timed(lambda kern=kern, budget=budget: sparse_lazy_greedy(kern, budget))
        (ids, _), ts = timed(lambda kern=kern, budget=budget: stochastic_greedy(kern, budget, eps=0.1))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(
            f"M={m:>9,}: kernel built {tb:6.1f} s | lazy greedy {tl:7.1f} s obj {sparse_objective(kern, idx):12.1f}"
            f" | stochastic {ts:6.1f} s obj {sparse_objective(kern, ids):12.1f} | peak RSS {peak:.2f} GiB"
        )

    m = args.greedi_size
    print(f"\n== 3. partitioned greedy (GreeDi, {args.parts} parts) vs centralised, M={m:,}, budget 10% ==")
    kern = sparse_kernel(m, args.k, seed=1)
    budget = m // 10
    (cen, _), tc = timed(lambda: sparse_lazy_greedy(kern, budget))
    parts = partition_items(m, args.parts, seed=0)
    (gre, _), tg = timed(lambda: greedi_merge(kern, [greedi_local_round(kern, p, budget) for p in parts], budget))
    vc, vg = sparse_objective(kern, cen), sparse_objective(kern, gre)
    print(
        f"centralised {tc:.1f} s obj {vc:.1f} | GreeDi (sequential local twin) {tg:.1f} s obj {vg:.1f} | "
        f"ratio {vg / vc:.4f}"
    )


if __name__ == "__main__":
    main()
