"""Tests for experiments.report.statistics: per-seed outcomes, per-read summaries and the
comparisons with the baseline (Fisher, log-rank, Welch) against independent computations,
the threshold and the configuration it falls back on, on hand-written workdirs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from experiments.report import statistics
from experiments.report.records import SeedCurve
from tests.report_fixtures import (
    NS5_ESCAPES,
    NUM_SEEDS,
    RAW_ESCAPES,
    STEPS,
    TOTAL_STEPS,
    analyze_workdir,
    final,
    make_config,
    seed_rows,
    study_rows,
    write_workdir,
)


def _expected_escapes(escapes):
    return [escapes.get(seed) for seed in range(NUM_SEEDS)]


# ---------------------------------------------------------------------------------------
# Per seed and per read
# ---------------------------------------------------------------------------------------


def test_per_seed_outcomes(report_study):
    _, results = report_study
    for read, escapes in (("raw", RAW_ESCAPES), ("ns5", NS5_ESCAPES)):
        r = results["reads"][read]
        assert r["seeds"] == list(range(NUM_SEEDS))
        assert r["escape_step"] == _expected_escapes(escapes)
        assert r["is_solved"] == [s in escapes for s in range(NUM_SEEDS)]
        assert r["final_accuracy"] == pytest.approx(
            [final(s, s in escapes) for s in range(NUM_SEEDS)]
        )
        # Best = the final value for these monotone curves, except seeds that only touch 0.5.
        assert r["best_accuracy"] == pytest.approx(
            [final(s, s in escapes) for s in range(NUM_SEEDS)]
        )
        assert r["censor_step"] == [None if s in escapes else TOTAL_STEPS for s in range(NUM_SEEDS)]
        assert r["nonfinite"] == [False] * NUM_SEEDS and r["num_nonfinite"] == 0


def test_solved_counts_and_medians(report_study):
    _, results = report_study
    raw, ns5 = results["reads"]["raw"], results["reads"]["ns5"]
    assert (raw["solved"], raw["num_seeds"], ns5["solved"], ns5["num_seeds"]) == (3, 16, 9, 16)
    assert raw["median_escape_step"] == 1800
    assert ns5["median_escape_step"] == 1400
    assert results["baseline"] == "raw" and results["threshold"] == 0.8


def test_mean_and_confidence_interval(report_study):
    _, results = report_study
    for read, escapes in (("raw", RAW_ESCAPES), ("ns5", NS5_ESCAPES)):
        finals = np.array([final(s, s in escapes) for s in range(NUM_SEEDS)])
        half = stats.t.ppf(0.975, NUM_SEEDS - 1) * finals.std(ddof=1) / np.sqrt(NUM_SEEDS)
        r = results["reads"][read]
        assert r["mean_final_accuracy"] == pytest.approx(finals.mean(), rel=1e-12)
        assert r["mean_final_accuracy_ci"] == pytest.approx(
            [finals.mean() - half, finals.mean() + half], rel=1e-12
        )
        assert r["num_in_mean"] == NUM_SEEDS


def test_escape_rate(report_study):
    _, results = report_study
    # 3 escapes; exposure = escape steps of solved + 2000 for each of the 13 unsolved.
    exposure = sum(RAW_ESCAPES.values()) + 13 * TOTAL_STEPS
    assert results["reads"]["raw"]["escape_rate_per_1k_steps"] == pytest.approx(3000 / exposure)


# ---------------------------------------------------------------------------------------
# Comparison: Fisher, log-rank, Welch
# ---------------------------------------------------------------------------------------


def _fisher_two_sided(a, b, c, d):
    """Exact two-sided p of [[a, b], [c, d]]: the hypergeometric probability of every table
    with the same margins that is no more likely than the observed one."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def prob(x):
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)

    observed = prob(a)
    support = range(max(0, row1 + col1 - n), min(row1, col1) + 1)
    return sum(prob(x) for x in support if prob(x) <= observed * (1 + 1e-9))


def test_fisher_p_matches_hypergeometric_sum(report_study):
    _, results = report_study
    # 9/16 vs 3/16 by math.comb sums, independently of scipy; the literal is that sum.
    hand = _fisher_two_sided(9, 7, 3, 13)
    assert hand == pytest.approx(0.0658928600216021, rel=1e-12)  # = 20437 / 310155
    c = results["comparison"]
    assert c["fisher_table"] == [[9, 7], [3, 13]]
    assert c["fisher_p"] == pytest.approx(hand, rel=1e-9)


def _logrank_chi2_p(groups):
    """Log-rank chi-square (1 df) from observed vs expected escapes in group 0.

    groups: two lists of (time, event) pairs.
    """
    times = sorted({t for g in groups for t, e in g if e})
    o_minus_e = var = 0.0
    for t in times:
        at_risk = [sum(1 for s, _ in g if s >= t) for g in groups]
        events = [sum(1 for s, e in g if s == t and e) for g in groups]
        n, o = sum(at_risk), sum(events)
        o_minus_e += events[0] - o * at_risk[0] / n
        if n > 1:
            var += o * (at_risk[0] / n) * (1 - at_risk[0] / n) * (n - o) / (n - 1)
    chi2 = o_minus_e**2 / var
    return math.erfc(math.sqrt(chi2 / 2))  # chi-square(1) survival function


def _survival_data(escapes, censor=TOTAL_STEPS, seeds=range(NUM_SEEDS)):
    return [(escapes[s], True) if s in escapes else (censor, False) for s in seeds]


def test_logrank_matches_independent_implementation(report_study):
    _, results = report_study
    expected = _logrank_chi2_p([_survival_data(NS5_ESCAPES), _survival_data(RAW_ESCAPES)])
    c = results["comparison"]
    assert c["logrank_p"] == pytest.approx(expected, rel=1e-9)
    assert c["logrank_statistic"] > 0  # ns5 escapes faster than expected under the null


def test_logrank_with_early_censoring(tmp_path):
    # An unfinished seed (last evaluation at 1000) is censored there, not at 2000.
    rows = (
        seed_rows("raw", 0, None, STEPS[:5])
        + seed_rows("raw", 1, 1200)
        + seed_rows("raw", 2, None)
        + seed_rows("ns5", 0, 600)
        + seed_rows("ns5", 1, 800)
        + seed_rows("ns5", 2, None, STEPS[:4])
        + seed_rows("ns5", 3, 1400)
    )
    results = analyze_workdir(write_workdir(tmp_path, rows, make_config()))
    assert results["reads"]["raw"]["censor_step"] == [1000, None, TOTAL_STEPS]
    assert results["reads"]["ns5"]["censor_step"] == [None, None, 800, None]
    expected = _logrank_chi2_p(
        [
            [(600, True), (800, True), (800, False), (1400, True)],
            [(1000, False), (1200, True), (2000, False)],
        ]
    )
    assert results["comparison"]["logrank_p"] == pytest.approx(expected, rel=1e-9)


def test_accuracy_difference_matches_scipy_welch(report_study):
    _, results = report_study
    raw = [final(s, s in RAW_ESCAPES) for s in range(NUM_SEEDS)]
    ns5 = [final(s, s in NS5_ESCAPES) for s in range(NUM_SEEDS)]
    ttest = stats.ttest_ind(ns5, raw, equal_var=False)
    ci = ttest.confidence_interval(0.95)
    c = results["comparison"]
    assert c["accuracy_difference"] == pytest.approx(np.mean(ns5) - np.mean(raw), rel=1e-12)
    assert c["accuracy_difference_ci"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert c["welch_p"] == pytest.approx(ttest.pvalue, rel=1e-9)
    assert c["welch_df"] == pytest.approx(ttest.df, rel=1e-9)


def test_hazard_ratio_mcnemar_and_kaplan_meier_in_the_results(report_study):
    _, results = report_study
    comparison = results["comparison"]
    # Both reads ran the same 16 seeds: 16 pairs; the seeds each read solves are the
    # discordant pairs of McNemar's test (no seed is solved under both here).
    mcnemar = comparison["mcnemar"]
    assert mcnemar["num_pairs"] == NUM_SEEDS
    both = len(set(RAW_ESCAPES) & set(NS5_ESCAPES))
    raw_only, ns5_only = len(RAW_ESCAPES) - both, len(NS5_ESCAPES) - both
    assert mcnemar["table"][0] == [both, raw_only] and mcnemar["table"][1][0] == ns5_only
    assert mcnemar["p"] == pytest.approx(stats.binomtest(raw_only, raw_only + ns5_only).pvalue)
    hazard = comparison["hazard_ratio"]
    assert hazard["baseline_model"] == "stratum_interval" and hazard["ratio"] > 1
    assert hazard["events"] == [len(RAW_ESCAPES), len(NS5_ESCAPES)]
    km = results["kaplan_meier"]
    assert list(km) == ["raw", "ns5"]
    assert km["ns5"]["steps"] == [0] + sorted(set(NS5_ESCAPES.values()))
    assert km["ns5"]["solved"][-1] == pytest.approx(len(NS5_ESCAPES) / NUM_SEEDS)
    assert km["ns5"]["at_risk"][:2] == [NUM_SEEDS, NUM_SEEDS]
    assert sum(km["raw"]["escapes"]) == len(RAW_ESCAPES)


def test_no_escapes_anywhere(tmp_path):
    rows = [r for s in range(3) for read in ("raw", "ns5") for r in seed_rows(read, s)]
    results = analyze_workdir(write_workdir(tmp_path, rows, make_config()))
    c = results["comparison"]
    assert c["fisher_p"] == 1.0
    assert c["logrank_p"] is None and c["escape_rate_ratio"] is None
    assert results["reads"]["ns5"]["median_escape_step"] is None


def test_three_reads_compare_each_with_the_first(tmp_path):
    rows = []
    for read, escapes in (("raw", {0: 1800}), ("ns5", {0: 800, 1: 1000}), ("polar", {1: 1200})):
        for seed in range(3):
            rows += seed_rows(read, seed, escapes.get(seed))
    config = make_config(reads=["raw", "ns5", "polar"])
    results = analyze_workdir(write_workdir(tmp_path, rows, config))
    assert list(results["comparisons"]) == ["ns5", "polar"]
    assert all(c["baseline"] == "raw" for c in results["comparisons"].values())
    assert results["comparison"] == results["comparisons"]["ns5"]
    assert results["comparisons"]["polar"]["fisher_table"] == [[1, 2], [1, 2]]


# ---------------------------------------------------------------------------------------
# Configuration: missing config, threshold, chance level
# ---------------------------------------------------------------------------------------


def test_missing_config_is_inferred_from_metrics(tmp_path):
    rows = seed_rows("ns5", 0, 800, STEPS[:5]) + seed_rows("raw", 0, None, STEPS[:5])
    results = analyze_workdir(write_workdir(tmp_path, rows))
    assert list(results["reads"]) == ["ns5", "raw"]  # first appearance; ns5 is the baseline
    assert results["baseline"] == "ns5"
    assert (results["threshold"], results["total_steps"], results["eval_every"]) == (0.8, 1000, 200)
    assert results["chance_accuracy"] is None and results["config"] == {}


def test_threshold_from_config_and_override(tmp_path):
    workdir = write_workdir(tmp_path, study_rows(), make_config(solved_threshold=0.5))
    # At 0.5 the evaluation before each escape (accuracy 0.5) already counts.
    assert analyze_workdir(workdir)["reads"]["raw"]["escape_step"][2] == 1200
    assert analyze_workdir(workdir, threshold=0.8)["reads"]["raw"]["escape_step"][2] == 1400
    assert analyze_workdir(workdir, threshold=0.95)["reads"]["raw"]["solved"] == 0
    with pytest.raises(ValueError, match="threshold"):
        analyze_workdir(workdir, threshold=1.5)


def test_chance_accuracy_from_task_layout():
    assert statistics.chance_accuracy(make_config()) == pytest.approx(1 / 32)  # values 32..63
    assert statistics.chance_accuracy(make_config(vocab_size=96)) == pytest.approx(1 / 40)
    assert statistics.chance_accuracy({"vocab_size": 80}) is None


# ---------------------------------------------------------------------------------------
# Building blocks on their own
# ---------------------------------------------------------------------------------------


def _curve(steps, accuracy, nonfinite=None):
    return SeedCurve(
        read="ns5",
        seed=7,
        steps=np.array(steps),
        accuracy=np.array(accuracy),
        nonfinite=np.array(nonfinite or [False] * len(steps)),
    )


def test_seed_outcome_of_diverged_and_unfinished_seeds():
    # Crossed the threshold, then diverged: unsolved, censored at the end of the run.
    diverged = statistics.seed_outcome(
        _curve([200, 400, 600], [0.85, math.nan, math.nan], [False, True, True]),
        threshold=0.8,
        final_step=TOTAL_STEPS,
    )
    assert (diverged["escape_step"], diverged["solved"], diverged["nonfinite"]) == (
        None,
        False,
        True,
    )
    assert (diverged["diverged_step"], diverged["last_step"], diverged["censor_step"]) == (
        400,
        600,
        TOTAL_STEPS,
    )
    assert diverged["best_accuracy"] == 0.85 and math.isnan(diverged["final_accuracy"])
    # Merely unfinished: censored at its last evaluation.
    unfinished = statistics.seed_outcome(_curve([200, 400], [0.1, 0.2]), 0.8, TOTAL_STEPS)
    assert (unfinished["solved"], unfinished["censor_step"], unfinished["diverged_step"]) == (
        False,
        400,
        None,
    )
    solved = statistics.seed_outcome(_curve([200, 400], [0.8, 0.9]), 0.8, TOTAL_STEPS)
    assert (solved["escape_step"], solved["censor_step"]) == (200, None)
    never_finite = statistics.seed_outcome(_curve([200], [math.nan]), 0.8, TOTAL_STEPS)
    assert math.isnan(never_finite["best_accuracy"]) and not never_finite["solved"]


def test_intervals_are_none_when_undefined():
    assert statistics.mean_confidence_interval([]) == (None, None, None)
    assert statistics.mean_confidence_interval([0.5]) == (0.5, None, None)
    assert statistics.welch_difference([], [0.5]) == {
        "difference": None,
        "ci": [None, None],
        "df": None,
        "p": None,
    }
    one = statistics.welch_difference([0.2], [0.5, 0.7])
    assert one["difference"] == pytest.approx(0.4) and one["ci"] == [None, None]
    constant = statistics.welch_difference([0.2, 0.2], [0.5, 0.5])
    assert constant["difference"] == pytest.approx(0.3) and constant["p"] is None
