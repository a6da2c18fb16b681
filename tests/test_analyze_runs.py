"""experiments.replication.analyze counts each run once: named twice, or as a parent and its child,
a run is counted once and the output says so; a run copied into two folders, and a
metrics.jsonl whose evaluations are out of order or repeated with different values, are
refused (exit code 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from experiments.replication import analyze
from tests.conftest import run_module


def _run(folder, name, rows, reads=("raw", "ns5")):
    workdir = folder / name
    workdir.mkdir(parents=True)
    (workdir / "run_config.json").write_text(
        json.dumps({"name": name, "reads": list(reads), "eval_every": 100, "solved_threshold": 0.8})
    )
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def _rows(offset=0.0):
    rows = []
    for read in ("raw", "ns5"):
        for seed in range(4):
            for step in (100, 200, 300):
                solved = read == "ns5" and seed < 3 and step >= 200
                accuracy = 0.9 if solved else 0.1 + offset + 0.01 * seed
                rows.append({"read": read, "seed": seed, "step": step, "accuracy": accuracy})
    return rows


@pytest.fixture()
def runs(tmp_path):
    parent = tmp_path / "runs"
    return parent, _run(parent, "a", _rows()), _run(parent, "b", _rows(0.02))


def test_a_run_named_twice_or_with_its_parent_counts_once(runs):
    parent, a, b = runs
    workdirs, notes = analyze.resolve_runs([str(parent), str(a), str(a / ".." / "a")])
    assert workdirs == [a.resolve(), b.resolve()]
    assert len(notes) == 1 and "named 3 times" in notes[0] and "counted once" in notes[0]
    result = analyze.compare_runs(workdirs, baseline="raw")
    assert result["pooled"]["ns5"]["num_seeds"] == 8  # two runs of 4 seeds, not three
    assert analyze.resolve_runs([str(a), str(b)])[1] == []


def test_compare_runs_refuses_a_run_given_twice(runs):
    _, a, _ = runs
    with pytest.raises(ValueError, match="runs given twice"):
        analyze.compare_runs([a, a / ".." / "a"])


def test_a_run_copied_into_two_folders_is_refused(runs, tmp_path):
    _, a, _ = runs
    shutil.copytree(a, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"same metrics\.jsonl, byte for byte"):
        analyze.resolve_runs([str(a), str(tmp_path / "copy")])


def test_evaluations_out_of_order_or_repeated_differently_are_refused(tmp_path):
    rows = _rows()
    swapped = rows[:1] + rows[2:3] + rows[1:2] + rows[3:]  # steps 100, 300, 200
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: read raw seed 0 step 200 .*order"):
        analyze.compare_runs([_run(tmp_path, "swapped", swapped)])
    changed = rows + [dict(rows[0], accuracy=0.95)]
    with pytest.raises(ValueError, match=r"step 100 is evaluated twice with different values"):
        analyze.compare_runs([_run(tmp_path, "changed", changed)])
    # Written again with the same values (a resumed run): harmless.
    again = rows + [dict(rows[0])]
    result = analyze.compare_runs([_run(tmp_path, "again", again)])
    assert result["runs"][0]["reads"]["ns5"]["solved"] == 3


def test_the_command_says_what_it_counted_once_and_refuses_with_code_2(runs, tmp_path):
    parent, a, _ = runs
    done = run_module("experiments.replication.analyze", f"--runs={parent},{a}", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "counted once" in done.stdout
    (tmp_path / "bad").mkdir()
    refused = run_module(
        "experiments.replication.analyze", f"--runs={a}", f"--out={tmp_path / 'bad'}", timeout=120
    )
    assert refused.returncode == 2 and "--out:" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
