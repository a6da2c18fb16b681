"""Building the report: reads a workdir, runs the statistics, writes every output.

:func:`build_report` writes ``results.json`` (strict JSON: NaN and Inf as null),
``results.md`` and the three figures into one training workdir;
:func:`build_regime_reports` does so for each regime workdir under a parent directory and
draws the regimes' solved counts side by side.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.report.anneal import anneal_summary, format_anneal_markdown
from experiments.report.plots import (
    plot_accuracy_curves,
    plot_escape_curves,
    plot_solved_counts,
    solved_counts,
)
from experiments.report.records import (
    ACCURACY_PNG,
    ESCAPE_PNG,
    METRICS_FILE,
    RESULTS_JSON,
    RESULTS_MD,
    SOLVED_PNG,
    load_metrics,
    load_run_config,
)
from experiments.report.statistics import analyze, finite_or_none
from experiments.report.tables import format_markdown, run_title

__all__ = ["build_regime_reports", "build_report", "find_regime_workdirs"]


def _jsonable(x: Any) -> Any:
    """NaN/Inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return finite_or_none(float(x))
    return x


def build_report(workdir: str | Path, threshold: float | None = None) -> dict:
    """Reads ``workdir``'s metrics and config, writes every output, returns the results.

    Outputs in ``workdir``: ``results.json``, ``results.md``, ``accuracy_curves.png``,
    ``escape_curves.png``, ``solved_counts.png`` (one group).

    Args:
        workdir: a training workdir holding ``metrics.jsonl`` (and ``run_config.json``).
        threshold: solved threshold; default ``run_config.json``'s ``solved_threshold``,
            else 0.8.

    Returns:
        The results dict as written to ``results.json`` (NaN as None): that of
        :func:`~experiments.report.statistics.analyze`, plus ``workdir``.

    Raises:
        ValueError: naming the file when ``metrics.jsonl`` is missing or empty, or
            ``run_config.json`` is malformed; or a threshold outside (0, 1].
    """
    workdir = Path(workdir)
    metrics = load_metrics(workdir)
    results = _jsonable(analyze(metrics, load_run_config(workdir), threshold))
    results["workdir"] = str(workdir)
    annealed = anneal_summary(workdir, results["threshold"])
    if annealed:  # Reads trained under the scaffold anneal (experiments.report.anneal).
        results["anneal"] = _jsonable(annealed)
    (workdir / RESULTS_JSON).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (workdir / RESULTS_MD).write_text(
        format_markdown(results) + format_anneal_markdown(annealed, results["threshold"])
    )
    plot_accuracy_curves(metrics.curves, results, workdir / ACCURACY_PNG)
    plot_escape_curves(results, workdir / ESCAPE_PNG)
    plot_solved_counts(
        {run_title(results): solved_counts(results)},
        workdir / SOLVED_PNG,
        threshold=results["threshold"],
    )
    return results


def find_regime_workdirs(parent: str | Path) -> list[Path]:
    """Immediate sub-directories of ``parent`` holding a ``metrics.jsonl``, sorted."""
    return sorted(p for p in Path(parent).iterdir() if (p / METRICS_FILE).is_file())


def build_regime_reports(parent: str | Path, threshold: float | None = None) -> dict[str, dict]:
    """Runs :func:`build_report` on each regime workdir under ``parent`` and draws
    ``parent/solved_counts.png`` with one group of bars per regime.

    Returns:
        regime label (``run_config.json``'s regime, else the directory name) -> results.

    Raises:
        ValueError: as :func:`build_report`, if ``parent`` holds no regime workdir, or if
            the regimes use different thresholds (their bars would not be comparable).
    """
    parent = Path(parent)
    subs = find_regime_workdirs(parent)
    if not subs:
        raise ValueError(f"{parent}: no sub-directory holds a {METRICS_FILE}")
    reports: dict[str, dict] = {}
    for sub in subs:
        results = build_report(sub, threshold)
        label = results.get("regime") or sub.name
        reports[sub.name if label in reports else label] = results
    thresholds = {r["threshold"] for r in reports.values()}
    if len(thresholds) > 1:
        raise ValueError(
            f"{parent}: the regimes use different solved thresholds "
            f"{sorted(thresholds)}; pass --threshold to compare them"
        )
    plot_solved_counts(
        {label: solved_counts(r) for label, r in reports.items()},
        parent / SOLVED_PNG,
        threshold=thresholds.pop(),
    )
    return reports
