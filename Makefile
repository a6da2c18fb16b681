PYTHON ?= python

.PHONY: install test test-fast bench bench-quick

install:
	$(PYTHON) -m pip install -e ".[test,torch]"

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	$(PYTHON) -m experiments.benchmark --json results/benchmark_cpu.json

bench-quick:
	$(PYTHON) -m experiments.benchmark --quick --json results/benchmark_cpu_quick.json
