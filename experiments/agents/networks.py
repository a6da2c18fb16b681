"""The agent's actor-critic network around a switchable recurrent core.

    observation -> Dense(width), ReLU -> core -> actor head (logits), critic head (value)

The core is ``"gru"`` (Flax's ``GRUCell``, the usual recurrent-PPO baseline) or any
read name the study accepts (``"raw"``, ``"ns5"``, ``"polar"``, ``"ns3_muon"``, ...):
an mLSTM cell of width ``width`` whose memory is read that way.

Two ways to run it, which must agree (tests/test_agent.py checks they do):

* ``step``: one time step for a batch of environments, as the rollout acts;
* ``unroll``: a whole (T, B) trajectory from a stored carry, as the PPO update
  recomputes it. The mLSTM runs its parallel chunkwise form there (much faster than
  stepping on long rollouts); the GRU steps in a ``lax.scan``.

Episode resets travel with the observation: ``reset[t]`` true means ``obs[t]`` is the
first of a new episode, so the core starts from a fresh state before that step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from orthorecall import cell as cell_lib
from orthorecall.reads import read_from_name

GRU = "gru"


@dataclasses.dataclass(frozen=True)
class CoreConfig:
    """The recurrent core (hashable: a static jit argument).

    Attributes:
        name: ``"gru"`` or a read name of the mLSTM cell (``reads.read_from_name``).
        width: the core's input and output width (the GRU's hidden size; the mLSTM
            cell's embedding dimension, whose memory is num_heads x (2 width / num_heads)^2).
        num_heads: the mLSTM cell's heads (unused by the GRU).
        conv_kernel_size: the mLSTM cell's causal conv window (reference 4; unused by
            the GRU). The window alone sees the last K inputs, so a recall that far back
            needs no memory; 1 leaves the matrix memory as the only way back in time.
    """

    name: str
    width: int = 64
    num_heads: int = 4
    conv_kernel_size: int = 4

    def __post_init__(self):
        if self.name != GRU:
            _ = self.cell_config  # Validates the read name and the cell's shape now.

    @property
    def is_gru(self) -> bool:
        return self.name == GRU

    @property
    def cell_config(self) -> cell_lib.CellConfig:
        try:
            read = read_from_name(self.name)
        except ValueError as e:
            raise ValueError(f"core {self.name!r} is neither 'gru' nor a read name: {e}") from None
        return cell_lib.CellConfig(
            embedding_dim=self.width,
            num_heads=self.num_heads,
            conv_kernel_size=self.conv_kernel_size,
            read=read,
        )


def initial_carry(core: CoreConfig, batch: tuple[int, ...]) -> Any:
    """A fresh episode's carry for ``batch`` environments (zeros)."""
    if core.is_gru:
        return jnp.zeros((*batch, core.width), jnp.float32)
    return cell_lib.initial_state(core.cell_config, batch)


def carry_size(core: CoreConfig) -> int:
    """Floats in one environment's carry (the state an agent stores per actor)."""
    leaves = jax.tree_util.tree_leaves(jax.eval_shape(lambda: initial_carry(core, (1,))))
    return sum(int(np.prod(leaf.shape)) for leaf in leaves)


def _reset_gru(carry: jax.Array, reset: jax.Array) -> jax.Array:
    return jnp.where(reset[..., None], 0.0, carry)


class ActorCritic(nn.Module):
    """Actor-critic with a recurrent core; see the module docstring."""

    num_actions: int
    core: CoreConfig

    def setup(self):
        width = self.core.width
        self.encoder = nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))
        if self.core.is_gru:
            self.gru = nn.GRUCell(width)
        else:
            self.cell = self.param(
                "cell", lambda key: cell_lib.init_params(key, self.core.cell_config)
            )
        hidden = lambda: nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2)))
        # Small final layers: a near-uniform first policy and values near zero.
        self.actor = [hidden(), nn.Dense(self.num_actions, nn.initializers.orthogonal(0.01))]
        self.critic = [hidden(), nn.Dense(1, kernel_init=nn.initializers.orthogonal(1.0))]

    def _heads(self, y):
        logits = self.actor[1](nn.relu(self.actor[0](y)))
        value = self.critic[1](nn.relu(self.critic[0](y)))[..., 0]
        return logits, value

    def __call__(self, carry, obs: jax.Array, reset: jax.Array):
        """``step``; what ``init`` traces."""
        return self.step(carry, obs, reset)

    def step(self, carry, obs: jax.Array, reset: jax.Array):
        """One step: obs (B, O), reset (B,) bool -> (carry, logits (B, A), value (B,))."""
        x = nn.relu(self.encoder(obs))
        if self.core.is_gru:
            carry, y = self.gru(_reset_gru(carry, reset), x)
        else:
            y, carry = cell_lib.step(self.cell, carry, x, reset, self.core.cell_config)
        return (carry, *self._heads(y))

    def unroll(self, carry, obs: jax.Array, reset: jax.Array):
        """A trajectory: obs (T, B, O), reset (T, B) -> (carry, logits (T, B, A),
        value (T, B)); equal to ``step`` applied T times."""
        x = nn.relu(self.encoder(obs))
        if self.core.is_gru:

            def body(gru, carry, inputs):
                x, reset = inputs
                return gru(_reset_gru(carry, reset), x)

            scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
            carry, y = scan(self.gru, carry, (x, reset))
        else:
            # The cell's sequence API is batch-major: (B, T, D).
            y, carry = cell_lib.scan(
                self.cell,
                jnp.swapaxes(x, 0, 1),
                self.core.cell_config,
                reset=jnp.swapaxes(reset, 0, 1),
                state=carry,
            )
            y = jnp.swapaxes(y, 0, 1)
        return (carry, *self._heads(y))
