"""A small Dreamer-style world model whose deterministic state is the mLSTM cell.

DreamerV3-shaped (Hafner et al. 2023), shrunk to run on a CPU in minutes:

* **RSSM.** The deterministic state is the mLSTM cell's ``CellState`` (matrix memory,
  normalizer, stabilizer, conv window); its output ``y_t`` (width D) is the deterministic
  feature. The stochastic state ``z_t`` is ``latents`` categorical variables of
  ``classes`` classes each, sampled with straight-through gradients and 1% uniform mixing.
  Categorical rather than Gaussian: the memory tasks' observations are discrete (a card's
  suit), the KL between categoricals is exact and bounded below by the free bits, and
  DreamerV3 found them the more robust default. One step::

      x_t  = in(z_{t-1}, a_{t-1})                 zeroed where an episode starts
      y_t  = cell.step(C_{t-1}, x_t, reset_t)     the one-step cell API
      prior      p(z_t | y_t)
      posterior  q(z_t | y_t, enc(o_t))           (observe mode; imagination samples the prior)
      feature    s_t = [y_t, z_t]

  Because the posterior sample ``z_{t-1}`` feeds the next cell input, observe mode is
  sequential: ``observe`` is ``observe_step`` in a ``lax.scan`` (the cell's parallel
  chunkwise form cannot run it). ``tests/test_world_model.py`` checks that the scan, the
  step-by-step loop the acting policy runs, and the cell's own ``cell.scan`` on the same
  inputs agree.

* **Data layout.** Row t of a sequence holds ``obs_t``, the action ``a_t`` taken on it, the
  reward ``r_t`` and ``cont_t = 1 - done_t`` that action produced, and ``is_first_t``. The
  reward and continue heads therefore read ``(s_t, a_t)``. This is DreamerV3's information
  in the layout ``auto_reset_step`` gives (it returns the next episode's first
  observation in place of the terminal one): every real transition, the terminal one
  included, is kept, and no step is spent on a reset.

* **Losses.** Observation: MSE in symlog space (any vector observation); reward: two-hot
  cross-entropy over 255 symlog bins; continue: Bernoulli; KL balancing with free bits:
  ``0.5 max(1, KL[sg(q) || p]) + 0.1 max(1, KL[q || sg(p)])``. Environment rewards are
  multiplied by ``reward_scale`` before the model sees them: POPGym rewards are
  ±1/episode-length, below the two-hot bins' resolution near zero (about 0.16), so
  ``experiments.agents.world_model_main`` scales them by the episode length. Returns are always
  reported in the environment's units.

* **Imagination and actor-critic.** From every posterior state of a training batch
  (B*T starts, world model frozen) ``imagine`` rolls the prior ``horizon`` steps with the
  actor's actions, one start per ``jax.vmap`` lane (the cell API takes unbatched states).
  λ-returns bootstrap from a slow (EMA) critic; the critic regresses them (two-hot); the
  actor is REINFORCE with an entropy bonus, advantages divided by ``max(1, S)`` where S is
  an EMA of the 95th - 5th percentile range of the returns (DreamerV3's return
  normalization); every term is weighted by the imagined discount-and-continue product.

* **Data.** ``collect`` steps ``num_envs`` vmapped environments with the current actor,
  the RSSM advancing one ``cell.step`` per environment step inside a jitted ``lax.scan``,
  and writes the rows into a fixed-size ring ``Replay`` (arrays only, no Python state
  inside jit). Training chunks of length T start at episode starts and from a zero state,
  so no chunk begins mid-episode without its context (episodes longer than T are only
  trained on their first T steps; pick T above the episode length).

Everything is pure functions over pytrees plus Flax Linen modules for the networks; the
static parts (environment, configuration) are closed over by ``make_functions``. The
pieces live beside this module: ``world_model_rssm`` (the configuration, the
distributions, the networks, ``observe`` and ``imagine``), ``world_model_training`` (the
losses, the actor-critic update, ``train_step``) and ``world_model_acting`` (the replay,
``collect``, ``evaluate``); this one holds the training loop's jitted functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from experiments.agents.world_model_acting import (
    POLICY_MODES,
    collect,
    evaluate,
    init_actor,
    init_replay,
    replay_add,
    replay_sample,
)
from experiments.agents.world_model_rssm import Config
from experiments.agents.world_model_training import init_train_state, train_step


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop's sizes (hashable)."""

    num_envs: int = 16
    collect_steps: int = 16  # environment steps per environment per update
    batch_size: int = 8  # chunks per update
    seq_len: int = 64  # T
    capacity: int = 4096  # replay steps per environment
    eval_envs: int = 32


class Functions(NamedTuple):
    """The jitted pieces of a run (``make_functions``)."""

    init: Any  # key -> (TrainState, Actor, Replay)
    prefill: Any  # (actor, replay, key, num_steps static) -> (actor, replay)
    update: Any  # (state, actor, replay, key) -> (state, actor, replay, metrics)
    evaluate: Any  # (state, key, mode name) -> (mean episode return, held-out metrics)


def make_functions(env, config: Config, loop: LoopConfig) -> Functions:
    """Jitted init / prefill (random actions) / update (collect, sample, train) / evaluate
    for one environment and configuration."""

    def init(key):
        train_key, actor_key = jax.random.split(key)
        state = init_train_state(config, train_key)
        actor = init_actor(env, config, loop.num_envs, actor_key)
        return state, actor, init_replay(loop.num_envs, loop.capacity, config.obs_size)

    def prefill(state, actor, replay, key, num_steps):
        actor, rows = collect(
            env, config, state.wm_params, state.actor_params, actor, key, num_steps, "random"
        )
        return actor, replay_add(replay, rows)

    def update(state, actor, replay, key):
        collect_key, sample_key, train_key = jax.random.split(key, 3)
        actor, rows = collect(
            env,
            config,
            state.wm_params,
            state.actor_params,
            actor,
            collect_key,
            loop.collect_steps,
            "sample",
        )
        replay = replay_add(replay, rows)
        batch = replay_sample(replay, sample_key, loop.batch_size, loop.seq_len)
        state, metrics = train_step(config, state, batch, train_key)
        return state, actor, replay, metrics

    evaluate_jit = jax.jit(
        lambda state, key, code: evaluate(env, config, state, key, loop.eval_envs, code)
    )

    def evaluate_fn(state, key, mode: str):
        return evaluate_jit(state, key, jnp.int32(POLICY_MODES.index(mode)))

    return Functions(
        init=jax.jit(init),
        prefill=jax.jit(prefill, static_argnums=4),
        update=jax.jit(update, donate_argnums=(2,)),
        evaluate=evaluate_fn,
    )
