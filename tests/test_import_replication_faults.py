"""experiments.replication.importer is all or nothing: every record of every file is
checked before anything is written, a bad one is refused with its file and line (exit
code 2), and --out is left as it was."""

from __future__ import annotations

import json
import shutil

import pytest

from experiments.replication import importer as import_replication
from experiments.replication.importer import DEFAULT_SOURCE, RecordError, parse_trace
from tests.conftest import run_module

# A late file (sorted order) and a regime-filtered one.
LATE = "stack_s512_results.jsonl"
RLS = "rls2k_s512.jsonl"
REGIME_FILTERED = "grid_lr001.jsonl"


@pytest.fixture()
def source(tmp_path):
    copy = tmp_path / "source"
    shutil.copytree(DEFAULT_SOURCE, copy)
    return copy


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _edit_first(path, edit):
    records = _records(path)
    edit(records[0])
    _write(path, records)


def _assert_refused(source, out, match):
    with pytest.raises(RecordError, match=match):
        import_replication.import_records(source, out)
    assert not out.exists() or not any(out.iterdir())
    # No partial folder left beside --out either.
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_a_malformed_line_in_a_late_file_leaves_nothing(source, tmp_path):
    with (source / LATE).open("a") as f:
        f.write("{not json\n")
    lines = len((source / LATE).read_text().splitlines())
    _assert_refused(source, tmp_path / "out", rf"{LATE}:{lines}: not a JSON line")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.pop("variant"), r":1: no 'variant'"),
        (lambda r: r.pop("seed"), r":1: no 'seed'"),
        (lambda r: r.update(seed="3"), r":1: seed must be an integer"),
        (lambda r: r.update(seed=2**32), r":1: seed must be an integer in \[0, 2\*\*32\)"),
        (lambda r: r.update(lr=float("inf")), r":1: lr must be a finite number"),
        (lambda r: r.update(steps=-1), r":1: steps must be an integer >= 1"),
        (lambda r: r["trace"].append(r["trace"][-1]), r":1: .*does not follow step"),
        (
            lambda r: r["trace"].append("step 2000 acc 0.95 loss 0.1 t 1s"),
            r":1: .*step 2000 does not follow step 2000",
        ),
        (
            lambda r: r["trace"].__setitem__(0, "step 200 acc 1.5 loss 3.0 t 1s"),
            r":1: .*accuracy outside \[0, 1\]",
        ),
        (
            lambda r: r["trace"].__setitem__(0, "step 200 acc nan loss 3.0 t 1s"),
            r":1: .*accuracy outside \[0, 1\]",
        ),
        (
            lambda r: r["trace"].append("step 2200 acc 0.9 loss 0.1 t 1s"),
            r":1: .*past the run's 2000",
        ),
        (lambda r: r.update(trace="step 200"), r":1: a trace must be a list of strings"),
    ],
)
def test_bad_records_are_refused_with_file_and_line(source, tmp_path, edit, match):
    _edit_first(source / RLS, edit)
    _assert_refused(source, tmp_path / "out", rf"{RLS}{match}")


def test_a_record_without_its_regime_in_a_regime_filtered_group_is_refused(source, tmp_path):
    _edit_first(source / REGIME_FILTERED, lambda r: r.pop("regime"))
    _assert_refused(source, tmp_path / "out", rf"{REGIME_FILTERED}:1: no 'regime'")


def test_a_line_that_is_not_an_object_is_refused(source, tmp_path):
    with (source / RLS).open("a") as f:
        f.write("[1, 2]\n")
    _assert_refused(source, tmp_path / "out", rf"{RLS}:\d+: a record must be a JSON object")


def test_an_empty_out_folder_is_filled_and_a_failed_import_leaves_it_empty(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _edit_first(source / RLS, lambda r: r.pop("seed"))
    _assert_refused(source, out, "no 'seed'")
    assert out.is_dir()
    shutil.copy(DEFAULT_SOURCE / RLS, source / RLS)
    workdirs = import_replication.import_records(source, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(workdirs)


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        import_replication.import_records(DEFAULT_SOURCE, tmp_path / "file")
    with pytest.raises(ValueError, match="--out: cannot create"):
        import_replication.import_records(DEFAULT_SOURCE, tmp_path / "file" / "runs")


def test_parse_trace_checks_order_and_ranges():
    assert parse_trace(["step 200 acc 0 loss nan t 1s"], "here")[0]["step"] == 200
    with pytest.raises(RecordError, match="is not 'step N acc A loss L t Ts'"):
        parse_trace(["step 200 acc 0.5 loss inf t 1s"], "here")
    with pytest.raises(RecordError, match="an infinite loss"):
        parse_trace(["step 200 acc 0.5 loss 1e999 t 1s"], "here")
    with pytest.raises(RecordError, match="alpha outside"):
        parse_trace(["step 200 acc 0.5 loss 1 t 1s alpha 2.0"], "here")


def test_the_command_exits_2_naming_the_file_and_line(source, tmp_path):
    _edit_first(source / RLS, lambda r: r.pop("variant"))
    out = tmp_path / "out"
    done = run_module(
        "experiments.replication.importer", f"--source={source}", f"--out={out}", timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{RLS}:1: no 'variant'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    usage = run_module("experiments.replication.importer", timeout=120)
    assert usage.returncode == 2 and "--out=DIR is required" in usage.stderr
