PYTHON ?= python

.PHONY: install test test-fast lint format bench bench-quick replication gpu-compile-report accelerator-check parity parity-report

install:
	$(PYTHON) -m pip install -e ".[test,lint,torch,agents,compare]"

# Two workers (or one per core): most tests wait on XLA compiling on one core.
# loadscope keeps each module on one worker, so module fixtures (trained runs) run once.
test:
	$(PYTHON) -m pytest -q -n auto --dist loadscope

# The suite without the tests marked slow (decorated, or listed in tests/slow_tests.txt):
# under a minute on 2 cores.
test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench:
	$(PYTHON) -m experiments.benchmarks.model --json results/benchmark_cpu.json

bench-quick:
	$(PYTHON) -m experiments.benchmarks.model --quick --json results/benchmark_cpu_quick.json

# The groups with a full report, and the replication's main regime at batch 16 (cosine,
# constant rate, 4,000-step cosine) for a pooled analysis of its own.
REPLICATION_REPORTS = v80_s512_b16_2k v80_s512_b16_2k_constant_lr v80_s512_b16_2k_headline \
	v80_s1024_b16_2k_headline v96_s768_b64_2k v96_s768_b16_4k v80_s512_b64_2k_lr_grid
REPLICATION_V80_S512_B16 = v80_s512_b16_2k v80_s512_b16_2k_constant_lr v80_s512_b16_4k
comma := ,
space := $(subst ,, )

# The replication's published records through our analysis: results/replication/ (its
# README says what is there), rebuilt from data/replication_runs alone.
replication:
	rm -rf results/replication/runs
	$(PYTHON) -m experiments.replication.importer --out=results/replication/runs
	for g in $(REPLICATION_REPORTS); do \
		$(PYTHON) -m experiments.report --workdir=results/replication/runs/$$g || exit 1; done
	$(PYTHON) -m experiments.replication.analyze --runs=results/replication/runs --baseline=raw \
		--out=results/replication/analysis.json > results/replication/analysis.md
	$(PYTHON) -m experiments.replication.analyze --baseline=raw --reads=ns5 \
		--runs=$(subst $(space),$(comma),$(addprefix results/replication/runs/,$(REPLICATION_V80_S512_B16))) \
		> results/replication/analysis_v80_s512_b16.md

# The Pallas kernels compiled offline for sm_80 and sm_90 (needs the gpu-report extra).
gpu-compile-report:
	$(PYTHON) -m experiments.accelerators.compile_report --json results/gpu_compile_report.json

# On a machine with one NVIDIA GPU: kernels, benchmark and a training slice, under
# results/accelerator/ (docs/accelerators.md has the time budget).
accelerator-check:
	$(PYTHON) -m experiments.accelerators.check --out results/accelerator

# The parity preset on this machine, one seed at a time, each in its own workdir and
# resumed where it stopped (Ctrl-C, a kill or a lost session); then results/parity is
# rebuilt from every workdir there is. On an accelerator, one command runs all 16 seeds:
# python -m experiments.run --config=configs/noisy_ar.py:parity --workdir=PATH
PARITY_RUNS ?= workdirs/parity
PARITY_SEEDS ?= 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26
parity:
	for s in $(PARITY_SEEDS); do \
		$(PYTHON) -m experiments.run --config=configs/noisy_ar.py:parity \
			--config.seeds.first_seed=$$s --config.seeds.num_seeds=1 \
			--workdir=$(PARITY_RUNS)/seed$$s || exit 1; done
	$(MAKE) parity-report

parity-report:
	$(PYTHON) -m experiments.parity.report --runs=$(PARITY_RUNS) --out=results/parity
