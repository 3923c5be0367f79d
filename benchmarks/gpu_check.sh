#!/usr/bin/env bash
# GPU check for a bare lent GPU machine (torch, transformers, peft, numpy, pyarrow, numba, safetensors; no Ray,
# faiss, vLLM, GGUF or Hub): local executor, random-weight Llama models of real shapes. One table out.
#   here:  bash benchmarks/gpu_check_prepare.sh         # .gpu/: tokenizer, ShareGPT rows, DeepSpeed (< 60 MB)
#   there: bash benchmarks/gpu_check.sh                 # carry .gpu; logs + JSON + table.md under $OUT
#          PARTS="teacher finetune" bash benchmarks/gpu_check.sh   # a subset, in this order
# teacher:  DELIFT ICL pairs/s per mode (batched / prefix / auto) on the 135M, 1.7B and 8B shapes, bf16, 256/256
#           tokens, share of the prefix-mode roofline; bf16 vs fp32 values on 135M; phase breakdown
# estimate: EstimateWorker sparse top-32 at rank 256, numpy CPU vs torch CUDA (fp32 / tf32 / bf16), dense tiles
# fit:      the local surrogate fit, CPU vs CUDA
# finetune: DeepSpeed LoRA ZeRO-2 and full ZeRO-3 steps with the default optimizer, Hopper arch list set
# tests:    the tests marked gpu (CUDA equal to the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
PARTS=${PARTS:-teacher estimate fit finetune tests}
mkdir -p "$OUT"
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
export NNCIFT_CACHE="$PWD/.gpu/cache" NNCIFT_BENCH_ROWS="$PWD/.gpu/sharegpt.parquet" PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
T=(--device cuda --max-prompt-tokens 256 --max-response-tokens 256)
teacher() {
  timeout 120 $PY benchmarks/bench_label.py --shape 135m "${T[@]}" --examples 16 --targets 64 --batch-size 64 \
      --modes batched,prefix,auto --fp32-reference --json "$OUT/teacher_135m.json" 2>&1 | tee "$OUT/teacher.log"
  timeout 120 $PY benchmarks/bench_label.py --shape 8b "${T[@]}" --examples 6 --targets 64 --batch-size 64 \
      --modes batched,prefix --json "$OUT/teacher_8b.json" 2>&1 | tee -a "$OUT/teacher.log"
  timeout 120 $PY benchmarks/bench_label.py --shape 1.7b "${T[@]}" --examples 8 --targets 64 --batch-size 64 \
      --modes batched,prefix --json "$OUT/teacher_1.7b.json" 2>&1 | tee -a "$OUT/teacher.log"
}
estimate() {
  timeout 150 $PY benchmarks/bench_estimate.py --sparse-only --device cuda --precision fp32,tf32,bf16 \
      --sparse-m 1048576 --sparse-rows 32768 --cpu-rows 4096 2>&1 | tee "$OUT/estimate.log"
}
fit() {
  timeout 90 $PY benchmarks/bench_fit.py --device cuda --pairs 30000 --epochs 2 --json "$OUT/fit.json" 2>&1 \
      | tee "$OUT/fit.log"
}
finetune() {
  # DeepSpeed from its sdist with no op prebuilt (DS_BUILD_OPS=0) and the wheels it needs
  DS_BUILD_OPS=0 timeout 120 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target /tmp/ds .gpu/whl/* 2>&1 | tail -n 3 | tee "$OUT/finetune.log"
  for cfg in "lora zero2" "full zero3"; do
    set -- $cfg
    PYTHONPATH="$PYTHONPATH:/tmp/ds" timeout 120 $PY benchmarks/bench_finetune_gpu.py --method "$1" --deepspeed "$2" \
        --json "$OUT/finetune_$1.json" 2>&1 | grep -v "it/s\]\|step/s\]" | tail -n 8 | tee -a "$OUT/finetune.log"
  done
}
tests() {
  timeout 120 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/surrogate/test_fitting.py tests/kernels/test_blocks.py \
      tests/influence/test_prefix_attention.py 2>&1 | tail -n 15 | tee "$OUT/tests.log"
}
for part in $PARTS; do  # in the order given; the table is rewritten after each part (a cut-off run keeps it)
  echo "== $part" && "$part"
  $PY benchmarks/gpu_check_table.py "$OUT" > "$OUT/table.md"
done
cat "$OUT/table.md"
