"""The study's command against the reference trainer's own record of its first steps.

``data/reference_parity/`` holds what the reference's PyTorch trainer did from its initial
weights (``experiments/parity/record_reference.py``, run in the reference's environment):
for seeds 11 and 12 and both reads, every step's training loss, gradient norm before
clipping and learning rate over the first 20 steps of the 2,000-step protocol, the
validation loss and accuracy after step 20, and the parameters then.

Here the ``parity`` preset runs those 20 steps through the command a user runs
(``python -m experiments.run``: ``config.init_from``, the numpy data stream,
``train_log.jsonl``, an evaluation and a checkpoint at step 20). The cosine of the
2,000-step budget is kept by ``stretched_cosine`` cut at step 20: the same rates.

Tolerances, from float32 rounding. Both sides compute in float32 (eps 6e-8) and order
their sums differently (the loss averages 8,176 positions, the gradient norm sums 78K
squares; our chunkwise form against the reference's parallel one), so the same
parameters give the same loss and gradient norm to a few 1e-7 relative (measured at
step 1: 1e-7). The steps then feed these differences back: Adam divides each gradient
by its running RMS, so a parameter whose gradient is tiny moves by about the learning
rate whatever its value, and a rounding difference in such a gradient becomes a
difference of up to that much in the parameter. The tolerances below allow that growth
and no more: they are a few times the largest differences measured (comments beside the
constants), and a defect of the step (a wrong rate, another data batch, weight decay
missing or on the wrong parameters) lands well above them (see PARAMS_ATOL). The
gradient norms of these steps stay below the clip's 1.0, so the clip is not exercised
here; tests/test_training.py checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from orthorecall import checkpointing, reference_checkpoint, torch_format
from tests.conftest import REPO_ROOT, run_module

pytestmark = pytest.mark.slow

PARITY = REPO_ROOT / "data" / "reference_parity"
RECORD = json.loads((PARITY / "first_steps.json").read_text())
STEPS = 20
SEEDS = (11, 12)
VARIANTS = {"raw": "baseline", "ns5": "ns5"}

# Measured here (seeds 11 and 12, both reads) at most: loss 1.5e-6 relative, gradient
# norm 1.8e-5, learning rate 7.5e-8, validation loss 3.0e-6, validation accuracy 4e-9,
# parameters after step 20 1.0e-4 absolute. Relative, per step: the loss.
LOSS_RTOL = 1e-5
# Relative, per step: the gradient norm (a sum of 78K squares, in another order).
GRAD_NORM_RTOL = 1e-4
# The learning rate: PyTorch's recursive cosine against optax's closed form, in float32.
LEARNING_RATE_RTOL = 1e-6
# Validation after step 20: loss relative, accuracy absolute (one flipped argmax among
# the 4,096 scored positions would be 2.4e-4).
VAL_LOSS_RTOL = 1e-5
VAL_ACCURACY_ATOL = 1e-4
# Parameters after step 20, absolute: a sixth of one step's learning rate (3e-3), the
# most one step's rounding can move a parameter whose gradient is near zero under Adam
# (module docstring). A defect is far above it: without weight decay the largest
# embedding weights (|w| about 4) would be off by 20 x 3e-3 x 0.01 x 4 = 2.4e-3; a 10%
# error in the rate, by up to 6e-3; another batch, by the whole update.
PARAMS_ATOL = 5e-4


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("parity") / "run"
    result = run_module(
        "experiments.run",
        "--config=configs/noisy_ar.py:parity",
        f"--workdir={workdir}",
        "--notensorboard",
        f"--config.seeds.first_seed={SEEDS[0]}",
        f"--config.seeds.num_seeds={len(SEEDS)}",
        f"--config.train.steps={STEPS}",
        "--config.train.schedule=stretched_cosine",
        "--config.train.stretch_steps=2000",
        "--config.train.log_every=1",
        f"--config.train.eval_every={STEPS}",
        f"--config.train.checkpoint_every={STEPS}",
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def reference(read: str, seed: int) -> dict:
    return RECORD["first_steps"][f"{VARIANTS[read]}_seed{seed}"]


def test_the_reads_start_from_the_same_recorded_weights():
    assert all(RECORD["init_identical"].values())
    assert sorted(int(s) for s in RECORD["init_identical"]) == list(range(11, 27))
    assert RECORD["environment"]["torch"].startswith("2.13.0")


@pytest.mark.parametrize("read", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_every_step_matches_the_reference(parity_run, read, seed):
    rows = [
        json.loads(line)
        for line in (parity_run / "train_log.jsonl").read_text().splitlines()
        if json.loads(line)["read"] == read and json.loads(line)["seed"] == seed
    ]
    expected = reference(read, seed)["steps"]
    assert [r["step"] for r in rows] == [e["step"] for e in expected] == list(range(1, 21))
    for ours, theirs in zip(rows, expected, strict=True):
        np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(ours["grad_norm"], theirs["grad_norm"], rtol=GRAD_NORM_RTOL)
        np.testing.assert_allclose(
            ours["learning_rate"], theirs["learning_rate"], rtol=LEARNING_RATE_RTOL
        )


@pytest.mark.parametrize("read", VARIANTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_validation_after_step_20_matches_the_reference(parity_run, read, seed):
    rows = [json.loads(line) for line in (parity_run / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["read"] == read and r["seed"] == seed]
    assert row["step"] == STEPS
    expected = reference(read, seed)
    np.testing.assert_allclose(row["loss"], expected["val_loss"], rtol=VAL_LOSS_RTOL)
    np.testing.assert_allclose(row["accuracy"], expected["val_accuracy"], atol=VAL_ACCURACY_ATOL)


def restored_params(workdir: Path) -> dict:
    checkpointer = checkpointing.RunCheckpointer(workdir / "checkpoints", save_every=STEPS)
    try:
        restored = checkpointer.restore_latest(None)
    finally:
        checkpointer.close()
    assert restored.step == STEPS
    return restored.state["states"]


@pytest.mark.parametrize("read", VARIANTS)
def test_parameters_after_step_20_match_the_reference(parity_run, read):
    states = restored_params(parity_run)
    state = states[read]
    params = state["params"] if isinstance(state, dict) else state[0]
    for i, seed in enumerate(SEEDS):
        obj = torch_format.load_torch_checkpoint(PARITY / reference(read, seed)["parameters"])
        theirs, _ = reference_checkpoint.params_from_state_dict(obj["state_dict"], obj["cfg"])
        ours = jax.tree.map(lambda x, i=i: np.asarray(x)[i], params)
        differences = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ours, theirs)
        worst = max(jax.tree.leaves(differences))
        assert worst < PARAMS_ATOL, (seed, differences)
