"""Benchmark: pairs/s of the DELIFT ICL utility, three ways, on the same pairs and model in one run.

(a) one padded forward per pair (reference style), (b) batched full sequences, (c) shared-prefix KV reuse.
All three score the response tokens (+ final EOS) of each target with gold-only log-softmax; the timed part
is d(with example) for every (example, target) pair (d(no example) is computed once per target in every mode
and excluded). Prints pairs/s, the ratios, and the maximum absolute difference of the values vs (a).

    .venv/bin/python benchmarks/bench_label.py                     # embedded SmolLM2-135M, ShareGPT pairs
    .venv/bin/python benchmarks/bench_label.py --model DIR --device cuda --examples 16 --targets 128
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from _common import items, label_parser, sharegpt_rows


def main() -> None:
    ap = label_parser(__doc__, targets=32, batch=16, tokens=128)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from nncift.influence.delift_icl import DeliftICL, pairs_per_second
    from nncift.models import load_causal_lm

    rows = sharegpt_rows(args.examples + args.targets)
    ex = rows[: args.examples]
    tg = rows[args.examples : args.examples + args.targets]

    t0 = time.perf_counter()
    model, tok = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s ({sum(p.numel() for p in model.parameters()):,} params)")
    kw = {
        "batch_size": args.batch_size,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_response_tokens": args.max_response_tokens,
    }
    fns = {m: DeliftICL(model, tok, mode=m, **kw) for m in ("single", "batched", "prefix")}
    e_items, t_items = items(ex), items(tg)
    enc = fns["prefix"].encode(t_items)
    lp = np.mean([len(fns["prefix"].prefix_ids(e)) for e in fns["prefix"].encode(e_items)])
    ls = np.mean([len(fns["prefix"].suffix_ids(t)[0]) for t in enc])
    print(
        f"{args.examples} examples x {args.targets} targets = {args.examples * args.targets} pairs; "
        f"mean prefix {lp:.0f} tokens, mean suffix {ls:.0f} tokens; batch {args.batch_size}; "
        f"{args.threads} threads on {args.device}"
    )
    fns["prefix"].icl_distance(items(ex[:1]), items(tg[:2]))  # warm-up
    res = {}
    for label, mode in (
        ("(a) one padded forward per pair", "single"),
        ("(b) batched full sequences", "batched"),
        ("(c) shared-prefix KV reuse", "prefix"),
    ):
        pps, vals = pairs_per_second(fns[mode], e_items, t_items)
        res[mode] = (label, pps, vals)
    ref = res["single"][2]
    print(f"\n{'method':36s} {'pairs/s':>9s} {'vs (a)':>7s} {'vs (b)':>7s} {'max |diff| vs (a)':>18s}")
    for mode in ("single", "batched", "prefix"):
        label, pps, vals = res[mode]
        print(
            f"{label:36s} {pps:9.2f} {pps / res['single'][1]:6.2f}x {pps / res['batched'][1]:6.2f}x "
            f"{np.abs(vals - ref).max():18.2e}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {m: {"pairs_per_s": r[1], "max_abs_diff": float(np.abs(r[2] - ref).max())} for m, r in res.items()},
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
