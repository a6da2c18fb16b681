"""Recurrent PPO in one jitted function, PureJaxRL-shaped.

One *update* collects ``num_steps`` steps from ``num_envs`` environments (vmapped,
reset inside the scan when an episode ends), computes GAE advantages, then runs
``update_epochs`` epochs of clipped-PPO minibatch steps. Minibatches split the
environments, never time: each keeps whole trajectories, which the update re-runs
through the recurrent core from the carry the rollout started with, resetting it where
the rollout did. That recomputation equals the rollout's own log-probabilities (the
first epoch's ratio is 1), which tests/test_agent.py checks across episode resets.

Everything an update touches is one pytree, ``RunnerState``; ``make_train_chunk``
returns a jitted function that advances many seeds (vmapped) by several updates
(``lax.scan``), so a driver (``experiments.agents.ppo_main``) can log and checkpoint between
calls without leaving the compiled loop for long.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from experiments.agents import envs as envs_lib
from experiments.agents.networks import ActorCritic, CoreConfig, initial_carry
from orthorecall.validation import check_int


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (PureJaxRL's names; hashable: a static jit argument)."""

    num_envs: int = 64
    num_steps: int = 128
    num_updates: int = 100
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    learning_rate: float = 2.5e-4
    anneal_lr: bool = True

    def __post_init__(self):
        for name in ("num_envs", "num_steps", "num_updates", "update_epochs", "num_minibatches"):
            # Stored as Python ints: the config is a static jit argument, hashed.
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.num_envs % self.num_minibatches:
            raise ValueError(
                f"num_envs={self.num_envs} must be a multiple of num_minibatches="
                f"{self.num_minibatches}: minibatches split the environments."
            )
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}.")
        for name in ("clip_eps", "learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        for name in ("ent_coef", "vf_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")

    @property
    def steps_per_update(self) -> int:
        """Environment steps one update collects."""
        return self.num_envs * self.num_steps


class RunnerState(NamedTuple):
    """One seed's training state (leaves of the environments have a leading num_envs)."""

    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array  # (E, O) the observation the next step acts on
    reset: jax.Array  # (E,) bool: obs is the first of an episode
    carry: Any  # the core's state before acting on obs
    episode_return: jax.Array  # (E,) return of the running episode so far
    episode_length: jax.Array  # (E,) int32
    key: jax.Array
    update: jax.Array  # int32: updates done


class Transition(NamedTuple):
    obs: jax.Array
    reset: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array


class Agent(NamedTuple):
    """The static parts of a training run (hashable)."""

    env: envs_lib.Environment
    core: CoreConfig
    ppo: PPOConfig

    @property
    def network(self) -> ActorCritic:
        return ActorCritic(num_actions=self.env.num_actions, core=self.core)


def make_optimizer(ppo: PPOConfig) -> optax.GradientTransformation:
    """Adam with global-norm clipping, the learning rate annealed linearly to 0."""
    learning_rate = ppo.learning_rate
    if ppo.anneal_lr:
        steps_per_update = ppo.update_epochs * ppo.num_minibatches
        learning_rate = optax.linear_schedule(
            ppo.learning_rate, 0.0, ppo.num_updates * steps_per_update
        )
    return optax.chain(
        optax.clip_by_global_norm(ppo.max_grad_norm), optax.adam(learning_rate, eps=1e-5)
    )


def init_runner(agent: Agent, key: jax.Array) -> RunnerState:
    """A seed's initial state: fresh parameters and a fresh episode in every env."""
    init_key, reset_key, key = jax.random.split(key, 3)
    env, ppo = agent.env, agent.ppo
    obs, env_state = jax.vmap(env.reset)(jax.random.split(reset_key, ppo.num_envs))
    carry = initial_carry(agent.core, (ppo.num_envs,))
    reset = jnp.ones((ppo.num_envs,), bool)
    params = agent.network.init(init_key, carry, obs, reset)
    return RunnerState(
        params=params,
        opt_state=make_optimizer(ppo).init(params),
        env_state=env_state,
        obs=obs,
        reset=reset,
        carry=carry,
        episode_return=jnp.zeros((ppo.num_envs,), jnp.float32),
        episode_length=jnp.zeros((ppo.num_envs,), jnp.int32),
        key=key,
        update=jnp.zeros((), jnp.int32),
    )


def rollout(agent: Agent, runner: RunnerState):
    """``num_steps`` steps of every env under the current policy.

    Returns:
        (runner advanced, Transition with (T, E) leaves, the carry the rollout started
        from, episode statistics: sums and count of the episodes that ended).
    """
    env, network = agent.env, agent.network
    step_env = jax.vmap(functools.partial(envs_lib.auto_reset_step, env))

    def one_step(runner: RunnerState, _):
        key, act_key, env_key = jax.random.split(runner.key, 3)
        carry, logits, value = network.apply(
            runner.params, runner.carry, runner.obs, runner.reset, method=ActorCritic.step
        )
        action = jax.random.categorical(act_key, logits)
        log_prob = _log_prob(logits, action)
        env_keys = jax.random.split(env_key, agent.ppo.num_envs)
        obs, env_state, reward, done = step_env(env_keys, runner.env_state, action)
        episode_return = runner.episode_return + reward
        episode_length = runner.episode_length + 1
        finished = (
            jnp.where(done, episode_return, 0.0),
            jnp.where(done, episode_length, 0),
            done.astype(jnp.int32),
        )
        transition = Transition(runner.obs, runner.reset, action, log_prob, value, reward, done)
        runner = runner._replace(
            env_state=env_state,
            obs=obs,
            reset=done,
            carry=carry,
            episode_return=jnp.where(done, 0.0, episode_return),
            episode_length=jnp.where(done, 0, episode_length),
            key=key,
        )
        return runner, (transition, finished)

    start_carry = runner.carry
    runner, (trajectory, finished) = jax.lax.scan(
        one_step, runner, None, length=agent.ppo.num_steps
    )
    returns, lengths, counts = (jnp.sum(x) for x in finished)
    return runner, trajectory, start_carry, (returns, lengths, counts)


def _log_prob(logits: jax.Array, action: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], axis=-1)[..., 0]


def _entropy(logits: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def generalized_advantages(
    trajectory: Transition, last_value: jax.Array, gamma: float, gae_lambda: float
) -> tuple[jax.Array, jax.Array]:
    """GAE(λ): (advantages, value targets), both (T, E). ``done[t]`` ends the episode
    after step t, so nothing flows back across it."""

    def backward(carry, t: Transition):
        advantage, next_value = carry
        live = 1.0 - t.done.astype(jnp.float32)
        delta = t.reward + gamma * next_value * live - t.value
        advantage = delta + gamma * gae_lambda * live * advantage
        return (advantage, t.value), advantage

    _, advantages = jax.lax.scan(
        backward, (jnp.zeros_like(last_value), last_value), trajectory, reverse=True
    )
    return advantages, advantages + trajectory.value


def ppo_loss(agent: Agent, params, start_carry, batch: Transition, advantages, targets):
    """Clipped PPO loss of one minibatch of whole trajectories ((T, e) leaves).

    Returns:
        (total loss, dict of its terms and diagnostics).
    """
    ppo = agent.ppo
    _, logits, value = agent.network.apply(
        params, start_carry, batch.obs, batch.reset, method=ActorCritic.unroll
    )
    log_prob = _log_prob(logits, batch.action)

    value_clipped = batch.value + jnp.clip(value - batch.value, -ppo.clip_eps, ppo.clip_eps)
    value_loss = 0.5 * jnp.mean(
        jnp.maximum(jnp.square(value - targets), jnp.square(value_clipped - targets))
    )
    log_ratio = log_prob - batch.log_prob
    ratio = jnp.exp(log_ratio)
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    clipped = jnp.clip(ratio, 1.0 - ppo.clip_eps, 1.0 + ppo.clip_eps)
    actor_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped * advantages))
    entropy = jnp.mean(_entropy(logits))
    total = actor_loss + ppo.vf_coef * value_loss - ppo.ent_coef * entropy
    return total, {
        "loss": total,
        "actor_loss": actor_loss,
        "value_loss": value_loss,
        "entropy": entropy,
        # The (k3) estimator of KL(old || new): unbiased and never negative.
        "approx_kl": jnp.mean(ratio - 1.0 - log_ratio),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > ppo.clip_eps).astype(jnp.float32)),
    }


def _split_envs(tree, perm, num_minibatches: int, env_axis: int):
    """Leaves with the env axis at ``env_axis`` -> (M, ...) minibatches of shuffled envs."""

    def split(x):
        x = jnp.take(x, perm, axis=env_axis)
        # Explicit sizes, not -1: a carry leaf may be empty (the mLSTM's conv window at 1).
        per_minibatch = x.shape[env_axis] // num_minibatches
        shape = x.shape[:env_axis] + (num_minibatches, per_minibatch) + x.shape[env_axis + 1 :]
        return jnp.moveaxis(x.reshape(shape), env_axis, 0)

    return jax.tree_util.tree_map(split, tree)


def update(agent: Agent, runner: RunnerState) -> tuple[RunnerState, dict]:
    """One PPO update (a rollout and its optimization) of one seed.

    Returns:
        (runner, metrics): scalar losses averaged over the update's minibatch steps, and
        the episodes that ended in the rollout (``episodes``, with the mean
        ``episode_return`` / ``episode_length`` over them; NaN when none ended).
    """
    ppo = agent.ppo
    optimizer = make_optimizer(ppo)
    runner, trajectory, start_carry, (returns, lengths, counts) = rollout(agent, runner)
    _, _, last_value = agent.network.apply(
        runner.params, runner.carry, runner.obs, runner.reset, method=ActorCritic.step
    )
    advantages, targets = generalized_advantages(trajectory, last_value, ppo.gamma, ppo.gae_lambda)

    def epoch(carry, key):
        params, opt_state = carry
        perm = jax.random.permutation(key, ppo.num_envs)
        minibatches = (
            _split_envs(start_carry, perm, ppo.num_minibatches, env_axis=0),
            _split_envs((trajectory, advantages, targets), perm, ppo.num_minibatches, 1),
        )

        def minibatch_step(carry, minibatch):
            params, opt_state = carry
            mb_carry, (mb_trajectory, mb_advantages, mb_targets) = minibatch
            loss = functools.partial(ppo_loss, agent)
            grads, terms = jax.grad(loss, has_aux=True)(
                params, mb_carry, mb_trajectory, mb_advantages, mb_targets
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), terms

        return jax.lax.scan(minibatch_step, (params, opt_state), minibatches)

    key, epoch_key = jax.random.split(runner.key)
    (params, opt_state), terms = jax.lax.scan(
        epoch, (runner.params, runner.opt_state), jax.random.split(epoch_key, ppo.update_epochs)
    )
    runner = runner._replace(params=params, opt_state=opt_state, key=key, update=runner.update + 1)
    metrics = {name: jnp.mean(value) for name, value in terms.items()}
    episodes = jnp.maximum(counts, 1)
    metrics["episodes"] = counts
    metrics["episode_return"] = jnp.where(counts > 0, returns / episodes, jnp.nan)
    metrics["episode_length"] = jnp.where(counts > 0, lengths / episodes, jnp.nan)
    return runner, metrics


def make_train_chunk(agents: dict[str, Agent], updates_per_call: int):
    """A jitted ``(runners, ) -> (runners, metrics)`` advancing every agent's seeds
    (``runners[name]`` with a leading seed axis) by ``updates_per_call`` updates;
    metrics leaves are (updates_per_call, seeds). The input runners are donated."""

    def chunk(runners: dict[str, RunnerState]):
        out, metrics = {}, {}
        for name, agent in agents.items():
            seeds_update = jax.vmap(functools.partial(update, agent))
            out[name], metrics[name] = jax.lax.scan(
                lambda runner, _, f=seeds_update: f(runner),
                runners[name],
                None,
                length=updates_per_call,
            )
        return out, metrics

    return jax.jit(chunk, donate_argnums=0)


def init_runners(agent: Agent, seeds) -> RunnerState:
    """Initial states of several seeds (leading seed axis), seed s from PRNGKey(s)."""
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    return jax.jit(jax.vmap(functools.partial(init_runner, agent)))(keys)
