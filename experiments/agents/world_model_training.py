"""The world model's learning: its loss on replayed chunks (observation, reward,
continue, balanced KL), the actor-critic update in imagination, and the training step
that takes one of each. ``experiments.agents.world_model``'s docstring gives the
design.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from experiments.agents.world_model_rssm import (
    Config,
    RSSMState,
    WorldModel,
    actor_network,
    categorical_kl,
    critic_network,
    feature,
    imagine,
    initial_state,
    lambda_returns,
    observe,
    policy_logits,
    symlog,
    two_hot_loss,
    two_hot_mean,
)

Params = Any
sg = jax.lax.stop_gradient


class TrainState(NamedTuple):
    wm_params: Params
    actor_params: Params
    critic_params: Params
    slow_critic_params: Params
    wm_opt: Any
    actor_opt: Any
    critic_opt: Any
    return_scale: jax.Array  # EMA of the 95th - 5th percentile range of the returns
    step: jax.Array


class Batch(NamedTuple):
    """Training sequences, leaves (B, T, ...): the row layout of the module docstring."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array  # environment units
    cont: jax.Array  # 1 - done, float
    is_first: jax.Array  # bool


def _optimizer(config: Config, learning_rate: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip), optax.adam(learning_rate, eps=1e-8)
    )


def init_train_state(config: Config, key: jax.Array) -> TrainState:
    """Fresh parameters and optimizer states."""
    wm_key, actor_key, critic_key, sample_key = jax.random.split(key, 4)
    state = initial_state(config, (1,))
    wm_params = WorldModel(config).init(
        wm_key,
        state,
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, config.obs_size)),
        jnp.ones((1,), bool),
        sample_key,
    )
    feat = jnp.zeros((1, config.feature_size))
    actor_params = actor_network(config).init(actor_key, feat)
    critic_params = critic_network(config).init(critic_key, feat)
    return TrainState(
        wm_params=wm_params,
        actor_params=actor_params,
        critic_params=critic_params,
        slow_critic_params=critic_params,
        wm_opt=_optimizer(config, config.wm_lr).init(wm_params),
        actor_opt=_optimizer(config, config.actor_lr).init(actor_params),
        critic_opt=_optimizer(config, config.critic_lr).init(critic_params),
        return_scale=jnp.zeros((), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def world_model_loss(config: Config, wm_params, batch: Batch, key):
    """The world-model loss of a batch of chunks (each started from a zero state).

    Returns:
        (scalar loss, (metrics dict, ``Observation``)).
    """
    model = WorldModel(config)
    is_first = batch.is_first.at[:, 0].set(True)  # chunks start from a zero state
    keys = jax.random.split(key, batch.obs.shape[1])
    _, seen = observe(config, wm_params, batch.obs, batch.action, is_first, keys)
    feat = feature(seen.states)
    obs_pred = model.apply(wm_params, feat, method=WorldModel.decode)
    obs_loss = jnp.sum(jnp.square(obs_pred - symlog(batch.obs)), axis=-1).mean()
    reward_logits, cont_logit = model.apply(
        wm_params, feat, batch.action, method=WorldModel.reward_cont
    )
    target = batch.reward * config.reward_scale
    reward_loss = two_hot_loss(reward_logits, target).mean()
    cont_loss = optax.sigmoid_binary_cross_entropy(cont_logit, batch.cont).mean()
    kl_dyn = categorical_kl(sg(seen.posterior), seen.prior)
    kl_rep = categorical_kl(seen.posterior, sg(seen.prior))
    dyn_loss = jnp.maximum(kl_dyn, config.free_bits).mean()
    rep_loss = jnp.maximum(kl_rep, config.free_bits).mean()
    loss = obs_loss + reward_loss + cont_loss + config.kl_dyn * dyn_loss + config.kl_rep * rep_loss
    # Reward prediction in environment units against the best constant (the batch mean),
    # and the sign of nonzero rewards against always guessing the commoner sign.
    reward_pred = two_hot_mean(reward_logits) / config.reward_scale
    nonzero = (batch.reward != 0).astype(jnp.float32)
    positive = _masked_mean((batch.reward > 0).astype(jnp.float32), nonzero)
    metrics = {
        "wm_loss": loss,
        "obs_loss": obs_loss,
        "reward_loss": reward_loss,
        "cont_loss": cont_loss,
        "kl": kl_dyn.mean(),
        "reward_mse": jnp.mean(jnp.square(reward_pred - batch.reward)),
        "reward_mse_mean_baseline": jnp.var(batch.reward),
        "reward_sign_accuracy": _masked_mean(
            (jnp.sign(reward_pred) == jnp.sign(batch.reward)).astype(jnp.float32), nonzero
        ),
        "reward_sign_majority_baseline": jnp.maximum(positive, 1.0 - positive),
    }
    return loss, (metrics, seen)


def actor_critic_update(config: Config, state: TrainState, starts: RSSMState, key):
    """Imagines from every start (leaves (N, ...)) and updates the actor and the critic.

    Returns:
        (new TrainState, metrics dict).
    """
    num_starts = starts.y.shape[0]
    run = functools.partial(imagine, config, state.wm_params, state.actor_params)
    traj = jax.vmap(run)(starts, jax.random.split(key, num_starts))
    # Time-major from here: (H+1, N, F), (H, N).
    feats = jnp.swapaxes(traj.feats, 0, 1)
    actions, rewards, conts = (jnp.swapaxes(a, 0, 1) for a in traj[1:])
    critic = critic_network(config)
    slow_values = two_hot_mean(critic.apply(state.slow_critic_params, feats))
    returns = lambda_returns(rewards, conts, slow_values, config.gamma, config.lam)
    # s_k is reached only if every earlier step continued.
    weight = jnp.cumprod(
        jnp.concatenate([jnp.ones_like(conts[:1]), config.gamma * conts[:-1]], axis=0), axis=0
    )
    low, high = jnp.percentile(returns, 5), jnp.percentile(returns, 95)
    return_scale = jnp.where(
        state.step == 0,
        high - low,
        config.return_decay * state.return_scale + (1 - config.return_decay) * (high - low),
    )
    advantage = (returns - slow_values[:-1]) / jnp.maximum(1.0, return_scale)

    def actor_loss(actor_params):
        logits = policy_logits(config, actor_params, feats[:-1])
        log_probs = jax.nn.log_softmax(logits)
        chosen = jnp.take_along_axis(log_probs, actions[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        loss = -(chosen * sg(advantage) + config.entropy * entropy)
        return jnp.mean(weight * loss), entropy.mean()

    def critic_loss(critic_params):
        logits = critic.apply(critic_params, feats[:-1])
        return jnp.mean(weight * two_hot_loss(logits, sg(returns)))

    (a_loss, entropy), a_grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor_params)
    c_loss, c_grads = jax.value_and_grad(critic_loss)(state.critic_params)
    updates, actor_opt = _optimizer(config, config.actor_lr).update(a_grads, state.actor_opt)
    actor_params = optax.apply_updates(state.actor_params, updates)
    updates, critic_opt = _optimizer(config, config.critic_lr).update(c_grads, state.critic_opt)
    critic_params = optax.apply_updates(state.critic_params, updates)
    rate = config.slow_critic_rate
    slow = jax.tree_util.tree_map(
        lambda s, c: (1 - rate) * s + rate * c, state.slow_critic_params, critic_params
    )
    new_state = state._replace(
        actor_params=actor_params,
        critic_params=critic_params,
        slow_critic_params=slow,
        actor_opt=actor_opt,
        critic_opt=critic_opt,
        return_scale=return_scale,
    )
    metrics = {
        "actor_loss": a_loss,
        "critic_loss": c_loss,
        "actor_entropy": entropy,
        "imagined_return": returns[0].mean() / config.reward_scale,
        "return_scale": return_scale,
    }
    return new_state, metrics


def train_step(config: Config, state: TrainState, batch: Batch, key, train_actor: bool = True):
    """One world-model update on ``batch``, then (``train_actor``, static) one
    actor-critic update in imagination from every posterior state of it.

    Returns:
        (new TrainState, metrics dict of scalars).
    """
    wm_key, imagine_key = jax.random.split(key)
    grad_fn = jax.value_and_grad(functools.partial(world_model_loss, config), has_aux=True)
    (_, (metrics, seen)), grads = grad_fn(state.wm_params, batch, wm_key)
    updates, wm_opt = _optimizer(config, config.wm_lr).update(grads, state.wm_opt)
    state = state._replace(wm_params=optax.apply_updates(state.wm_params, updates), wm_opt=wm_opt)
    if train_actor:
        # Imagine with the updated model from the posterior states it was trained on.
        starts = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), seen.states)
        state, ac_metrics = actor_critic_update(config, state, sg(starts), imagine_key)
        metrics = {**metrics, **ac_metrics}
    return state._replace(step=state.step + 1), metrics
