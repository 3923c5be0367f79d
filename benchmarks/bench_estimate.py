"""Benchmark: surrogate estimation throughput (pairs/s), and a large top-k run with its peak memory.

Side by side in one run, on the paper's network (mlp, hidden 100, embeddings 384):
  (1) the reference-style per-pair loop (concatenate [e_i; 0; e_j], one forward per pair);
  (2) a batched GEMM over concatenated pair features (the pair tensor is built for a block);
  (3) the factorised torch tile kernel (nncift.estimate.predict_block);
  (4) ours: the factorised compiled kernel (nncift.kernels.predict_block_np);
and the bilinear kind (--rank, default 256) with and without the cosine prior:
  (5) one BLAS GEMM of the augmented per-item factors (nncift.estimate.predict_factors);
and the estimates the choose stage can keep (nncift.choose), through the estimate worker (raw units, the
exact diagonal written over the tile):
  (6) a bilinear form on [e, 1] (diag_cosine, shrink_<l>: k = d + 1) and with per-item effects (additive: k = d + 3).

    .venv/bin/python benchmarks/bench_estimate.py                    # throughput table
    .venv/bin/python benchmarks/bench_estimate.py --scale 100000     # + 100k x 100k top-32 stripes, peak RSS
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import torch


def rate(fn, pairs: int, repeat: int = 3) -> float:
    fn()
    best = min(_timed(fn) for _ in range(repeat))
    return pairs / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--scale", type=int, default=0, help="also run an N x N top-k estimation (e.g. 100000)")
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--rank", type=int, default=256, help="bilinear tower width")
    args = ap.parse_args()

    from nncift.estimate import EstimateWorker, predict_block
    from nncift.kernels import predict_block_np
    from nncift.network import InfluenceNetwork
    from nncift.pairs import Block
    from nncift.synthetic import clustered_embeddings

    torch.manual_seed(0)
    d, h, b = args.dim, args.hidden, args.block
    emb, _ = clustered_embeddings(2 * b, d, seed=0)
    er, ec = emb[:b], emb[b:]
    net = InfluenceNetwork(d, h).eval()
    p, q = net.project(torch.from_numpy(er), torch.from_numpy(ec))
    w2, b2 = net.head()
    q_t = np.ascontiguousarray(q.numpy().T)
    results = []

    n_loop = 2000
    zero = np.zeros(1, np.float32)

    def per_pair():
        with torch.no_grad():
            for t in range(n_loop):
                x = np.concatenate([er[t % b], zero, ec[(7 * t) % b]])
                net.forward_concat(torch.from_numpy(x)[None]).item()

    results.append(("(1) per-pair loop (reference style)", rate(per_pair, n_loop, repeat=1)))
    side = 256
    ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")

    def gemm():
        x = np.concatenate([er[ii.reshape(-1)], np.zeros((side * side, 1), np.float32), ec[jj.reshape(-1)]], 1)
        with torch.no_grad():
            net.forward_concat(torch.from_numpy(x))

    results.append(("(2) batched GEMM on pair features", rate(gemm, side * side)))
    pt, qt_, w2t = p[:1024], q, torch.from_numpy(w2)
    results.append(("(3) factorised torch tiles", rate(lambda: predict_block(pt, qt_, w2t, b2), 1024 * b)))
    pn = np.ascontiguousarray(p.numpy()[:1024])
    results.append(("(4) ours: factorised compiled kernel", rate(lambda: predict_block_np(pn, q_t, w2, b2), 1024 * b)))
    # the bilinear surrogates: one BLAS GEMM of the augmented per-item factors per block
    from nncift.estimate import predict_factors
    from nncift.network import BilinearNetwork

    for rank, prior in ((args.rank, False), (args.rank, True)):
        bil = BilinearNetwork(d, rank=rank, symmetric=False, cosine_prior=prior).eval()
        f = bil.estimator(torch.from_numpy(er[:1024]), torch.from_numpy(ec))
        name = f"(5) bilinear r={rank}{' + cosine prior' if prior else ''} GEMM (k={f['p'].shape[1]})"
        results.append((name, rate(lambda f=f: predict_factors(f), 1024 * b)))
    # the chosen estimates of the choose stage: [e, 1] W against [e, 1] (+ effects), through the estimate worker
    from nncift.choose import Recipe, dot_factors

    rng = np.random.default_rng(0)
    w = rng.normal(size=(d + 1, d + 1)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name, eff in (("diag_cosine / shrink_<l>", False), ("additive", True)):
            rec = Recipe(name, "ff", free=False, view="embedding", W=w,
                         r=rng.normal(size=b).astype(np.float32) if eff else None,
                         c=rng.normal(size=b).astype(np.float32) if eff else None)  # fmt: skip
            pf, qf = dot_factors(rec, er, ec, rec.r, rec.c)
            head = {"type": "dot", "p": pf, "q": qf, "lo": 0.0, "hi": 1.0, "diag": np.ones(b, np.float32)}
            worker = EstimateWorker({"ff": head}, tmp, layout="dense")
            results.append((f"(6) chosen {name} (k={pf.shape[1]}), worker tile",
                            rate(lambda wk=worker: wk.predict_raw("ff", 0, 1024, 0, b), 1024 * b)))  # fmt: skip
    ref = results[0][1]
    print(f"torch threads {torch.get_num_threads()}, hidden {h}, dim {d}")
    print(f"{'method':40s} {'pairs/s':>12s} {'vs (1)':>10s}")
    for name, r in results:
        print(f"{name:40s} {r:12.3e} {r / ref:9.0f}x")
    ours = results[3][1]
    print(
        f"target >= 5e7 pairs/s: {'met' if ours >= 5e7 else 'NOT met'}; >= 3500x loop: "
        f"{'met' if ours / ref >= 3500 else 'NOT met'}"
    )
    slowest = min(r for name, r in results[4:])
    print(f"bilinear kinds and chosen estimates >= 3e8 pairs/s: {'met' if slowest >= 3e8 else 'NOT met'} "
          f"(slowest {slowest:.2e})")  # fmt: skip

    if args.scale:
        n = args.scale
        emb, _ = clustered_embeddings(n, d, seed=1)
        p, q = net.project(torch.from_numpy(emb), torch.from_numpy(emb))
        heads = {"ff": {"p": p.numpy(), "q": q.numpy(), "w2": w2, "b2": b2, "lo": 0.0, "hi": 1.0}}
        del emb
        with tempfile.TemporaryDirectory() as tmp:
            worker = EstimateWorker(heads, tmp, layout="sparse", topk=args.topk, col_chunk=8192)
            t0 = time.perf_counter()
            stripe = 1024
            for i, r0 in enumerate(range(0, n, stripe)):
                worker.run_block(Block("ff", i, r0, min(n, r0 + stripe), 0, n))
            dt = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(
            f"\n{n:,} x {n:,} estimation with top-{args.topk} per row: {dt:.1f} s "
            f"({n * n / dt:.3e} pairs/s), peak RSS {peak:.2f} GiB"
        )


if __name__ == "__main__":
    main()
