"""Flax wrappers over the pure functions, for Flax codebases (Linen and NNX).

The library itself is pure functions over plain pytrees (``cell``, ``model``);
these modules only hold that pytree as one Flax parameter, so a Flax agent or
model can embed the cell without a second implementation.

``MLSTMRNNCell`` (Linen) and ``MLSTMNNXCell`` (NNX) are RNN cells in Flax's sense:
``cell(carry, x) -> (carry, y)``, ``initialize_carry``, ``num_feature_axes``, so
``nn.RNN`` / ``nnx.RNN`` (``seq_lengths``, ``time_major``, ``reverse``) and
``Bidirectional`` drive them:

    rnn = nn.RNN(MLSTMRNNCell(CellConfig(embedding_dim=64, read=NS5)))
    variables = rnn.init(key, xs)                       # xs (*batch, T, 64)
    ys = rnn.apply(variables, xs, seq_lengths=lengths)

Episode resets: ``cell(carry, (x, reset))`` with ``reset`` (*batch,) bool starts a
new episode at this step (the carry is cleared first, or replaced by the learned
initial state). ``nn.RNN`` passes one array per step, so there the flag travels as
the input's last feature with ``reset_channel=True`` (a value > 0.5 resets; the
cell's input is the other D features). ``MLSTMCell`` keeps the cell's own
sequence API (the parallel chunkwise form, much faster than stepping):

    cell = MLSTMCell(CellConfig(embedding_dim=64, read=NS5))
    variables = cell.init(key, xs)                      # xs (B, T, 64)
    ys, state = cell.apply(variables, xs, reset=resets)
    y, state = cell.apply(variables, state, x, reset, method=MLSTMCell.step)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from orthorecall import cell as cell_lib
from orthorecall import model as model_lib


class MLSTMCell(nn.Module):
    """The mLSTM cell (``cell.scan`` / ``cell.step``) as a Linen module."""

    config: cell_lib.CellConfig

    def setup(self):
        self.cell_params = self.param("cell", lambda key: cell_lib.init_params(key, self.config))

    def __call__(
        self, x: jax.Array, reset: jax.Array | None = None, state: cell_lib.CellState | None = None
    ):
        """(B, T, D) inputs -> ((B, T, D) outputs, final state)."""
        return cell_lib.scan(self.cell_params, x, self.config, reset=reset, state=state)

    def step(self, state: cell_lib.CellState, x: jax.Array, reset: jax.Array | None):
        """One step: (B, D) -> ((B, D), new state)."""
        return cell_lib.step(self.cell_params, state, x, reset, self.config)

    def initial_state(self, batch_size: int) -> cell_lib.CellState:
        return cell_lib.initial_state(self.config, batch_size)


class MLSTMLanguageModel(nn.Module):
    """The reference language model (``model.apply``) as a Linen module."""

    config: model_lib.ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, reset: jax.Array | None = None) -> jax.Array:
        params = self.param("model", lambda key: model_lib.init_params(key, self.config))
        return model_lib.apply(params, tokens, self.config, reset=reset)


def _split_inputs(inputs, reset_channel: bool):
    """(x, reset or None) from a step's inputs: ``x``, ``(x, reset)``, or with
    ``reset_channel`` an array whose last feature is the reset flag."""
    if isinstance(inputs, tuple):
        if len(inputs) != 2:
            raise ValueError(
                f"a step's inputs are x or (x, reset); got a tuple of {len(inputs)} items."
            )
        return inputs
    if reset_channel:
        return inputs[..., :-1], inputs[..., -1] > 0.5
    return inputs, None


def _learned_state_init(config: cell_lib.CellConfig):
    """A fresh episode's state without batch axes (zeros), as a parameter's initializer."""
    return lambda key: cell_lib.initial_state(config, ())


def _cell_step(params, config, reset_channel, initial, carry, inputs):
    """One step of either Flax cell: (carry, y). ``initial`` is the learned initial
    state (no batch axes) or None (zeros, the reset of ``cell.step``)."""
    x, reset = _split_inputs(inputs, reset_channel)
    if initial is not None and reset is not None:
        carry, reset = cell_lib.select_state(reset, _learnable(initial), carry), None
    y, carry = cell_lib.step(params, carry, x, reset, config)
    return carry, y


def _fresh_carry(config, input_shape, dtype, initial):
    """Either Flax cell's ``initialize_carry``: zeros, or the learned initial state."""
    batch = tuple(input_shape[:-1])
    state = cell_lib.initial_state(config, batch, dtype=dtype)
    if initial is not None:
        state = cell_lib.select_state(jnp.ones(batch, bool), _learnable(initial), state)
    return state


def _learnable(state: cell_lib.CellState) -> cell_lib.CellState:
    # m is the recurrence's log-scale stabilizer, not content: it stays 0 at a start.
    memory = state.memory._replace(m=jax.lax.stop_gradient(jnp.zeros_like(state.memory.m)))
    return state._replace(memory=memory)


class MLSTMRNNCell(nn.RNNCellBase):
    """The mLSTM cell as a Linen RNN cell (``nn.RNN``, ``nn.Bidirectional``).

    ``__call__(carry, inputs) -> (carry, y)`` with inputs ``x`` (*batch, D) or
    ``(x, reset)``; the carry is a ``cell.CellState`` in ``carry_dtype`` (the state
    arithmetic is float32 whatever it is).

    Attributes:
        config: the cell configuration.
        reset_channel: the input's last feature is the reset flag (for ``nn.RNN``,
            which passes one array per step): inputs are (*batch, D + 1).
        learned_initial_state: a fresh episode (``initialize_carry``, and every reset)
            starts from a learned state (parameter ``initial_state``, zeros at
            initialization) instead of zeros. Its ``initialize_carry`` then reads a
            parameter: call it inside ``apply`` (``nn.RNN`` does).
        carry_dtype: the dtype of the carry ``initialize_carry`` makes.
    """

    config: cell_lib.CellConfig
    reset_channel: bool = False
    learned_initial_state: bool = False
    carry_dtype: Any = jnp.float32

    def setup(self):
        self.cell = self.param("cell", lambda key: cell_lib.init_params(key, self.config))
        if self.learned_initial_state:
            self.initial_state = self.param("initial_state", _learned_state_init(self.config))

    def __call__(self, carry: cell_lib.CellState, inputs):
        initial = self.initial_state if self.learned_initial_state else None
        return _cell_step(self.cell, self.config, self.reset_channel, initial, carry, inputs)

    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]):
        """A fresh episode's carry for inputs of ``input_shape`` (*batch, features)."""
        initial = self.initial_state if self.learned_initial_state else None
        return _fresh_carry(self.config, input_shape, self.carry_dtype, initial)

    @property
    def num_feature_axes(self) -> int:
        return 1


def _value(variable):
    # get_value() from flax 0.12 on (where .value is deprecated); .value before.
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


class MLSTMNNXCell(nnx.Module):
    """The mLSTM cell as an NNX RNN cell (``nnx.RNN``): the same conventions as
    :class:`MLSTMRNNCell`, with the parameters (and the learned initial state) as
    ``nnx.Param``s created at construction.

    Args:
        config: the cell configuration.
        rngs: ``nnx.Rngs`` with a ``params`` stream.
        reset_channel, learned_initial_state, carry_dtype: as ``MLSTMRNNCell``.
    """

    def __init__(
        self,
        config: cell_lib.CellConfig,
        *,
        rngs: nnx.Rngs,
        reset_channel: bool = False,
        learned_initial_state: bool = False,
        carry_dtype: Any = jnp.float32,
    ):
        self.config = config
        self.reset_channel = reset_channel
        self.carry_dtype = carry_dtype
        self.cell = nnx.Param(cell_lib.init_params(rngs.params(), config))
        if learned_initial_state:
            self.initial_state = nnx.Param(_learned_state_init(config)(None))
        else:
            self.initial_state = None

    def _initial(self):
        return None if self.initial_state is None else _value(self.initial_state)

    def __call__(self, carry: cell_lib.CellState, inputs):
        return _cell_step(
            _value(self.cell), self.config, self.reset_channel, self._initial(), carry, inputs
        )

    def initialize_carry(self, input_shape: tuple[int, ...], rngs=None):
        """A fresh episode's carry for inputs of ``input_shape`` (*batch, features)."""
        return _fresh_carry(self.config, input_shape, self.carry_dtype, self._initial())

    @property
    def num_feature_axes(self) -> int:
        return 1
