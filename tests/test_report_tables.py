"""Tests for experiments.report.tables: results.md and the stdout summary of the study, and
the notes on diverged, unfinished and missing seeds."""

from __future__ import annotations

import re

from experiments.report import records, statistics, tables
from tests.report_fixtures import (
    STEPS,
    analyze_workdir,
    make_config,
    seed_rows,
    study_rows,
    write_workdir,
)


def test_results_markdown(report_study):
    workdir, results = report_study
    md = (workdir / records.RESULTS_MD).read_text()
    assert tables.format_markdown(results) == md
    assert "| read | solved / N | mean final accuracy [95% CI] | median escape step |" in md
    ns5 = results["reads"]["ns5"]
    low, high = ns5["mean_final_accuracy_ci"]
    assert (
        f"| ns5 | 9/16 | {100 * ns5['mean_final_accuracy']:.1f}% "
        f"[{100 * low:.1f}, {100 * high:.1f}] | 1400 |"
    ) in md
    assert "| raw | 3/16 |" in md
    assert f"Fisher exact p = {results['comparison']['fisher_p']:.2g}" in md
    assert f"log-rank p = {results['comparison']['logrank_p']:.2g}" in md
    assert "| seed | raw final acc | raw escape step | ns5 final acc | ns5 escape step |" in md
    # Kaplan–Meier: one row per step where a curve has a point, the value held until then.
    assert "| step | raw | ns5 |" in md
    assert "| 800 | 0.0% | 6.2% [" in md
    assert re.search(r"\| 2000 \| 18\.8% \[[\d.]+, [\d.]+\] \| 56\.2% \[", md)
    assert "baseline hazard per evaluation interval and group; Wald p = " in md
    assert "| 4 | 3.4% | - | 91.6% | 1200 |" in md


def test_format_summary(report_study):
    _, results = report_study
    lines = tables.format_summary(results).splitlines()
    assert len(lines) == 4
    assert re.fullmatch(
        r"  ns5: 9/16 solved, mean final acc \d+\.\d% \[\d+\.\d, \d+\.\d\], "
        r"median escape step 1400",
        lines[2],
    )
    assert lines[3].startswith("  ns5 vs raw: Fisher p=0.066, log-rank p=")


def test_markdown_notes_diverged_unfinished_and_missing_seeds(tmp_path):
    # 2 of 3 configured seeds per read; raw seed 0 stops at 1000 (unfinished); ns5 seed 1
    # diverges at 1200 and stops at 1400, which is not "unfinished".
    diverged = seed_rows("ns5", 1, 1000, STEPS[:7])
    diverged[5].update(accuracy=None, nonfinite=True)
    diverged[6].update(accuracy=float("nan"), nonfinite=True)
    rows = (
        seed_rows("raw", 0, None, STEPS[:5])
        + seed_rows("raw", 1)
        + seed_rows("ns5", 0, 800)
        + diverged
    )
    results = analyze_workdir(write_workdir(tmp_path, rows, make_config(num_seeds=3)))
    md = tables.format_markdown(results)
    assert "| ns5 | 1/2 (1 diverged) |" in md
    assert f"Diverged seeds: {statistics.NONFINITE_POLICY}" in md
    assert "Incomplete: raw has metrics for 2 of 3 configured seeds." in md
    assert "Incomplete: ns5 has metrics for 2 of 3 configured seeds." in md
    assert (
        "Unfinished: raw seeds 0 have no evaluation at step 2000 (censored at their last "
        "evaluation)."
    ) in md
    assert "Unfinished: ns5" not in md
    assert "| 1 | 3.1% | - | n/a | diverged at 1200 |" in md


def test_records_dated_from_a_step_keep_counts_not_times(tmp_path):
    # The replication's headline files hold evaluations from step 1000 on: escapes
    # before it are dated 1000, so no log-rank test or hazard ratio, and a note says why.
    rows = [r for r in study_rows() if r["step"] >= 1000]
    config = make_config(escapes_dated_from_step=1000)
    results = analyze_workdir(write_workdir(tmp_path, rows, config))
    comparison = results["comparison"]
    assert results["reads"]["ns5"]["solved"] == 9 and comparison["fisher_p"] is not None
    assert comparison["logrank_p"] is None and comparison["hazard_ratio"] is None
    assert comparison["mcnemar"]["num_pairs"] == 16
    md = tables.format_markdown(results)
    assert "Escapes before step 1000 are dated 1000" in md and "log-rank p = n/a" in md
