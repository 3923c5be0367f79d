"""Benchmark: pairs/s of the DELIFT ICL utility in each mode, on the same pairs and model in one run.

(a) ``single``: one padded forward per pair (reference style); (b) ``batched``: full sequences, batched;
(c) ``prefix``: each example's prefix run once, its targets attending over the prefix's keys / values shared
across the batch. All score the response tokens (+ final EOS) of each target with gold-only log-probs; the
timed part is d(with example) for every (example, target) pair (d(no example) is computed once per target
and excluded). Prints pairs/s, the ratios, the max |diff| of the values vs the first mode, a phase breakdown
(tokenise / prefix forward / model body / LM head, a separate profiled pass), and on CUDA the share of the
prefix-mode roofline (2 x parameters x mean suffix tokens FLOP per pair, the measure of docs/gpu.md at ``--peak-tflops``).

    .venv/bin/python benchmarks/bench_label.py                     # embedded SmolLM2-135M, ShareGPT pairs
    .venv/bin/python benchmarks/bench_label.py --model DIR --device cuda --examples 16 --targets 128
    python3 benchmarks/bench_label.py --shape 8b --device cuda    # random weights of a real shape (GPU check)
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from _common import items, label_parser, random_lm, sharegpt_rows

LABELS = {
    "single": "(a) one padded forward per pair",
    "batched": "(b) batched full sequences",
    "prefix": "(c) shared-prefix attention",
    "auto": "(d) auto (the faster of b / c)",
}


def main() -> None:
    ap = label_parser(__doc__, targets=32, batch=16, tokens=128)
    ap.add_argument("--shape", default=None, help="random-weight Llama of a real shape: 135m | 1.7b | 8b")
    ap.add_argument("--modes", default="single,batched,prefix", help="comma-separated; the first is the reference")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 matrix rate for the roofline")
    ap.add_argument("--fp32-reference", action="store_true", help="also score in float32: report bf16 vs fp32")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from nncift.influence.delift_icl import DeliftICL, pairs_per_second
    from nncift.lm.models import load_causal_lm

    rows = sharegpt_rows(args.examples + args.targets)
    ex, tg = rows[: args.examples], rows[args.examples : args.examples + args.targets]
    t0 = time.perf_counter()
    if args.shape:
        model, tok = random_lm(args.shape, args.device, args.dtype)
    else:
        model, tok = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    print(f"model loaded in {time.perf_counter() - t0:.1f} s ({n_params:,} params, {dtype}) on {args.device}")
    kw = {
        "batch_size": args.batch_size,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_response_tokens": args.max_response_tokens,
    }
    modes = args.modes.split(",")
    fns = {m: DeliftICL(model, tok, mode=m, **kw) for m in modes}
    e_items, t_items = items(ex), items(tg)
    f0 = fns[modes[0]]
    lp = np.mean([len(f0.prefix_ids(e)) for e in f0.encode(e_items)])
    ls = np.mean([len(f0.suffix_ids(t)[0]) for t in f0.encode(t_items)])
    print(
        f"{args.examples} examples x {args.targets} targets = {args.examples * args.targets} pairs; "
        f"mean prefix {lp:.0f} tokens, mean suffix {ls:.0f} tokens; batch {args.batch_size}; "
        f"{args.threads} threads"
    )
    for m in modes:  # warm-up (kernels, allocator) on a slice
        fns[m].icl_distance(items(ex[:1]), items(tg[: min(len(tg), args.batch_size)]))
    fns = {m: DeliftICL(model, tok, mode=m, **kw) for m in modes}  # fresh: auto decides inside the timed run
    res = {}
    for m in modes:
        pps, vals = pairs_per_second(fns[m], e_items, t_items)
        res[m] = {"pairs_per_s": pps, "vals": vals}
        if m == "auto":
            res[m]["chose"] = fns[m]._auto
    ref = res[modes[0]]["vals"]
    roof = args.peak_tflops * 1e12 / (2.0 * n_params * ls) if args.device.startswith("cuda") else None
    print(f"\n{'method':36s} {'pairs/s':>9s} {'vs ' + modes[0]:>10s} {'max |diff|':>11s} {'roofline':>9s}")
    for m in modes:
        r = res[m]
        r["max_abs_diff"] = float(np.abs(r["vals"] - ref).max())
        r["roofline_share"] = None if roof is None else r["pairs_per_s"] / roof
        share = "" if roof is None else f"{100 * r['roofline_share']:8.0f}%"
        label = LABELS[m] + (f" -> {r['chose']}" if "chose" in r else "")
        print(
            f"{label:36s} {r['pairs_per_s']:9.2f} {r['pairs_per_s'] / res[modes[0]]['pairs_per_s']:9.2f}x "
            f"{r['max_abs_diff']:11.2e} {share}"
        )
    if roof is not None:
        print(f"prefix-mode roofline at {args.peak_tflops:.0f} TFLOP/s: {roof:,.0f} pairs/s")
    # phase breakdown: a separate pass with synchronised timers (slower than the timed pass above)
    print(f"\nphases (s, one profiled pass): {'mode':>8s} tokenise   prefix     body     head")
    for m in modes:
        if m == "single":
            continue
        fn = DeliftICL(model, tok, mode=m if m != "auto" else res[m]["chose"], **kw)
        fn.profile = True
        fn.icl_distance(e_items, t_items)
        res[m]["phases"] = dict(fn.phases)
        print(f"{'':31s}{m:>8s} " + " ".join(f"{fn.phases[k]:8.3f}" for k in ("tokenise", "prefix", "body", "head")))
    if args.fp32_reference and dtype != torch.float32:
        model32 = model.float()
        fn = DeliftICL(model32, tok, mode="batched", **kw)
        u16 = res[modes[-1]]["vals"]
        u32 = fn.icl_distance(e_items, t_items)
        diff = float(np.abs(u16 - u32).max())
        print(f"\n{dtype} vs float32 d(with example): max |diff| {diff:.2e} on a spread of {np.ptp(u32):.2e}")
        res["fp32_max_abs_diff"], res["fp32_spread"] = diff, float(np.ptp(u32))
    if args.json:
        out = {
            k: ({kk: vv for kk, vv in v.items() if kk != "vals"} if isinstance(v, dict) else v) for k, v in res.items()
        }
        out["setup"] = {"shape": args.shape, "params": n_params, "dtype": str(dtype), "device": args.device,
                        "examples": args.examples, "targets": args.targets, "batch_size": args.batch_size,
                        "mean_prefix": float(lp), "mean_suffix": float(ls), "roofline_pairs_per_s": roof}  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
