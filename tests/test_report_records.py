"""Tests for experiments.report.records: reading metrics.jsonl (resumed runs, truncated
lines, bad schema, missing or empty files) and run_config.json."""

from __future__ import annotations

import json
import math
import re

import pytest

from experiments.report import build, records
from tests.report_fixtures import (
    CHANCE,
    STEPS,
    analyze_workdir,
    make_config,
    row,
    seed_rows,
    write_workdir,
)


def test_resumed_run_keeps_last_occurrence(tmp_path):
    first = [row("ns5", 0, s, CHANCE) for s in STEPS[:5]]  # steps 200..1000
    # Resumed from the step-400 checkpoint: steps 600..2000 are rewritten; it escapes at 800.
    resumed = [row("ns5", 0, s, 0.95 if s >= 800 else CHANCE) for s in STEPS[2:]]
    resumed[-1]["accuracy"] = 0.97
    rows = first + resumed + seed_rows("raw", 0)
    results = analyze_workdir(write_workdir(tmp_path, rows, make_config()))
    ns5 = results["reads"]["ns5"]
    assert ns5["escape_step"] == [800] and ns5["final_accuracy"] == [0.97]
    assert results["input"]["duplicate_lines"] == 3  # steps 600, 800, 1000
    assert results["input"]["metrics_lines"] == len(rows)


def test_truncated_line_is_skipped_and_bad_schema_raises(tmp_path):
    rows = seed_rows("raw", 0) + seed_rows("ns5", 0, 800)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    workdir = tmp_path / "truncated"
    workdir.mkdir()
    # A crash mid-write, then the resumed run's line appended to the partial one.
    (workdir / records.METRICS_FILE).write_text('{"read": "raw", "se' + text + "\n\n")
    metrics = records.load_metrics(workdir)
    assert metrics.num_skipped == 1 and metrics.curves["raw"][0].steps[0] == 400
    (workdir / records.METRICS_FILE).write_text(text + '{"read": "raw", "seed": 0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:21"):
        records.load_metrics(workdir)


# build_report too: the CLI turns its ValueError into exit status 2.
@pytest.mark.parametrize("load", [records.load_metrics, build.build_report])
@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_missing_or_empty_metrics_raise_naming_the_file(tmp_path, content, load):
    if content is not None:
        (tmp_path / records.METRICS_FILE).write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / records.METRICS_FILE))):
        load(tmp_path)


def test_run_config_absent_or_malformed(tmp_path):
    assert records.load_run_config(tmp_path) == {}
    config = make_config()
    (tmp_path / records.CONFIG_FILE).write_text(json.dumps(config))
    assert records.load_run_config(tmp_path) == config
    path = re.escape(str(tmp_path / records.CONFIG_FILE))
    (tmp_path / records.CONFIG_FILE).write_text('{"name": ')
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        records.load_run_config(tmp_path)
    (tmp_path / records.CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path}: expected a JSON object, got list"):
        records.load_run_config(tmp_path)


def test_curves_are_sorted_by_step_and_seed(tmp_path):
    # Evaluations written out of order (several processes appending): each curve is
    # sorted by step, seeds ascending, reads in order of first appearance; null accuracy
    # is NaN and the nonfinite flag is kept.
    rows = [
        row("ns5", 1, 400, 0.5),
        row("ns5", 0, 400, None, nonfinite=True),
        row("raw", 0, 200, CHANCE),
        row("ns5", 1, 200, CHANCE),
    ]
    metrics = records.load_metrics(write_workdir(tmp_path, rows))
    assert list(metrics.curves) == ["ns5", "raw"]
    assert list(metrics.curves["ns5"]) == [0, 1]
    curve = metrics.curves["ns5"][1]
    assert (curve.read, curve.seed, curve.steps.tolist()) == ("ns5", 1, [200, 400])
    assert curve.accuracy.tolist() == [CHANCE, 0.5] and curve.nonfinite.tolist() == [False, False]
    diverged = metrics.curves["ns5"][0]
    assert math.isnan(diverged.accuracy[0]) and diverged.nonfinite.tolist() == [True]
    assert (metrics.num_lines, metrics.num_duplicates, metrics.num_skipped) == (4, 0, 0)


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"read": "raw", "seed": "one", "step": 200, "accuracy": 0.1}',
            "seed and step must be integers",
        ),
        (
            '{"read": "raw", "seed": 0, "step": 200, "accuracy": "high"}',
            "accuracy must be a number or null",
        ),
        (
            '{"read": "raw", "seed": 0, "step": 200, "accuracy": true}',
            "accuracy must be a number or null",
        ),
        ("[1, 2, 3]", "expected an object"),
    ],
    ids=["seed", "accuracy-string", "accuracy-bool", "not-an-object"],
)
def test_bad_field_raises_naming_the_line(tmp_path, line, message):
    (tmp_path / records.METRICS_FILE).write_text(line + "\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / records.METRICS_FILE}:1: ") + message
    ):
        records.load_metrics(tmp_path)
