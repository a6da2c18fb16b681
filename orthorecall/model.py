"""The reference language model: embedding, mLSTM blocks, output head.

REFERENCE §2: x = Embedding[tokens]; per block h = x + cell(LN(x));
logits = Dense(LN_post(h)). Pure functions over a plain parameter pytree (so
``jax.vmap`` can stack parameters over seeds), plus the agent-style API:

    params = init_params(key, config)
    logits = apply(params, tokens, config)                 # (B, T) -> (B, T, V)
    state = initial_state(config, batch_size)
    logits_t, state = step(params, state, tokens_t, reset_t, config)

Token ids outside [0, V) (negative ones included) embed as NaN: the logits of
their position, and of the later positions of their episode, are NaN, never
another token's. ``apply`` and ``step`` run under the caller's jit, so they
cannot raise on a value; ``checked_apply`` and ``checked_step`` report such ids
as an error under ``jax.experimental.checkify``:

    checked = checkify.checkify(jax.jit(checked_apply, static_argnames="config"))
    error, logits = checked(params, tokens, config=config)
    error.throw()   # names how many ids lie outside [0, V), and their range

Parameter layout::

    {"embedding": (V, D),
     "blocks": [{"norm": {"scale": (D,)}, "mlstm": <cell params>}, ...],
     "post_norm": {"scale": (D,)},
     "head": {"kernel": (D, V), "bias": (V,)}}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from orthorecall import cell as cell_lib
from orthorecall import mlstm, precision
from orthorecall.validation import check_int

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The language model's hyper-parameters; defaults are the reference's at
    vocabulary 80. Hashable, so it can be a static jit argument.

    Attributes:
        vocab_size: V.
        cell: every block's mLSTM cell (widths, read, sequence form, compute dtype);
            ``cell.num_blocks`` is the number of residual blocks (reference 1), which
            the cell needs for its down-projection initialization.

    Example::

        ModelConfig(vocab_size=96, cell=CellConfig(read=NS5, chunk_size=16))
    """

    vocab_size: int = 80
    cell: cell_lib.CellConfig = cell_lib.CellConfig()

    def __post_init__(self):
        object.__setattr__(self, "vocab_size", check_int("vocab_size", self.vocab_size, minimum=2))
        if not isinstance(self.cell, cell_lib.CellConfig):
            raise ValueError(f"cell must be a cell.CellConfig, got {self.cell!r}.")

    @property
    def num_blocks(self) -> int:
        """Residual mLSTM blocks (``cell.num_blocks``)."""
        return self.cell.num_blocks

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes`` applied; cell fields through ``cell=...``, e.g.
        ``config.replace(cell=config.cell.replace(read=NS5))``."""
        return dataclasses.replace(self, **changes)


def init_params(key: jax.Array, config: ModelConfig) -> Params:
    """Reference initialization: embedding N(0, 1); norms 0 (scale 1); head
    weight and bias uniform(±1/sqrt(D)) (PyTorch Linear default); cells as in
    ``cell.init_params``."""
    d, v = config.cell.embedding_dim, config.vocab_size
    embed_key, head_w_key, head_b_key, *block_keys = jax.random.split(key, 3 + config.num_blocks)
    bound = 1.0 / math.sqrt(d)
    return {
        "embedding": jax.random.normal(embed_key, (v, d), jnp.float32),
        "blocks": [
            {
                "norm": {"scale": jnp.zeros((d,))},
                "mlstm": cell_lib.init_params(block_key, config.cell),
            }
            for block_key in block_keys
        ],
        "post_norm": {"scale": jnp.zeros((d,))},
        "head": {
            "kernel": jax.random.uniform(head_w_key, (d, v), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(head_b_key, (v,), jnp.float32, -bound, bound),
        },
    }


def keep_frozen(new_params: Params, old_params: Params, config: ModelConfig) -> Params:
    """``new_params`` with the parameters the read's variant freezes (``randk``: every
    block's key projection; ``randqk``: query and key) taken from ``old_params``.

    Applied after every optimizer update, so frozen parameters stay bit for bit at
    their initialization (weight decay included), whatever the optimizer.
    """
    frozen = config.cell.read.frozen_parameters()
    if not frozen:
        return new_params
    blocks = [
        {**new, "mlstm": {**new["mlstm"], **{name: old["mlstm"][name] for name in frozen}}}
        for new, old in zip(new_params["blocks"], old_params["blocks"], strict=True)
    ]
    return {**new_params, "blocks": blocks}


def initial_state(config: ModelConfig, batch_size: int) -> list[cell_lib.CellState]:
    """A fresh episode's state: one ``CellState`` per block."""
    return [cell_lib.initial_state(config.cell, batch_size) for _ in range(config.num_blocks)]


def _check_tokens(tokens, config, ndim):
    if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
        layout = "(batch, time)" if ndim == 2 else "(batch,)"
        raise ValueError(
            f"tokens must be an integer array of shape {layout}; got {tokens.dtype} {tokens.shape}."
        )


def _token_index(tokens):
    """tokens as a signed integer array wide enough to compare with any vocab size."""
    dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(tokens.dtype, jnp.int32))
    return jnp.asarray(tokens).astype(dtype)


def _embed(params, tokens):
    """Embedding rows; NaN rows for ids outside [0, V)."""
    embedding = params["embedding"]
    index = _token_index(tokens)
    # jnp.take's "fill" mode gives fill_value for ids >= V but, like Python
    # indexing, reads a negative id from the end (-1 would alias token V - 1):
    # sending negatives past the end makes every id outside [0, V) a NaN row.
    index = jnp.where(index < 0, embedding.shape[0], index)
    return jnp.take(embedding, index, axis=0, mode="fill", fill_value=jnp.nan)


def check_tokens(tokens: jax.Array, config: ModelConfig) -> None:
    """A ``checkify.check`` that every token id lies in [0, vocab_size).

    For use under ``jax.experimental.checkify.checkify`` (as in ``checked_apply``):
    jitted without it, JAX refuses the check; run eagerly, it raises at once.
    """
    tokens = jnp.asarray(tokens)
    if tokens.size == 0:
        return
    index = _token_index(tokens)
    outside = (index < 0) | (index >= config.vocab_size)
    count = jnp.sum(outside)
    checkify.check(
        ~jnp.any(outside),
        f"{{count}} token id(s) outside [0, {config.vocab_size}) (vocab_size): the ids "
        "range from {low} to {high}. Out-of-range ids give NaN logits; are the tokens "
        "from a vocabulary of another size?",
        count=count,
        low=jnp.min(index),
        high=jnp.max(index),
    )


def _check_states(state, config):
    """The per-block state list, or a ValueError naming what was expected."""
    if isinstance(state, cell_lib.CellState):
        got = "a single cell.CellState"
    elif not isinstance(state, (list, tuple)):
        got = type(state).__name__
    elif len(state) != config.num_blocks:
        got = f"{len(state)}"
    else:
        return
    raise ValueError(
        f"state must be a list with one cell.CellState per block "
        f"(num_blocks={config.num_blocks}); got {got}. Make it with "
        "model.initial_state(config, batch_size)."
    )


def _head(params, h):
    h = cell_lib.layer_norm(h, params["post_norm"]["scale"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def apply(
    params: Params,
    tokens: jax.Array,
    config: ModelConfig,
    *,
    reset: jax.Array | None = None,
    state: list[cell_lib.CellState] | None = None,
    return_state: bool = False,
    read_mix: jax.Array | float | None = None,
):
    """Logits for every position of a batch of token sequences.

    Args:
        params: model parameters.
        tokens: (B, T) integer tokens in [0, V). An id outside [0, V) (negative
            included) gives NaN logits at its position and the later positions of
            its episode; it is not checked here (see ``checked_apply``).
        config: the model configuration.
        reset: optional (B, T) bool; true at t starts a new episode at t.
        state: optional per-block states to continue from.
        return_state: also return the final per-block states.
        read_mix: None, or the scaffold anneal's α for every block (a scalar,
            ``orthorecall.anneal``).

    Returns:
        logits (B, T, V) float32, or (logits, states) with ``return_state``.

    Raises:
        ValueError: tokens of the wrong rank or dtype, a reset that is not (B, T)
            bool, or a state list of the wrong length.
    """
    _check_tokens(tokens, config, 2)
    mlstm.check_reset(reset, tokens.shape, "(batch, time)")
    if state is not None:
        _check_states(state, config)
    with precision.matmul_precision(config.cell.matmul_precision):
        h = _embed(params, tokens)
        states = state if state is not None else [None] * config.num_blocks
        new_states = []
        for block, block_state in zip(params["blocks"], states, strict=True):
            y, block_state = cell_lib.scan(
                block["mlstm"],
                cell_lib.layer_norm(h, block["norm"]["scale"]),
                config.cell,
                reset=reset,
                state=block_state,
                read_mix=read_mix,
            )
            h = h + y
            new_states.append(block_state)
        logits = _head(params, h)
    return (logits, new_states) if return_state else logits


def step(
    params: Params,
    state: list[cell_lib.CellState],
    tokens: jax.Array,
    reset: jax.Array | None,
    config: ModelConfig,
) -> tuple[jax.Array, list[cell_lib.CellState]]:
    """One token per sequence: for generation and agents.

    Args:
        params: model parameters.
        state: per-block states (``initial_state``).
        tokens: (B,) integer tokens in [0, V); an id outside gives NaN logits (and
            a NaN state until the sequence is reset), unchecked (see
            ``checked_step``).
        reset: (B,) bool or None; true starts a new episode at this token.
        config: the model configuration.

    Returns:
        (logits (B, V) float32, new per-block states).

    Raises:
        ValueError: tokens of the wrong rank or dtype, a reset that is not (B,)
            bool, or a state list of the wrong length.
    """
    _check_tokens(tokens, config, 1)
    mlstm.check_reset(reset, tokens.shape, "(batch,)")
    _check_states(state, config)
    with precision.matmul_precision(config.cell.matmul_precision):
        h = _embed(params, tokens)
        new_states = []
        for block, block_state in zip(params["blocks"], state, strict=True):
            y, block_state = cell_lib.step(
                block["mlstm"],
                block_state,
                cell_lib.layer_norm(h, block["norm"]["scale"]),
                reset,
                config.cell,
            )
            h = h + y
            new_states.append(block_state)
        return _head(params, h), new_states


def checked_apply(params: Params, tokens: jax.Array, config: ModelConfig, **kwargs):
    """``apply`` preceded by ``check_tokens``: run it under ``checkify.checkify``
    (see the module docstring) to get an error for token ids outside [0, V)."""
    check_tokens(tokens, config)
    return apply(params, tokens, config, **kwargs)


def checked_step(params: Params, state, tokens: jax.Array, reset, config: ModelConfig):
    """``step`` preceded by ``check_tokens``, for use under ``checkify.checkify``."""
    check_tokens(tokens, config)
    return step(params, state, tokens, reset, config)


def count_params(params: Params) -> int:
    """Number of scalar parameters."""
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
