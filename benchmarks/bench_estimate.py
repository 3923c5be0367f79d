"""Benchmark: surrogate estimation throughput (pairs/s), and a large top-k run with its peak memory.

Side by side in one run, on the paper's network (mlp, hidden 100, embeddings 384):
  (1) the reference-style per-pair loop (concatenate [e_i; 0; e_j], one forward per pair);
  (2) a batched GEMM over concatenated pair features (the pair tensor is built for a block);
  (3) the factorised torch tile kernel (nncift.kernels.estimate_worker.predict_block);
  (4) ours: the factorised compiled kernel (nncift.surrogate.numba_kernels.predict_block_np);
and the bilinear kind (--rank, default 256) with and without the cosine prior:
  (5) one BLAS GEMM of the augmented per-item factors (nncift.kernels.estimate_worker.predict_factors);
and the estimates the choose stage can keep (nncift.surrogate.candidates), through the estimate worker (raw units, the
exact diagonal written over the tile):
  (6) a bilinear form on [e, 1] (diag_cosine, shrink_<l>: k = d + 1) and with per-item effects (additive: k = d + 3).
End to end through EstimateWorker.run_block (Parquet write included), on rank --rank factors of --sparse-m items:
  (7) sparse top-k row stripes (--stripe rows x every column, exact diagonal, row means): the numpy engine on the
      CPU beside the torch engine on --device at each --precision (on a GPU only (rows, k) come back);
  (8) dense tiles (--block square) on --device: computed and copied back (predict_raw) vs also written to
      Parquet (run_block), which shows what bounds a dense tile.

    .venv/bin/python benchmarks/bench_estimate.py                    # throughput table
    .venv/bin/python benchmarks/bench_estimate.py --scale 100000     # + 100k x 100k top-32 stripes, peak RSS
    .venv/bin/python benchmarks/bench_estimate.py --sparse-only --device cuda --precision fp32,tf32,bf16 \
        --sparse-m 1048576 --sparse-rows 32768                       # (7), (8) on a GPU: 1M columns
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
    ap.add_argument("--device", default="cpu", help="device of the torch engine in (7) and (8): cpu | cuda")
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated torch-engine precisions for (7)")
    ap.add_argument("--sparse-m", type=int, default=8192, help="(7): items (rows and columns) of the kernel")
    ap.add_argument("--sparse-rows", type=int, default=0, help="(7): rows timed (0 = all --sparse-m)")
    ap.add_argument("--stripe", type=int, default=4096, help="(7): rows per sparse stripe")
    ap.add_argument("--cpu-rows", type=int, default=0, help="(7): rows timed on the numpy engine (0 = --sparse-rows)")
    ap.add_argument("--sparse-only", action="store_true", help="only (7) and (8)")
    args = ap.parse_args()
    if args.sparse_only:
        sparse_cases(args)
        return

    from nncift.corpus.synthetic import clustered_embeddings
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.labels.plan import Block
    from nncift.surrogate.network import InfluenceNetwork
    from nncift.surrogate.numba_kernels import predict_block_np
    from nncift.surrogate.predict import predict_block

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
    from nncift.surrogate.network import BilinearNetwork
    from nncift.surrogate.predict import predict_factors

    for rank, prior in ((args.rank, False), (args.rank, True)):
        bil = BilinearNetwork(d, rank=rank, symmetric=False, cosine_prior=prior).eval()
        f = bil.estimator(torch.from_numpy(er[:1024]), torch.from_numpy(ec))
        name = f"(5) bilinear r={rank}{' + cosine prior' if prior else ''} GEMM (k={f['p'].shape[1]})"
        results.append((name, rate(lambda f=f: predict_factors(f), 1024 * b)))
    # the chosen estimates of the choose stage: [e, 1] W against [e, 1] (+ effects), through the estimate worker
    from nncift.surrogate.candidates import Recipe, dot_factors

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

    sparse_cases(args)

    if args.scale:
        n = args.scale
        emb, _ = clustered_embeddings(n, d, seed=1)
        p, q = net.project(torch.from_numpy(emb), torch.from_numpy(emb))
        heads = {"ff": {"type": "mlp", "p": p.numpy(), "q": q.numpy(), "w2": w2, "b2": b2, "lo": 0.0, "hi": 1.0}}
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


def sparse_cases(args) -> None:
    """(7) sparse top-k stripes and (8) dense tiles, end to end through the worker (see the module doc)."""
    from nncift.kernels.estimate_worker import EstimateWorker
    from nncift.labels.plan import Block

    m, f, stripe = args.sparse_m, args.rank, args.stripe
    rng = np.random.default_rng(0)
    scale = np.float32(1 / np.sqrt(f))
    head = {"type": "dot", "p": rng.normal(size=(m, f)).astype(np.float32) * scale,
            "q": rng.normal(size=(m, f)).astype(np.float32) * scale,
            "lo": 0.0, "hi": 1.0, "diag": np.ones(m, np.float32)}  # fmt: skip
    rows = min(m, args.sparse_rows or m)
    out = []

    def stripes(worker, n_rows):
        for i, r0 in enumerate(range(0, n_rows, stripe)):
            worker.run_block(Block("ff", i, r0, min(n_rows, r0 + stripe), 0, m))

    with tempfile.TemporaryDirectory() as tmp:
        cpu_rows = min(m, args.cpu_rows or rows)
        w = EstimateWorker({"ff": head}, tmp, layout="sparse", topk=args.topk, engine="numpy")
        out.append(("numpy", "cpu", "fp32", rate(lambda: stripes(w, cpu_rows), cpu_rows * m, repeat=2)))
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        for prec in args.precision.split(","):
            w = EstimateWorker({"ff": head}, tmp, device=args.device, layout="sparse", topk=args.topk,
                               engine="torch", precision=prec)  # fmt: skip
            out.append(("torch", args.device, prec, rate(lambda w=w: (stripes(w, rows), sync()), rows * m, repeat=2)))
        print(f"\n(7) sparse top-{args.topk} stripes, {m:,} columns, rank {f}, {stripe} rows per stripe, "
              f"exact diagonal and row means, Parquet write included (torch threads {torch.get_num_threads()})")  # fmt: skip
        print(f"{'engine':8s} {'device':8s} {'precision':10s} {'pairs/s':>12s} {'vs numpy':>9s} {'1M x 1M':>9s}")
        for eng, dev, prec, r in out:
            print(f"{eng:8s} {dev:8s} {prec:10s} {r:12.3e} {r / out[0][3]:8.1f}x {1e12 / r:8.0f}s")
        if args.device != "cpu":
            best = max(r for eng, *_, r in out if eng == "torch")
            print(f"target >= 5e10 pairs/s on the device: {'met' if best >= 5e10 else 'NOT met'} (best {best:.2e}); "
                  f">= 30x the CPU: {best / out[0][3]:.0f}x")  # fmt: skip
        # (8) dense tiles on the device: compute + copy back, then + Parquet write
        b = min(args.block, m)
        w = EstimateWorker({"ff": head}, tmp, device=args.device, layout="dense", engine="torch")
        tile = Block("ff", 0, 0, b, 0, b)
        r_copy = rate(lambda: w.predict_raw("ff", 0, b, 0, b), b * b)
        r_write = rate(lambda: w.run_block(tile), b * b)
        print(
            f"\n(8) dense {b} x {b} tiles on {args.device}: computed + copied back {r_copy:.3e} pairs/s; "
            f"+ Parquet write {r_write:.3e} pairs/s (the write takes {100 * (1 - r_write / r_copy):.0f}% of a tile)"
        )


if __name__ == "__main__":
    main()
