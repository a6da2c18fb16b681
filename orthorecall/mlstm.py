"""The mLSTM matrix-memory recurrence, its single step and two sequence forms.

Per head, with queries q_t, keys k_t, values v_t (width d) and gate
pre-activations ĩ_t, f̃_t (REFERENCE §2.5):

    log f_t = log_sigmoid(f̃_t)
    m_t     = max(log f_t + m_{t-1}, ĩ_t)                 (stabilizer, m_0 = 0)
    C_t     = e^{log f_t + m_{t-1} - m_t} C_{t-1} + e^{ĩ_t - m_t} k̂_t v_tᵀ
    n_t     = e^{log f_t + m_{t-1} - m_t} n_{t-1} + e^{ĩ_t - m_t} k̂_t
    h̃_t     = q_tᵀ R(C_t) / (max(|q_tᵀ n_t|, e^{-m_t}) + 1e-6)

with k̂ = k / √d and R the read (``ReadConfig``): C itself, NS_k(C) or the
polar factor of C. The read is used only for h̃; the state keeps the raw C.

Two mechanism variants of the replication change the recurrence itself:

* the delta write (``ReadConfig.write == "delta"``) erases along the key first:
  C_t = e^{...} (I − k̂_t k̂_tᵀ) C_{t-1} + e^{...} k̂_t v_tᵀ (n, m unchanged);
* the rls read (``ReadConfig.kind == "rls"``) reads with the whitened query
  q'_t = P_t q_t, P_t = (λ Π_s f_s I + Σ_s w_{t,s} k̂_s k̂_sᵀ)⁻¹ with the weights w of
  C_t (so the ridge term decays with the forget gates, as in recursive least
  squares), kept by a Sherman–Morrison update of the stabilized inverse: in the
  stabilized scale A_t = f' A_{t-1} + i' k̂k̂ᵀ, the recursion of C, from A_0 = λI;
  the state holds P̃_t − I/λ (zero for a fresh episode). Then
  h̃_t = q'ᵀC_t / (max(|q'ᵀn_t|, e^{-m_t}) + 1e-6) as for any query.

Neither has a chunk-parallel form here: ``chunkwise_sequence`` runs their recurrence
(steps of one chunk per ``jax.checkpoint``).

Two sequence forms compute the same thing:

* ``recurrent_sequence``: ``lax.scan`` over time of ``memory_step``.
* ``chunkwise_sequence``: ``lax.scan`` over chunks of L positions; inside a
  chunk every position is computed at once from the chunk-start state with
  L x L decay matrices, and the stabilizer is reproduced exactly as the
  recurrence computes it (so the two agree to float32 rounding even for reads
  that are not scale invariant). For a non-raw read, every position reads its
  C_t = (decayed chunk-start memory) + Σ_s decay[t, s] k̂_s v_sᵀ
  (``chunk_read.chunk_read``: on CPU the fused kernel forms each C_t in cache,
  elsewhere one batched product forms all L). The chunk body runs under ``jax.checkpoint``:
  backward keeps the chunk-boundary states and the read's output (B, H, L, d),
  recomputes the rest, and never repeats the read itself.
  On the CPU the raw read runs its recurrence in a fused kernel instead
  (``orthorecall.raw_memory``): the same function, without the chunk's L x L work.

Resets (per batch element and step) mean "this step starts a new episode": the
state is cleared (C, n, m = 0) before the step is processed.

Non-finite values: a NaN in the inputs or the state reaches, in both forms, the
values the recurrence's arithmetic carries it to: later positions of its episode,
never earlier ones and never past a reset (a reset isolates fully). The chunkwise
form treats an inf like a NaN (NaN wherever it could reach; the recurrence gives ±inf,
NaN or, through an infinite normalizer, 0 there) and keeps gradients finite outside
what a bad value reaches. ĩ = -inf (no write) and f̃ = ±inf (f = 0 or 1) are not bad
values: both forms compute them exactly.

Shapes: B batch, T time, H heads, d head width. All state is float32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from orthorecall import chunk_read, chunkwise, gram_read, raw_memory
from orthorecall.reads import RAW, ReadConfig
from orthorecall.validation import check_int

# Added to the normalizer, as in the reference.
DENOMINATOR_EPS = 1e-6
# The one intermediate a chunk keeps for backward besides its boundary state:
# the read qᵀ R(C_t) (B, H, L, d), the expensive part of the forward.
READ_CHECKPOINT_NAME = "mlstm_read"


class MemoryState(NamedTuple):
    """Recurrent state of the memory, float32.

    Attributes:
        c: (B, H, d, d) matrix memory (stabilized: true memory x e^{-m}).
        n: (B, H, d) normalizer (stabilized likewise).
        m: (B, H) log-scale stabilizer.
        p: the rls read's (B, H, d, d) inverse key covariance, stored as P̃ − I/λ (zero
            for a fresh episode); None for every other read.
    """

    c: jax.Array
    n: jax.Array
    m: jax.Array
    p: jax.Array | None = None


def initial_memory_state(
    batch_size: int, num_heads: int, head_dim: int, read: ReadConfig | None = None
) -> MemoryState:
    """The all-zero state of a fresh episode (m_0 = 0), with the rls read's ``p`` when
    ``read`` is rls."""
    for name, value in (
        ("batch_size", batch_size),
        ("num_heads", num_heads),
        ("head_dim", head_dim),
    ):
        check_int(name, value, minimum=1)
    matrices = jnp.zeros((batch_size, num_heads, head_dim, head_dim), jnp.float32)
    return MemoryState(
        c=matrices,
        n=jnp.zeros((batch_size, num_heads, head_dim), jnp.float32),
        m=jnp.zeros((batch_size, num_heads), jnp.float32),
        p=matrices if needs_inverse(read) else None,
    )


def needs_inverse(read: ReadConfig | None) -> bool:
    """Whether the state of ``read`` carries the rls read's ``p``."""
    return read is not None and read.kind == "rls"


def check_reset(reset, shape: tuple[int, ...], layout: str) -> None:
    """A ValueError unless ``reset`` is None or a bool array of ``shape``.

    A reset is per sequence (and step): a (1,) array would broadcast over the
    batch and restart every sequence, and an integer array would let values
    other than 0 and 1 through unchecked under jit, so neither is accepted.

    Args:
        reset: the argument as given (None, a numpy or JAX array, a tracer).
        shape: the shape it must have, e.g. (B,) for a step, (B, T) for a sequence.
        layout: the axes' names for the message, e.g. "(batch,)".

    Raises:
        ValueError: another shape or a dtype other than bool.
    """
    if reset is None:
        return
    shape = tuple(shape)
    if not hasattr(reset, "shape") or not hasattr(reset, "dtype"):
        raise ValueError(
            f"reset must be a bool array of shape {shape} {layout}; got {type(reset).__name__}."
        )
    if tuple(reset.shape) != shape:
        raise ValueError(
            f"reset must have shape {shape} {layout}; got {tuple(reset.shape)}. It holds one "
            "flag per sequence (and step) and is not broadcast: pass it for every sequence."
        )
    if reset.dtype != np.bool_:
        raise ValueError(
            f"reset must be a bool array (true where a new episode starts); got {reset.dtype}. "
            "Convert it first, e.g. reset.astype(bool)."
        )


def _clear(state: MemoryState, reset: jax.Array) -> MemoryState:
    """Zeros the state of the batch elements whose ``reset`` (B,) is true."""
    keep = jnp.logical_not(reset)
    return MemoryState(
        c=jnp.where(keep[:, None, None, None], state.c, 0.0),
        n=jnp.where(keep[:, None, None], state.n, 0.0),
        m=jnp.where(keep[:, None], state.m, 0.0),
        p=None if state.p is None else jnp.where(keep[:, None, None, None], state.p, 0.0),
    )


def _check_inverse_state(state: MemoryState, read: ReadConfig, shape: tuple[int, ...]) -> None:
    if needs_inverse(read) and (state.p is None or state.p.shape != shape):
        have = None if state.p is None else state.p.shape
        raise ValueError(
            f"the rls read keeps P in state.p of shape {shape}, got {have}; make the state "
            "with initial_memory_state(..., read=read) (cell.initial_state does)."
        )
    if not needs_inverse(read) and state.p is not None:
        raise ValueError(
            f"state.p is only kept for the rls read; read={read} needs a state without it "
            "(initial_memory_state(..., read=read))."
        )


def _erase_along_key(c: jax.Array, k: jax.Array) -> jax.Array:
    """(I − k̂k̂ᵀ) C: the delta rule's erasure, for C (..., d, d) and k̂ (..., d)."""
    return c - k[..., :, None] * jnp.einsum("...i,...ij->...j", k, c)[..., None, :]


def _whitening_update(p, k, f_scale, i_scale, ridge):
    """Sherman–Morrison for A_t = f' A_{t-1} + i' k̂k̂ᵀ, with P̃ = A⁻¹ stored as p = P̃ − I/λ.

    P̃_t = (P̃ − i' u uᵀ / (f' + i' k̂ᵀu)) / f' with u = P̃ k̂. f' = 0 (a forget gate of
    exactly 0, or an underflow of its stabilized weight) leaves A singular; P̃ is then
    inf, as the definition has it.
    """
    eye = jnp.eye(p.shape[-1], dtype=p.dtype) / ridge
    inverse = p + eye
    u = jnp.einsum("...ij,...j->...i", inverse, k)
    denominator = f_scale + i_scale * jnp.sum(k * u, axis=-1)
    correction = (i_scale / denominator)[..., None, None] * (u[..., :, None] * u[..., None, :])
    return (inverse - correction) / f_scale[..., None, None] - eye


def _whitened_query(p, q, m, ridge):
    """P_t q with P_t = e^{-m} P̃_t the unstabilized inverse: q' for an rls read."""
    inverse = p + jnp.eye(p.shape[-1], dtype=p.dtype) / ridge
    return jnp.exp(-m)[..., None] * jnp.einsum("...ij,...j->...i", inverse, q)


def _normalized_read(numerator, q_dot_n, m):
    denominator = jnp.maximum(jnp.abs(q_dot_n), jnp.exp(-m)) + DENOMINATOR_EPS
    return numerator / denominator[..., None]


def check_read_mix(read: ReadConfig, read_mix) -> None:
    """A ValueError when a scaffold-anneal mix is given for a read with nothing to mix:
    one that is C itself (raw, delta) or the rls read (whose query is whitened, not C)."""
    if read_mix is not None and (read.is_raw or read.kind == "rls"):
        raise ValueError(
            f"read_mix anneals a read R(C) into the raw read; read={read} has no R(C) to "
            "anneal (use a Newton-Schulz or polar read)."
        )
    if read_mix is not None and jnp.ndim(read_mix) != 0:
        raise ValueError(
            f"read_mix must be a scalar α (vmap over seeds for one α each), got shape "
            f"{jnp.shape(read_mix)}."
        )


def _mixed_with_raw(own: jax.Array, raw, read_mix) -> jax.Array:
    """α·own + (1 − α)·raw() (``raw`` a thunk: computed only under a mix)."""
    if read_mix is None:
        return own
    alpha = jnp.asarray(read_mix, jnp.float32)
    return alpha * own + (1.0 - alpha) * raw()


def memory_step(
    state: MemoryState,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    input_gate: jax.Array,
    forget_gate: jax.Array,
    reset: jax.Array | None,
    read: ReadConfig,
    read_mix: jax.Array | float | None = None,
) -> tuple[jax.Array, MemoryState]:
    """One step of the recurrence.

    Args:
        state: ``MemoryState`` with leading batch B.
        q, k, v: (B, H, d) query, key, value (any float dtype; cast to float32).
        input_gate, forget_gate: (B, H) gate pre-activations ĩ, f̃.
        reset: (B,) bool, or None; true clears the state before this step.
        read: the read applied to C_t.
        read_mix: None, or the scaffold anneal's α (a scalar, ``orthorecall.anneal``):
            the layer reads α·qᵀR(C_t) + (1 − α)·qᵀC_t.

    Returns:
        (h̃ of shape (B, H, d) float32, the new ``MemoryState``).

    Raises:
        ValueError: inconsistent shapes, a reset that is not (B,) bool, or a read_mix
            for a read that is C itself.
    """
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all have shape (batch, heads, head_dim); got "
            f"{q.shape}, {k.shape}, {v.shape}."
        )
    b, h, d = q.shape
    for name, gate in (("input_gate", input_gate), ("forget_gate", forget_gate)):
        if gate.shape != (b, h):
            raise ValueError(f"{name} must have shape {(b, h)}, got {gate.shape}.")
    if state.c.shape != (b, h, d, d):
        raise ValueError(f"state.c must have shape {(b, h, d, d)} to match q, got {state.c.shape}.")
    check_reset(reset, (b,), "(batch,)")
    _check_inverse_state(state, read, (b, h, d, d))
    check_read_mix(read, read_mix)
    if reset is not None:
        state = _clear(state, reset)
    q, k, v, i_pre, f_pre = (x.astype(jnp.float32) for x in (q, k, v, input_gate, forget_gate))
    k = k / math.sqrt(k.shape[-1])
    log_f = jax.nn.log_sigmoid(f_pre)
    m = jnp.maximum(log_f + state.m, i_pre)
    f_scale = jnp.exp(log_f + state.m - m)
    i_scale = jnp.exp(i_pre - m)
    previous = _erase_along_key(state.c, k) if read.write == "delta" else state.c
    c = f_scale[..., None, None] * previous + i_scale[..., None, None] * (
        k[..., :, None] * v[..., None, :]
    )
    n = f_scale[..., None] * state.n + i_scale[..., None] * k
    p = None
    if needs_inverse(read):
        p = _whitening_update(state.p, k, f_scale, i_scale, read.ridge)
        q = _whitened_query(p, q, m, read.ridge)
    numerator = _mixed_with_raw(
        read.retrieve(c, q), lambda: jnp.einsum("...i,...ij->...j", q, c), read_mix
    )
    h = _normalized_read(numerator, jnp.sum(q * n, axis=-1), m)
    return h, MemoryState(c, n, m, p)


def _check_sequence_inputs(q, k, v, input_gate, forget_gate, reset, state, read):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all have shape (batch, time, heads, head_dim); got "
            f"{q.shape}, {k.shape}, {v.shape}."
        )
    b, t, h, d = q.shape
    for name, gate in (("input_gate", input_gate), ("forget_gate", forget_gate)):
        if gate.shape != (b, t, h):
            raise ValueError(f"{name} must have shape {(b, t, h)}, got {gate.shape}.")
    check_reset(reset, (b, t), "(batch, time)")
    if state is not None and state.c.shape != (b, h, d, d):
        raise ValueError(f"state.c must have shape {(b, h, d, d)} to match q, got {state.c.shape}.")
    if state is not None:
        _check_inverse_state(state, read, (b, h, d, d))


def recurrent_sequence(
    q,
    k,
    v,
    input_gate,
    forget_gate,
    *,
    read: ReadConfig,
    reset: jax.Array | None = None,
    state: MemoryState | None = None,
    read_mix: jax.Array | float | None = None,
) -> tuple[jax.Array, MemoryState]:
    """The recurrence over a sequence, one ``memory_step`` per position.

    Args:
        q, k, v: (B, T, H, d).
        input_gate, forget_gate: (B, T, H) pre-activations.
        read: the read.
        reset: optional (B, T) bool; true at t clears the state before step t.
        state: optional initial ``MemoryState``; zeros when None.
        read_mix: None, or the scaffold anneal's α (``memory_step``).

    Returns:
        (h̃ (B, T, H, d) float32, final ``MemoryState``).

    Raises:
        ValueError: inconsistent shapes, or a reset that is not (B, T) bool.
    """
    _check_sequence_inputs(q, k, v, input_gate, forget_gate, reset, state, read)
    check_read_mix(read, read_mix)
    b, t, h, d = q.shape
    if state is None:
        state = initial_memory_state(b, h, d, read)
    if reset is None:
        reset = jnp.zeros((b, t), bool)
    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, input_gate, forget_gate, reset)]

    def body(carry, xs):
        q_t, k_t, v_t, i_t, f_t, r_t = xs
        out, carry = memory_step(carry, q_t, k_t, v_t, i_t, f_t, r_t, read, read_mix)
        return carry, out

    final, outs = jax.lax.scan(body, state, time_major)
    return jnp.moveaxis(outs, 0, 1), final


def _prepared_inputs(q, k, v, input_gate, forget_gate, reset):
    """float32 q, k/√d, v, log f, ĩ and a bool reset (all False when None)."""
    b, t, _, d = q.shape
    if reset is None:
        reset = jnp.zeros((b, t), bool)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k = k / math.sqrt(d)
    log_f = jax.nn.log_sigmoid(forget_gate.astype(jnp.float32))
    return q, k, v, log_f, input_gate.astype(jnp.float32), reset


def _padded_in_time(q, k, v, log_f, i_pre, reset, length: int):
    """Prepared inputs padded in time to ``length`` with identity steps (f = 1, i = 0:
    the state is unchanged) whose outputs are dropped."""
    pad = length - q.shape[1]
    if not pad:
        return q, k, v, log_f, i_pre, reset
    time_pad = lambda x, value: jnp.pad(
        x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value
    )
    q, k, v = (time_pad(x, 0.0) for x in (q, k, v))
    return (
        q,
        k,
        v,
        time_pad(log_f, 0.0),
        time_pad(i_pre, chunkwise.LOG_ZERO),
        time_pad(reset, False),
    )


def _padded_inputs(q, k, v, input_gate, forget_gate, reset, length: int):
    """``_prepared_inputs`` padded in time to ``length`` (``_padded_in_time``)."""
    return _padded_in_time(*_prepared_inputs(q, k, v, input_gate, forget_gate, reset), length)


def _gram_step(carry, xs, steps):
    """One step of ``gram_sequence``: C, n, m as the recurrence updates them, G = CᵀC by
    its rank-two update, and h̃ read through G."""
    c, g, n, m = carry
    q_t, k_t, v_t, log_f_t, i_t, reset_t = xs
    keep = jnp.logical_not(reset_t)
    c = jnp.where(keep[:, None, None, None], c, 0.0)
    g = jnp.where(keep[:, None, None, None], g, 0.0)
    n = jnp.where(keep[:, None, None], n, 0.0)
    m = jnp.where(keep[:, None], m, 0.0)
    m_new = jnp.maximum(log_f_t + m, i_t)
    f_scale = jnp.exp(log_f_t + m - m_new)
    i_scale = jnp.exp(i_t - m_new)
    g = gram_read.gram_update(g, c, k_t, v_t, f_scale, i_scale)
    c = f_scale[..., None, None] * c + i_scale[..., None, None] * (
        k_t[..., :, None] * v_t[..., None, :]
    )
    n = f_scale[..., None] * n + i_scale[..., None] * k_t
    memory_t_query = jnp.einsum("...ki,...k->...i", c, q_t)
    numerator = gram_read.gram_read(g, memory_t_query, steps)
    return (c, g, n, m_new), _normalized_read(numerator, jnp.sum(q_t * n, axis=-1), m_new)


def gram_sequence(
    q,
    k,
    v,
    input_gate,
    forget_gate,
    *,
    read: ReadConfig,
    reset: jax.Array | None = None,
    state: MemoryState | None = None,
    chunk_size: int | None = None,
    read_mix: jax.Array | float | None = None,
) -> tuple[jax.Array, MemoryState]:
    """The recurrence carrying G_t = C_tᵀC_t beside C_t, read through G (``gram_read``).

    Same function as ``recurrent_sequence`` (to float32 rounding) for a read that
    ``gram_read.gram_steps`` accepts (cubic NS_k, 1 <= k <= 6): each step updates C, n, m
    as the recurrence does and G by the rank-two ``gram_update`` (O(d²)), and reads
    NS_k(C_t)ᵀq_t from G_t and C_tᵀq_t with (3^k - 1) / 2 matrix-vector products: no
    d x d product anywhere after the first step's G_0 = C_0ᵀC_0. Steps run one after
    another (parallelism comes from batch x heads); for training, every ``chunk_size``
    steps are one ``jax.checkpoint``, so backward keeps a state per chunk and recomputes
    the steps of one chunk at a time.

    Args and returns: as ``chunkwise_sequence`` (``chunk_size``: steps per checkpoint,
    default 64).

    Raises:
        ValueError: inconsistent shapes, a bad chunk size, or a read without a Gram form.
    """
    _check_sequence_inputs(q, k, v, input_gate, forget_gate, reset, state, read)
    steps = read.gram_steps()
    if read_mix is not None:
        raise ValueError(
            "gram_sequence reads NS_k(C) alone; the scaffold anneal's read_mix needs the "
            "chunkwise or recurrent form."
        )
    if steps is None:
        raise ValueError(
            f"read {read} has no Gram form (cubic Newton-Schulz with 1 to "
            f"{gram_read.MAX_GRAM_ITERATIONS} iterations); use recurrent_sequence or "
            "chunkwise_sequence."
        )
    chunk_size = check_int("chunk_size", 64 if chunk_size is None else chunk_size, minimum=1)
    b, t, h, d = q.shape
    if state is None:
        state = initial_memory_state(b, h, d, read)
    size = min(chunk_size, t)
    num_chunks = -(-t // size)
    q, k, v, log_f, i_pre, reset = _padded_inputs(
        q, k, v, input_gate, forget_gate, reset, num_chunks * size
    )

    step = functools.partial(_gram_step, steps=steps)

    def chunk(carry, xs):
        return jax.lax.scan(step, carry, xs)

    # (B, T, ...) -> (num_chunks, L, B, ...)
    to_chunks = lambda x: jnp.moveaxis(x, 1, 0).reshape((num_chunks, size, b) + x.shape[2:])
    xs = tuple(to_chunks(x) for x in (q, k, v, log_f, i_pre, reset))
    gram = jnp.einsum("...ki,...kj->...ij", state.c, state.c)
    carry = (state.c, gram, state.n, state.m)
    (c, _, n, m), outs = jax.lax.scan(jax.checkpoint(chunk, prevent_cse=False), carry, xs)
    outs = jnp.moveaxis(outs.reshape((num_chunks * size, b, h, d)), 0, 1)
    return outs[:, :t], MemoryState(c, n, m)


def _checkpointed_recurrence(
    q, k, v, input_gate, forget_gate, read, reset, state, chunk_size, read_mix
):
    """``memory_step`` after ``memory_step``, every ``chunk_size`` steps one
    ``jax.checkpoint`` (backward keeps a state per chunk): the sequence form of the
    variants without a chunk-parallel one (``ReadConfig.has_chunkwise_form``)."""
    b, t = q.shape[:2]
    size = min(chunk_size, t)
    num_chunks = -(-t // size)
    if reset is None:
        reset = jnp.zeros((b, t), bool)
    pad = num_chunks * size - t
    # Identity steps (f = 1, i = 0, zero q, k, v) after the end; their outputs are dropped.
    padded = lambda x, value: jnp.pad(
        x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value
    )
    inputs = (
        padded(q, 0),
        padded(k, 0),
        padded(v, 0),
        padded(input_gate, -jnp.inf),
        padded(forget_gate, jnp.inf),
        padded(reset, False),
    )
    # (B, T, ...) -> (num_chunks, L, B, ...)
    to_chunks = lambda x: jnp.moveaxis(x, 1, 0).reshape((num_chunks, size, b) + x.shape[2:])

    def step(carry, xs):
        out, carry = memory_step(carry, *xs, read, read_mix)
        return carry, out

    chunk = lambda carry, xs: jax.lax.scan(step, carry, xs)
    final, outs = jax.lax.scan(
        jax.checkpoint(chunk, prevent_cse=False), state, tuple(map(to_chunks, inputs))
    )
    outs = jnp.moveaxis(outs.reshape((num_chunks * size,) + outs.shape[2:]), 0, 1)
    return outs[:, :t], final


def default_chunk_size(read: ReadConfig, backend: str | None = None) -> int:
    """The chunk length to use for ``read`` on ``backend`` (default: JAX's).

    Forming C_t for every position costs O(L d²) per position, so a non-raw
    read wants short chunks; the raw read never forms C_t and wants longer
    ones. Measured on the 2-core CPU (NS5 training step, v80/s512, batch 16),
    with the fused chunk read: chunk 8/16/32 gave 6,800/6,460/5,790 tokens/s and the
    evaluation forward 8/16/32/64 22.2k/22.9k/21.1k/18.4k (before it, with XLA forming
    the memories: train 8/16/32/64/128 2,840/3,140/2,800/2,360/1,480); raw:
    16/32/64 gave 26.8k/29.5k/29.1k. Accelerators have not been timed; there a
    non-raw read runs as XLA arrays, about 22 d x d arrays per position of a chunk
    for NS5's backward (``footprint``), so it gets 16 there too, for memory (the
    published study's step: 136 GiB estimated with chunks of 16, 222 with 64).
    """
    del backend  # The same choice everywhere, for speed on CPU and memory elsewhere.
    return 64 if read.is_raw else 16


def chunkwise_sequence(
    q,
    k,
    v,
    input_gate,
    forget_gate,
    *,
    read: ReadConfig,
    reset: jax.Array | None = None,
    state: MemoryState | None = None,
    chunk_size: int | None = None,
    read_mix: jax.Array | float | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, MemoryState]:
    """The same function as ``recurrent_sequence``, chunk by chunk.

    ``chunk_size`` need not divide T: the tail is padded with identity steps
    (forget 1, input 0) that leave the state unchanged and are dropped.

    On the CPU the raw read (additive write) runs its recurrence in a fused kernel
    instead (``orthorecall.raw_memory``; ``chunk_size`` is then the number of steps
    between the states it keeps for backward): the same function, a fraction of the
    chunk form's time there. A read that mixes in (``read_mix``) or swaps with
    (straight-through) the raw read then combines the two reads' normalized outputs.

    Args and returns: as ``recurrent_sequence`` (``read_mix`` included), plus
    ``chunk_size`` (>= 1, or None for ``default_chunk_size(read)``) and
    ``implementation``: "auto" (the kernel where ``raw_memory.applies``) or "xla" (the
    chunk form everywhere).

    Raises:
        ValueError: inconsistent shapes, a bad chunk size or an unknown implementation.
    """
    _check_sequence_inputs(q, k, v, input_gate, forget_gate, reset, state, read)
    check_read_mix(read, read_mix)
    if implementation not in ("auto", "xla"):
        raise ValueError(f'implementation must be "auto" or "xla", got {implementation!r}.')
    if chunk_size is None:
        chunk_size = default_chunk_size(read)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    b, _, h, d = q.shape
    if state is None:
        state = initial_memory_state(b, h, d, read)
    if not read.has_chunkwise_form:
        return _checkpointed_recurrence(
            q, k, v, input_gate, forget_gate, read, reset, state, chunk_size, read_mix
        )
    raw_beside = read_mix is not None or read.straight_through != "none"
    if implementation == "auto" and raw_beside and raw_memory.applies(RAW):
        return _beside_the_raw_kernel(
            q, k, v, input_gate, forget_gate, read, reset, state, chunk_size, read_mix
        )
    inputs = _prepared_inputs(q, k, v, input_gate, forget_gate, reset)
    scan = functools.partial(_chunk_scan, read=read, chunk_size=chunk_size, read_mix=read_mix)
    if implementation == "auto" and raw_memory.applies(read):
        # The states saved for backward: one per chunk_size steps, no more than T apart.
        interval = max(1, min(chunk_size, q.shape[1]))
        outs = raw_memory.sequence(
            *inputs, state.c, state.n, state.m, interval=interval, fallback=scan
        )
    else:
        outs = scan(*inputs, state.c, state.n, state.m)
    h, c, n, m = outs
    return h, MemoryState(c, n, m, state.p)


def _beside_the_raw_kernel(
    q, k, v, input_gate, forget_gate, read, reset, state, chunk_size, read_mix
):
    """A read that mixes (``read_mix``) or swaps (straight-through) in the raw read, where
    the raw read runs in the CPU kernel: the own read's and the raw read's outputs, each
    computed (and normalized) as that read alone computes it, combined after the
    normalization, which they share. So α = 1 is the read's output and α = 0 the raw
    read's, bit for bit, and a straight-through half's value is exactly one read's."""
    run = lambda r: chunkwise_sequence(
        q, k, v, input_gate, forget_gate, read=r, reset=reset, state=state, chunk_size=chunk_size
    )
    own, end = run(read.own_read)
    raw, _ = run(RAW)
    h = read.combine_straight_through(own, raw)
    return _mixed_with_raw(h, lambda: raw, read_mix), end


def _chunk_scan(q, k, v, log_f, i_pre, reset, c0, n0, m0, *, read, chunk_size, read_mix):
    """``chunkwise_sequence``'s chunk form on prepared inputs (``_prepared_inputs``):
    h and the end state's (C, n, m)."""
    b, t, h, d = q.shape
    size = min(chunk_size, t)
    num_chunks = -(-t // size)
    q, k, v, log_f, i_pre, reset = _padded_in_time(q, k, v, log_f, i_pre, reset, num_chunks * size)

    def to_chunks(x):
        # (B, T, ...) -> (num_chunks, B, L, ...): whole chunks of time moved, each
        # position's (H, d) block kept in place. Putting the heads before time here
        # would be a full transpose of q, k and v, which on the CPU cost more than the
        # chunk arithmetic (XLA then copied each one twice); inside a chunk the same
        # transpose is a few hundred KiB in cache.
        return jnp.moveaxis(x.reshape((b, num_chunks, size) + x.shape[2:]), 1, 0)

    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, L, H, ...) -> (B, H, L, ...)

    def chunk_step(carry, chunk):
        q, k, v, log_f, i_pre, reset = chunk
        chunk = (*map(heads_first, (q, k, v, log_f, i_pre)), reset)
        carry, out = _chunk(carry, chunk, read, read_mix)
        return carry, heads_first(out)

    body = jax.checkpoint(
        chunk_step,
        prevent_cse=False,
        policy=jax.checkpoint_policies.save_only_these_names(READ_CHECKPOINT_NAME),
    )
    xs = tuple(map(to_chunks, (q, k, v, log_f, i_pre, reset)))
    final, outs = jax.lax.scan(body, MemoryState(c0, n0, m0), xs)
    # (num_chunks, B, L, H, d) -> (B, T, H, d)
    outs = jnp.moveaxis(outs, 0, 1).reshape(b, num_chunks * size, h, d)
    return outs[:, :t], final.c, final.n, final.m


def _chunk(state: MemoryState, chunk, read: ReadConfig, read_mix=None):
    """All positions of one chunk from the chunk-start state, and the state at its end
    (the scan body of a non-raw read).

    chunk: q, k̂, v (B, H, L, d); log_f, ĩ (B, H, L); reset (B, L). Non-finite values
    are contained as ``chunkwise`` describes.
    """
    q, k, v, log_f, i_pre, reset = chunk
    geo = chunkwise.geometry(log_f, i_pre, reset)
    faults = chunkwise.output_faults(
        q, k, v, log_f, i_pre, geo.segment_start, per_column=read.is_raw
    )
    end_faults = chunkwise.end_faults(k, v, log_f, i_pre, geo.segment_start, geo.carries_in)
    q, k, v = (chunkwise.finite_or_zero(x) for x in (q, k, v))
    c0, n0, m0 = chunkwise.sanitized_state(state.c, state.n, state.m)

    m = chunkwise.stabilizer(geo, m0)  # (B, H, L)
    decay = jnp.exp(geo.log_decay - m[..., None])  # (B, H, L, L)
    state_scale = chunkwise.state_scale(geo, m0, m)
    n = state_scale[..., None] * n0[:, :, None, :] + jnp.matmul(decay, k)  # (B, H, L, d)
    # qᵀC_t at every position, C_t never formed: (B, H, L, d).
    raw_read = lambda: (
        jnp.matmul(jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * decay, v)
        + state_scale[..., None] * jnp.matmul(q, c0)
    )
    if read.is_raw:
        numerator = raw_read()
    else:
        # R(C_t)ᵀq_t with C_t = state part + Σ_s decay[t, s] k̂_s v_sᵀ (formed inside the
        # CPU kernel, as one batched product elsewhere). Saved through the chunk's
        # checkpoint: backward then needs only the read's VJP, not a second forward read.
        numerator = checkpoint_name(
            chunk_read.chunk_read(c0, state_scale, decay, k, v, q, read.own_read),
            READ_CHECKPOINT_NAME,
        )
        if read.straight_through != "none":
            numerator = read.combine_straight_through(numerator, raw_read())
        numerator = _mixed_with_raw(numerator, raw_read, read_mix)
    h = _normalized_read(numerator, jnp.sum(q * n, axis=-1), m)
    bad_h = chunkwise.bad_outputs(faults, geo.carries_in, state.c, state.n, state.m, read.is_raw)

    last_weights = decay[..., -1, :]  # (B, H, L)
    last_c = state_scale[..., -1, None, None] * c0 + jnp.matmul(
        jnp.swapaxes(k * last_weights[..., None], -1, -2), v
    )
    end = chunkwise.end_state(
        end_faults, state.c, state.n, state.m, last_c, n[:, :, -1], m[..., -1]
    )
    return MemoryState(*end), jnp.where(bad_h, jnp.nan, h)
