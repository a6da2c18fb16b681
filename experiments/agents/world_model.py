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
static parts (environment, configuration) are closed over by ``make_functions``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from experiments.agents import envs as envs_lib
from orthorecall import cell as cell_lib
from orthorecall.reads import read_from_name
from orthorecall.validation import check_int

Params = Any
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and learning hyper-parameters (hashable: a static jit argument).

    Attributes:
        num_actions, obs_size: from the environment.
        read: the cell's memory read (``reads.read_from_name``: "ns5", "raw", "polar", ...).
        embedding_dim, num_heads: the cell's D and heads (inner width 64*ceil(2D/64)).
        hidden: width of every MLP's hidden layer.
        latents, classes: the stochastic state's categorical variables and their classes.
        unimix: uniform mixture of every categorical (latents and actor).
        bins: two-hot bins of the reward and critic heads (symlog space, [-20, 20]).
        free_bits, kl_dyn, kl_rep: KL balancing (DreamerV3: 1, 0.5, 0.1).
        reward_scale: environment rewards are multiplied by it for the model.
        horizon, gamma, lam: imagination length, discount, λ of the λ-returns.
        entropy: the actor's entropy bonus (on normalized advantages). DreamerV3's 3e-4
            let the actor collapse onto one action on RepeatPrevious (and, acting on one
            action only, the data stopped showing it the others); 3e-3 did not.
        return_decay: EMA decay of the return-range scale S.
        slow_critic_rate: EMA rate of the slow critic the returns bootstrap from.
        wm_lr, actor_lr, critic_lr, grad_clip: Adam learning rates, global-norm clip
            (at wm_lr 1e-3 the reward head sat on its predict-the-mean plateau for over
            1000 updates on RepeatPrevious; at 3e-3 it left it after about 500).
    """

    num_actions: int
    obs_size: int
    read: str = "ns5"
    embedding_dim: int = 32
    num_heads: int = 4
    hidden: int = 64
    latents: int = 8
    classes: int = 8
    unimix: float = 0.01
    bins: int = 255
    free_bits: float = 1.0
    kl_dyn: float = 0.5
    kl_rep: float = 0.1
    reward_scale: float = 1.0
    horizon: int = 15
    gamma: float = 0.997
    lam: float = 0.95
    entropy: float = 3e-3
    return_decay: float = 0.99
    slow_critic_rate: float = 0.02
    wm_lr: float = 3e-3
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    grad_clip: float = 100.0

    def __post_init__(self):
        _ = self.cell_config  # Validates the read name and the cell's shape now.
        for name in ("num_actions", "obs_size", "hidden", "latents", "classes", "horizon"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins!r}.")

    @property
    def cell_config(self) -> cell_lib.CellConfig:
        return cell_lib.CellConfig(
            embedding_dim=self.embedding_dim,
            num_heads=self.num_heads,
            read=read_from_name(self.read),
        )

    @property
    def stoch_size(self) -> int:
        return self.latents * self.classes

    @property
    def feature_size(self) -> int:
        return self.embedding_dim + self.stoch_size


# ---------------------------------------------------------------- distributions


def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x):
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


def _bin_values(bins: int) -> jax.Array:
    return jnp.linspace(-20.0, 20.0, bins)


def two_hot(x: jax.Array, bins: int) -> jax.Array:
    """(...,) values -> (..., bins) two-hot weights of symlog(x) on the symlog bins."""
    values = _bin_values(bins)
    y = jnp.clip(symlog(x), values[0], values[-1])
    width = values[1] - values[0]
    position = (y - values[0]) / width
    below = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, bins - 2)
    upper_weight = position - below
    return (
        jax.nn.one_hot(below, bins) * (1.0 - upper_weight)[..., None]
        + jax.nn.one_hot(below + 1, bins) * upper_weight[..., None]
    )


def two_hot_mean(logits: jax.Array) -> jax.Array:
    """(..., bins) logits -> (...,) the predicted value, symexp of the expected bin."""
    return symexp(jnp.sum(jax.nn.softmax(logits) * _bin_values(logits.shape[-1]), axis=-1))


def two_hot_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Cross-entropy of (..., bins) logits against the two-hot encoding of (...,) targets."""
    return -jnp.sum(two_hot(target, logits.shape[-1]) * jax.nn.log_softmax(logits), axis=-1)


def unimix_logits(logits: jax.Array, unimix: float) -> jax.Array:
    """Logits of (1 - unimix) softmax(logits) + unimix / classes (never a zero probability,
    so KLs and log-probabilities stay bounded)."""
    probs = (1.0 - unimix) * jax.nn.softmax(logits) + unimix / logits.shape[-1]
    return jnp.log(probs)


def sample_straight_through(key: jax.Array, logits: jax.Array) -> jax.Array:
    """A one-hot sample of (..., classes) logits whose gradient is that of the probabilities."""
    probs = jax.nn.softmax(logits)
    sample = jax.nn.one_hot(jax.random.categorical(key, logits), logits.shape[-1])
    return sample + probs - sg(probs)


def categorical_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p || q) of (..., latents, classes) normalized logits, summed over the latents."""
    p = jax.nn.softmax(p_logits)
    kl = jnp.sum(p * (jax.nn.log_softmax(p_logits) - jax.nn.log_softmax(q_logits)), axis=-1)
    return jnp.sum(kl, axis=-1)


# ---------------------------------------------------------------- networks


class MLP(nn.Module):
    """Dense -> LayerNorm -> SiLU, ``layers`` times, then a Dense output (zeros at
    initialization with ``zero_output``: the reward and critic start predicting 0)."""

    hidden: int
    out: int
    layers: int = 1
    zero_output: bool = False

    @nn.compact
    def __call__(self, x):
        for _ in range(self.layers):
            x = nn.silu(nn.LayerNorm()(nn.Dense(self.hidden, use_bias=False)(x)))
        init = nn.initializers.zeros if self.zero_output else nn.initializers.lecun_normal()
        return nn.Dense(self.out, kernel_init=init)(x)


class RSSMState(NamedTuple):
    """The model state after a step (leaves with any batch axes in front).

    Attributes:
        cell: the mLSTM ``CellState`` (the deterministic memory).
        y: (*batch, D) the cell's output, the deterministic feature.
        z: (*batch, latents * classes) the stochastic state, one-hot per latent.
    """

    cell: cell_lib.CellState
    y: jax.Array
    z: jax.Array


def initial_state(config: Config, batch: tuple[int, ...]) -> RSSMState:
    """A fresh episode's state for ``batch`` sequences (zeros; ``()`` for one)."""
    return RSSMState(
        cell=cell_lib.initial_state(config.cell_config, batch),
        y=jnp.zeros((*batch, config.embedding_dim)),
        z=jnp.zeros((*batch, config.stoch_size)),
    )


def feature(state: RSSMState) -> jax.Array:
    """(*batch, D + latents*classes) the feature every head reads, [y, z]."""
    return jnp.concatenate([state.y, state.z], axis=-1)


class WorldModel(nn.Module):
    """Encoder, RSSM (mLSTM cell + categorical latents) and heads; see the module docstring.

    Methods are single steps over any batch shape; ``observe`` and ``imagine`` scan them.
    """

    config: Config

    def setup(self):
        c = self.config
        self.encoder = MLP(c.hidden, c.hidden)
        self.cell_input = MLP(c.hidden, c.embedding_dim)
        self.cell = self.param("cell", lambda key: cell_lib.init_params(key, c.cell_config))
        self.prior_net = MLP(c.hidden, c.stoch_size)
        self.posterior_net = MLP(c.hidden, c.stoch_size)
        self.decoder = MLP(c.hidden, c.obs_size)
        self.reward_head = MLP(c.hidden, c.bins, zero_output=True)
        self.cont_head = MLP(c.hidden, 1)

    def __call__(self, state, prev_action, obs, reset, key):
        """Traced by ``init``: one observe step and every head."""
        state, _, _, _ = self.observe_step(state, prev_action, obs, reset, key)
        action = jnp.zeros(obs.shape[:-1], jnp.int32)
        return self.decode(feature(state)), self.reward_cont(feature(state), action)

    def _latent_logits(self, net, x):
        c = self.config
        logits = net(x).reshape(x.shape[:-1] + (c.latents, c.classes))
        return unimix_logits(logits, c.unimix)

    def transition(self, state: RSSMState, action: jax.Array, reset: jax.Array | None):
        """The deterministic step: (cell output y (*batch, D), new CellState, cell input x).

        ``action`` (*batch,) int is the action taken after ``state``; where ``reset`` is
        true an episode starts here: the cell is cleared and the input carries no previous
        latent or action.
        """
        inputs = jnp.concatenate(
            [state.z, jax.nn.one_hot(action, self.config.num_actions)], axis=-1
        )
        if reset is not None:
            inputs = jnp.where(reset[..., None], 0.0, inputs)
        x = self.cell_input(inputs)
        y, cell_state = cell_lib.step(self.cell, state.cell, x, reset, self.config.cell_config)
        return y, cell_state, x

    def observe_step(self, state, prev_action, obs, reset, key):
        """One observed step: ``obs`` (*batch, O) after ``prev_action`` (*batch,) from
        ``state``; ``reset`` (*batch,) bool marks episode starts.

        Returns:
            (posterior RSSMState, posterior logits, prior logits (*batch, latents, classes),
            the cell's input x (*batch, D)).
        """
        y, cell_state, x = self.transition(state, prev_action, reset)
        prior = self._latent_logits(self.prior_net, y)
        embed = self.encoder(symlog(obs))
        posterior = self._latent_logits(self.posterior_net, jnp.concatenate([y, embed], -1))
        z = sample_straight_through(key, posterior).reshape(y.shape[:-1] + (-1,))
        return RSSMState(cell_state, y, z), posterior, prior, x

    def imagine_step(self, state, action, key):
        """One imagined step: the prior's sample after ``action``. -> (RSSMState, prior logits)."""
        y, cell_state, _ = self.transition(state, action, None)
        prior = self._latent_logits(self.prior_net, y)
        z = sample_straight_through(key, prior).reshape(y.shape[:-1] + (-1,))
        return RSSMState(cell_state, y, z), prior

    def decode(self, feat):
        """(*batch, F) -> (*batch, O) the observation's prediction in symlog space."""
        return self.decoder(feat)

    def reward_cont(self, feat, action):
        """(*batch, F), (*batch,) -> (reward logits (*batch, bins), continue logit (*batch,))
        of taking ``action`` in the state ``feat``."""
        x = jnp.concatenate([feat, jax.nn.one_hot(action, self.config.num_actions)], -1)
        return self.reward_head(x), self.cont_head(x)[..., 0]


def actor_network(config: Config) -> MLP:
    return MLP(config.hidden, config.num_actions, layers=2)


def critic_network(config: Config) -> MLP:
    return MLP(config.hidden, config.bins, layers=2, zero_output=True)


def policy_logits(config: Config, actor_params, feat) -> jax.Array:
    return unimix_logits(actor_network(config).apply(actor_params, feat), config.unimix)


# ---------------------------------------------------------------- observe and imagine


class Observation(NamedTuple):
    """What ``observe`` returns per step (leaves (B, T, ...))."""

    states: RSSMState  # posterior states (the imagination's starts)
    posterior: jax.Array  # (B, T, latents, classes) logits
    prior: jax.Array  # (B, T, latents, classes) logits
    cell_inputs: jax.Array  # (B, T, D) what the cell was fed


def observe(config: Config, wm_params, obs, actions, is_first, keys, state=None):
    """The RSSM over observed sequences: ``observe_step`` in a ``lax.scan`` over time.

    Args:
        obs: (B, T, O) observations; actions: (B, T) int actions taken on them.
        is_first: (B, T) bool, episode starts (the state is cleared there).
        keys: (T,) PRNG keys, one per step (shared by the batch, whose samples differ).
        state: the ``RSSMState`` before step 0 (B,); zeros when None.

    Returns:
        (final RSSMState, ``Observation`` with leaves (B, T, ...)).
    """
    model = WorldModel(config)
    batch = obs.shape[0]
    if state is None:
        state = initial_state(config, (batch,))
    # Step t's cell input is the action taken at t-1; step 0 has none (and starts afresh
    # when is_first[:, 0], the case of every training chunk).
    prev_actions = jnp.concatenate([jnp.zeros_like(actions[:, :1]), actions[:, :-1]], axis=1)

    def body(state, inputs):
        o, a, first, key = inputs
        state, post, prior, x = model.apply(
            wm_params, state, a, o, first, key, method=WorldModel.observe_step
        )
        return state, Observation(state, post, prior, x)

    time_major = lambda tree: jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), tree)
    final, out = jax.lax.scan(
        body, state, (time_major(obs), time_major(prev_actions), time_major(is_first), keys)
    )
    return final, time_major(out)


class Imagined(NamedTuple):
    """An imagined trajectory of one start (leaves (H+1, ...) or (H, ...))."""

    feats: jax.Array  # (H+1, F) s_0 (the start) .. s_H
    actions: jax.Array  # (H,) a_k taken in s_k
    rewards: jax.Array  # (H,) predicted reward of (s_k, a_k), model units
    conts: jax.Array  # (H,) predicted continue probability of (s_k, a_k)


def imagine(config: Config, wm_params, actor_params, start: RSSMState, key) -> Imagined:
    """Rolls the prior ``config.horizon`` steps from one unbatched ``start`` with actions
    sampled from the actor; ``jax.vmap`` it over starts. No gradient reaches the world
    model or the actor through it (the actor learns by REINFORCE on ``actions``)."""
    model = WorldModel(config)
    wm_params, actor_params, start = sg(wm_params), sg(actor_params), sg(start)

    def body(state, key):
        action_key, latent_key = jax.random.split(key)
        feat = feature(state)
        logits = policy_logits(config, actor_params, feat)
        action = jax.random.categorical(action_key, logits)
        reward_logits, cont_logit = model.apply(
            wm_params, feat, action, method=WorldModel.reward_cont
        )
        state, _ = model.apply(wm_params, state, action, latent_key, method=WorldModel.imagine_step)
        out = (feat, action, two_hot_mean(reward_logits), jax.nn.sigmoid(cont_logit))
        return state, out

    final, (feats, actions, rewards, conts) = jax.lax.scan(
        body, start, jax.random.split(key, config.horizon)
    )
    feats = jnp.concatenate([feats, feature(final)[None]], axis=0)
    return Imagined(sg(feats), actions, sg(rewards), sg(conts))


def lambda_returns(rewards, conts, values, gamma: float, lam: float) -> jax.Array:
    """λ-returns R_k = r_k + γ c_k ((1-λ) V_{k+1} + λ R_{k+1}), R_H = V_H.

    Args:
        rewards, conts: (H, ...) of the step from s_k; values: (H+1, ...) V(s_0..s_H).

    Returns:
        (H, ...) R_0 .. R_{H-1}.
    """

    def body(next_return, inputs):
        r, c, next_value = inputs
        ret = r + gamma * c * ((1.0 - lam) * next_value + lam * next_return)
        return ret, ret

    _, returns = jax.lax.scan(body, values[-1], (rewards, conts, values[1:]), reverse=True)
    return returns


# ---------------------------------------------------------------- losses and training


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


# ---------------------------------------------------------------- acting and replay


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
