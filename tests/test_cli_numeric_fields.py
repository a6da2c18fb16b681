"""Every command refuses NaN, infinities and out-of-range integers in every numeric field
with exit code 2 and a message naming the field, before any compute and without leaving
anything behind.

The fields are generated, not listed (tests/cli_fault_driver.py walks each command's
flags and its configuration's preset), so a field added later is covered too. Each
command's cases run in one process, calling its ``main`` in-process; one real
``python -m`` process per command checks the exit code end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, run_module

COMMANDS = (
    "experiments.run",
    "experiments.agents.ppo_main",
    "experiments.agents.world_model_main",
    "experiments.probes.probe",
    "experiments.study.evaluate_reference",
    "experiments.replication.importer",
    "experiments.replication.analyze",
    "experiments.benchmarks.model",
    "experiments.benchmarks.agents",
    "experiments.benchmarks.data",
    "experiments.benchmarks.reference",
)
# Commands with no numeric flag today (their other inputs are tested elsewhere): the
# generated cases cover any they gain.
WITHOUT_NUMERIC_FIELDS = {
    "experiments.replication.importer",
    "experiments.benchmarks.model",
    "experiments.benchmarks.reference",
}


def _driver(module: str, scratch) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "cli_fault_driver.py"), module, str(scratch)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"JAX_PLATFORMS": "cpu", **_environment()},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _refused_properly(case: dict) -> bool:
    name = case["field"].lstrip("-").rsplit(".", 1)[-1]
    return (
        case["code"] == 2
        and not case["computed"]
        and not case["left"]
        and name in case["message"]
        and "Traceback" not in case["message"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("module", COMMANDS)
def test_nan_infinity_and_out_of_range_integers_are_refused(module, tmp_path):
    result = _driver(module, tmp_path)
    if module in WITHOUT_NUMERIC_FIELDS:
        assert result["fields"] == []
    else:
        assert result["fields"], "no numeric field found: the driver no longer sees them"
    wrong = [c for c in result["cases"] if not _refused_properly(c)]
    assert not wrong, json.dumps(wrong, indent=1)[:6000]


def _assert_refused(done, *fragments):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, arguments, fragment",
    [
        (
            "experiments.run",
            ["--config=configs/noisy_ar.py:smoke", "--config.train.learning_rate=nan"],
            "config.train.learning_rate: must be finite",
        ),
        (
            "experiments.agents.ppo_main",
            ["--config=configs/popgym_ppo.py:smoke", "--config.seeds.first_seed=4294967296"],
            "config.seeds.first_seed: seeds 4294967296..4294967297 go past 2**32 - 1",
        ),
        ("experiments.agents.world_model_main", ["--seed=18446744073709551616"], "--seed: seed "),
        (
            "experiments.study.evaluate_reference",
            ["--checkpoint=missing.pt", "--num_batches=18446744073709551616"],
            "--num_batches: must be <= 2147483647",
        ),
        ("experiments.replication.analyze", ["--threshold=nan"], "--threshold: must be finite"),
        (
            "experiments.benchmarks.agents",
            ["--width=18446744073709551616"],
            "--width: must be <= 2147483647",
        ),
        ("experiments.benchmarks.data", ["--seq-len=inf"], "--seq-len"),
    ],
)
def test_a_real_process_exits_2_naming_the_field(module, arguments, fragment, tmp_path):
    out = tmp_path / "out"
    extra = {
        "experiments.run": [f"--workdir={out}"],
        "experiments.agents.ppo_main": [f"--workdir={out}"],
        "experiments.agents.world_model_main": [f"--out={out}"],
        "experiments.replication.analyze": [f"--runs={tmp_path}"],
    }.get(module, [])
    _assert_refused(run_module(module, *arguments, *extra, timeout=180), fragment)
    assert not out.exists()


@pytest.mark.slow
def test_output_paths_that_cannot_be_written_are_refused_before_compute(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    file = tmp_path / "file"
    file.write_text("")
    _assert_refused(
        run_module("experiments.agents.world_model_main", f"--out={file}/run", timeout=180),
        "--out: cannot create",
    )
    _assert_refused(
        run_module(
            "experiments.agents.world_model_main", f"--out={tmp_path}", "extra", timeout=180
        ),
        "unexpected arguments",
    )
    _assert_refused(
        run_module(
            "experiments.probes.probe",
            "--probe=decode",
            f"--checkpoint={REPO_ROOT}/tests/fixtures/reference_checkpoints/none.pt",
            f"--out={folder}",
            timeout=180,
        ),
        f"--out: {folder} is a folder",
    )
    _assert_refused(
        run_module("experiments.benchmarks.model", f"--json={folder}", timeout=180),
        f"--json: {folder} is a folder",
    )
    _assert_refused(
        run_module(
            "experiments.benchmarks.reference",
            f"--reference_dir={tmp_path}",
            f"--json={folder}",
            timeout=180,
        ),
        f"--json: {folder} is a folder",
    )
    _assert_refused(
        run_module("experiments.replication.importer", f"--out={file}/runs", timeout=180),
        "--out: cannot create",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert not any(folder.iterdir())
