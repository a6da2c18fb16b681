"""The world model's acting side: the replay ring buffer, the policy stepping vmapped
environments (``collect``) and the held-out evaluation. ``experiments.agents.
world_model``'s docstring gives the data layout.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from experiments.agents import envs as envs_lib
from experiments.agents.world_model_rssm import (
    Config,
    RSSMState,
    WorldModel,
    feature,
    initial_state,
    policy_logits,
)
from experiments.agents.world_model_training import Batch, TrainState, world_model_loss


class Replay(NamedTuple):
    """A ring buffer of ``capacity`` steps per environment (leaves (E, capacity, ...)).

    ``written`` counts the steps ever written per environment (the same for all):
    position p holds step p + capacity * floor((written - 1 - p) / capacity).
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    cont: jax.Array
    is_first: jax.Array
    written: jax.Array  # int32 scalar


def init_replay(num_envs: int, capacity: int, obs_size: int) -> Replay:
    zeros = lambda *shape, dtype=jnp.float32: jnp.zeros((num_envs, capacity, *shape), dtype)
    return Replay(
        obs=zeros(obs_size),
        action=zeros(dtype=jnp.int32),
        reward=zeros(),
        cont=zeros(),
        is_first=zeros(dtype=bool),
        written=jnp.zeros((), jnp.int32),
    )


def replay_add(replay: Replay, rows: Batch) -> Replay:
    """Appends ``rows`` (leaves (E, K, ...)), overwriting the oldest steps."""
    capacity = replay.obs.shape[1]
    positions = (replay.written + jnp.arange(rows.obs.shape[1])) % capacity
    put = lambda buffer, new: buffer.at[:, positions].set(new)
    return Replay(*map(put, replay[:5], rows), written=replay.written + rows.obs.shape[1])


def replay_valid_starts(replay: Replay, length: int) -> jax.Array:
    """(E, capacity) bool: episode starts whose ``length``-step window lies in the buffer."""
    capacity = replay.obs.shape[1]
    p = jnp.arange(capacity)
    written = p < replay.written
    logical = p + capacity * (jnp.maximum(replay.written - 1 - p, 0) // capacity)
    return replay.is_first & written[None] & (logical + length <= replay.written)[None]


def replay_sample(replay: Replay, key, batch_size: int, length: int) -> Batch:
    """``batch_size`` windows of ``length`` steps starting at episode starts (with
    replacement). Keep one in the buffer (``length`` steps from the first reset make one);
    without any, windows start at the oldest step instead, mid-episode."""
    num_envs, capacity = replay.is_first.shape
    valid = replay_valid_starts(replay, length).reshape(-1)
    oldest = (jnp.maximum(replay.written - capacity, 0) % capacity) + jnp.arange(
        num_envs
    ) * capacity
    valid = jnp.where(valid.any(), valid, jnp.zeros_like(valid).at[oldest].set(True))
    flat = jax.random.categorical(key, jnp.where(valid, 0.0, -jnp.inf), shape=(batch_size,))
    env, start = flat // capacity, flat % capacity
    positions = (start[:, None] + jnp.arange(length)) % capacity
    take = lambda buffer: buffer[env[:, None], positions]
    return Batch(*map(take, replay[:5]))


class Actor(NamedTuple):
    """The acting side's state (leaves (E, ...)): environments, the RSSM's posterior, and
    episode bookkeeping."""

    env_state: Any
    obs: jax.Array  # (E, O) the observation to act on
    is_first: jax.Array  # (E,) obs starts an episode
    model: RSSMState  # the posterior before obs
    prev_action: jax.Array  # (E,) int32
    episode_return: jax.Array  # (E,) the running episode's return so far
    finished_return: jax.Array  # sum of the returns of episodes finished since last read
    finished_count: jax.Array


def init_actor(env, config: Config, num_envs: int, key) -> Actor:
    obs, env_state = jax.vmap(env.reset)(jax.random.split(key, num_envs))
    return Actor(
        env_state=env_state,
        obs=obs.astype(jnp.float32),
        is_first=jnp.ones((num_envs,), bool),
        model=initial_state(config, (num_envs,)),
        prev_action=jnp.zeros((num_envs,), jnp.int32),
        episode_return=jnp.zeros((num_envs,)),
        finished_return=jnp.zeros(()),
        finished_count=jnp.zeros((), jnp.int32),
    )


POLICY_MODES = ("sample", "greedy", "random")


def policy_step(config, wm_params, actor_params, model, prev_action, obs, is_first, key, mode):
    """One acting step for a batch of environments: the posterior after ``obs`` (one
    ``cell.step``), then an action.

    Args:
        mode: one of ``POLICY_MODES`` ("sample" from the actor, its "greedy" action, or
            uniformly "random"), or its index as an int32 array (one compiled program
            serves all three).

    Returns:
        (new posterior RSSMState, actions (E,) int32).
    """
    model_key, action_key, random_key = jax.random.split(key, 3)
    model, _, _, _ = WorldModel(config).apply(
        wm_params, model, prev_action, obs, is_first, model_key, method=WorldModel.observe_step
    )
    logits = policy_logits(config, actor_params, feature(model))
    code = POLICY_MODES.index(mode) if isinstance(mode, str) else mode
    action = jnp.select(
        [code == 1, code == 2],
        [
            jnp.argmax(logits, axis=-1),
            jax.random.randint(random_key, prev_action.shape, 0, config.num_actions),
        ],
        jax.random.categorical(action_key, logits),
    )
    return model, action.astype(jnp.int32)


def collect(env, config, wm_params, actor_params, actor: Actor, key, num_steps: int, mode):
    """Steps every environment ``num_steps`` times with the policy (``policy_step`` in a
    ``lax.scan``, environments vmapped, reset where an episode ends).

    Returns:
        (new Actor, rows as a ``Batch`` with leaves (E, num_steps, ...)).
    """
    step_envs = jax.vmap(functools.partial(envs_lib.auto_reset_step, env))

    def body(actor: Actor, key):
        policy_key, env_key = jax.random.split(key)
        model, action = policy_step(
            config,
            wm_params,
            actor_params,
            actor.model,
            actor.prev_action,
            actor.obs,
            actor.is_first,
            policy_key,
            mode,
        )
        env_keys = jax.random.split(env_key, actor.obs.shape[0])
        obs, env_state, reward, done = step_envs(env_keys, actor.env_state, action)
        reward, done = reward.astype(jnp.float32), done.astype(bool)
        row = Batch(actor.obs, action, reward, 1.0 - done.astype(jnp.float32), actor.is_first)
        episode_return = actor.episode_return + reward
        actor = Actor(
            env_state=env_state,
            obs=obs.astype(jnp.float32),
            is_first=done,
            model=model,
            prev_action=action,
            episode_return=jnp.where(done, 0.0, episode_return),
            finished_return=actor.finished_return + jnp.sum(jnp.where(done, episode_return, 0.0)),
            finished_count=actor.finished_count + jnp.sum(done),
        )
        return actor, row

    actor, rows = jax.lax.scan(body, actor, jax.random.split(key, num_steps))
    return actor, jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), rows)


def evaluate(env, config, state: TrainState, key, num_envs: int, mode):
    """Held-out evaluation: ``num_envs`` fresh environments run ``env.max_episode_length``
    steps with the policy (``mode`` as ``policy_step``'s), data no update has seen.

    Returns:
        (mean return of each environment's first episode, environment units;
        ``world_model_loss`` metrics on those steps, prefixed ``heldout_``).
    """
    actor_key, collect_key, loss_key = jax.random.split(key, 3)
    actor = init_actor(env, config, num_envs, actor_key)
    _, rows = collect(
        env,
        config,
        state.wm_params,
        state.actor_params,
        actor,
        collect_key,
        env.max_episode_length,
        mode,
    )
    # Steps up to and including the first episode's last one.
    ended_before = jnp.cumsum(1.0 - rows.cont, axis=1) - (1.0 - rows.cont)
    first_episode = (ended_before == 0).astype(jnp.float32)
    mean_return = jnp.sum(rows.reward * first_episode, axis=1).mean()
    _, (metrics, _) = world_model_loss(config, state.wm_params, rows, loss_key)
    return mean_return, {f"heldout_{name}": value for name, value in metrics.items()}
