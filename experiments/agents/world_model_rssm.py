"""The world model's network: its configuration, the distributions of its heads and
latents, the RSSM over the mLSTM cell (``WorldModel``), the actor and critic networks,
and the model run over observed sequences (``observe``) and in imagination
(``imagine``, with the λ-returns). ``experiments.agents.world_model``'s docstring gives
the design and the data layout.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from orthorecall import cell as cell_lib
from orthorecall.reads import read_from_name
from orthorecall.validation import check_int

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
