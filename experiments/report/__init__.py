"""The study's report: tables, tests and plots rebuilt from a training workdir.

    python -m experiments.report --workdir=DIR [--threshold=0.8]

Reads only ``DIR/metrics.jsonl`` (one evaluation per line per read and seed) and
``DIR/run_config.json`` (optional; missing keys are inferred from the metrics) and writes
into ``DIR``:

* ``results.json`` -- per read and seed: final and best accuracy, escape step, solved and
  nonfinite flags; per read: solved count, mean final accuracy with a 95% Student t
  interval, median escape step; per comparison of a read with the baseline (the first
  read): Fisher exact p on solved counts, log-rank p on escape times, the difference in
  mean final accuracy with a 95% Welch interval, a crude escape-rate ratio, the
  discrete-time hazard ratio with its 95% Wald interval and McNemar's exact p on paired
  seeds (``hazard``); per read, the Kaplan-Meier fraction solved vs step with its 95%
  band;
* ``results.md`` -- the study's table (rows = reads), the tests, the Kaplan-Meier table
  and a per-seed table;
* ``accuracy_curves.png``, ``escape_curves.png`` (Kaplan-Meier), ``solved_counts.png``.

If ``DIR`` has no ``metrics.jsonl`` but sub-directories that do (one per regime), the CLI
reports each of them and draws one ``DIR/solved_counts.png`` grouped by regime.

Diverged seeds (``nonfinite``: the training loss went NaN/Inf) are counted as unsolved
(divergence is a terminal failure, so for the log-rank test and the Kaplan-Meier curves
they are censored at the end of the run, not at the divergence), and their final accuracy
is left out of the mean final accuracy (after divergence it measures nothing) -- each
read reports ``num_nonfinite`` so that the exclusion is visible.

Modules: ``records`` (reading a workdir), ``statistics`` (pure), ``hazard`` (hazard
ratios, McNemar, Kaplan-Meier; pure), ``anneal`` (accuracy at α = 0 of annealed reads),
``tables`` (the Markdown and the summary), ``plots``, ``build`` (reads, computes, writes) and
``__main__`` (the CLI, the only module that defines flags; this package never imports it).
"""

from experiments.report.build import build_regime_reports, build_report, find_regime_workdirs
from experiments.report.plots import (
    plot_accuracy_curves,
    plot_escape_curves,
    plot_solved_counts,
    solved_counts,
)
from experiments.report.records import (
    ACCURACY_PNG,
    CONFIG_FILE,
    ESCAPE_PNG,
    METRICS_FILE,
    RESULTS_JSON,
    RESULTS_MD,
    SOLVED_PNG,
    Metrics,
    SeedCurve,
    load_metrics,
    load_run_config,
)
from experiments.report.statistics import (
    DEFAULT_THRESHOLD,
    NONFINITE_POLICY,
    analyze,
    chance_accuracy,
    compare_reads,
    escape_events,
    mean_confidence_interval,
    seed_outcome,
    summarize_read,
    welch_difference,
)
from experiments.report.tables import format_markdown, format_summary

__all__ = [
    "ACCURACY_PNG",
    "CONFIG_FILE",
    "DEFAULT_THRESHOLD",
    "ESCAPE_PNG",
    "METRICS_FILE",
    "NONFINITE_POLICY",
    "RESULTS_JSON",
    "RESULTS_MD",
    "SOLVED_PNG",
    "Metrics",
    "SeedCurve",
    "analyze",
    "build_regime_reports",
    "build_report",
    "chance_accuracy",
    "compare_reads",
    "escape_events",
    "find_regime_workdirs",
    "format_markdown",
    "format_summary",
    "load_metrics",
    "load_run_config",
    "mean_confidence_interval",
    "plot_accuracy_curves",
    "plot_escape_curves",
    "plot_solved_counts",
    "seed_outcome",
    "solved_counts",
    "summarize_read",
    "welch_difference",
]
