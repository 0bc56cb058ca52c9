# Two commands: `make demo` and `make test`. Both install first (idempotent).
# `make gpu-check` is for a lent GPU machine (see README, "GPU"); it uses that machine's Python.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this project's machines; on a CUDA machine pip picks its default.
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed

# The GPU machine's own Python (torch with CUDA, lightning, pytest), not .venv.
GPU_PYTHON ?= python3

.PHONY: install test demo lint clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch; \
	else \
		$(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=15 tests

demo: install
	$(BIN)/python -m examples.demo

lint: install
	$(BIN)/ruff check .

# DRYRUN=1: list the checks and which wheels are missing, install and run nothing.
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check $(if $(DRYRUN),--dry-run) $(if $(ONLY),--only $(ONLY))

clean:
	rm -rf $(VENV) .pytest_cache
