"""Thin Flax Linen wrappers over the pure functions, for Flax codebases.

The library itself is pure functions over plain pytrees (``cell``, ``model``);
these modules only hold that pytree as one Flax parameter, so a Flax agent or
model can embed the cell without a second implementation:

    cell = MLSTMCell(CellConfig(embedding_dim=64, read=NS5))
    variables = cell.init(key, xs)                      # xs (B, T, 64)
    ys, state = cell.apply(variables, xs, reset=resets)
    y, state = cell.apply(variables, state, x, reset, method=MLSTMCell.step)
"""

from __future__ import annotations

import flax.linen as nn
import jax

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
