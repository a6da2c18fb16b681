PYTHON ?= python

.PHONY: install test test-fast lint format bench bench-quick

install:
	$(PYTHON) -m pip install -e ".[test,lint,torch]"

test:
	$(PYTHON) -m pytest -q

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
