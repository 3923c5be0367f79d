"""One Markdown table from the JSON files benchmarks/gpu_check.sh leaves in its output folder.

python3 benchmarks/gpu_check_table.py gpu_check
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check")
    lines = ["| check | figure |", "|---|---|"]
    for shape in ("135m", "1.7b", "8b"):
        f = out / f"teacher_{shape}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        s = r["setup"]
        roof = s.get("roofline_pairs_per_s")
        for mode in ("single", "batched", "prefix", "auto"):
            if mode not in r:
                continue
            m = r[mode]
            share = f", {100 * m['roofline_share']:.0f}% of the prefix roofline ({roof:,.0f})" if roof else ""
            chose = f" (chose {m['chose']})" if m.get("chose") else ""
            ph = m.get("phases")
            phases = (
                f"; phases s: tokenise {ph['tokenise']:.2f}, prefix {ph['prefix']:.2f}, body {ph['body']:.2f}, "
                f"head {ph['head']:.2f}" if ph else ""
            )  # fmt: skip
            lines.append(
                f"| teacher {shape} {s['dtype'].replace('torch.', '')} {mode}{chose} | {m['pairs_per_s']:,.0f} "
                f"pairs/s{share}; max diff vs {next(iter(k for k in r if k in ('single', 'batched')))} "
                f"{m['max_abs_diff']:.1e}{phases} |"
            )
        if "fp32_max_abs_diff" in r:
            lines.append(
                f"| teacher {shape} bf16 vs fp32 | max diff of d(with example) {r['fp32_max_abs_diff']:.1e} on a "
                f"spread of {r['fp32_spread']:.1e} |"
            )
    f = out / "fit.json"
    if f.is_file():
        for kind, r in json.loads(f.read_text()).items():
            secs = ", ".join(f"{d} {s:.2f} s/epoch" for d, s in r["s_per_epoch"].items())
            lines.append(f"| fit {kind} | {secs}; {r['speedup']:.1f}x; max diff {r['max_abs_diff']:.1e} |")
    for method in ("lora", "full"):
        f = out / f"finetune_{method}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            lines.append(
                f"| DeepSpeed {method} {r['deepspeed']} ({r['optimizer']}, arch list {r['TORCH_CUDA_ARCH_LIST']}) | "
                f"{r['steps']} steps in {r['seconds_train']:.1f} s ({r['seconds_total']:.1f} s with start-up), loss "
                f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}, parameters {r['param_dtype']} |"
            )
    for name in ("estimate.log", "tests.log"):
        f = out / name
        if f.is_file():
            tail = [x for x in f.read_text().splitlines() if x.strip()][-1:]
            lines.append(f"| {name[:-4]} | {tail[0] if tail else '(empty)'} (full log: {name}) |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
