"""Benchmark: the local surrogate fit (:func:`nncift.surrogate.fitting.fit_loop`) on the CPU and on ``--device``, same data.

Random embeddings and labels of the default fit's sizes (d = 384, bilinear rank 256 and the paper's MLP), a
fixed number of epochs (no early stopping); prints seconds per epoch on each device, the speed-up, and the
largest difference of the fitted outputs (the GPU fit equals the CPU fit within float32 reduction order).

    .venv/bin/python benchmarks/bench_fit.py                      # CPU only
    python3 benchmarks/bench_fit.py --device cuda --json out.json # CPU vs GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from nncift.surrogate.fitting import PairLabels, fit_loop, predict_pairs
    from nncift.surrogate.network import network_from_config

    rng = np.random.default_rng(0)
    e = rng.standard_normal((args.items, 384)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    r, c = rng.integers(0, args.items, args.pairs), rng.integers(0, args.items, args.pairs)
    y = (np.einsum("pd,pd->p", e[r], e[c]) + 0.1 * rng.standard_normal(args.pairs)).astype(np.float32)
    tr, va = PairLabels(r[:-2000], c[:-2000], y[:-2000]), PairLabels(r[-2000:], c[-2000:], y[-2000:])
    out = {}
    for kind in ("bilinear", "mlp"):
        cfg = {"kind": kind, "hidden": 100, "rank": 256, "symmetric": True, "cosine_prior": True, "lr": 1e-3,
               "weight_decay": 0.0, "epochs": args.epochs, "batch_size": 256, "patience": 10**6, "seed": 0}  # fmt: skip
        preds, secs = {}, {}
        for dev in dict.fromkeys(("cpu", args.device)):
            t0 = time.perf_counter()
            state, _ = fit_loop(cfg, e, e, tr, va, device=dev)
            secs[dev] = (time.perf_counter() - t0) / args.epochs
            net = network_from_config(cfg, 384)
            net.load_state_dict(state)
            et = torch.from_numpy(e)
            preds[dev] = predict_pairs(net.eval(), et, et, va)
        diff = float(np.abs(preds["cpu"] - preds[args.device]).max())
        out[kind] = {"s_per_epoch": secs, "speedup": secs["cpu"] / secs[args.device], "max_abs_diff": diff}
        print(
            f"fit {kind:8s} {len(tr):,} pairs: " + ", ".join(f"{d} {s:.2f} s/epoch" for d, s in secs.items())
            + f"; speed-up {out[kind]['speedup']:.2f}x; max |diff| of the fitted outputs {diff:.1e}"
        )  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
