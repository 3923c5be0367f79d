#!/usr/bin/env bash
# GPU check of the fine-tuning path, for a lent GPU machine (one short run; logs under $OUT or ./gpu_check_ft).
#   bash benchmarks/gpu_check_finetune.sh            # uses every visible GPU as one Ray Train worker each
# 1. ZeRO-3, bf16, LoRA on SmolLM2 with one DeepSpeed rank per GPU (NCCL) under Ray Train: loss decreases,
#    an interrupted run resumes; train_summary.json records the engine's parameter dtype (bf16).
# 2. the same with full fine-tuning (ZeRO-3 partitions every weight).
# 3. evaluation on CUDA (generation + held-out loss) of the fine-tuned adapter.
set -uo pipefail
OUT=${OUT:-gpu_check_ft}
mkdir -p "$OUT"
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi | tee "$OUT/nvidia-smi.txt"
COMMON=(--config jobs/configs/compare_smollm2.yaml --set data.pool_size=300 --set data.test_size=40
        --set finetune.use_gpu=true --set finetune.num_workers="$NGPU" --set finetune.deepspeed=zero3
        --set finetune.precision=bf16 --set finetune.micro_batch_size=4 --set finetune.batch_size=$((8 * NGPU))
        --set embed.device=cuda --set embed.num_gpus=0.5 --set eval.device=cuda --set eval.num_gpus=1
        --set eval.batch_size=20)
RUN="$OUT/run"
rm -rf "$RUN"
# 1. LoRA: stopped after the checkpoint of step 3 (as if killed), then resumed to the end
$PY - "$RUN" "${COMMON[@]}" <<'PY' 2>&1 | tail -n 40 | tee "$OUT/lora_resume.log"
import json, sys
from nncift.runner import Runner
from nncift.stages.finetune import finetune
from nncift.config import load_config
if __name__ == "__main__":
    run, args = sys.argv[1], sys.argv[2:]
    cfg = load_config(args[1], [a for a in args[2:] if a != "--set"])
    r = Runner(cfg, run)
    print("interrupted:", finetune(r.ctx, "random", stop_after=3))
    s = finetune(r.ctx, "random")
    recs = [json.loads(x) for x in open(f"{run}/finetune/random/progress.jsonl")]
    print("resumed:", s)
    print("steps", len(recs), "first loss", recs[0]["loss"], "last loss", recs[-1]["loss"])
    import torch
    print("cuda devices", torch.cuda.device_count())
PY
# 2. full fine-tuning, ZeRO-3 bf16
$PY -m nncift.cli finetune --run-dir "$RUN" --subset nncift "${COMMON[@]}" --set finetune.method=full \
    --set finetune.lr=2e-5 2>&1 | tail -n 30 | tee "$OUT/full_zero3.log"
# 3. evaluation on CUDA
$PY -m nncift.cli evaluate --run-dir "$RUN" --subset random "${COMMON[@]}" 2>&1 | tail -n 20 | tee "$OUT/eval.log"
cp -r "$RUN"/finetune/*/train_summary.json "$RUN"/finetune/*/eval/eval.json "$OUT"/ 2>/dev/null
