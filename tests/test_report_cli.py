"""Tests for ``python -m experiments.report`` (experiments/report/__main__.py), in
subprocesses: the summary, the exit status, a directory of regime workdirs, the flags."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from experiments.report import records
from tests.conftest import REPO_ROOT, run_module
from tests.report_fixtures import make_config, seed_rows, write_regime_workdirs, write_workdir


def _cli(*args):
    return run_module("experiments.report", *args, timeout=120)


@pytest.mark.slow
def test_cli_prints_summary(tmp_path):
    rows = [
        r
        for s in range(4)
        for read, e in (("raw", None), ("ns5", 1000))
        for r in seed_rows(read, s, e)
    ]
    workdir = write_workdir(tmp_path, rows, make_config())
    proc = _cli(f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr
    assert "raw: 0/4 solved" in proc.stdout and "ns5: 4/4 solved" in proc.stdout
    assert "Fisher p=0.029" in proc.stdout  # 4/4 vs 0/4: 2 / C(8, 4)
    assert (workdir / records.RESULTS_JSON).is_file()
    assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr  # no library INFO lines


@pytest.mark.slow
def test_cli_empty_workdir_exits_2(tmp_path):
    proc = _cli(f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert "metrics.jsonl: not found" in proc.stderr and str(tmp_path) in proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
def test_cli_reports_each_regime_and_groups_them(tmp_path):
    write_regime_workdirs(tmp_path)
    proc = _cli(f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if not line.startswith(" ")] == [
        "v80_s512 / unit",
        "v96_s1024 / unit",
        "grouped solved counts",
    ]
    assert "raw: 1/2 solved" in lines[1] and "raw: 0/2 solved" in lines[5]
    assert lines[-1] == f"grouped solved counts: {tmp_path / records.SOLVED_PNG}"
    assert (tmp_path / records.SOLVED_PNG).is_file()
    assert (tmp_path / "v80_s512" / records.RESULTS_JSON).is_file()


@pytest.mark.slow
def test_cli_usage_errors_exit_2(tmp_path):
    proc = _cli()
    assert proc.returncode == 2 and "--workdir=DIR is required." in proc.stderr
    proc = _cli(f"--workdir={tmp_path}", "extra")
    assert proc.returncode == 2 and "unexpected arguments: ['extra']" in proc.stderr


@pytest.mark.slow
def test_cli_help_lists_its_flags():
    proc = _cli("--help")
    assert "python -m experiments.report --workdir=DIR" in proc.stdout
    assert "--workdir: Training workdir with metrics.jsonl" in proc.stdout
    assert "--threshold: Solved threshold" in proc.stdout


@pytest.mark.slow
def test_importing_the_package_defines_no_flags():
    # experiments.study.train imports the package inside `python -m experiments.run`, which
    # defines its own --workdir: the package must leave the flags to __main__. A fresh
    # interpreter, since this process may have imported anything already.
    code = """if True:
        from absl import flags
        before = set(flags.FLAGS)
        import experiments.report
        from experiments.report import build, plots, records, statistics, tables
        assert set(flags.FLAGS) == before, sorted(set(flags.FLAGS) - before)
        import experiments.run  # defines --workdir: no collision
        assert "workdir" in flags.FLAGS
        """
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
