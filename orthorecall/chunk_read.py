"""The read at every position of a chunk from the chunk-start memory.

The chunkwise mLSTM (``mlstm.chunkwise_sequence``) reads, at each position t of a
chunk of L, h_t = R(C_t)ᵀ q_t with

    C_t = scale_t C0 + Σ_s decay[t, s] k_s v_sᵀ,

C0 the memory at the chunk's start and decay the chunk's L x L (causal, stabilized)
decay matrix. ``chunk_read`` computes that. On the CPU backend, for Newton–Schulz
reads, a fused kernel (``cpu_kernel.chunk_read_forward``) forms each C_t in cache,
reads it and drops it, forward and backward: formed by XLA, the L memories of every
batch element and head go to memory and back, and that traffic cost as much as the
reads (0.77 s of a 1.78 s NS5 training step at v80/s512, batch 16, on 2 cores).
On NVIDIA GPUs (``"auto"``, Newton–Schulz reads the Pallas kernels take) the Pallas
chunk read (``orthorecall.pallas_chunk_read``) forms each C_t on chip, forward and
backward. Elsewhere (TPU, other reads, ``implementation="xla"``) it forms all L memories
with one batched product and reads them with ``ReadConfig.retrieve``; all compute the
same function to float32 rounding, with the same gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from orthorecall import cpu_kernel, newton_schulz, pallas_chunk_read, precision
from orthorecall.reads import RAW, ReadConfig

IMPLEMENTATIONS = ("auto", "xla")


def chunk_memories(memory, scale, decay, keys, values):
    """C_t = scale_t C0 + Σ_s decay[t, s] k_s v_sᵀ for every t: (..., L, d, d)."""
    weighted_keys = decay[..., :, :, None] * keys[..., None, :, :]  # (..., L, L, d)
    return scale[..., None, None] * memory[..., None, :, :] + jnp.matmul(
        jnp.swapaxes(weighted_keys, -1, -2), values[..., None, :, :]
    )


def chunk_read(
    memory: jax.Array,
    scale: jax.Array,
    decay: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    queries: jax.Array,
    read: ReadConfig,
    *,
    implementation: str = "auto",
) -> jax.Array:
    """h_t = R(C_t)ᵀ q_t at every position of a chunk (see the module docstring).

    Args:
        memory: C0, (..., d, d).
        scale: (..., L), the weight of C0 in each C_t.
        decay: (..., L, L), the weight of source s in C_t.
        keys, values, queries: (..., L, d).
        read: the read R.
        implementation: ``"auto"`` (the fused CPU kernel where it applies: Newton–Schulz
            reads on the CPU backend) or ``"xla"`` (form the memories, then read).

    Returns:
        float32 (..., L, d).

    Raises:
        ValueError: inconsistent shapes or an unknown implementation.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not known; use one of {IMPLEMENTATIONS}."
        )
    batch, length, d = queries.shape[:-2], queries.shape[-2], queries.shape[-1]
    expected = {
        "memory": (memory, batch + (d, d)),
        "scale": (scale, batch + (length,)),
        "decay": (decay, batch + (length, length)),
        "keys": (keys, batch + (length, d)),
        "values": (values, batch + (length, d)),
    }
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(
                f"chunk_read: {name} must have shape {shape} for queries of shape "
                f"{queries.shape} (..., L, d), got {array.shape}."
            )
    if not read.has_chunkwise_form:
        raise ValueError(
            f"chunk_read forms C_t by the additive write and reads it alone; read={read} "
            "(a delta write or the rls read) has no such form (orthorecall.mlstm runs its "
            "recurrence)."
        )
    if read.straight_through != "none":
        own, raw = (
            chunk_read(
                memory, scale, decay, keys, values, queries, r, implementation=implementation
            )
            for r in (read.own_read, RAW)
        )
        return read.combine_straight_through(own, raw)
    operands = tuple(x.astype(jnp.float32) for x in (memory, scale, decay, keys, values, queries))
    if implementation == "auto" and read.implementation() == "cpu_kernel":
        return _fused(*operands, read, precision.current())
    if implementation == "auto" and _pallas_applies(read, length, d):
        return _pallas(*operands, read, precision.current())
    # Elsewhere on GPUs ("auto") the formed memories are read by newton_schulz_read's
    # Pallas kernel.
    return _formed_read(*operands, read=read, ns_implementation=implementation)


def _pallas_applies(read: ReadConfig, length: int, d: int) -> bool:
    """Whether the Pallas chunk read (``pallas_chunk_read``) runs: where the Pallas NS
    read would (NVIDIA GPUs, d and precision it takes), for chunks up to its
    ``MAX_CHUNK``, and, in a GPU process, once its kernels are known to build (if not,
    a warning, and the formed memories)."""
    if read.kind != "newton_schulz" or length > pallas_chunk_read.MAX_CHUNK:
        return False
    if newton_schulz.read_implementation(read.num_iterations, read.coefficients, width=d) != (
        "pallas_gpu"
    ):
        return False
    if newton_schulz._process_backend() != "gpu":
        return True
    failure = pallas_chunk_read.compile_failure(_steps(read), d, length, precision.current())
    return failure is None


def _formed_read(memory, scale, decay, keys, values, queries, *, read, ns_implementation="xla"):
    memories = chunk_memories(memory, scale, decay, keys, values)
    if read.kind == "newton_schulz":
        return newton_schulz.newton_schulz_read(
            memories,
            queries,
            read.num_iterations,
            read.coefficients,
            implementation=ns_implementation,
        )
    return read.retrieve(memories, queries)


def _steps(read: ReadConfig):
    return newton_schulz.iteration_coefficients(read.coefficients, read.num_iterations)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused(memory, scale, decay, keys, values, queries, read, jax_precision):
    return _fused_fwd(memory, scale, decay, keys, values, queries, read, jax_precision)[0]


def _fused_fwd(memory, scale, decay, keys, values, queries, read, jax_precision):
    operands = (memory, scale, decay, keys, values, queries)
    # platform_dependent: a program exported or lowered for another platform from a
    # CPU process gets the XLA formulation.
    h = jax.lax.platform_dependent(
        *operands,
        cpu=functools.partial(cpu_kernel.chunk_read_forward, steps=_steps(read)),
        default=functools.partial(_formed_read, read=read),
    )
    # Only the operands are kept: backward forms the memories again.
    return h, operands


def _formed_backward(memory, scale, decay, keys, values, queries, h_bar, *, read):
    operands = (memory, scale, decay, keys, values, queries)
    return jax.vjp(functools.partial(_formed_read, read=read), *operands)[1](h_bar)


def _fused_bwd(read, jax_precision, operands, h_bar):
    # Under the precision in force when the forward was traced (orthorecall.precision).
    with precision.scope(jax_precision):
        return tuple(
            jax.lax.platform_dependent(
                *operands,
                h_bar,
                cpu=functools.partial(cpu_kernel.chunk_read_backward, steps=_steps(read)),
                default=functools.partial(_formed_backward, read=read),
            )
        )


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _pallas(memory, scale, decay, keys, values, queries, read, jax_precision):
    return _pallas_fwd(memory, scale, decay, keys, values, queries, read, jax_precision)[0]


def _pallas_kernel(kernel, read, jax_precision):
    return functools.partial(kernel, steps=_steps(read), jax_precision=jax_precision)


def _pallas_fwd(memory, scale, decay, keys, values, queries, read, jax_precision):
    operands = (memory, scale, decay, keys, values, queries)
    # The CUDA program runs the kernels; a program for another platform forms the memories.
    h = jax.lax.platform_dependent(
        *operands,
        cuda=_pallas_kernel(pallas_chunk_read.chunk_read_forward, read, jax_precision),
        default=functools.partial(_formed_read, read=read),
    )
    return h, operands


def _pallas_bwd(read, jax_precision, operands, h_bar):
    with precision.scope(jax_precision):
        return tuple(
            jax.lax.platform_dependent(
                *operands,
                h_bar,
                cuda=_pallas_kernel(pallas_chunk_read.chunk_read_backward, read, jax_precision),
                default=functools.partial(_formed_backward, read=read),
            )
        )


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
