"""Tests for experiments.report.build: the results.json contract (strict JSON), every
output written for one workdir, and a directory of regime workdirs."""

from __future__ import annotations

import json

import pytest

from experiments.report import build, plots, records, tables
from tests.report_fixtures import (
    NUM_SEEDS,
    SOLVED_ACC,
    STEPS,
    TOTAL_STEPS,
    final,
    make_config,
    seed_rows,
    write_regime_workdirs,
    write_workdir,
)


def test_results_json_contract(report_study):
    workdir, results = report_study
    on_disk = json.loads((workdir / records.RESULTS_JSON).read_text())
    assert on_disk == results
    for read in ("raw", "ns5"):
        r = on_disk["reads"][read]
        for key in ("num_seeds", "solved", "mean_final_accuracy"):
            assert isinstance(r[key], (int, float))
        assert len(r["final_accuracy"]) == len(r["escape_step"]) == NUM_SEEDS
    assert 0 < on_disk["comparison"]["fisher_p"] < 1 and 0 < on_disk["comparison"]["logrank_p"] < 1
    assert on_disk["config"]["opaque_key"] == {"kept": True}


def test_nonfinite_seed_is_unsolved_and_left_out_of_the_mean(tmp_path):
    # ns5 seed 1 crosses the threshold at 1000, then its loss goes NaN at 1200; the trainer
    # logs null, then NaN, and stops that seed at 1400.
    diverged = seed_rows("ns5", 1, 1000, STEPS[:7])
    diverged[5].update(accuracy=None, nonfinite=True)
    diverged[6].update(accuracy=float("nan"), nonfinite=True)
    rows = seed_rows("ns5", 0, 800) + diverged + seed_rows("ns5", 2, None)
    rows += [r for s in range(3) for r in seed_rows("raw", s)]
    workdir = write_workdir(tmp_path, rows, make_config())
    results = build.build_report(workdir)
    ns5 = results["reads"]["ns5"]
    assert ns5["nonfinite"] == [False, True, False] and ns5["num_nonfinite"] == 1
    assert ns5["escape_step"] == [800, None, None] and ns5["solved"] == 1
    assert ns5["diverged_step"] == [None, 1200, None]
    assert ns5["censor_step"] == [None, TOTAL_STEPS, TOTAL_STEPS]  # divergence is terminal
    assert ns5["final_accuracy"] == [
        pytest.approx(final(0, True)),
        None,
        pytest.approx(final(2, False)),
    ]
    assert ns5["best_accuracy"][1] == pytest.approx(SOLVED_ACC)
    assert ns5["num_in_mean"] == 2
    assert ns5["mean_final_accuracy"] == pytest.approx((final(0, True) + final(2, False)) / 2)

    # Strict JSON on disk: NaN became null.
    def reject(constant):
        raise AssertionError(f"results.json holds {constant}")

    on_disk = json.loads((workdir / records.RESULTS_JSON).read_text(), parse_constant=reject)
    assert on_disk["reads"]["ns5"]["final_accuracy"][1] is None
    assert "diverged at 1200" in (workdir / records.RESULTS_MD).read_text()
    assert "(1 diverged)" in tables.format_summary(results)


def test_single_read_has_no_comparison(tmp_path):
    rows = [r for s in range(3) for r in seed_rows("ns5", s, {0: 800}.get(s))]
    workdir = write_workdir(tmp_path, rows, make_config(reads=["ns5"]))
    results = build.build_report(workdir)
    assert results["comparison"] is None and results["comparisons"] == {}
    assert "Fisher" not in (workdir / records.RESULTS_MD).read_text()
    assert (workdir / records.ESCAPE_PNG).stat().st_size > 10_000


def test_regime_subdirectories_are_grouped(tmp_path):
    write_regime_workdirs(tmp_path)
    reports = build.build_regime_reports(tmp_path)
    assert list(reports) == ["v80_s512", "v96_s1024"]
    assert [plots.solved_counts(r)["raw"] for r in reports.values()] == [(1, 2), (0, 2)]
    assert (tmp_path / records.SOLVED_PNG).stat().st_size > 10_000
    assert (tmp_path / "v96_s1024" / records.RESULTS_JSON).is_file()
    with pytest.raises(ValueError, match="no sub-directory"):
        build.build_regime_reports(tmp_path / "not_a_workdir")


def test_regimes_with_different_thresholds_are_refused(tmp_path):
    write_regime_workdirs(tmp_path)
    config_path = tmp_path / "v96_s1024" / records.CONFIG_FILE
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "solved_threshold": 0.5})
    )
    with pytest.raises(ValueError, match=r"different solved thresholds \[0\.5, 0\.8\]"):
        build.build_regime_reports(tmp_path)
    assert not (tmp_path / records.SOLVED_PNG).exists()
