"""Tests for orthorecall.training, orthorecall.checkpointing and experiments.study.train.

Every model here is tiny (D=16, 2 heads, V=24, sequence length 16) so that each compile
takes seconds. The module turns on JAX's persistent compilation cache in the pytest
session's temporary folder (restored afterwards), so that a program compiled once (e.g.
the training step of the first of two identical runs) is not compiled again, also by
tests/test_run.py's subprocesses when both files run in one session.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.noisy_ar import get_config
from experiments.study import study_config, train
from experiments.study.cli import ConfigError
from experiments.study.workdir import WorkdirError, WorkdirLock
from orthorecall import checkpointing, data, training
from orthorecall import model as model_lib
from tests.conftest import (
    REPO_ROOT,
    TINY_TASK,
    assert_script_passes_on_eight_cpu_devices,
    with_overrides,
)

TASK = data.NoisyRecallTask(**TINY_TASK)


def tiny_config(**overrides):
    """The smoke preset + TINY + overrides (``train__steps=5`` sets train.steps)."""
    config = get_config("smoke")
    for key, value in with_overrides(**overrides).items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    # A speed-up only: reset_cache is private API, so without it run uncached.
    try:
        from jax._src import compilation_cache as cc
    except ImportError:
        yield None
        return

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    previous = {name: getattr(jax.config, name) for name in names}
    cache_dir = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    cache_dir.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()  # Whether the cache is used is decided once per process otherwise.
    yield cache_dir
    for name, value in previous.items():
        jax.config.update(name, value)
    cc.reset_cache()


def _host(tree):
    """A writable host copy (the train step donates its input states)."""
    return jax.tree_util.tree_map(lambda x: np.array(x), jax.device_get(tree))


def _assert_trees_equal(a, b, **tolerance):
    leaves_a, def_a = jax.tree_util.tree_flatten(a)
    leaves_b, def_b = jax.tree_util.tree_flatten(b)
    assert def_a == def_b
    for x, y in zip(leaves_a, leaves_b):
        if tolerance:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _seed_slice(tree, index):
    return jax.tree_util.tree_map(lambda x: x[index], tree)


# ---------------------------------------------------------------------------------------
# The jitted step: vmapped seeds, non-finite seeds
# ---------------------------------------------------------------------------------------

SEEDS = np.array([7, 2, 13])  # Deliberately not 0..N-1: seed s must mean PRNGKey(s).
NUM_STEPS = 3


@pytest.fixture(scope="module")
def ns5_steps():
    """One read (ns5, whose Newton-Schulz read is the vmapped matrix code under study),
    the optimizer of a 4-step run, the reference numpy batches of every seed, and the
    3-seed trajectory (host copies of the states before/after each step).

    The optimizer is the protocol's except for two values. eps=1e-3: with eps=1e-8 Adam
    turns a gradient component that is float noise (|g| ~ 1e-8, e.g. some gate biases)
    into an update of about lr/2 whose sign is the noise's, so a summation-order
    difference of 1e-8 between the batched and the unbatched program becomes 1e-3 in a
    parameter. clip 0.1 (below every seed's gradient norm): the clip is active, so a
    norm taken across seeds instead of per seed would show."""
    configs = study_config.validate_config(tiny_config(reads="ns5"))
    optimizer = training.make_optimizer(total_steps=NUM_STEPS + 1, eps=1e-3, clip_norm=0.1)
    streams = [data.ReferenceTrainingStream(TASK, seed=int(s), batch_size=4) for s in SEEDS]
    batches = []
    for _ in range(NUM_STEPS):
        pairs = [stream.next_batch() for stream in streams]
        batches.append((np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])))
    step = training.make_train_step(configs, optimizer, None)
    keys = np.zeros((len(SEEDS), 2), np.uint32)
    states = {"ns5": training.init_seed_states(SEEDS, configs["ns5"], optimizer)}
    trajectory, losses, grad_norms = [_host(states)], [], []
    for batch in batches:
        states, _, metrics = step(states, keys, batch)
        trajectory.append(_host(states))
        losses.append(np.asarray(metrics["ns5"]["loss"]))
        grad_norms.append(np.asarray(metrics["ns5"]["grad_norm"]))
    return dict(
        configs=configs,
        optimizer=optimizer,
        batches=batches,
        step=step,
        keys=keys,
        trajectory=trajectory,
        losses=losses,
        grad_norms=grad_norms,
    )


@pytest.mark.slow
def test_vmapped_seeds_match_single_seed_runs(ns5_steps):
    """N seeds in one vmapped step = N separate single-seed runs on the same batches.

    vmap turns per-seed matmuls into batched ones whose float summation order may differ
    from the unbatched kernels (gradients differ by ~1e-8 here), hence rtol 1e-5 /
    atol 1e-6 after 3 steps (float32 rounding is ~1e-7 relative; a wrong batch, key,
    clip or seed axis gives changes of the order of the learning rate, 1e-3)."""
    s = ns5_steps
    assert all((norms > 0.1).all() for norms in s["grad_norms"])  # The clip is active.
    single_step = training.make_train_step(s["configs"], s["optimizer"], None)
    initial, final = s["trajectory"][0]["ns5"], s["trajectory"][-1]["ns5"]
    init_one = jax.jit(model_lib.init_params, static_argnums=1)
    for i, seed in enumerate(SEEDS):
        # Seed s initializes from PRNGKey(s) whatever its position among the seeds (jit
        # vs eager vmap: rounding may differ).
        _assert_trees_equal(
            init_one(jax.random.PRNGKey(seed), s["configs"]["ns5"]),
            _seed_slice(initial.params, i),
            rtol=1e-6,
            atol=1e-7,
        )
        # The single-seed run starts from the same state (a slice of the 3-seed one:
        # initializing 1 seed eagerly would compile every init op anew for its shapes).
        state = {"ns5": _seed_slice(initial, slice(i, i + 1))}
        for k, (inputs, targets) in enumerate(s["batches"]):
            state, _, metrics = single_step(
                state, s["keys"][:1], (inputs[i : i + 1], targets[i : i + 1])
            )
            np.testing.assert_allclose(
                np.asarray(metrics["ns5"]["loss"])[0], s["losses"][k][i], rtol=1e-5
            )
            np.testing.assert_allclose(
                np.asarray(metrics["ns5"]["grad_norm"])[0], s["grad_norms"][k][i], rtol=1e-5
            )
        state = _host(state)["ns5"]
        assert not state.nonfinite.any()
        _assert_trees_equal(
            state.params, _seed_slice(final.params, slice(i, i + 1)), rtol=1e-5, atol=1e-6
        )
        _assert_trees_equal(
            state.opt_state, _seed_slice(final.opt_state, slice(i, i + 1)), rtol=1e-5, atol=1e-6
        )
    # The test is not vacuous: training moved the parameters well beyond the tolerance.
    moved = max(
        np.max(np.abs(a - b))
        for a, b in zip(
            jax.tree_util.tree_leaves(final.params), jax.tree_util.tree_leaves(initial.params)
        )
    )
    assert moved > 1e-3


@pytest.mark.slow
def test_seed_groups_compute_the_same_steps_and_evaluations(ns5_steps):
    """Three groups of one seed, one after the other (the trainer's answer to a step that
    does not fit in memory), follow the 3-seed trajectory and evaluate as it does."""
    s = ns5_steps
    grouped = training.make_train_step(s["configs"], s["optimizer"], None, seed_groups=3)
    hlo = grouped.lower(s["trajectory"][0], s["keys"], s["batches"][0]).as_text()
    assert "while" in hlo  # the groups are a loop, not three copies of the step
    states = copy.deepcopy(s["trajectory"][0])
    for k, batch in enumerate(s["batches"]):
        states, _, metrics = grouped(states, s["keys"], batch)
        np.testing.assert_allclose(metrics["ns5"]["loss"], s["losses"][k], rtol=1e-5)
        np.testing.assert_allclose(metrics["ns5"]["grad_norm"], s["grad_norms"][k], rtol=1e-5)
        _assert_trees_equal(_host(states), s["trajectory"][k + 1], rtol=1e-5, atol=1e-6)

    inputs = np.stack([b[0] for b in s["batches"]], axis=1)  # (seeds, batches, B, L)
    targets = np.stack([b[1] for b in s["batches"]], axis=1)
    final = s["trajectory"][-1]
    want = training.make_eval_step(s["configs"])(final, inputs, targets)
    got = training.make_eval_step(s["configs"], seed_groups=3)(final, inputs, targets)
    _assert_trees_equal(got, want, rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match="seed_groups=2 must divide the number of seeds, 3"):
        grouped_badly = training.make_train_step(s["configs"], s["optimizer"], None, seed_groups=2)
        grouped_badly(states, s["keys"], s["batches"][0])
    with pytest.raises(ValueError, match="seed_groups"):
        training.make_eval_step(s["configs"], seed_groups=0)


_GROUPED_ON_EIGHT_DEVICES = """
import jax, numpy as np
from experiments.study import study_config
from orthorecall import training
from tests.test_training import tiny_config
configs = study_config.validate_config(tiny_config(reads="raw"))
# eps 1e-3: see ns5_steps (Adam turns gradient components that are float noise into
# updates of about the learning rate).
optimizer = training.make_optimizer(total_steps=4, eps=1e-3)
mesh = training.seed_mesh()
seeds = np.arange(16)  # two per device
states = {"raw": training.init_seed_states(seeds, configs["raw"], optimizer)}
states = training.shard_seeds(states, mesh)
keys = training.shard_seeds(jax.vmap(jax.random.PRNGKey)(seeds), mesh)
rng = np.random.default_rng(0)
batch = training.shard_seeds(tuple(rng.integers(0, 24, (2, 16, 2, 15)).astype(np.int32)), mesh)
host = lambda tree: jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
results = {}
for groups in (1, 2):
    # Run what was inspected (calling the jitted function would compile it again).
    step = training.make_train_step(configs, optimizer, None, seed_groups=groups)
    step = step.lower(states, keys, batch).compile()
    compiled = step.as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert collective not in compiled, (groups, collective)
    copy = jax.tree_util.tree_map(lambda x: x.copy(), states)
    new_states, _, metrics = step(copy, keys, batch)
    assert new_states["raw"].params["embedding"].sharding.spec[0] == "seed"
    results[groups] = host((new_states, metrics))
for a, b in zip(jax.tree_util.tree_leaves(results[1]), jax.tree_util.tree_leaves(results[2])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.slow
def test_seed_groups_on_eight_devices_stay_on_their_devices():
    """Seeds sharded over 8 devices and updated in 2 groups: each group takes one seed of
    every device's own pair, so the compiled step moves no data between devices."""
    assert_script_passes_on_eight_cpu_devices(_GROUPED_ON_EIGHT_DEVICES)


@pytest.mark.slow
def test_nonfinite_seed_is_frozen_and_others_unaffected(ns5_steps):
    """Seed 1 gets a batch with no scored position (loss 0/0 = NaN, NaN gradients) at
    step 2: it is flagged, keeps its step-1 parameters and optimizer state, stays frozen
    on the next (normal) batch, and seeds 0 and 2 are bit-identical to the clean run."""
    s = ns5_steps
    step, (after1, after2, after3) = s["step"], s["trajectory"][1:]
    inputs, targets = s["batches"][1]
    targets = targets.copy()
    targets[1] = data.IGNORE_INDEX
    states, _, metrics = step(copy.deepcopy(after1), s["keys"], (inputs, targets))
    loss = np.asarray(metrics["ns5"]["loss"])
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()
    states = _host(states)
    np.testing.assert_array_equal(states["ns5"].nonfinite, [False, True, False])
    _assert_trees_equal(_seed_slice(states["ns5"].params, 1), _seed_slice(after1["ns5"].params, 1))
    _assert_trees_equal(
        _seed_slice(states["ns5"].opt_state, 1), _seed_slice(after1["ns5"].opt_state, 1)
    )
    for i in (0, 2):
        _assert_trees_equal(
            _seed_slice(states["ns5"].params, i), _seed_slice(after2["ns5"].params, i)
        )

    states, _, metrics = step(states, s["keys"], s["batches"][2])
    assert np.isfinite(np.asarray(metrics["ns5"]["loss"])).all()  # A finite loss now...
    states = _host(states)
    np.testing.assert_array_equal(states["ns5"].nonfinite, [False, True, False])
    _assert_trees_equal(
        _seed_slice(states["ns5"].params, 1),  # ...but it stays frozen.
        _seed_slice(after1["ns5"].params, 1),
    )
    for i in (0, 2):
        _assert_trees_equal(
            _seed_slice(states["ns5"].params, i), _seed_slice(after3["ns5"].params, i)
        )
        _assert_trees_equal(
            _seed_slice(states["ns5"].opt_state, i), _seed_slice(after3["ns5"].opt_state, i)
        )


@pytest.mark.slow
def test_flagged_seed_is_not_updated_even_with_a_finite_loss(ns5_steps):
    s = ns5_steps
    flagged = copy.deepcopy(s["trajectory"][1])
    flagged["ns5"] = flagged["ns5"]._replace(nonfinite=np.array([False, False, True]))
    states = _host(s["step"](flagged, s["keys"], s["batches"][1])[0])
    np.testing.assert_array_equal(states["ns5"].nonfinite, [False, False, True])
    _assert_trees_equal(
        _seed_slice(states["ns5"].params, 2), _seed_slice(s["trajectory"][1]["ns5"].params, 2)
    )
    for i in (0, 1):
        _assert_trees_equal(
            _seed_slice(states["ns5"].params, i), _seed_slice(s["trajectory"][2]["ns5"].params, i)
        )


# ---------------------------------------------------------------------------------------
# The optimizer against an independent float64 transcription of PyTorch
# ---------------------------------------------------------------------------------------


def torch_adamw_reference(
    params, grads_per_step, lr_at, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip=1.0
):
    """PyTorch's clip_grad_norm_(max_norm=clip) + AdamW.step + scheduler.step, float64.

    clip_grad_norm_: total = sqrt(sum ||g||^2); coef = clip / (total + 1e-6), clamped to
    <= 1. AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps). The scheduler gives lr_at(k)
    for the k-th (0-based) optimizer step."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    history = []
    for k, grads in enumerate(grads_per_step):
        g = {name: np.asarray(x, np.float64) for name, x in grads.items()}
        if clip is not None:
            total = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
            coef = min(clip / (total + 1e-6), 1.0)
            g = {name: x * coef for name, x in g.items()}
        lr, t = lr_at(k), k + 1
        for name in p:
            p[name] = p[name] * (1 - lr * weight_decay)
            m[name] = b1 * m[name] + (1 - b1) * g[name]
            v[name] = b2 * v[name] + (1 - b2) * g[name] ** 2
            denom = np.sqrt(v[name]) / math.sqrt(1 - b2**t) + eps
            p[name] = p[name] - lr / (1 - b1**t) * m[name] / denom
        history.append({name: x.copy() for name, x in p.items()})
    return history


def _optax_run(optimizer, params, grads_per_step):
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = optimizer.init(params)
    history = []
    for grads in grads_per_step:
        updates, state = optimizer.update(
            {k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}, state, params
        )
        params = optax.apply_updates(params, updates)
        history.append({k: np.asarray(v, np.float64) for k, v in params.items()})
    return history


OPT_STEPS = 6


@pytest.fixture(scope="module")
def optimizer_problem():
    rng = np.random.default_rng(0)
    # Every kind of parameter (matrix, bias, norm scale) gets the weight decay.
    params = {
        "kernel": rng.normal(size=(3, 4)),
        "bias": rng.normal(size=(4,)),
        "scale": 1.0 + 0.1 * rng.normal(size=(5,)),
    }
    # Global gradient norms above and below the clip, so that the clip matters even
    # through Adam's scale invariance (it changes the relative weight of the steps).
    norms = [5.0, 0.3, 2.0, 0.8, 3.0, 0.5]
    grads = []
    for norm in norms:
        g = {k: rng.normal(size=v.shape) for k, v in params.items()}
        total = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        grads.append({k: x * norm / total for k, x in g.items()})
    return params, grads


def _cosine(peak, horizon):
    return lambda k: peak * 0.5 * (1 + math.cos(math.pi * min(k, horizon) / horizon))


@pytest.mark.parametrize("schedule", ["cosine", "constant", "stretched_cosine"])
@pytest.mark.slow
def test_make_optimizer_matches_pytorch_adamw(optimizer_problem, schedule):
    """Defaults = AdamW(3e-3, (0.9, 0.999), 1e-8, weight decay 0.01) after a global-norm
    clip of 1.0. The params are O(1) float32 (rounding ~1e-7) and move by ~1e-2 over
    the steps; atol 3e-7 tells apart e.g. a missing or masked weight decay (~3e-5 per
    step) or a clip with another threshold."""
    params, grads = optimizer_problem
    lr_at = {
        "cosine": _cosine(3e-3, OPT_STEPS),
        "constant": lambda k: 3e-3,
        "stretched_cosine": _cosine(3e-3, 2 * OPT_STEPS),
    }[schedule]
    optimizer = training.make_optimizer(
        total_steps=OPT_STEPS, schedule=schedule, stretch_steps=2 * OPT_STEPS
    )
    expected = torch_adamw_reference(params, grads, lr_at)
    got = _optax_run(optimizer, params, grads)
    for k, (e, g) in enumerate(zip(expected, got)):
        for name in params:
            np.testing.assert_allclose(
                g[name], e[name], rtol=0, atol=3e-7, err_msg=f"{schedule} step {k} {name}"
            )
    if schedule == "cosine":
        # Not vacuous: without the clip, or with another decay, the result is off.
        for changed in (dict(clip=None), dict(weight_decay=0.0)):
            other = torch_adamw_reference(params, grads, lr_at, **changed)
            assert max(np.max(np.abs(other[-1][n] - got[-1][n])) for n in params) > 3e-6


def test_learning_rate_schedules():
    cosine = training.learning_rate_schedule("cosine", 3e-3, 2000)
    for k in (0, 1, 500, 1000, 1999, 2000):
        assert float(cosine(k)) == pytest.approx(
            3e-3 * 0.5 * (1 + math.cos(math.pi * k / 2000)), rel=1e-5, abs=1e-10
        )
    assert float(cosine(2000)) == pytest.approx(0.0, abs=1e-10)
    constant = training.learning_rate_schedule("constant", 1e-3, 2000)
    assert [float(constant(k)) for k in (0, 1000, 2000, 5000)] == pytest.approx([1e-3] * 4)
    # The replication's 4,000-step cosine, cut at 2,000 steps: half the peak at the end.
    stretched = training.learning_rate_schedule("stretched_cosine", 3e-3, 2000, 4000)
    for k in (0, 1000, 2000):
        assert float(stretched(k)) == pytest.approx(
            3e-3 * 0.5 * (1 + math.cos(math.pi * k / 4000)), rel=1e-5
        )
    assert float(stretched(2000)) == pytest.approx(1.5e-3, rel=1e-5)
    with pytest.raises(ValueError, match="stretch_steps"):
        training.learning_rate_schedule("stretched_cosine", 3e-3, 2000, 1000)
    with pytest.raises(ValueError, match="linear"):
        training.learning_rate_schedule("linear", 3e-3, 2000)


# ---------------------------------------------------------------------------------------
# train_and_evaluate
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The TINY study (raw and ns5, 3 seeds, 24 steps, on-device data) run twice."""
    workdirs = []
    for name in ("run_a", "run_b"):
        workdir = tmp_path_factory.mktemp(name)
        train.train_and_evaluate(tiny_config(), workdir)
        workdirs.append(workdir)
    return workdirs


def _restore(directory, like=None):
    """(step, state, meta) of the newest checkpoint that verifies, or None."""
    checkpointer = checkpointing.RunCheckpointer(directory, save_every=4)
    try:
        restored = checkpointer.restore_latest(like)
    finally:
        checkpointer.close()
    return None if restored is None else (restored.step, restored.state, restored.meta)


@pytest.mark.slow
def test_identical_runs_are_identical(two_runs):
    a, b = two_runs
    metrics = (a / "metrics.jsonl").read_bytes()
    assert metrics == (b / "metrics.jsonl").read_bytes()
    rows = [json.loads(line) for line in metrics.decode().splitlines()]
    assert len(rows) == 2 * 3 * 6  # reads x seeds x evaluations
    assert {(r["read"], r["seed"]) for r in rows} == {
        (r, s) for r in ("raw", "ns5") for s in range(3)
    }
    results_a, results_b = (json.loads((w / "results.json").read_text()) for w in (a, b))
    assert results_a.pop("workdir") != results_b.pop("workdir")  # The only difference.
    assert results_a == results_b
    step_a, state_a, meta_a = _restore(a / "checkpoints")
    step_b, state_b, meta_b = _restore(b / "checkpoints")
    assert step_a == step_b == 24
    assert meta_a == meta_b
    _assert_trees_equal(state_a, state_b)  # Parameters, optimizer states and data keys.


def _memory_that_needs_groups(config) -> int:
    """A per-device memory in which all three seeds at once do not fit, one at a time do."""
    configs = study_config.validate_config(config, available_memory=2**40)
    for exponent in np.arange(20, 40, 0.25):
        available = int(2**exponent)
        try:
            if study_config.seed_groups(config, configs, available_memory=available) > 1:
                return available
        except ConfigError:
            continue
    raise AssertionError("no memory size makes the trainer group the seeds")


@pytest.mark.slow
def test_seeds_are_grouped_when_the_device_memory_is_short(two_runs, tmp_path, monkeypatch):
    """Where a step of all seeds would not fit, the trainer runs them in groups, on its
    own, with the same results as the ungrouped run."""
    config = tiny_config()
    available = _memory_that_needs_groups(config)
    configs = study_config.validate_config(config, available_memory=available)
    assert study_config.seed_groups(config, configs, available_memory=available) == 3
    with pytest.raises(ConfigError, match="even with one seed at a time"):
        study_config.seed_groups(config, configs, available_memory=available // 4)
    monkeypatch.setattr(
        study_config.footprint, "per_device_available_memory", lambda devices: available
    )
    train.train_and_evaluate(config, tmp_path, tensorboard=False)
    assert json.loads((tmp_path / "run_config.json").read_text())["seed_groups"] == 3
    grouped = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert len(grouped) == len(whole) == 2 * 3 * 6
    for got, want in zip(grouped, whole, strict=True):
        assert (got["read"], got["seed"], got["step"]) == (want["read"], want["seed"], want["step"])
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-4)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _no_compute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("compute started before the configuration was checked")

    monkeypatch.setattr(training, "init_seed_states", fail)
    monkeypatch.setattr(training, "make_train_step", fail)


@pytest.mark.slow
@pytest.mark.parametrize("run_config", ["kept", "deleted", "malformed", "not_a_run"])
def test_different_config_in_same_workdir_is_refused(two_runs, tmp_path, monkeypatch, run_config):
    """The checkpoints know their configuration: run_config.json deleted or damaged, a
    different configuration is refused all the same, with the differing fields."""
    workdir = tmp_path / "run"
    shutil.copytree(two_runs[0], workdir)
    if run_config == "deleted":
        (workdir / "run_config.json").unlink()
    elif run_config == "malformed":
        (workdir / "run_config.json").write_text('{"config": {"train": ')
    elif run_config == "not_a_run":
        (workdir / "run_config.json").write_text("[1, 2]")
    before = _snapshot(workdir)
    _no_compute(monkeypatch)
    config = tiny_config(train__learning_rate=1e-3, task__seq_len=20)
    with pytest.raises(WorkdirError) as error:
        train.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "train.learning_rate: workdir has 0.003, now 0.001" in message
    assert "task.seq_len: workdir has 16, now 20" in message
    assert "train.steps" not in message  # Only the differing fields are named.
    assert _snapshot(workdir) == before  # Nothing written, nothing removed.


def _flip_a_bit_in_the_largest_array_file(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    largest = max(files, key=lambda p: p.stat().st_size)
    content = bytearray(largest.read_bytes())
    content[len(content) // 2] ^= 0x10
    largest.write_bytes(bytes(content))


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_identically(
    two_runs, tmp_path, capsys
):
    """The issue's failure: a flipped bit in the newest checkpoint's array data was
    resumed silently and gave wrong results. Now the run says which checkpoint failed,
    resumes from the older one, and ends with the uninterrupted run's numbers; the
    damaged checkpoint is kept aside, and retention keeps good ones."""
    workdir = tmp_path / "run"
    shutil.copytree(two_runs[0], workdir)
    (workdir / "results.json").unlink()
    _flip_a_bit_in_the_largest_array_file(workdir / "checkpoints" / "24")
    train.train_and_evaluate(tiny_config(), workdir, tensorboard=False)
    output = capsys.readouterr().out
    assert "resuming" in output and "from step 20" in output
    assert "checkpoint of step 24 failed verification, moved to corrupt-24" in output
    checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert checkpoints == ["16", "20", "24", "corrupt-24"]
    assert (workdir / "metrics.jsonl").read_bytes() == (two_runs[1] / "metrics.jsonl").read_bytes()
    step, state, meta = _restore(workdir / "checkpoints")
    _, expected_state, expected_meta = _restore(two_runs[1] / "checkpoints")
    assert step == 24 and meta == expected_meta
    _assert_trees_equal(state, expected_state)
    # Every checkpoint records the run's configuration and its fingerprint.
    description = json.loads((workdir / "run_config.json").read_text())
    assert meta["config"] == description["config"] == json.loads(tiny_config().to_json())
    assert meta["config_fingerprint"] == description["config_fingerprint"]


@pytest.mark.slow
def test_only_damaged_checkpoints_are_refused_not_started_over(two_runs, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(two_runs[0], workdir)
    for step in (16, 20, 24):
        (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text("{damaged")
    metrics = (workdir / "metrics.jsonl").read_bytes()
    _no_compute(monkeypatch)
    for _ in range(2):  # The first run moves them aside; the next is refused all the same.
        with pytest.raises(WorkdirError) as error:
            train.train_and_evaluate(tiny_config(), workdir)
        assert "only damaged ones moved aside: corrupt-16, corrupt-20, corrupt-24" in str(
            error.value
        )
    assert (workdir / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
def test_a_failed_start_does_not_poison_the_workdir(tmp_path, monkeypatch):
    """A start that dies before any result (here the first step runs out of memory)
    leaves the workdir free for the corrected command, whatever its configuration."""
    real_make_train_step = training.make_train_step

    def out_of_memory(*args, **kwargs):
        def step(*step_args):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory (simulated)")

        return step

    monkeypatch.setattr(training, "make_train_step", out_of_memory)
    workdir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        train.train_and_evaluate(tiny_config(train__batch_size=8), workdir, tensorboard=False)
    monkeypatch.setattr(training, "make_train_step", real_make_train_step)
    corrected = tiny_config(
        reads="raw", seeds__num_seeds=1, train__steps=4, train__checkpoint_every=4
    )
    results = train.train_and_evaluate(corrected, workdir, tensorboard=False)
    assert results["total_steps"] == 4
    description = json.loads((workdir / "run_config.json").read_text())
    assert description["config"]["train"]["batch_size"] == 4


_BLOCKED_FIRST_STEP = """
import sys, time
from experiments.study import train
from orthorecall import training
from tests.test_training import tiny_config

def make_train_step(*args, **kwargs):
    def step(*step_args):  # Stands for a long trace and compile of the first step.
        print("compiling", flush=True)
        time.sleep(120)
    return step

training.make_train_step = make_train_step
train.train_and_evaluate(tiny_config(), sys.argv[1], tensorboard=False)
"""


@pytest.mark.slow
def test_sigterm_stops_the_first_step_at_once(tmp_path):
    """Until the first step returns (tracing, compiling: minutes for a large model) a
    SIGTERM stops the run at once; the stop-after-the-step handler, which waits for the
    step to return, is armed only after it."""
    process = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_FIRST_STEP, str(tmp_path / "run")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "compiling"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    "run_config, expected",
    [
        (None, "neither checkpoints nor run_config.json"),
        ('{"config": ', "is not valid JSON"),
        ("other", "train.learning_rate: workdir has 0.001, now 0.003"),
    ],
)
def test_results_without_checkpoints_are_not_overwritten(
    tmp_path, monkeypatch, run_config, expected
):
    """Results of a run whose checkpoints are gone (deleted, or none written yet) are
    only continued by the same configuration: never overwritten by another."""
    (tmp_path / "metrics.jsonl").write_text('{"read": "raw", "seed": 0, "step": 4}\n')
    if run_config == "other":
        other = json.loads(tiny_config(train__learning_rate=1e-3).to_json())
        run_config = json.dumps({"config": other})
    if run_config is not None:
        (tmp_path / "run_config.json").write_text(run_config)
    before = _snapshot(tmp_path)
    _no_compute(monkeypatch)
    with pytest.raises(WorkdirError, match=re.escape(expected)):
        train.train_and_evaluate(tiny_config(), tmp_path)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k not in (".lock", "checkpoints")} == before


def test_a_locked_workdir_is_refused_before_any_compute(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with WorkdirLock(tmp_path), pytest.raises(WorkdirError, match="is in use by process"):
        train.train_and_evaluate(tiny_config(), tmp_path)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(task__seq_len=33), ["config.task", "seq_len", "even"]),
        (dict(task__vocab_size=5), ["config.task", "vocab_size"]),
        (dict(seeds__num_seeds=0), ["config.seeds.num_seeds"]),
        (dict(reads="raw,ns5,bogus"), ["config.reads", "bogus"]),
        (dict(reads="raw,raw"), ["config.reads", "twice"]),
        (dict(train__schedule="linear"), ["config.train.schedule", "linear"]),
        (
            dict(train__schedule="stretched_cosine", train__stretch_steps=10),
            ["config.train.stretch_steps"],
        ),
        (dict(train__batch_size=0), ["config.train.batch_size"]),
        (dict(train__eval_every=0), ["config.train.eval_every"]),
        (dict(train__checkpoint_every=0), ["config.train.checkpoint_every"]),
        (dict(train__learning_rate=0.0), ["config.train.learning_rate"]),
        (dict(train__data_source="torch"), ["config.train.data_source", "torch"]),
        (dict(task__multi_query=False), ["config.task.multi_query"]),
        # The only divisibility constraint: the model's inner width by the heads.
        (dict(model__num_heads=3), ["config.model", "num_heads"]),
        (dict(solved_threshold=0.0), ["config.solved_threshold"]),
    ],
)
def test_invalid_configs_fail_before_any_compute(overrides, expected, tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    workdir = tmp_path / "never_created"
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(tiny_config(**overrides), workdir)
    for text in expected:
        assert text in str(error.value)
    assert not workdir.exists()


@pytest.mark.slow
def test_half_written_and_damaged_checkpoints_are_skipped(two_runs, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(two_runs[0] / "checkpoints", directory)
    latest, state, meta = _restore(directory)
    assert latest == 24
    real = directory / "24"
    # A newer step without Orbax's completion marker (a save cut short)...
    shutil.copytree(real, directory / "28")
    (directory / "28" / "_CHECKPOINT_METADATA").unlink()
    # ...Orbax's temporary directory of a save in progress...
    shutil.copytree(real, directory / "32.orbax-checkpoint-tmp-1234567")
    # ...and newer, complete-looking checkpoints with a damaged file: the state's tree
    # metadata in one, the JSON item in the other. (Damaged array data fail as well, but
    # leave Orbax's failed asyncio tasks to be reported at exit.)
    shutil.copytree(real, directory / "36")
    (directory / "36" / "state" / "_METADATA").write_bytes(b"damaged")
    shutil.copytree(real, directory / "40")
    (directory / "40" / "meta" / "metadata").write_text('{"step": 40, "metr')
    checkpointer = checkpointing.RunCheckpointer(directory, save_every=4)
    try:
        assert checkpointer.complete_steps()[:2] == [40, 36]
        assert 28 not in checkpointer.complete_steps()
        restored = checkpointer.restore_latest(state)  # train.py's way
        rejected = {r.step: r.moved_to.name for r in checkpointer.rejected}
    finally:
        checkpointer.close()
    assert restored.step == 24 and restored.meta == meta and restored.verified
    _assert_trees_equal(restored.state, state)
    # The damaged ones are moved aside, out of Orbax's steps, and kept.
    assert rejected == {40: "corrupt-40", 36: "corrupt-36"}
    assert (directory / "corrupt-40" / "meta").is_dir()

    # Nothing usable at all: None, not an exception.
    for step_dir in list(directory.iterdir()):
        if not step_dir.name.startswith("corrupt-"):
            shutil.rmtree(step_dir)
    assert _restore(directory, state) is None


@pytest.mark.slow
def test_numpy_source_feeds_reference_streams_and_resumes_after_interrupt(tmp_path, monkeypatch):
    """With data_source="numpy", seed s trains on ReferenceTrainingStream(seed=s) batch
    after batch (captured at the step's input), also across an interruption: a SIGINT
    that arrives inside a step (after the step consumed, i.e. donated, its input states)
    stops the run at the end of that step with a consistent checkpoint, and the resumed
    run continues both the streams and the step count."""
    steps, first_seed, num_seeds = 5, 5, 3
    config = tiny_config(
        reads="ns5",
        train__data_source="numpy",
        train__steps=steps,
        train__eval_every=5,
        train__checkpoint_every=5,
        seeds__first_seed=first_seed,
        seeds__num_seeds=num_seeds,
    )
    captured = []
    interrupt_at = 3

    def capturing_make_train_step(configs, optimizer, sample_batch, **options):
        assert sample_batch is None  # Batches come from the host streams.

        def step(states, keys, batch):
            captured.append(tuple(np.asarray(x) for x in jax.device_get(batch)))
            # Like a donating jitted step: the input states are consumed.
            new_states = jax.tree_util.tree_map(jnp.copy, states)
            for leaf in jax.tree_util.tree_leaves(states):
                leaf.delete()
            if len(captured) == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)  # Delivered inside the step.
            size = keys.shape[0]
            metrics = {
                read: {"loss": jnp.zeros(size), "grad_norm": jnp.zeros(size)} for read in configs
            }
            return new_states, keys, metrics

        return step

    monkeypatch.setattr(training, "make_train_step", capturing_make_train_step)
    workdir = tmp_path / "run"
    # A suite started in the background of a non-interactive shell inherits an ignored
    # SIGINT, which the run rightly keeps ignoring: give this test Python's default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, workdir)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(captured) == interrupt_at
    step, _, meta = _restore(workdir / "checkpoints")
    assert step == meta["step"] == interrupt_at
    streams = [
        data.ReferenceTrainingStream(TASK, seed=s, batch_size=4)
        for s in range(first_seed, first_seed + num_seeds)
    ]
    for stream in streams:
        for _ in range(interrupt_at):
            stream.next_batch()
    assert meta["streams"] == json.loads(json.dumps([s.state() for s in streams]))

    interrupt_at = -1
    train.train_and_evaluate(config, workdir)
    assert len(captured) == steps  # Resumed after the interruption's step, not restarted.

    streams = [
        data.ReferenceTrainingStream(TASK, seed=s, batch_size=4)
        for s in range(first_seed, first_seed + num_seeds)
    ]
    for inputs, targets in captured:
        expected = [stream.next_batch() for stream in streams]
        assert inputs.dtype == targets.dtype == np.int32
        np.testing.assert_array_equal(inputs, np.stack([e[0] for e in expected]))
        np.testing.assert_array_equal(targets, np.stack([e[1] for e in expected]))
    step, _, meta = _restore(workdir / "checkpoints")
    assert step == steps
    assert meta["streams"] == json.loads(json.dumps([s.state() for s in streams]))


def test_a_run_says_when_the_numpy_source_holds_the_devices_up():
    class Streams:
        workers, wait_seconds = 4, 3.0

    notes = []

    class Progress:
        note = notes.append

    train._note_if_data_throttles(Progress, Streams, elapsed=20.0)  # 15%: not worth a word
    assert notes == []
    train._note_if_data_throttles(Progress, Streams, elapsed=10.0)
    assert len(notes) == 1
    assert "waited 30% of the time" in notes[0] and "4 worker process(es)" in notes[0]
    assert "train.data_source='jax'" in notes[0]


def test_frozen_projections_stay_at_their_initialization():
    """randk / randqk: the optimizer's update (weight decay included) never reaches the
    frozen projections, while every other parameter, and raw's k_proj, moves."""
    configs = study_config.validate_config(tiny_config(reads="raw,randk,randqk"))
    optimizer = training.make_optimizer(total_steps=4)
    stream = data.ReferenceTrainingStream(TASK, seed=3, batch_size=4)
    step = training.make_train_step(configs, optimizer, None)
    seeds = np.array([0, 1])
    states = {name: training.init_seed_states(seeds, c, optimizer) for name, c in configs.items()}
    before = _host(states)
    for _ in range(2):
        inputs, targets = stream.next_batch()
        batch = (np.stack([inputs] * 2), np.stack([targets] * 2))
        states, _, _ = step(states, np.zeros((2, 2), np.uint32), batch)
    after = _host(states)
    for name, frozen in (("raw", ()), ("randk", ("k_proj",)), ("randqk", ("q_proj", "k_proj"))):
        old = before[name].params["blocks"][0]["mlstm"]
        new = after[name].params["blocks"][0]["mlstm"]
        for param in ("q_proj", "k_proj", "v_proj", "up_proj"):
            if param in frozen:
                np.testing.assert_array_equal(new[param], old[param], err_msg=f"{name} {param}")
            else:
                assert not np.array_equal(new[param], old[param]), f"{name} {param} did not move"
