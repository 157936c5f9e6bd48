# scenetxtvar: `make demo` and `make test` each set up everything they need on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# timm imports torchvision, and this pair is the one that imports together here (see README).
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help setup test test-fast demo demo-full lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv with the pinned torch pair and the project (re-runs when pyproject changes)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR)
	$(BIN)/python -m pip install --quiet -e '.[dev,eval]' $(TORCH_PAIR)
	@touch $@

test: setup  ## run the test suite (CPU; gpu tests skip themselves)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## the suite without tests marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup  ## tokenizer -> base -> CAR stages on synthetic scenes, then evaluate (~14 CPU minutes on AVX2 only, 10-13 with bf16 instructions)
	$(BIN)/python -m scenetxtvar.demo --profile quick

demo-full: setup  ## the same with the budgets that aim at the legibility targets (~30 CPU minutes on 2 cores with bf16 instructions, ~57 on AVX2 only)
	$(BIN)/python -m scenetxtvar.demo --profile full

lint: setup  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup  ## benchmark scripts -> benchmarks/results/*.json + summary.md (takes a while on CPU)
	@mkdir -p benchmarks/results
	$(BIN)/python benchmarks/bench_infer.py --out benchmarks/results/bench_infer.json
	$(BIN)/python benchmarks/bench_tokenizer.py --out benchmarks/results/bench_tokenizer.json
	$(BIN)/python benchmarks/bench_tokenizer_train.py --out benchmarks/results/bench_tokenizer_train.json
	$(BIN)/python benchmarks/bench_pilot.py --out benchmarks/results/bench_pilot.json
	$(BIN)/python benchmarks/bench_train.py --out benchmarks/results/bench_train.json
	$(BIN)/python benchmarks/bench_data.py --out benchmarks/results/bench_data.json
	$(BIN)/python benchmarks/bench_data_gen.py --out benchmarks/results/bench_data_gen.json
	$(BIN)/python benchmarks/bench_sample.py --out benchmarks/results/bench_sample.json
	$(BIN)/python benchmarks/summary.py

clean:  ## remove caches and outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs
