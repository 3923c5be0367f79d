#!/usr/bin/env bash
# GPU check of the CUDA / vLLM paths, for a lent GPU machine (one short run; writes logs to $OUT or ./gpu_check).
#   bash benchmarks/gpu_check.sh
# 1. delift_icl on CUDA: prefix reuse vs full sequences (values within 1e-4) and pairs/s (benchmarks/bench_label.py)
# 2. estimation kernel on CUDA (EstimateWorker with device=cuda) equals the CPU result
# 3. vLLM backend (if vllm imports): teacher-forced prompt_logprobs utility equals the HF backend within 1e-3
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi | tee "$OUT/nvidia-smi.txt"
$PY benchmarks/bench_label.py --device cuda --examples 16 --targets 128 --batch-size 64 \
    --max-prompt-tokens 256 --max-response-tokens 256 --json "$OUT/bench_label_cuda.json" 2>&1 | tee "$OUT/bench_label_cuda.log"
$PY - <<'PY' 2>&1 | tee "$OUT/estimate_cuda.log"
import numpy as np, tempfile, torch
from pathlib import Path
from nncift.estimate import EstimateWorker, assemble_dense
from nncift.network import InfluenceNetwork
from nncift.pairs import block_grid
torch.manual_seed(0)
e = torch.randn(3000, 384)
net = InfluenceNetwork(384, 100)
p, q = net.project(e, e)
w2, b2 = net.head()
heads = {"ff": {"p": p.numpy(), "q": q.numpy(), "w2": w2, "b2": b2, "lo": 0.0, "hi": 1.0}}
outs = {}
for dev in ("cpu", "cuda"):
    d = Path(tempfile.mkdtemp())
    w = EstimateWorker(heads, str(d), device=dev)
    for b in block_grid("ff", 3000, 3000, 1024):
        w.run_block(b)
    outs[dev] = assemble_dense(d, "ff", (3000, 3000))
print("estimate cuda vs cpu max |diff|:", float(np.abs(outs["cpu"] - outs["cuda"]).max()))
PY
if $PY -c "import vllm" 2>/dev/null; then
$PY - <<'PY' 2>&1 | tee "$OUT/vllm.log"
import numpy as np
from nncift.influence import Items
from nncift.influence.delift_icl import build_delift_icl
from nncift.influence.delift_icl_vllm import build_delift_icl_vllm
from nncift.models import embedded_lm_dir
if __name__ == "__main__":
    path = str(embedded_lm_dir())
    ex = Items(["What is the capital of France?"], ["Paris."], np.zeros((1, 1), np.float32))
    tg = Items(["What is the capital of Japan?", "Name a prime."], ["Tokyo.", "7"], np.zeros((2, 1), np.float32))
    hf = build_delift_icl(path, device="cuda").utility(ex, tg)
    vl = build_delift_icl_vllm(path, device="cuda").utility(ex, tg)
    print("hf", hf, "vllm", vl, "max |diff|", float(np.abs(hf - vl).max()))
PY
else
  echo "vllm not importable: skipped (install the [vllm] extra in its own environment)" | tee "$OUT/vllm.log"
fi
