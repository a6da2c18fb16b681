"""The mLSTM world model: one-step observe vs the scan and the cell's parallel form, resets,
imagination under jit(vmap), training steps, the replay, the command end to end."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.agents import world_model_acting as acting
from experiments.agents import world_model_rssm as rssm
from experiments.agents import world_model_training as training
from orthorecall import cell as cell_lib
from tests.conftest import REPO_ROOT, run_module

B, T = 3, 12
# D=16, 4 heads: inner width 64, head width 16. Small heads and latents keep compiles short.
CONFIG = rssm.Config(
    num_actions=4,
    obs_size=4,
    read="ns5",
    embedding_dim=16,
    hidden=32,
    latents=4,
    classes=4,
    horizon=5,
    reward_scale=48.0,
)


def _sequences(key, reset_at=None):
    """Random one-hot observations, actions, and episode starts (at 0 and ``reset_at``)."""
    obs_key, action_key = jax.random.split(key)
    obs = jax.nn.one_hot(jax.random.randint(obs_key, (B, T), 0, 4), 4)
    actions = jax.random.randint(action_key, (B, T), 0, 4)
    is_first = jnp.zeros((B, T), bool).at[:, 0].set(True)
    if reset_at is not None:
        is_first = is_first.at[:, reset_at].set(True)
    return obs, actions, is_first


@pytest.fixture(scope="module")
def params():
    return jax.jit(functools.partial(training.init_train_state, CONFIG))(jax.random.PRNGKey(0))


def test_one_step_observe_equals_the_scan_and_the_cells_parallel_form(params):
    obs, actions, is_first = _sequences(jax.random.PRNGKey(1))
    is_first = is_first.at[1, 7].set(True)  # one sequence starts a new episode mid-way
    keys = jax.random.split(jax.random.PRNGKey(2), T)
    observe = jax.jit(functools.partial(rssm.observe, CONFIG))
    _, seen = observe(params.wm_params, obs, actions, is_first, keys)

    # As the acting policy runs it: one jitted cell step per environment step.
    step = jax.jit(
        lambda p, *a: rssm.WorldModel(CONFIG).apply(p, *a, method=rssm.WorldModel.observe_step)
    )
    state = rssm.initial_state(CONFIG, (B,))
    prev_action = jnp.zeros((B,), jnp.int32)
    for t in range(T):
        state, posterior, prior, _ = step(
            params.wm_params, state, prev_action, obs[:, t], is_first[:, t], keys[t]
        )
        prev_action = actions[:, t]
        np.testing.assert_allclose(posterior, seen.posterior[:, t], atol=1e-5)
        np.testing.assert_allclose(prior, seen.prior[:, t], atol=1e-5)
        np.testing.assert_allclose(state.y, seen.states.y[:, t], atol=1e-5)
        np.testing.assert_array_equal(state.z, seen.states.z[:, t])

    # The cell's chunkwise (parallel) form on the inputs the RSSM fed it, with its resets.
    cell_params = params.wm_params["params"]["cell"]
    ys, _ = cell_lib.scan(cell_params, seen.cell_inputs, CONFIG.cell_config, reset=is_first)
    np.testing.assert_allclose(ys, seen.states.y, atol=1e-5)


def test_a_reset_inside_a_sequence_equals_a_fresh_start(params):
    k = 5
    obs, actions, is_first = _sequences(jax.random.PRNGKey(3), reset_at=k)
    keys = jax.random.split(jax.random.PRNGKey(4), T)
    observe = jax.jit(functools.partial(rssm.observe, CONFIG))
    final, whole = observe(params.wm_params, obs, actions, is_first, keys)
    final_later, later = observe(
        params.wm_params, obs[:, k:], actions[:, k:], is_first[:, k:], keys[k:]
    )
    for got, want in zip(jax.tree_util.tree_leaves(later), jax.tree_util.tree_leaves(whole)):
        np.testing.assert_allclose(got, want[:, k:], atol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(final_later), jax.tree_util.tree_leaves(final)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_imagination_from_every_posterior_state_under_jit_vmap(params):
    obs, actions, is_first = _sequences(jax.random.PRNGKey(5), reset_at=6)
    keys = jax.random.split(jax.random.PRNGKey(6), T)
    _, seen = jax.jit(functools.partial(rssm.observe, CONFIG))(
        params.wm_params, obs, actions, is_first, keys
    )
    starts = jax.tree_util.tree_map(lambda a: a.reshape(B * T, *a.shape[2:]), seen.states)
    run = jax.jit(jax.vmap(functools.partial(rssm.imagine, CONFIG), in_axes=(None, None, 0, 0)))
    traj = run(
        params.wm_params,
        params.actor_params,
        starts,
        jax.random.split(jax.random.PRNGKey(7), B * T),
    )
    h, n = CONFIG.horizon, B * T
    assert traj.feats.shape == (n, h + 1, CONFIG.feature_size)
    assert traj.actions.shape == traj.rewards.shape == traj.conts.shape == (n, h)
    for leaf in (traj.feats, traj.rewards, traj.conts):
        assert np.isfinite(np.asarray(leaf)).all()
    assert ((traj.actions >= 0) & (traj.actions < CONFIG.num_actions)).all()
    assert ((traj.conts >= 0) & (traj.conts <= 1)).all()
    # Step 0 of every imagined trajectory is its start.
    np.testing.assert_allclose(traj.feats[:, 0], rssm.feature(starts), atol=1e-6)
    # The one-hot latents stay one-hot per latent variable.
    z = np.asarray(traj.feats[..., CONFIG.embedding_dim :]).reshape(n, h + 1, CONFIG.latents, -1)
    np.testing.assert_allclose(z.sum(-1), 1.0, atol=1e-5)


def test_lambda_returns_match_their_recursion():
    rewards = jnp.array([1.0, 0.0, 2.0])
    conts = jnp.array([1.0, 0.5, 1.0])
    values = jnp.array([0.0, 1.0, 2.0, 3.0])
    gamma, lam = 0.9, 0.8
    got = rssm.lambda_returns(rewards, conts, values, gamma, lam)
    want, following = [], values[-1]
    for k in reversed(range(3)):
        following = rewards[k] + gamma * conts[k] * ((1 - lam) * values[k + 1] + lam * following)
        want.insert(0, following)
    np.testing.assert_allclose(got, np.array(want), rtol=1e-6)


def test_two_hot_round_trips_through_the_bins():
    values = jnp.array([-30.0, -1.0, -1 / 48, 0.0, 1 / 48, 0.7, 5.0])
    logits = jnp.log(rssm.two_hot(values, 255) + 1e-12)
    np.testing.assert_allclose(rssm.two_hot_mean(logits), values, rtol=1e-3, atol=1e-5)


def test_the_replay_samples_whole_episodes_after_wrapping_around():
    capacity, length = 16, 4
    replay = acting.init_replay(2, capacity, 1)
    step = 0
    for _ in range(5):  # 5 x 7 = 35 steps: the ring has wrapped twice
        index = jnp.arange(step, step + 7, dtype=jnp.float32)
        rows = training.Batch(
            obs=jnp.broadcast_to(index[None, :, None], (2, 7, 1)),
            action=jnp.zeros((2, 7), jnp.int32),
            reward=jnp.zeros((2, 7)),
            cont=jnp.ones((2, 7)),
            is_first=jnp.broadcast_to(index % 5 == 0, (2, 7)),  # episodes of 5 steps
        )
        replay = acting.replay_add(replay, rows)
        step += 7
    batch = acting.replay_sample(replay, jax.random.PRNGKey(0), 64, length)
    starts = np.asarray(batch.obs[:, 0, 0])
    steps = np.asarray(batch.obs[..., 0])
    assert (starts % 5 == 0).all() and np.asarray(batch.is_first[:, 0]).all()
    np.testing.assert_array_equal(np.diff(steps, axis=1), 1)  # consecutive, never across the seam
    assert starts.min() >= step - capacity and steps.max() < step  # only what the ring holds
    assert len(set(starts.tolist())) > 1


@pytest.mark.slow
def test_training_steps_are_finite_and_overfit_a_fixed_batch(params):
    obs, actions, is_first = _sequences(jax.random.PRNGKey(8), reset_at=7)
    reward_sign = jax.random.bernoulli(jax.random.PRNGKey(9), 0.5, (B, T))
    batch = training.Batch(
        obs=obs,
        action=actions,
        reward=jnp.where(reward_sign, 1.0, -1.0) / 48,
        cont=jnp.ones((B, T)).at[:, 6].set(0.0),  # the first episode ends before step 7
        is_first=is_first,
    )
    step = jax.jit(functools.partial(training.train_step, CONFIG))
    state, losses = params, []
    for i in range(25):
        state, metrics = step(state, batch, jax.random.PRNGKey(10 + i))
        for name, value in metrics.items():
            assert np.isfinite(float(value)), (i, name)
        losses.append(float(metrics["wm_loss"]))
    assert losses[-1] < 0.6 * losses[0], losses
    assert set(metrics) >= {"actor_loss", "critic_loss", "actor_entropy", "kl", "reward_mse"}
    assert int(state.step) == 25


@pytest.mark.slow
def test_the_command_writes_metrics_summary_and_curves(tmp_path):
    out = tmp_path / "run"
    done = run_module(
        "experiments.agents.world_model_main",
        "--env=RepeatPreviousEasy",
        "--steps=3",
        "--log_every=2",
        "--seed=1",
        "--read=raw",
        "--num_envs=2",
        "--collect_steps=4",
        "--batch_size=2",
        "--horizon=3",
        "--eval_envs=2",
        f"--out={out}",
        # The run checks plumbing, not speed: XLA's cheapest code generation compiles faster.
        env={"XLA_FLAGS": "--xla_backend_optimization_level=0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 3]
    assert {"wall_s", "eval_return", "random_return", "heldout_reward_mse"} <= set(lines[0])
    assert {"wm_loss", "obs_loss", "reward_loss", "kl", "actor_loss"} <= set(lines[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"]["read"] == "raw" and summary["last"]["step"] == 3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run into the same folder is refused before any work, the first kept.
    before = (out / "metrics.jsonl").read_text()
    again = run_module("experiments.agents.world_model_main", "--steps=1", f"--out={out}")
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text() == before


# experiments.agents.world_model_main defines its flags on import (--batch_size, --out, ...), which
# other commands define too: its checks run in a process of their own.
_REFUSALS_SCRIPT = """
import sys, pathlib, re
from experiments.agents import world_model_main as command
from experiments.study.cli import ConfigError
tmp = pathlib.Path(sys.argv[1])
arguments = dict(env_name="RepeatPreviousEasy", steps=1, seed=0, read="raw")
out = tmp / "run"
(tmp / "file").write_text("")
cases = [
    (dict(num_envs=2**30), r"--num_envs: the run needs about .* more than"),
    (dict(seed=2**64), r"--seed: seed 18446744073709551616 goes past"),
    (dict(reward_scale=float("inf")), r"--reward_scale: must be finite"),
    (dict(read="ns0x"), r"--read: "),
    (dict(out=tmp / "file" / "run"), r"--out: cannot create"),
]
for changes, pattern in cases:
    try:
        command.run(**{**arguments, "out": out, **changes})
    except ConfigError as e:
        assert re.search(pattern, str(e)), (pattern, str(e))
    else:
        raise AssertionError(f"not refused: {changes}")
assert not out.exists()
print("ok")
"""


def test_the_command_refuses_sizes_and_paths_before_writing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _REFUSALS_SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
