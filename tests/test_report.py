"""Tests for experiments.report: statistics against independent computations, the
results.json contract, the markdown, the plots and the CLI, on hand-written workdirs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from experiments import report

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_EVERY, TOTAL_STEPS = 200, 2000
STEPS = list(range(EVAL_EVERY, TOTAL_STEPS + 1, EVAL_EVERY))
CHANCE, SOLVED_ACC = 0.03, 0.9

# The replication's v80/s512 batch-16 cell (REFERENCE.md section 5): 3/16 vs 9/16 solved.
# seed -> escape step; every other seed stays at chance.
RAW_ESCAPES = {2: 1400, 5: 1800, 11: 2000}
NS5_ESCAPES = {0: 800, 1: 1000, 3: 1000, 4: 1200, 6: 1400, 8: 1400, 9: 1600, 12: 1800, 15: 2000}
NUM_SEEDS = 16


def _row(read, seed, step, accuracy, nonfinite=False):
    return {"read": read, "seed": seed, "step": step, "accuracy": accuracy, "loss": 3.0,
            "train_loss": 3.0, "nonfinite": nonfinite}


def _final(seed, solved):
    """Distinct final accuracies per seed, so that the variances are not degenerate."""
    return SOLVED_ACC + 0.004 * seed if solved else CHANCE + 0.001 * seed


def _seed_rows(read, seed, escape=None, steps=STEPS):
    """Chance until the evaluation before ``escape`` (0.5 there: close, not solved), then
    solved; the last evaluation holds the seed's distinct final accuracy."""
    rows = []
    for step in steps:
        if escape is None or step < escape - EVAL_EVERY:
            acc = CHANCE
        elif step < escape:
            acc = 0.5
        else:
            acc = SOLVED_ACC
        rows.append(_row(read, seed, step, acc))
    rows[-1]["accuracy"] = _final(seed, escape is not None)
    return rows


def _config(**overrides):
    config = {"name": "unit", "regime": "v80_s512", "total_steps": TOTAL_STEPS,
              "eval_every": EVAL_EVERY, "reads": ["raw", "ns5"], "num_seeds": NUM_SEEDS,
              "solved_threshold": 0.8, "batch_size": 16, "vocab_size": 80, "seq_len": 512,
              "opaque_key": {"kept": True}}
    config.update(overrides)
    return config


def _write_workdir(path, rows, config=None):
    path.mkdir(parents=True, exist_ok=True)
    # json.dumps writes float NaN as the NaN literal, as Python trainers do.
    (path / report.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / report.CONFIG_FILE).write_text(json.dumps(config))
    return path


def _study_rows():
    rows = []
    for read, escapes in (("raw", RAW_ESCAPES), ("ns5", NS5_ESCAPES)):
        for seed in range(NUM_SEEDS):
            rows += _seed_rows(read, seed, escapes.get(seed))
    # Accuracy exactly at the threshold counts: ns5 seed 4 reaches 0.8 at step 1200.
    next(r for r in rows if (r["read"], r["seed"], r["step"]) == ("ns5", 4, 1200))["accuracy"] = 0.8
    return rows


def _analyze(workdir, threshold=None):
    return report.analyze(report.load_metrics(workdir), report.load_run_config(workdir), threshold)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = _write_workdir(tmp_path_factory.mktemp("study"), _study_rows(), _config())
    return workdir, report.build_report(workdir)


def _expected_escapes(escapes):
    return [escapes.get(seed) for seed in range(NUM_SEEDS)]


# ---------------------------------------------------------------------------------------
# Per seed and per read
# ---------------------------------------------------------------------------------------


def test_per_seed_outcomes(study):
    _, results = study
    for read, escapes in (("raw", RAW_ESCAPES), ("ns5", NS5_ESCAPES)):
        r = results["reads"][read]
        assert r["seeds"] == list(range(NUM_SEEDS))
        assert r["escape_step"] == _expected_escapes(escapes)
        assert r["is_solved"] == [s in escapes for s in range(NUM_SEEDS)]
        assert r["final_accuracy"] == pytest.approx([_final(s, s in escapes) for s in range(NUM_SEEDS)])
        # Best = the final value for these monotone curves, except seeds that only touch 0.5.
        assert r["best_accuracy"] == pytest.approx([_final(s, s in escapes) for s in range(NUM_SEEDS)])
        assert r["censor_step"] == [None if s in escapes else TOTAL_STEPS for s in range(NUM_SEEDS)]
        assert r["nonfinite"] == [False] * NUM_SEEDS and r["num_nonfinite"] == 0


def test_solved_counts_and_medians(study):
    _, results = study
    raw, ns5 = results["reads"]["raw"], results["reads"]["ns5"]
    assert (raw["solved"], raw["num_seeds"], ns5["solved"], ns5["num_seeds"]) == (3, 16, 9, 16)
    assert raw["median_escape_step"] == 1800
    assert ns5["median_escape_step"] == 1400
    assert results["baseline"] == "raw" and results["threshold"] == 0.8


def test_mean_and_confidence_interval(study):
    _, results = study
    for read, escapes in (("raw", RAW_ESCAPES), ("ns5", NS5_ESCAPES)):
        finals = np.array([_final(s, s in escapes) for s in range(NUM_SEEDS)])
        half = stats.t.ppf(0.975, NUM_SEEDS - 1) * finals.std(ddof=1) / np.sqrt(NUM_SEEDS)
        r = results["reads"][read]
        assert r["mean_final_accuracy"] == pytest.approx(finals.mean(), rel=1e-12)
        assert r["mean_final_accuracy_ci"] == pytest.approx(
            [finals.mean() - half, finals.mean() + half], rel=1e-12)
        assert r["num_in_mean"] == NUM_SEEDS


def test_escape_rate(study):
    _, results = study
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


def test_fisher_p_matches_hypergeometric_sum(study):
    _, results = study
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


def test_logrank_matches_independent_implementation(study):
    _, results = study
    expected = _logrank_chi2_p([_survival_data(NS5_ESCAPES), _survival_data(RAW_ESCAPES)])
    c = results["comparison"]
    assert c["logrank_p"] == pytest.approx(expected, rel=1e-9)
    assert c["logrank_statistic"] > 0  # ns5 escapes faster than expected under the null


def test_logrank_with_early_censoring(tmp_path):
    # An unfinished seed (last evaluation at 1000) is censored there, not at 2000.
    rows = (_seed_rows("raw", 0, None, STEPS[:5]) + _seed_rows("raw", 1, 1200)
            + _seed_rows("raw", 2, None) + _seed_rows("ns5", 0, 600) + _seed_rows("ns5", 1, 800)
            + _seed_rows("ns5", 2, None, STEPS[:4]) + _seed_rows("ns5", 3, 1400))
    results = _analyze(_write_workdir(tmp_path, rows, _config()))
    assert results["reads"]["raw"]["censor_step"] == [1000, None, TOTAL_STEPS]
    assert results["reads"]["ns5"]["censor_step"] == [None, None, 800, None]
    expected = _logrank_chi2_p([[(600, True), (800, True), (800, False), (1400, True)],
                                [(1000, False), (1200, True), (2000, False)]])
    assert results["comparison"]["logrank_p"] == pytest.approx(expected, rel=1e-9)


def test_accuracy_difference_matches_scipy_welch(study):
    _, results = study
    raw = [_final(s, s in RAW_ESCAPES) for s in range(NUM_SEEDS)]
    ns5 = [_final(s, s in NS5_ESCAPES) for s in range(NUM_SEEDS)]
    ttest = stats.ttest_ind(ns5, raw, equal_var=False)
    ci = ttest.confidence_interval(0.95)
    c = results["comparison"]
    assert c["accuracy_difference"] == pytest.approx(np.mean(ns5) - np.mean(raw), rel=1e-12)
    assert c["accuracy_difference_ci"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert c["welch_p"] == pytest.approx(ttest.pvalue, rel=1e-9)
    assert c["welch_df"] == pytest.approx(ttest.df, rel=1e-9)


def test_no_escapes_anywhere(tmp_path):
    rows = [r for s in range(3) for read in ("raw", "ns5") for r in _seed_rows(read, s)]
    results = _analyze(_write_workdir(tmp_path, rows, _config()))
    c = results["comparison"]
    assert c["fisher_p"] == 1.0
    assert c["logrank_p"] is None and c["escape_rate_ratio"] is None
    assert results["reads"]["ns5"]["median_escape_step"] is None


def test_three_reads_compare_each_with_the_first(tmp_path):
    rows = []
    for read, escapes in (("raw", {0: 1800}), ("ns5", {0: 800, 1: 1000}), ("polar", {1: 1200})):
        for seed in range(3):
            rows += _seed_rows(read, seed, escapes.get(seed))
    results = _analyze(_write_workdir(tmp_path, rows, _config(reads=["raw", "ns5", "polar"])))
    assert list(results["comparisons"]) == ["ns5", "polar"]
    assert all(c["baseline"] == "raw" for c in results["comparisons"].values())
    assert results["comparison"] == results["comparisons"]["ns5"]
    assert results["comparisons"]["polar"]["fisher_table"] == [[1, 2], [1, 2]]


# ---------------------------------------------------------------------------------------
# Input handling: resume duplicates, NaN, missing config, threshold, bad lines
# ---------------------------------------------------------------------------------------


def test_resumed_run_keeps_last_occurrence(tmp_path):
    first = [_row("ns5", 0, s, CHANCE) for s in STEPS[:5]]  # steps 200..1000
    # Resumed from the step-400 checkpoint: steps 600..2000 are rewritten; it escapes at 800.
    resumed = [_row("ns5", 0, s, 0.95 if s >= 800 else CHANCE) for s in STEPS[2:]]
    resumed[-1]["accuracy"] = 0.97
    rows = first + resumed + _seed_rows("raw", 0)
    results = _analyze(_write_workdir(tmp_path, rows, _config()))
    ns5 = results["reads"]["ns5"]
    assert ns5["escape_step"] == [800] and ns5["final_accuracy"] == [0.97]
    assert results["input"]["duplicate_lines"] == 3  # steps 600, 800, 1000
    assert results["input"]["metrics_lines"] == len(rows)


def test_nonfinite_seed_is_unsolved_and_left_out_of_the_mean(tmp_path):
    # ns5 seed 1 crosses the threshold at 1000, then its loss goes NaN at 1200; the trainer
    # logs null, then NaN, and stops that seed at 1400.
    diverged = _seed_rows("ns5", 1, 1000, STEPS[:7])
    diverged[5].update(accuracy=None, nonfinite=True)
    diverged[6].update(accuracy=float("nan"), nonfinite=True)
    rows = _seed_rows("ns5", 0, 800) + diverged + _seed_rows("ns5", 2, None)
    rows += [r for s in range(3) for r in _seed_rows("raw", s)]
    workdir = _write_workdir(tmp_path, rows, _config())
    results = report.build_report(workdir)
    ns5 = results["reads"]["ns5"]
    assert ns5["nonfinite"] == [False, True, False] and ns5["num_nonfinite"] == 1
    assert ns5["escape_step"] == [800, None, None] and ns5["solved"] == 1
    assert ns5["diverged_step"] == [None, 1200, None]
    assert ns5["censor_step"] == [None, TOTAL_STEPS, TOTAL_STEPS]  # divergence is terminal
    assert ns5["final_accuracy"] == [pytest.approx(_final(0, True)), None, pytest.approx(_final(2, False))]
    assert ns5["best_accuracy"][1] == pytest.approx(SOLVED_ACC)
    assert ns5["num_in_mean"] == 2
    assert ns5["mean_final_accuracy"] == pytest.approx((_final(0, True) + _final(2, False)) / 2)
    # Strict JSON on disk: NaN became null.
    def reject(constant):
        raise AssertionError(f"results.json holds {constant}")

    on_disk = json.loads((workdir / report.RESULTS_JSON).read_text(), parse_constant=reject)
    assert on_disk["reads"]["ns5"]["final_accuracy"][1] is None
    assert "diverged at 1200" in (workdir / report.RESULTS_MD).read_text()
    assert "(1 diverged)" in report.format_summary(results)


def test_missing_config_is_inferred_from_metrics(tmp_path):
    rows = _seed_rows("ns5", 0, 800, STEPS[:5]) + _seed_rows("raw", 0, None, STEPS[:5])
    results = _analyze(_write_workdir(tmp_path, rows))
    assert list(results["reads"]) == ["ns5", "raw"]  # first appearance; ns5 is the baseline
    assert results["baseline"] == "ns5"
    assert (results["threshold"], results["total_steps"], results["eval_every"]) == (0.8, 1000, 200)
    assert results["chance_accuracy"] is None and results["config"] == {}


def test_threshold_from_config_and_override(tmp_path):
    workdir = _write_workdir(tmp_path, _study_rows(), _config(solved_threshold=0.5))
    # At 0.5 the evaluation before each escape (accuracy 0.5) already counts.
    assert _analyze(workdir)["reads"]["raw"]["escape_step"][2] == 1200
    assert _analyze(workdir, threshold=0.8)["reads"]["raw"]["escape_step"][2] == 1400
    assert _analyze(workdir, threshold=0.95)["reads"]["raw"]["solved"] == 0
    with pytest.raises(ValueError, match="threshold"):
        _analyze(workdir, threshold=1.5)


def test_chance_accuracy_from_task_layout():
    assert report.chance_accuracy(_config()) == pytest.approx(1 / 32)  # values 32..63
    assert report.chance_accuracy(_config(vocab_size=96)) == pytest.approx(1 / 40)
    assert report.chance_accuracy({"vocab_size": 80}) is None


def test_truncated_line_is_skipped_and_bad_schema_raises(tmp_path):
    rows = _seed_rows("raw", 0) + _seed_rows("ns5", 0, 800)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    workdir = tmp_path / "truncated"
    workdir.mkdir()
    # A crash mid-write, then the resumed run's line appended to the partial one.
    (workdir / report.METRICS_FILE).write_text('{"read": "raw", "se' + text + "\n\n")
    metrics = report.load_metrics(workdir)
    assert metrics.num_skipped == 1 and metrics.curves["raw"][0].steps[0] == 400
    (workdir / report.METRICS_FILE).write_text(text + '{"read": "raw", "seed": 0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:21"):
        report.load_metrics(workdir)


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_missing_or_empty_metrics_raise_naming_the_file(tmp_path, content):
    if content is not None:
        (tmp_path / report.METRICS_FILE).write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / report.METRICS_FILE))):
        report.build_report(tmp_path)


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def test_results_json_contract(study):
    workdir, results = study
    on_disk = json.loads((workdir / report.RESULTS_JSON).read_text())
    assert on_disk == results
    for read in ("raw", "ns5"):
        r = on_disk["reads"][read]
        for key in ("num_seeds", "solved", "mean_final_accuracy"):
            assert isinstance(r[key], (int, float))
        assert len(r["final_accuracy"]) == len(r["escape_step"]) == NUM_SEEDS
    assert 0 < on_disk["comparison"]["fisher_p"] < 1 and 0 < on_disk["comparison"]["logrank_p"] < 1
    assert on_disk["config"]["opaque_key"] == {"kept": True}


def test_results_markdown(study):
    workdir, results = study
    md = (workdir / report.RESULTS_MD).read_text()
    assert "| read | solved / N | mean final accuracy [95% CI] | median escape step |" in md
    ns5 = results["reads"]["ns5"]
    low, high = ns5["mean_final_accuracy_ci"]
    assert (f"| ns5 | 9/16 | {100 * ns5['mean_final_accuracy']:.1f}% "
            f"[{100 * low:.1f}, {100 * high:.1f}] | 1400 |") in md
    assert "| raw | 3/16 |" in md
    assert f"Fisher exact p = {results['comparison']['fisher_p']:.2g}" in md
    assert f"log-rank p = {results['comparison']['logrank_p']:.2g}" in md
    assert "| seed | raw final acc | raw escape step | ns5 final acc | ns5 escape step |" in md
    assert "| 4 | 3.4% | - | 91.6% | 1200 |" in md


def test_format_summary(study):
    _, results = study
    lines = report.format_summary(results).splitlines()
    assert len(lines) == 4
    assert re.fullmatch(r"  ns5: 9/16 solved, mean final acc \d+\.\d% \[\d+\.\d, \d+\.\d\], "
                        r"median escape step 1400", lines[2])
    assert lines[3].startswith("  ns5 vs raw: Fisher p=0.066, log-rank p=")


@pytest.mark.parametrize("name", [report.ACCURACY_PNG, report.ESCAPE_PNG, report.SOLVED_PNG])
def test_plots_are_written(study, name):
    workdir, _ = study
    path = workdir / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_single_read_has_no_comparison(tmp_path):
    rows = [r for s in range(3) for r in _seed_rows("ns5", s, {0: 800}.get(s))]
    workdir = _write_workdir(tmp_path, rows, _config(reads=["ns5"]))
    results = report.build_report(workdir)
    assert results["comparison"] is None and results["comparisons"] == {}
    assert "Fisher" not in (workdir / report.RESULTS_MD).read_text()
    assert (workdir / report.ESCAPE_PNG).stat().st_size > 10_000


def test_plot_solved_counts_groups_regimes(tmp_path):
    path = tmp_path / "grouped.png"
    report.plot_solved_counts({"v80_s512": {"raw": (3, 16), "ns5": (9, 16)},
                               "v96_s1024": {"raw": (4, 24), "ns5": (15, 24)},
                               "v96_s768": {"raw": (1, 8)}}, path)
    assert path.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.report", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_summary(tmp_path):
    rows = [r for s in range(4) for read, e in (("raw", None), ("ns5", 1000))
            for r in _seed_rows(read, s, e)]
    workdir = _write_workdir(tmp_path, rows, _config())
    proc = _cli(f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr
    assert "raw: 0/4 solved" in proc.stdout and "ns5: 4/4 solved" in proc.stdout
    assert "Fisher p=0.029" in proc.stdout  # 4/4 vs 0/4: 2 / C(8, 4)
    assert (workdir / report.RESULTS_JSON).is_file()


def test_cli_empty_workdir_exits_2(tmp_path):
    proc = _cli(f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert "metrics.jsonl: not found" in proc.stderr and str(tmp_path) in proc.stderr
    assert proc.stdout == ""


def test_regime_subdirectories_are_grouped(tmp_path):
    for regime, raw_escapes in (("v80_s512", {0: 1600}), ("v96_s1024", {})):
        rows = [r for s in range(2) for read, escapes in (("raw", raw_escapes), ("ns5", {0: 800, 1: 1000}))
                for r in _seed_rows(read, s, escapes.get(s))]
        _write_workdir(tmp_path / regime, rows, _config(regime=regime, num_seeds=2))
    (tmp_path / "not_a_workdir").mkdir()
    reports = report.build_regime_reports(tmp_path)
    assert list(reports) == ["v80_s512", "v96_s1024"]
    assert [report.solved_counts(r)["raw"] for r in reports.values()] == [(1, 2), (0, 2)]
    assert (tmp_path / report.SOLVED_PNG).stat().st_size > 10_000
    assert (tmp_path / "v96_s1024" / report.RESULTS_JSON).is_file()
    with pytest.raises(ValueError, match="no sub-directory"):
        report.build_regime_reports(tmp_path / "not_a_workdir")
