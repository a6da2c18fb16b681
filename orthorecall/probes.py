"""Probes of a trained model's memory: where each recalled pair was stored, the memory
at chosen positions, and the model run with some of its queries replaced.

The replication (arXiv:2607.19390) asks three things of trained models (defined in
``docs/specification.md``, "Probes"; the command is ``experiments/probes/probe.py``):

* swap: the trained parameters read with another read (``swapped_read``);
* decode: can the value be read linearly off the memory C_t with the model's own stored
  key? (``trace`` gives C_t at the query positions, ``orthorecall.ridge`` the decoder);
* oracle: does recall work when the query q_t is the stored key itself?
  (``apply_with_queries``).

The layout facts they rest on (``stored_positions``, ``other_key_positions``) come from
the task (spec §1): after the one-token shift, a scored position t holds a key token and
its target is that key's value; the pair was presented earlier, key at u, value at u + 1.

Everything runs the model's own code (``cell.sequence_projections``,
``cell.memory_sequence``, ``mlstm.memory_step``), so a probe looks at the model rather
than at a restatement of it; the tests check ``trace``'s logits against ``model.apply``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from orthorecall import cell as cell_lib
from orthorecall import mlstm, precision
from orthorecall import model as model_lib
from orthorecall.data import IGNORE_INDEX
from orthorecall.reads import ReadConfig, read_from_name

NO_POSITION = -1


# ---------------------------------------------------------------------------------------
# The task's layout
# ---------------------------------------------------------------------------------------


def _check_pair(inputs, targets) -> tuple[np.ndarray, np.ndarray]:
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.shape != targets.shape or inputs.ndim < 1:
        raise ValueError(
            f"inputs and targets must have the same shape (..., T); got {inputs.shape} and "
            f"{targets.shape}."
        )
    for name, array in (("inputs", inputs), ("targets", targets)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be integer token ids, got {array.dtype}.")
    return inputs, targets


def stored_positions(inputs, targets, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """For every scored position t, the earlier position u where its key was stored.

    A scored position t (target ≠ ``ignore_index``) holds a key token whose target is
    its value. The pair was presented before: the key at a position u with the same
    token and an unscored target, its value at u + 1. u is the latest such position
    before t, as the replication takes it. With multi-query (the study's task) that is
    the key's first presentation, where its value was first written: every later
    presentation of the key is a scored query itself. Without multi-query, repeats are
    unscored and the latest is the nearest one.

    Args:
        inputs, targets: integer arrays (..., T) of recall sequences
            (``data.reference_validation_set``'s layout).
        ignore_index: the target of unscored positions.

    Returns:
        int64 array (..., T): u at scored positions, ``NO_POSITION`` (-1) elsewhere.

    Raises:
        ValueError: shapes differ, or a scored position is not a recall query: its token
            was never presented unscored before it, or the token after that
            presentation is not its target.
    """
    inputs, targets = _check_pair(inputs, targets)
    flat_inputs = inputs.reshape(-1, inputs.shape[-1])
    flat_targets = targets.reshape(-1, inputs.shape[-1])
    result = np.full(flat_inputs.shape, NO_POSITION, np.int64)
    for row, (tokens, row_targets) in enumerate(zip(flat_inputs, flat_targets, strict=True)):
        latest: dict[int, int] = {}
        for t, (token, target) in enumerate(
            zip(tokens.tolist(), row_targets.tolist(), strict=True)
        ):
            if target == ignore_index:
                latest[token] = t
                continue
            u = latest.get(token)
            if u is None or tokens[u + 1] != target:
                where = np.unravel_index(row, inputs.shape[:-1]) if inputs.ndim > 1 else ()
                found = (
                    "never presented unscored before"
                    if u is None
                    else f"presented at {u} followed by {tokens[u + 1]}"
                )
                raise ValueError(
                    f"sequence {tuple(int(i) for i in where)}, position {t}: token {token} is "
                    f"scored with target {target} but {found}; is this a recall sequence "
                    "(is_training=False) with this ignore_index?"
                )
            result[row, t] = u
    return result.reshape(inputs.shape)


def other_key_positions(
    inputs,
    targets,
    stored,
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """For every scored position t, where another key was stored: the wrong-key control.

    Among the keys of the sequence other than inputs[t] that were already stored before
    t (the stored positions ``stored`` gives for the scored queries of the sequence, as
    far as they lie before t), one is drawn uniformly with ``rng``; its stored position is
    returned. A key stored only after t is never drawn: C_t holds nothing of it, so the
    control would be at chance for a trivial reason. Keys no query asks for are not
    candidates (their presentations cannot be told from the tokens alone); without
    multi-query a sequence asks for one key only, so the control is empty there.

    Args:
        inputs, targets: integer arrays (..., T).
        stored: ``stored_positions(inputs, targets)``.
        rng: draws the other key.
        ignore_index: the target of unscored positions.

    Returns:
        int64 array (..., T): the other key's stored position at scored positions with
        another stored key, ``NO_POSITION`` elsewhere.
    """
    inputs, targets = _check_pair(inputs, targets)
    stored = np.asarray(stored)
    if stored.shape != inputs.shape:
        raise ValueError(f"stored must have shape {inputs.shape}, got {stored.shape}.")
    length = inputs.shape[-1]
    flat_inputs = inputs.reshape(-1, length)
    flat_stored = stored.reshape(-1, length)
    result = np.full(flat_inputs.shape, NO_POSITION, np.int64)
    for row in range(flat_inputs.shape[0]):
        keys = {}  # key token -> stored position, for the keys some query asks for
        for t in np.flatnonzero(flat_stored[row] >= 0):
            keys.setdefault(int(flat_inputs[row, t]), int(flat_stored[row, t]))
        for t in np.flatnonzero(flat_stored[row] >= 0):
            token = int(flat_inputs[row, t])
            candidates = sorted(u for key, u in keys.items() if key != token and u < t)
            if candidates:
                result[row, t] = candidates[rng.integers(len(candidates))]
    return result.reshape(inputs.shape)


# ---------------------------------------------------------------------------------------
# Swap: the same parameters, another read
# ---------------------------------------------------------------------------------------


def swapped_read(trained: ReadConfig, name: str) -> ReadConfig:
    """The read named ``name`` for a model trained with ``trained``.

    A swap changes how the memory is read, not how it is written: a model trained with
    the delta write keeps it (``raw`` on a ``delta`` model is the delta memory read
    raw), and the name's own write applies only when it asks for the delta write
    (``delta_ns5``). Frozen projections only matter in training and are kept.

    Raises:
        ValueError: an unknown read name, or a combination that has no definition (the
            rls read with the delta write).
    """
    read = read_from_name(name)
    write = "delta" if "delta" in (trained.write, read.write) else "additive"
    return read.replace(write=write, frozen=trained.frozen)


# ---------------------------------------------------------------------------------------
# The model re-run with its memory exposed
# ---------------------------------------------------------------------------------------


class BlockTrace(NamedTuple):
    """One block's inside, for a batch of B sequences of length T.

    Attributes:
        q, k, v: (B, T, H, d) float32, as the cell computes them: k before the
            recurrence's 1/√d (k̂ = k / √d is what the memory stores).
        memory: the ``mlstm.MemoryState`` after each requested step (leading axes
            (B, P)): c (B, P, H, d, d), n (B, P, H, d), m (B, P, H); stabilized, i.e. the
            true memory times e^{-m}. Unrequested slots hold zeros.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    memory: mlstm.MemoryState


def _check_positions(positions, batch: int, length: int, name: str) -> np.ndarray:
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch}, P), got {positions.shape}.")
    if not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"{name} must be integer positions, got {positions.dtype}.")
    if ((positions < NO_POSITION) | (positions >= length)).any():
        raise ValueError(f"{name} must lie in [0, {length}) or be {NO_POSITION} (none).")
    for row in positions:
        valid = row[row >= 0]
        if len(np.unique(valid)) != len(valid):
            raise ValueError(f"{name}: a position is requested twice in one sequence: {row}.")
    return positions.astype(np.int32)


def memory_at(projections: cell_lib.SequenceProjections, read: ReadConfig, positions):
    """The memory state after step ``positions[b, j]`` of each sequence, by the recurrence.

    ``lax.scan`` of ``mlstm.memory_step`` from a fresh state; after each step the state
    of the sequences that asked for it is written to its slot. The state does not depend
    on the read, only on its write (the rls read's inverse is not part of C), so the
    scan reads raw: C is the model's whatever its read.

    Args:
        projections: ``cell.sequence_projections``' output for (B, T).
        read: the model's read (only its write is used).
        positions: (B, P) int32 in [0, T), distinct per sequence, or ``NO_POSITION``.

    Returns:
        ``mlstm.MemoryState`` with leaves (B, P, ...), p None; zeros in unused slots.
    """
    q, k, v = projections.q, projections.k, projections.v
    batch, length, heads, width = q.shape
    slots = positions.shape[1]
    # slot[b, t] = j where positions[b, j] = t; ``slots`` (out of range) elsewhere.
    rows = jnp.arange(batch)[:, None]
    slot = jnp.full((batch, length), slots, jnp.int32)
    slot = slot.at[rows, jnp.where(positions >= 0, positions, length)].set(
        jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), positions.shape), mode="drop"
    )
    capture_read = ReadConfig("raw", write=read.write)
    state = mlstm.initial_memory_state(batch, heads, width)
    kept = mlstm.MemoryState(
        c=jnp.zeros((batch, slots, heads, width, width), jnp.float32),
        n=jnp.zeros((batch, slots, heads, width), jnp.float32),
        m=jnp.zeros((batch, slots, heads), jnp.float32),
    )

    def step(carry, inputs):
        state, kept = carry
        q_t, k_t, v_t, i_t, f_t, slot_t = inputs
        _, state = mlstm.memory_step(state, q_t, k_t, v_t, i_t, f_t, None, capture_read)
        index = jnp.arange(batch)
        kept = mlstm.MemoryState(
            c=kept.c.at[index, slot_t].set(state.c, mode="drop"),
            n=kept.n.at[index, slot_t].set(state.n, mode="drop"),
            m=kept.m.at[index, slot_t].set(state.m, mode="drop"),
        )
        return (state, kept), None

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    inputs = (q, k, v, projections.input_gate, projections.forget_gate, slot)
    (_, kept), _ = jax.lax.scan(step, (state, kept), tuple(map(time_major, inputs)))
    return kept


def _blocks(params, tokens, config: model_lib.ModelConfig, change_queries=None, positions=None):
    """Logits and per-block traces: ``model.apply`` block by block, each block's q, k, v
    optionally changed by ``change_queries(projections) -> q`` before its memory."""
    batch, length = tokens.shape
    cell_config = config.cell
    reset = jnp.zeros((batch, length), bool)
    history = jnp.zeros((batch, cell_config.conv_kernel_size - 1, cell_config.inner_dim))
    traces = []
    with precision.matmul_precision(cell_config.matmul_precision):
        h = model_lib._embed(params, tokens)
        for block in params["blocks"]:
            cell_params = block["mlstm"]
            x = cell_lib.layer_norm(h, block["norm"]["scale"])
            projections, _ = cell_lib.sequence_projections(
                cell_params, x, cell_config, reset, history
            )
            if change_queries is not None:
                projections = projections._replace(q=change_queries(projections))
            out, _ = cell_lib.memory_sequence(projections, cell_config, reset, None)
            h = h + cell_lib.sequence_output(cell_params, out, projections, cell_config)
            if positions is not None:
                memory = memory_at(projections, cell_config.read, positions)
                f32 = lambda a: a.astype(jnp.float32)
                traces.append(
                    BlockTrace(f32(projections.q), f32(projections.k), f32(projections.v), memory)
                )
        logits = model_lib._head(params, h)
    return logits, traces


@functools.partial(jax.jit, static_argnames="config")
def _trace(params, tokens, config, positions):
    return _blocks(params, tokens, config, positions=positions)


def trace(params, tokens, config: model_lib.ModelConfig, positions):
    """The model's logits and, per block, q, k, v and the memory at ``positions``.

    The forward is ``model.apply``'s (same sequence form and read, so the same logits
    to float32 rounding); the memories come from ``memory_at``.

    Args:
        params: model parameters (one model, no seed axis).
        tokens: (B, T) int tokens.
        config: the model configuration.
        positions: (B, P) int, distinct per sequence; ``NO_POSITION`` pads.

    Returns:
        (logits (B, T, V), list of ``BlockTrace``, one per block).

    Raises:
        ValueError: tokens not (B, T) integer; positions outside [0, T), repeated in a
            sequence, or not (B, P).
    """
    tokens = jnp.asarray(tokens)
    model_lib._check_tokens(tokens, config, 2)
    positions = _check_positions(positions, *tokens.shape, "positions")
    return _trace(params, tokens, config, jnp.asarray(positions))


@functools.partial(jax.jit, static_argnames=("config", "use"))
def _apply_with_queries(params, tokens, config, sources, use):
    def change(projections):
        source = projections.k if use == "key" else projections.q
        gathered = jnp.take_along_axis(source, jnp.maximum(sources, 0)[:, :, None, None], axis=1)
        return jnp.where((sources >= 0)[:, :, None, None], gathered, projections.q)

    return _blocks(params, tokens, config, change_queries=change)[0]


def apply_with_queries(params, tokens, config: model_lib.ModelConfig, sources, *, use="key"):
    """Logits with the query of chosen positions replaced, in every block.

    At each position t with ``sources[b, t] = s ≥ 0`` the block's query q_t becomes the
    same block's key k_s (``use="key"``: the oracle query, in the scale of q, i.e. k
    before the recurrence's 1/√d, so that q·k̂ is k_s's own match) or its query q_s
    (``use="query"``; s = t leaves the model unchanged, a check of the plumbing).
    Everything else is the model's: the gates still see the native q, k, v.

    Args:
        params: model parameters.
        tokens: (B, T) int tokens.
        config: the model configuration.
        sources: (B, T) int, each in [0, t] or ``NO_POSITION`` (q_t kept).
        use: ``"key"`` or ``"query"``.

    Returns:
        logits (B, T, V).

    Raises:
        ValueError: bad shapes, a source after its position, or an unknown ``use``.
    """
    if use not in ("key", "query"):
        raise ValueError(f"use must be 'key' or 'query', got {use!r}.")
    tokens = jnp.asarray(tokens)
    model_lib._check_tokens(tokens, config, 2)
    sources = np.asarray(sources)
    if sources.shape != tokens.shape or not np.issubdtype(sources.dtype, np.integer):
        raise ValueError(f"sources must be integers of shape {tokens.shape}, got {sources.shape}.")
    positions = np.arange(tokens.shape[1])
    if ((sources < NO_POSITION) | (sources > positions)).any():
        raise ValueError(
            f"sources must lie in [0, t] at position t (no query from the future) or be "
            f"{NO_POSITION} (unchanged)."
        )
    return _apply_with_queries(params, tokens, config, jnp.asarray(sources, jnp.int32), use)
