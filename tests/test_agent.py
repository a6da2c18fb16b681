"""The recurrent PPO agent: rollout vs update, GAE, a smoke run, the command's workdir."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.agents import envs as envs_lib
from experiments.agents import ppo
from experiments.agents import train as agent_train
from experiments.agents.networks import ActorCritic, CoreConfig, carry_size
from experiments.configs import popgym_ppo
from tests.conftest import compilation_cache_env, run_module


def _agent(core: str, conv_kernel_size: int = 4, **ppo_fields) -> ppo.Agent:
    fields = dict(num_envs=4, num_steps=64, num_updates=2, num_minibatches=2, update_epochs=1)
    fields.update(ppo_fields)
    return ppo.Agent(
        env=envs_lib.make("RepeatPreviousEasy"),
        core=CoreConfig(name=core, width=16, num_heads=4, conv_kernel_size=conv_kernel_size),
        ppo=ppo.PPOConfig(**fields),
    )


@pytest.mark.parametrize("core", ["gru", "raw", "ns5"])
def test_the_update_recomputes_the_rollouts_log_probs_across_resets(core):
    # RepeatPrevious-Easy episodes last 51 steps: a 64-step rollout crosses a reset, after
    # which both the stepped rollout and the unrolled update must start the core afresh.
    agent = _agent(core)
    runner = ppo.init_runner(agent, jax.random.PRNGKey(3))
    _, trajectory, start_carry, _ = jax.jit(functools.partial(ppo.rollout, agent))(runner)
    resets = np.asarray(trajectory.reset)
    assert resets[0].all() and resets[1:].any(), "the rollout must cross an episode reset"
    _, logits, values = agent.network.apply(
        runner.params, start_carry, trajectory.obs, trajectory.reset, method=ActorCritic.unroll
    )
    log_probs = jax.nn.log_softmax(logits)
    log_probs = jnp.take_along_axis(log_probs, trajectory.action[..., None], -1)[..., 0]
    np.testing.assert_allclose(log_probs, trajectory.log_prob, atol=2e-6)
    np.testing.assert_allclose(values, trajectory.value, atol=2e-6)
    # The first epoch's ratio is then 1, so the clipped objective starts unclipped.
    advantages = jnp.ones_like(trajectory.reward)
    _, terms = ppo.ppo_loss(agent, runner.params, start_carry, trajectory, advantages, advantages)
    assert float(terms["clip_fraction"]) == 0.0
    assert abs(float(terms["approx_kl"])) < 1e-6


def test_generalized_advantages_against_a_hand_computed_case():
    gamma, lam = 0.9, 0.5
    reward = np.array([[1.0], [0.0], [2.0]], np.float32)
    value = np.array([[0.5], [1.0], [1.5]], np.float32)
    done = np.array([[False], [True], [False]])
    last_value = np.array([3.0], np.float32)
    trajectory = ppo.Transition(
        obs=None, reset=None, action=None, log_prob=None, value=value, reward=reward, done=done
    )
    advantages, targets = ppo.generalized_advantages(trajectory, last_value, gamma, lam)
    # Backwards by hand: step 2 bootstraps from last_value; step 1 ends the episode.
    delta2 = 2.0 + gamma * 3.0 - 1.5
    delta1 = 0.0 - 1.0  # done: no bootstrap, nothing flows back from step 2
    delta0 = 1.0 + gamma * 1.0 - 0.5
    want = np.array([delta0 + gamma * lam * delta1, delta1, delta2])
    np.testing.assert_allclose(np.asarray(advantages)[:, 0], want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(targets)[:, 0], want + value[:, 0], rtol=1e-6)


def test_ppo_updates_of_several_seeds_have_finite_losses_and_move_the_parameters():
    agents = {name: _agent(name, num_steps=16) for name in ("gru", "ns5")}
    # A core whose carry has an empty leaf (no conv window) splits into minibatches too.
    agents["raw_no_conv"] = _agent("raw", conv_kernel_size=1, num_steps=16)
    runners = {name: ppo.init_runners(agent, [0, 1]) for name, agent in agents.items()}
    before = jax.tree_util.tree_map(np.asarray, runners)
    runners, metrics = ppo.make_train_chunk(agents, 2)(runners)
    for name in agents:
        assert metrics[name]["loss"].shape == (2, 2)  # (updates, seeds)
        for key in ("loss", "actor_loss", "value_loss", "entropy", "approx_kl"):
            assert np.isfinite(metrics[name][key]).all(), (name, key)
        assert np.all(np.asarray(runners[name].update) == 2)
        moved = jax.tree_util.tree_map(
            lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
            runners[name].params,
            before[name].params,
        )
        assert max(jax.tree_util.tree_leaves(moved)) > 0
        # Seeds differ: they were initialized and trained with their own keys.
        first = jax.tree_util.tree_leaves(runners[name].params)[0]
        assert not np.allclose(first[0], first[1])


def test_state_sizes_of_the_cores():
    assert carry_size(CoreConfig("gru", width=64)) == 64
    # width 64: inner 128 over 4 heads of 32 -> C 4x32x32, n 4x32, m 4, conv window 3x128.
    assert carry_size(CoreConfig("ns5", width=64)) == 4 * 32 * 32 + 4 * 32 + 4 + 3 * 128
    # Without the conv (window 1) the carry holds the memory alone.
    no_conv = CoreConfig("raw", width=64, conv_kernel_size=1)
    assert no_conv.cell_config.conv_kernel_size == 1
    assert carry_size(no_conv) == 4 * 32 * 32 + 4 * 32 + 4


def test_configuration_errors_name_the_field():
    config = popgym_ppo.get_config("smoke")
    with config.unlocked():
        config.cores = "gru,gru"
    with pytest.raises(agent_train.ConfigError, match="twice"):
        agent_train.agents_from_config(config)
    config = popgym_ppo.get_config("smoke")
    config.cores = "gru,ns0x"
    with pytest.raises(agent_train.ConfigError, match="neither 'gru' nor a read name"):
        agent_train.agents_from_config(config)
    config = popgym_ppo.get_config("smoke")
    config.ppo.num_updates = 5
    with pytest.raises(agent_train.ConfigError, match=r"multiple of run\.log_every"):
        agent_train.agents_from_config(config)
    config = popgym_ppo.get_config("smoke")
    config.env = "Pong"
    with pytest.raises(agent_train.ConfigError, match="env"):
        agent_train.agents_from_config(config)
    config = popgym_ppo.get_config("smoke")
    config.ppo.num_minibatches = 3
    with pytest.raises(agent_train.ConfigError, match="multiple of num_minibatches"):
        agent_train.agents_from_config(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seeds.first_seed", 2**32, r"config\.seeds\.first_seed: seed.* go past 2\*\*32 - 1"),
        ("seeds.first_seed", 2**32 - 1, r"config\.seeds\.first_seed: seeds 4294967295\.\.4"),
        ("seeds.first_seed", -1, r"config\.seeds\.first_seed: must be >= 0"),
        ("ppo.learning_rate", float("inf"), r"config\.ppo\.learning_rate: must be finite"),
        ("ppo.learning_rate", float("nan"), r"config\.ppo\.learning_rate: must be finite"),
        ("ppo.learning_rate", 0.0, r"config\.ppo\.learning_rate: must be > 0"),
        ("ppo.gamma", 1.5, r"config\.ppo\.gamma: must lie in \[0, 1\]"),
        ("model.width", 0, r"config\.model\.width: must be >= 1"),
        ("model.width", -3, r"config\.model\.width: must be >= 1"),
        ("model.num_heads", 0, r"config\.model\.num_heads: must be >= 1"),
        ("ppo.num_envs", 2**64, r"config\.ppo\.num_envs: must be <= 2147483647"),
        ("run.keep_checkpoints", 2**64, r"config\.run\.keep_checkpoints: must be <= "),
        ("model.conv_kernel_size", 10**6, r"config\.model\.conv_kernel_size: must be <= 1024"),
    ],
)
def test_fields_out_of_range_are_refused_before_the_workdir(tmp_path, field, value, message):
    config = popgym_ppo.get_config("smoke")
    section, name = field.split(".")
    config[section][name] = value
    if field == "seeds.first_seed" and value == 2**32 - 1:
        config.seeds.num_seeds = 2  # 2**32 - 1 alone is a valid seed; two go past it
    workdir = tmp_path / "agents"
    with pytest.raises(agent_train.ConfigError, match=message):
        agent_train.train_agents(config, workdir)
    assert not workdir.exists()


def test_the_largest_seed_is_accepted():
    config = popgym_ppo.get_config("smoke")
    config.seeds.first_seed = 2**32 - 2  # seeds 2**32 - 2 and 2**32 - 1
    agent_train.agents_from_config(config)


def test_a_gru_of_width_zero_is_refused_for_every_core():
    config = popgym_ppo.get_config("smoke")
    config.cores = "gru"
    config.model.width = 0
    with pytest.raises(agent_train.ConfigError, match=r"model\.width"):
        agent_train.agents_from_config(config)


def test_memory_estimate_refuses_what_cannot_fit_before_the_workdir(tmp_path):
    config = popgym_ppo.get_config("smoke")
    agents = agent_train.agents_from_config(config)
    small = agent_train.memory_estimate_bytes(agents, 2)
    # Counts what it should: the rollout grows with num_envs x num_steps.
    config.ppo.num_envs = 16
    assert agent_train.memory_estimate_bytes(agent_train.agents_from_config(config), 2) > small
    config.ppo.num_envs = 2**30
    workdir = tmp_path / "agents"
    with pytest.raises(agent_train.ConfigError, match=r"config\.ppo\.num_envs: .* needs about"):
        agent_train.train_agents(config, workdir)
    assert not workdir.exists()
    # A device of less memory than the smoke preset needs refuses it too.
    config = popgym_ppo.get_config("smoke")
    with pytest.raises(agent_train.ConfigError, match="more than the"):
        agent_train.train_agents(config, workdir, available_memory=small // 2)
    assert not workdir.exists()


@pytest.mark.slow
def test_memory_estimate_stays_above_what_xla_compiles():
    from orthorecall import footprint

    config = popgym_ppo.get_config("smoke")
    config.cores = "gru,ns5"
    agents = agent_train.agents_from_config(config)
    seeds = np.arange(config.seeds.num_seeds)
    runners = {
        name: jax.eval_shape(lambda agent=agent: ppo.init_runners(agent, seeds))
        for name, agent in agents.items()
    }
    compiled = ppo.make_train_chunk(agents, config.run.log_every).lower(runners).compile()
    need = footprint.compiled_memory_bytes(compiled)
    estimate = agent_train.memory_estimate_bytes(agents, config.seeds.num_seeds)
    assert need <= estimate <= 5 * need, (estimate, need)


def test_an_unwritable_workdir_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(agent_train.ConfigError, match=r"--workdir: .* is a file"):
        agent_train.train_agents(popgym_ppo.get_config("smoke"), tmp_path / "file")
    with pytest.raises(agent_train.ConfigError, match="--workdir: cannot create"):
        agent_train.train_agents(popgym_ppo.get_config("smoke"), tmp_path / "file" / "sub")


def _agent_command(workdir, *overrides):
    # The later commands load the programs the first compiled from the cache; the run
    # checks plumbing, not speed: XLA's cheapest code generation compiles faster.
    env = compilation_cache_env(workdir.parent / "jax-cache")
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return run_module(
        "experiments.agents.ppo_main",
        "--config=configs/popgym_ppo.py:smoke",
        f"--workdir={workdir}",
        *overrides,
        env=env,
    )


@pytest.mark.slow
def test_the_smoke_preset_end_to_end_then_resume_and_refusals(tmp_path):
    workdir = tmp_path / "smoke"
    done = _agent_command(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("run_config.json", "metrics.jsonl", "results.json", "results.md", "curves.png"):
        assert (workdir / name).is_file(), name
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    config = popgym_ppo.get_config("smoke")
    cores = config.cores.split(",")
    assert len(records) == config.ppo.num_updates * len(cores) * config.seeds.num_seeds
    assert {r["core"] for r in records} == set(cores)
    assert all(np.isfinite(r["loss"]) for r in records)
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["cores"]) == set(cores)
    assert "update 4/4" in done.stdout

    # Resuming from the middle reproduces the same run: drop the last checkpoint and the
    # results, rerun the same command.
    shutil.rmtree(workdir / "checkpoints" / "4")
    (workdir / "results.json").unlink()
    again = _agent_command(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and "from update 2" in again.stdout
    resumed = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert resumed == records

    # Another configuration in the same workdir, and an unknown field, are refused.
    other = _agent_command(workdir, "--config.ppo.learning_rate=0.1")
    assert other.returncode == 2 and "different configuration" in other.stderr
    unknown = _agent_command(tmp_path / "x", "--config.ppo.nope=1")
    assert unknown.returncode == 2 and "has no field 'nope'" in unknown.stderr
