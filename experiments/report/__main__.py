"""Rebuild the study's tables, tests and plots from a training workdir.

    python -m experiments.report --workdir=DIR [--threshold=0.8]

Reads ``DIR/metrics.jsonl`` and ``DIR/run_config.json`` (optional; missing keys are
inferred from the metrics) and writes into ``DIR``: ``results.json``, ``results.md``,
``accuracy_curves.png``, ``escape_curves.png`` and ``solved_counts.png`` (what each holds:
the ``experiments.report`` package docstring). Prints a summary of each run.

If ``DIR`` has no ``metrics.jsonl`` but sub-directories that do (one per regime), reports
each of them and draws one ``DIR/solved_counts.png`` grouped by regime.

Exit status 2, with the error on stderr, when there is nothing valid to report (no or
empty ``metrics.jsonl``, a malformed line or config, a threshold outside (0, 1]) or the
command line is wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from absl import app, flags

from experiments.report.build import build_regime_reports, build_report, find_regime_workdirs
from experiments.report.records import METRICS_FILE, SOLVED_PNG
from experiments.report.tables import format_summary
from experiments.study.cli import library_logging_at_warning

# Defined in this module only: the package (``experiments/report/__init__.py``) never
# imports it, so that ``experiments.study.train``, which imports the package inside
# ``python -m experiments.run`` (a process with its own --workdir flag), defines no flag.
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Training workdir with metrics.jsonl, or a directory of such workdirs (one per regime).",
)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "Solved threshold (default: run_config.json's solved_threshold, else 0.8)."
)


def _usage_error(message: str) -> NoReturn:
    # Exit 2, as every other refusal of the project's commands.
    print(f"report: usage error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str]) -> None:
    """CLI: builds the report(s) and prints the summary; errors go to stderr, exit 2."""
    library_logging_at_warning()
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {list(argv[1:])}")
    workdir, threshold = _WORKDIR.value, _THRESHOLD.value
    if not workdir:
        _usage_error("--workdir=DIR is required.")
    workdir = Path(workdir)
    try:
        if (
            workdir.is_dir()
            and not (workdir / METRICS_FILE).exists()
            and find_regime_workdirs(workdir)
        ):
            reports = build_regime_reports(workdir, threshold)
            print("\n".join(format_summary(r) for r in reports.values()))
            print(f"grouped solved counts: {workdir / SOLVED_PNG}")
        else:
            print(format_summary(build_report(workdir, threshold)))
    except ValueError as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
