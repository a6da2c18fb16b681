"""The algebra of one chunk of the chunkwise mLSTM (``mlstm.chunkwise_sequence``).

A chunk of L positions is computed from the state at its start, (c₀, n₀, m₀). What the
gates and resets alone decide comes first (``geometry``): the segments that resets cut
the chunk into, the log-decay from every source s to every target t, and how much of
the start state still reaches t. The stabilizer m_t follows exactly as the recurrence
computes it (``stabilizer``): the running max of the carried-in log-scale and every
source's log-weight, so the two forms agree to float32 rounding even for reads that are
not scale invariant.

Non-finite values (``output_faults``, ``bad_outputs``, ``end_faults``, ``end_state``).
The L x L products mix every position of the chunk with every other, and a masked entry
is an exact 0, but 0 x NaN = NaN: a NaN or inf anywhere in the chunk would reach earlier
positions and later episodes. So the arithmetic runs on sanitized values (bad ones
replaced by 0, the result for finite inputs bit for bit unchanged), and NaN is put back
with ``jnp.where`` where the recurrence would have it (were every bad value a NaN): a
bad q at its own position; a bad k, v, gate or carried-in state from its position (or
the chunk start) up to the next reset. Selecting rather than multiplying also keeps
backward clean: the poisoned positions pass a zero cotangent to finite arithmetic, so
gradients of other episodes stay finite. A forget gate of exactly -inf (f = 0) forgets
as in the recurrence: its prefix sum would be -inf - (-inf), so it is treated as a
boundary of the decay matrix instead.

Arrays are (B, H, L, ...) for one chunk: q, k̂, v (B, H, L, d); log f, ĩ (B, H, L);
reset (B, L); c₀ (B, H, d, d), n₀ (B, H, d), m₀ (B, H).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Stands in for log(0) in masked decay entries: finite, so gradients through
# the masks stay finite, and exp(LOG_ZERO - m) underflows to exactly 0.
LOG_ZERO = -1e30


class Geometry(NamedTuple):
    """What a chunk's gates and resets decide before any state is known.

    Attributes:
        segment_start: (B, L) the first position of t's segment (0 before any reset).
        carries_in: (B, 1, L) whether t is in the chunk's first segment, which the
            start state reaches.
        cum_log_f: (B, H, L) F_t, the prefix sums of log f.
        log_decay: (B, H, L, L) log of the weight of source s at target t (before the
            stabilizer), LOG_ZERO outside t's segment, after t, or across an f = 0.
        carried_base: (B, H, L) log-scale of the start state at t, less m₀; -inf where
            an f = 0 since the chunk start erased it.
        forgotten: (B, H, L) whether such an f = 0 came since t's segment start.
    """

    segment_start: jax.Array
    carries_in: jax.Array
    cum_log_f: jax.Array
    log_decay: jax.Array
    carried_base: jax.Array
    forgotten: jax.Array


def running_max(x: jax.Array, axis: int) -> jax.Array:
    """``lax.cummax(x, axis)`` in O(L√L) work instead of O(L²).

    XLA lowers cummax to a reduce_window as wide as the axis: at L = 64 on a
    (16, 4, 8, 64, 48) array it took 5.6 ms on the 2-core CPU, this 0.9 ms. The axis is
    cut into blocks of about √L: a cummax within each block, one across the blocks'
    maxima, and the two combined (max is exact, so the result is identical).
    """
    axis = axis % x.ndim
    length = x.shape[axis]
    block = max(1, math.isqrt(length))
    if block <= 2:
        return jax.lax.cummax(x, axis=axis)
    num_blocks = -(-length // block)
    lowest = jnp.array(
        -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min, x.dtype
    )
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, num_blocks * block - length)
    blocks = jnp.pad(x, pad, constant_values=lowest).reshape(
        x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1 :]
    )
    within = jax.lax.cummax(blocks, axis=axis + 1)
    block_max = jax.lax.index_in_dim(within, block - 1, axis=axis + 1, keepdims=False)
    before = jax.lax.cummax(block_max, axis=axis)
    shift = [(0, 0)] * before.ndim
    shift[axis] = (1, 0)
    before = jax.lax.slice_in_dim(
        jnp.pad(before, shift, constant_values=lowest), 0, num_blocks, axis=axis
    )
    combined = jnp.maximum(within, jnp.expand_dims(before, axis + 1))
    combined = combined.reshape(x.shape[:axis] + (num_blocks * block,) + x.shape[axis + 1 :])
    return jax.lax.slice_in_dim(combined, 0, length, axis=axis)


def finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def nan_or_inf(x: jax.Array) -> jax.Array:
    """NaN or +inf: -inf is a legitimate log-scale (ĩ = -inf writes nothing, m₀ = -inf
    holds nothing)."""
    return ~(x < jnp.inf)


def sanitized_gates(log_f: jax.Array, i_pre: jax.Array) -> tuple[jax.Array, jax.Array]:
    return finite_or_zero(log_f), jnp.where(nan_or_inf(i_pre), 0.0, i_pre)


def sanitized_state(c, n, m):
    return finite_or_zero(c), finite_or_zero(n), jnp.where(nan_or_inf(m), 0.0, m)


def geometry(log_f: jax.Array, i_pre: jax.Array, reset: jax.Array) -> Geometry:
    """The chunk's ``Geometry`` from its raw gates (log f, ĩ) and resets; the gates are
    sanitized here, their faults are ``output_faults``' business."""
    size = log_f.shape[-1]
    positions = jnp.arange(size)
    # Within-chunk segments: a reset at s starts segment s' = #resets <= s.
    segment = jnp.cumsum(reset.astype(jnp.int32), axis=-1)  # (B, L)
    carries_in = (segment == 0)[:, None, :]
    segment_start = running_max(jnp.where(reset, positions, 0), axis=1)
    # f = 0 (log f = -inf) at u cuts the decay from every source before u.
    closed = log_f == -jnp.inf
    closed_count = jnp.cumsum(closed.astype(jnp.int32), axis=-1)
    log_f, i_pre = sanitized_gates(log_f, i_pre)

    cum_log_f = jnp.cumsum(log_f, axis=-1)  # F_t
    before = jnp.pad(cum_log_f, [(0, 0), (0, 0), (1, 0)])[..., :-1]  # F_{t-1}
    f_before_start = jnp.take_along_axis(
        before, jnp.broadcast_to(segment_start[:, None, :], before.shape), axis=-1
    )
    log_decay = cum_log_f[..., :, None] - cum_log_f[..., None, :] + i_pre[..., None, :]
    same_segment = segment[:, :, None] == segment[:, None, :]
    causal = positions[:, None] >= positions[None, :]
    not_closed = closed_count[..., :, None] == closed_count[..., None, :]
    valid = (causal & same_segment)[:, None] & not_closed  # (B, H, L, L)
    log_decay = jnp.where(valid, log_decay, LOG_ZERO)
    forgotten = since_segment_start(closed, segment_start)
    carried_base = jnp.where(forgotten, -jnp.inf, cum_log_f - f_before_start)
    return Geometry(segment_start, carries_in, cum_log_f, log_decay, carried_base, forgotten)


def since_segment_start(flag: jax.Array, segment_start: jax.Array) -> jax.Array:
    """Whether ``flag`` (B, H, L, ...) held at some position of t's segment up to t."""
    trailing = (1,) * (flag.ndim - 3)
    positions = jnp.arange(flag.shape[2]).reshape((1, 1, -1) + trailing)
    # The last flagged position so far, compared with the segment's first.
    last = running_max(jnp.where(flag, positions, -1), axis=2)
    return last >= segment_start.reshape(segment_start.shape[:1] + (1, -1) + trailing)


def carried_log_scale(geo: Geometry, m0: jax.Array) -> jax.Array:
    """(B, H, L) the log-scale of the (sanitized) start state m₀ at every position."""
    return jnp.where(
        geo.forgotten,
        -jnp.inf,
        geo.carried_base + jnp.where(geo.carries_in, m0[..., None], 0.0),
    )


def stabilizer(geo: Geometry, m0: jax.Array) -> jax.Array:
    """m_t (B, H, L) exactly as the recurrence computes it."""
    return jnp.maximum(carried_log_scale(geo, m0), jnp.max(geo.log_decay, axis=-1))


def state_scale(geo: Geometry, m0: jax.Array, m: jax.Array) -> jax.Array:
    """(B, H, L) the weight of the start state at every position, stabilized by m."""
    return jnp.where(
        geo.carries_in & ~geo.forgotten, jnp.exp(geo.cum_log_f + m0[..., None] - m), 0.0
    )


class Faults(NamedTuple):
    """Where the recurrence's values would be NaN (or inf), from the chunk's own inputs
    (the start state's part is added by ``bad_outputs``).

    The recurrence's stabilizer m turns NaN from a NaN gate (log f NaN, ĩ NaN or +inf)
    or a bad m₀, and then so does everything; feature i of n from feature i of a key or
    of n₀; entry (i, j) of C from feature i of a key, feature j of a value or entry
    (i, j) of C₀. The raw read keeps that column structure (qᵀC_{:, j} is NaN iff
    column j is); every other read mixes all entries, and a NaN in q·n (the normalizer)
    reaches all of h̃.
    """

    bad_m: jax.Array  # (B, H, L) gates
    bad_key: jax.Array  # (B, H, L) some feature of a key since the segment start
    bad_value: jax.Array  # (B, H, L, d), or (B, H, L, 1) when only "any" matters
    bad_query: jax.Array  # (B, H, L) some feature of q_t itself


def output_faults(q, k, v, log_f, i_pre, segment_start, per_column: bool) -> Faults:
    """The ``Faults`` of every position, from the unsanitized q, k̂, v and gates.

    ``per_column``: keep the value faults per column (the raw read), else any column.
    """
    since_start = lambda flag: since_segment_start(flag, segment_start)
    not_finite = lambda x: ~jnp.isfinite(x)
    bad_value = not_finite(v)
    if not per_column:
        bad_value = jnp.any(bad_value, axis=-1, keepdims=True)
    return Faults(
        bad_m=since_start(jnp.isnan(log_f) | nan_or_inf(i_pre)),
        bad_key=since_start(jnp.any(not_finite(k), axis=-1)),
        bad_value=since_start(bad_value),
        bad_query=jnp.any(not_finite(q), axis=-1),
    )


def bad_outputs(faults: Faults, carries_in, c0, n0, m0, raw: bool) -> jax.Array:
    """(B, H, L, d or 1): where h̃ is NaN, given the unsanitized start state."""
    from_state = lambda flags: carries_in[..., None] & flags[:, :, None]  # (B,H,d)->(B,H,L,d)
    bad_m = faults.bad_m | (carries_in & nan_or_inf(m0)[..., None])
    bad_n = bad_m | faults.bad_key | (carries_in & jnp.any(~jnp.isfinite(n0), axis=-1)[..., None])
    bad_columns = (
        (bad_m | faults.bad_key)[..., None]
        | faults.bad_value
        | from_state(jnp.any(~jnp.isfinite(c0), axis=-2))
    )
    if not raw:
        bad_columns = jnp.any(bad_columns, axis=-1, keepdims=True)
    return (faults.bad_query | bad_n)[..., None] | bad_columns


class EndFaults(NamedTuple):
    """The chunk's own faults at its last position (before the start state's)."""

    bad_m: jax.Array  # (B, H)
    bad_key: jax.Array  # (B, H, d) per feature
    bad_value: jax.Array  # (B, H, d) per feature
    carries_in: jax.Array  # (B, 1): whether the last position still sees the start state


def end_faults(k, v, log_f, i_pre, segment_start, carries_in) -> EndFaults:
    """``EndFaults`` from the unsanitized k̂, v and gates: any bad value since the last
    position's segment start (a reduction, no running max)."""
    positions = jnp.arange(log_f.shape[-1])
    in_last = (positions >= segment_start[:, -1:])[:, None, :]  # (B, 1, L)
    any_in_last = lambda flag: jnp.any(flag & in_last[..., None], axis=2)
    return EndFaults(
        bad_m=jnp.any((jnp.isnan(log_f) | nan_or_inf(i_pre)) & in_last, axis=-1),
        bad_key=any_in_last(~jnp.isfinite(k)),
        bad_value=any_in_last(~jnp.isfinite(v)),
        carries_in=carries_in[..., -1],
    )


def end_state(faults: EndFaults, c0, n0, m0, c_end, n_end, m_end):
    """(c, n, m) at the chunk's end, NaN where the recurrence's would be; c0, n0, m0 the
    unsanitized start state."""
    carries = faults.carries_in  # (B, 1)
    bad_m = faults.bad_m | (carries & nan_or_inf(m0))
    bad_n = bad_m[..., None] | faults.bad_key | (carries[..., None] & ~jnp.isfinite(n0))
    bad_c = (
        bad_m[..., None, None]
        | faults.bad_key[..., :, None]
        | faults.bad_value[..., None, :]
        | (carries[..., None, None] & ~jnp.isfinite(c0))
    )
    return (
        jnp.where(bad_c, jnp.nan, c_end),
        jnp.where(bad_n, jnp.nan, n_end),
        jnp.where(bad_m, jnp.nan, m_end),
    )
