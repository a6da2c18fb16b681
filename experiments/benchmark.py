"""``python -m experiments.benchmark``: runs ``python -m experiments.benchmarks.model``.

Kept while experiments/accelerator_check.py starts the benchmark under this name; the
command is ``experiments.benchmarks.model``.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("experiments.benchmarks.model", run_name="__main__", alter_sys=True)
