PYTHON ?= python

.PHONY: install test test-fast lint format bench bench-quick

install:
	$(PYTHON) -m pip install -e ".[test,lint,torch,agents]"

# Two workers (or one per core): most tests wait on XLA compiling on one core.
# loadscope keeps each module on one worker, so module fixtures (trained runs) run once.
test:
	$(PYTHON) -m pytest -q -n auto --dist loadscope

# The suite without the tests marked slow: well under a minute.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench:
	$(PYTHON) -m experiments.benchmark --json results/benchmark_cpu.json

bench-quick:
	$(PYTHON) -m experiments.benchmark --quick --json results/benchmark_cpu_quick.json
