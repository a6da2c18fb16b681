"""TensorBoard event files of a run, read back with TensorBoard's own reader."""

import math

import pytest

from experiments.study.summaries import ALL_SEEDS, RunSummaries

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(directory, tag):
    reader = event_accumulator.EventAccumulator(str(directory))
    reader.Reload()
    if tag not in reader.Tags()["scalars"]:
        return []
    return [(e.step, pytest.approx(e.value)) for e in reader.Scalars(tag)]


def _records(step, accuracy_by_seed):
    return [
        {
            "read": "ns5",
            "seed": seed,
            "step": step,
            "accuracy": acc,
            "loss": None if acc is None else 1.0 - acc,
            "nonfinite": acc is None,
        }
        for seed, acc in accuracy_by_seed.items()
    ]


def test_per_seed_and_per_read_curves(tmp_path):
    summaries = RunSummaries(tmp_path, ["raw", "ns5"], seeds=[3, 10])
    summaries.train(
        5,
        {
            "raw": {"loss": [2.0, 4.0], "grad_norm": [0.5, 0.25]},
            "ns5": {"loss": [1.0, math.nan], "grad_norm": [0.1, math.inf]},
        },
    )
    summaries.evaluation(5, _records(5, {3: 0.9, 10: None}), solved={"ns5": 1})
    summaries.close()
    # Seeds are zero-padded so that runs sort by seed.
    assert _scalars(tmp_path / "raw" / "seed_03", "train/loss") == [(5, 2.0)]
    assert _scalars(tmp_path / "raw" / "seed_10", "train/grad_norm") == [(5, 0.25)]
    assert _scalars(tmp_path / "raw" / ALL_SEEDS, "train/loss_mean") == [(5, 3.0)]
    # A diverged seed writes nothing, and means are over the finite values.
    assert _scalars(tmp_path / "ns5" / "seed_10", "train/loss") == []
    assert _scalars(tmp_path / "ns5" / ALL_SEEDS, "train/loss_mean") == [(5, 1.0)]
    assert _scalars(tmp_path / "ns5" / "seed_03", "val/accuracy") == [(5, 0.9)]
    assert _scalars(tmp_path / "ns5" / "seed_03", "val/loss") == [(5, 0.1)]
    assert _scalars(tmp_path / "ns5" / ALL_SEEDS, "val/accuracy_mean") == [(5, 0.9)]
    assert _scalars(tmp_path / "ns5" / ALL_SEEDS, "val/solved") == [(5, 1.0)]
    assert _scalars(tmp_path / "ns5" / ALL_SEEDS, "val/diverged") == [(5, 1.0)]


def test_resume_hides_what_was_written_after_the_checkpoint(tmp_path):
    # A run checkpointed at step 4, wrote steps up to 6, crashed and resumes from 4.
    first = RunSummaries(tmp_path, ["ns5"], seeds=[0])
    for step in range(2, 7, 2):
        first.evaluation(step, _records(step, {0: step / 10}), solved={"ns5": 0})
    first.close()
    resumed = RunSummaries(tmp_path, ["ns5"], seeds=[0], purge_step=4)
    for step in (4, 6):
        resumed.evaluation(step, _records(step, {0: 0.5 + step / 100}), solved={"ns5": 0})
    resumed.close()
    assert _scalars(tmp_path / "ns5" / "seed_0", "val/accuracy") == [(2, 0.2), (4, 0.54), (6, 0.56)]
