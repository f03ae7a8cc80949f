# vlmtune: `make demo` runs the whole pipeline on a local Ray cluster (CPU, tiny model, sample catalog);
# `make test` runs the test suite. Both create .venv on first use (torch 2.13.0 first, so pip never
# pulls a multi-GB CUDA build on a CPU machine; then the project at the versions in constraints.txt).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo-cpu.yaml

.PHONY: install bytecode demo test test-fast lint bench k8s clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Every Ray worker and CLI subprocess imports vlmtune anew. Where PYTHONDONTWRITEBYTECODE is set (CI
# images often do) Python never caches bytecode, so each of them compiles src/ again (~0.6 s of CPU): compile
# it once here (unchanged files are skipped; a file edited later is recompiled in memory, as without this).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q src tests

demo: bytecode
	$(BIN)/python jobs/demo.py --config $(DEMO_CONFIG)

test: bytecode
	$(BIN)/python -m pytest tests

test-fast: bytecode
	$(BIN)/python -m pytest tests -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests jobs bench

# k8s/*.yaml from k8s/kustomize/ (kustomize, then the comments of the sources put back); tests/infra/test_k8s.py
# fails while the committed files differ from this render.
k8s: $(STAMP)
	$(BIN)/python -m tests.infra.k8s_render

bench: bytecode
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/prepare.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
