"""Refusals of the smaller commands that need no subprocess: sizes checked against
estimates before compute, and the study's command refusing an unwritable workdir."""

from __future__ import annotations

import pytest

from experiments.study import evaluate_reference
from tests.conftest import REFERENCE_CHECKPOINTS, run_module

CHECKPOINT = REFERENCE_CHECKPOINTS / "v80_s512_baseline_seed11_steps2000.pt"


def test_a_validation_set_too_large_to_draw_is_refused_before_it_is_drawn():
    with pytest.raises(ValueError, match=r"--num_batches=1000000 x --batch_size=16 .* ask for"):
        evaluate_reference.evaluate_checkpoint(CHECKPOINT, num_batches=10**6, batch_size=16)


def test_flags_out_of_range_name_the_flag():
    evaluate_reference.check_flags(None, 16, 64)
    with pytest.raises(ValueError, match=r"--chunk_size: must be <= 2147483647"):
        evaluate_reference.check_flags(None, None, 2**64)


@pytest.mark.slow
def test_the_study_refuses_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    done = run_module(
        "experiments.run",
        "--config=configs/noisy_ar.py:smoke",
        f"--workdir={tmp_path / 'file'}",
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--workdir:" in done.stderr and "is a file, not a folder" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, arguments, fragment",
    [
        ("experiments.run", [], "usage error: --config=configs/noisy_ar.py[:PRESET] is required"),
        (
            "experiments.agents.ppo_main",
            ["--config=configs/popgym_ppo.py:smoke", "extra"],
            "usage error: unexpected arguments: ['extra']",
        ),
        ("experiments.agents.world_model_main", [], "--out=DIR is required"),
        ("experiments.replication.analyze", [], "--runs=DIR[,DIR...] is required"),
    ],
)
def test_usage_errors_exit_2(module, arguments, fragment):
    done = run_module(module, *arguments, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert fragment in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "count, fragment",
    [
        ("100000000", "--num_sequences: 100000000 sequences of"),
        ("17", "--num_sequences: 17 is not a multiple of the validation batch size 16"),
    ],
)
def test_probe_refuses_validation_sets_it_cannot_draw_before_any_probe(tmp_path, count, fragment):
    out = tmp_path / "probe.json"
    done = run_module(
        "experiments.probes.probe",
        "--probe=oracle",
        f"--checkpoint={CHECKPOINT}",
        f"--num_sequences={count}",
        f"--out={out}",
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert fragment in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not done.stdout.strip()  # no probe ran (each prints its record)
    assert not out.exists()
