#!/usr/bin/env bash
# Measured subset comparison on the embedded default (issue #5): LoRA on SmolLM2-135M-Instruct with DeepSpeed
# ZeRO-2 on 2 Ray Train workers, for the subsets random / NN-CIFT / exact DELIFT-SE / base / full, evaluated
# on 60 held-out ShareGPT pairs (ROUGE-L, embedding similarity, held-out loss).
#   bash benchmarks/compare_subsets.sh [--set key=value ...]     # ~45 min on 2 CPU cores; resumable
# Output: runs/compare/compare/compare.md (table), compare.png (plot), compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
RUN=${RUN:-runs/compare}
time .venv/bin/nncift compare --config jobs/configs/compare_smollm2.yaml --run-dir "$RUN" "$@"
cat "$RUN/compare/compare.md"
