"""The scaffold anneal: the schedule (α per seed and step), the mixed read, and a gated
run of the trainer end to end (per-seed budgets, resume)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.noisy_ar import get_config
from experiments.report.anneal import format_anneal_markdown, summarize_anneal
from experiments.study import study_config, train
from experiments.study.cli import ConfigError
from orthorecall import cell as cell_lib
from orthorecall import mlstm
from orthorecall.anneal import NOT_TRIGGERED, AnnealSchedule
from orthorecall.reads import NS5, RAW, read_from_name
from tests.test_training import tiny_config

# ---------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------


def test_window_alpha_by_hand():
    schedule = AnnealSchedule(mode="window", start=100, end=300)
    steps = np.array([0, 100, 150, 200, 299, 300, 1000])
    np.testing.assert_allclose(
        schedule.alpha(steps), [1, 1, 0.75, 0.5, 0.005, 0, 0], rtol=1e-6, atol=1e-7
    )
    # One α per seed when seeds are given; triggers play no part.
    np.testing.assert_allclose(schedule.alpha(200, np.array([-1, 50, 90])), [0.5] * 3)
    np.testing.assert_array_equal(schedule.budget(np.array([-1, 50]), 400), [400, 400])


def test_gated_alpha_per_seed_and_step_by_hand():
    schedule = AnnealSchedule(mode="gated", threshold=0.8, dwell=200, span=500, settle=200)
    triggers = np.array([NOT_TRIGGERED, 1000, 1800], np.int32)
    # The replication's trace of a seed triggered at 1000: α 1, 1, 0.6, 0.2, 0 at
    # 1000, 1200, 1400, 1600, 1800.
    got = np.stack([schedule.alpha(step, triggers) for step in (1000, 1200, 1400, 1600, 1800)])
    want = [[1, 1, 1], [1, 1, 1], [1, 0.6, 1], [1, 0.2, 1], [1, 0, 1]]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(schedule.alpha(2300, triggers), [1, 0, 0.4], atol=1e-6)
    # Budgets: untriggered and early seeds keep the run's; a late one ends at
    # 1800 + 200 + 500 + 200 (the replication's 2,700 steps for a trigger at 1,800).
    np.testing.assert_array_equal(schedule.budget(triggers, 2000), [2000, 2000, 2700])
    # Triggers: the first accuracy at or above the threshold; never NaN, never twice.
    after = schedule.triggered(triggers, 2000, np.array([0.85, 0.99, np.nan]))
    np.testing.assert_array_equal(after, [2000, 1000, 1800])
    np.testing.assert_array_equal(
        schedule.triggered(np.full(2, NOT_TRIGGERED), 200, [0.79, np.nan]), [-1, -1]
    )
    # Under jit, with jax.numpy, the same numbers.
    jitted = jax.jit(lambda s, t: schedule.alpha(s, t, xp=jnp))
    np.testing.assert_allclose(jitted(1400, triggers), [1, 0.6, 1], atol=1e-6)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"mode": "cosine"}, "mode"),
        ({"mode": "window", "start": 5, "end": 5}, "after start"),
        ({"span": 0}, "span"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"dwell": -1}, "dwell"),
    ],
)
def test_bad_schedules_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        AnnealSchedule(**fields)


# ---------------------------------------------------------------------------------------
# The mixed read
# ---------------------------------------------------------------------------------------


def _inputs(t=11):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 4)), jnp.float32) for _ in range(3))
    gates = [jnp.asarray(rng.normal(size=(2, t, 2)) + s, jnp.float32) for s in (0.0, 2.0)]
    return q, k, v, *gates


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
def test_read_mix_interpolates_the_read_and_the_raw_read(form):
    args = _inputs()
    sequence = mlstm.recurrent_sequence if form == "recurrent" else mlstm.chunkwise_sequence
    run = lambda read, mix=None: np.asarray(sequence(*args, read=read, read_mix=mix)[0])
    ns5, raw = run(NS5), run(RAW)
    np.testing.assert_array_equal(run(NS5, 1.0), ns5)
    np.testing.assert_array_equal(run(NS5, jnp.float32(0.0)), raw)
    # The normalizer does not depend on the read, so h̃ mixes as the reads do.
    np.testing.assert_allclose(run(NS5, 0.3), 0.3 * ns5 + 0.7 * raw, rtol=1e-5, atol=1e-6)


def test_read_mix_is_refused_where_there_is_nothing_to_anneal():
    args = _inputs(3)
    for read in (RAW, read_from_name("delta"), read_from_name("rls")):
        with pytest.raises(ValueError, match="no R"):
            mlstm.chunkwise_sequence(*args, read=read, read_mix=0.5)
    with pytest.raises(ValueError, match="scalar"):
        mlstm.recurrent_sequence(*args, read=NS5, read_mix=jnp.ones(2))
    with pytest.raises(ValueError, match="gram"):
        mlstm.gram_sequence(*args, read=NS5, read_mix=0.5)
    config = cell_lib.CellConfig(embedding_dim=8, num_heads=2, inner_multiple=8)
    params = cell_lib.init_params(jax.random.PRNGKey(0), config)
    with pytest.raises(ValueError, match="no R"):
        cell_lib.scan(params, jnp.zeros((1, 3, 8)), config, read_mix=0.5)


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------


def _gated_config(**anneal_fields):
    """The cpu_anneal preset, small: the cpu regime's accuracies move off chance within
    tens of steps (the TINY task's stay at 0), so a threshold just above chance
    triggers seeds at different evaluations."""
    config = get_config("cpu_anneal")
    config.seeds.num_seeds = 3
    config.train.steps = 40
    config.train.batch_size = 8
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.train.log_every = 10
    config.train.val_batches = 1
    config.anneal.update(dict(dwell=10, span=20, settle=10))
    config.anneal.update(anneal_fields)
    return config


def test_anneal_configs_are_checked():
    with pytest.raises(ConfigError, match="anneal"):
        study_config.validate_config(tiny_config(reads="ns5,ns5_anneal"))
    bad = _gated_config()
    bad.reads = "raw,raw_anneal"
    with pytest.raises(ConfigError, match="no R"):
        study_config.validate_config(bad)
    late_window = _gated_config(mode="window", start=10, end=1000)
    with pytest.raises(ConfigError, match=r"anneal\.end"):
        study_config.validate_config(late_window)
    with pytest.raises(ConfigError, match="span"):
        study_config.validate_config(_gated_config(span=0))
    # ns5 and ns5_anneal are the same model trained differently: not an alias.
    assert list(study_config.validate_config(_gated_config())) == ["raw", "ns5", "ns5_anneal"]


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_gated_anneal_runs_per_seed_budgets_and_resumes_identically(tmp_path):
    # A threshold just above chance: some seeds trigger early, others late or never.
    config = _gated_config(threshold=0.14)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    rows = _rows(workdir)
    steps = config.train.steps
    by = lambda read: {(r["seed"], r["step"]): r for r in rows if r["read"] == read}
    plain, annealed = by("ns5"), by("ns5_anneal")
    triggers = {}
    for (seed, step), row in sorted(annealed.items()):
        trigger = row["anneal_trigger_step"]
        if trigger is not None:
            triggers[seed] = trigger
        # α as the schedule says; up to the anneal's start the model is ns5's, bit for bit.
        want_alpha = (
            1.0 if trigger is None else float(np.clip(1 - (step - trigger - 10) / 20, 0, 1))
        )
        assert row["alpha"] == pytest.approx(want_alpha)
        if (trigger is None or step <= trigger + 10) and (seed, step) in plain:
            assert row["accuracy"] == plain[(seed, step)]["accuracy"]
    assert triggers, "no seed triggered: lower the threshold"
    for seed in {s for s, _ in annealed}:
        last = max(step for s, step in annealed if s == seed)
        if seed in triggers:
            # Each triggered seed ends at α = 0, on its own budget.
            assert last == max(steps, triggers[seed] + 40)
            assert annealed[(seed, last)]["alpha"] == 0.0
        else:
            assert last == steps
    assert max(step for _, step in plain) == steps  # ns5 is not extended.
    # The report says what the anneal left: every triggered seed at α = 0.
    report = json.loads((workdir / "results.json").read_text())["anneal"]["ns5_anneal"]
    assert report["annealed_to_zero"] == len(triggers)
    assert "accuracy at α = 0" in (workdir / "results.md").read_text()

    # Resume from a checkpoint before the end (after the first trigger): same rows.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    checkpoints = sorted(
        (p for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    for late in checkpoints[1:]:
        shutil.rmtree(late)
    (resumed / "metrics.jsonl").unlink()
    (resumed / "results.json").unlink()
    train.train_and_evaluate(config, resumed)
    assert (resumed / "metrics.jsonl").read_text() == (workdir / "metrics.jsonl").read_text()


def test_anneal_summary_by_hand():
    row = lambda seed, step, acc, alpha, trigger: {
        "read": "ns5_anneal",
        "seed": seed,
        "step": step,
        "accuracy": acc,
        "alpha": alpha,
        "anneal_trigger_step": trigger,
    }
    rows = [
        row(0, 10, 0.9, 1.0, None),
        row(0, 20, 0.85, 0.5, 10),
        row(0, 30, 0.95, 0.0, 10),
        row(1, 10, 0.2, 1.0, None),
        row(1, 20, 0.82, 1.0, None),  # triggered at its last evaluation: never annealed
        row(2, 10, 0.81, 1.0, None),
        row(2, 30, 0.7, 0.0, 10),
        {"read": "raw", "seed": 0, "step": 10, "accuracy": 0.5},  # not annealed: ignored
    ]
    summary = summarize_anneal(rows, threshold=0.8)["ns5_anneal"]
    assert (summary["num_seeds"], summary["triggered"], summary["annealed_to_zero"]) == (3, 2, 2)
    assert summary["solved_at_alpha_0"] == 1
    assert summary["mean_accuracy_at_trigger"] == pytest.approx((0.9 + 0.81) / 2)
    assert summary["mean_accuracy_at_alpha_0"] == pytest.approx((0.95 + 0.7) / 2)
    assert summary["lowest_accuracy_while_annealing"] == pytest.approx(0.7)
    assert format_anneal_markdown({}, 0.8) == ""
    assert "| 2 | 10 | 81.0% | 30 | 0.00 | 70.0% |" in format_anneal_markdown(
        {"ns5_anneal": summary}, 0.8
    )
