"""Tests for experiments.report.plots: the figures are written, for the study, for
solved counts grouped by regime and for escape curves with unfinished seeds."""

from __future__ import annotations

import pytest

from experiments.report import plots, records
from tests.report_fixtures import STEPS, analyze_workdir, make_config, seed_rows, write_workdir


@pytest.mark.parametrize("name", [records.ACCURACY_PNG, records.ESCAPE_PNG, records.SOLVED_PNG])
def test_plots_are_written(report_study, name):
    workdir, _ = report_study
    path = workdir / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_plot_solved_counts_groups_regimes(tmp_path):
    path = tmp_path / "grouped.png"
    plots.plot_solved_counts(
        {
            "v80_s512": {"raw": (3, 16), "ns5": (9, 16)},
            "v96_s1024": {"raw": (4, 24), "ns5": (15, 24)},
            "v96_s768": {"raw": (1, 8)},
        },
        path,
    )
    assert path.stat().st_size > 10_000


def test_escape_curves_with_unfinished_seeds(tmp_path):
    # Unfinished seeds (raw 0 and ns5 1 stop early) get censoring ticks on their curve.
    rows = (
        seed_rows("raw", 0, None, STEPS[:5])
        + seed_rows("raw", 1, 1200)
        + seed_rows("ns5", 0, 600)
        + seed_rows("ns5", 1, None, STEPS[:4])
    )
    results = analyze_workdir(write_workdir(tmp_path, rows, make_config()))
    assert results["reads"]["ns5"]["censor_step"] == [None, 800]
    path = tmp_path / records.ESCAPE_PNG
    plots.plot_escape_curves(results, path)
    assert path.stat().st_size > 10_000
