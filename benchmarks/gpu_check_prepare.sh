#!/usr/bin/env bash
# Prepare, on a machine of ours, what benchmarks/gpu_check.sh needs on a bare GPU machine besides the repository
# (at most 60 MB, in the git-ignored folder .gpu/, which the device call carries):
#   .gpu/cache/SmolLM2-135M-Instruct/  SmolLM2's config and tokenizer files (no weights: the checks build
#                                      random-weight models of real shapes), found through NNCIFT_CACHE
#   .gpu/sharegpt.parquet              the benchmarks' ShareGPT rows (NNCIFT_BENCH_ROWS)
#   .gpu/whl/                          DeepSpeed's sdist and the wheels of its missing dependencies (Python 3.12)
#     bash benchmarks/gpu_check_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/cache/SmolLM2-135M-Instruct .gpu/whl
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
SRC=$($PY -c "from nncift.lm.models import embedded_lm_dir; print(embedded_lm_dir())")
cp "$SRC"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} .gpu/cache/SmolLM2-135M-Instruct/
cp "$SRC"/*.jinja .gpu/cache/SmolLM2-135M-Instruct/ 2>/dev/null || true
$PY - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
import pyarrow as pa, pyarrow.parquet as pq
from _common import sharegpt_rows
rows = sharegpt_rows(600)
pq.write_table(pa.Table.from_pylist([{"prompt": r["prompt"], "response": r["response"]} for r in rows]), ".gpu/sharegpt.parquet")
PY
$PY -m pip download -q --no-deps --no-binary=:all: deepspeed==0.19.8 -d .gpu/whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    pydantic==2.14.4 pydantic-core==2.50.5 hjson==3.1.0 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh .gpu
