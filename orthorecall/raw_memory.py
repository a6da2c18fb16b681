"""The raw-read mLSTM memory on the CPU: the recurrence itself, in a fused kernel.

With the raw read, h_t = C_tᵀq_t / (max(|q_t·n_t|, e^{-m_t}) + 1e-6) needs C_t only
through its product with q_t. The chunkwise form (``mlstm.chunkwise_sequence``) trades the
recurrence's 4d² flops per step for L x L decay matrices and batched products, 2-3 times
the arithmetic, which pays on accelerators; on the CPU, XLA runs those small products far
below the machine's speed. ``kernels/raw_memory.cc`` runs the recurrence as written,
C_t in L1, a few steps per pass over its rows, reading the (B, T, H, d) layout the model
produces, and its VJP by the adjoint recurrence from states it saves every ``interval``
steps. Built, loaded and switched off (``ORTHORECALL_CPU_KERNEL=0``) with the other CPU
kernels (``orthorecall.cpu_kernel``).

It computes ``chunkwise_sequence``'s function, with its treatment of non-finite values
(``orthorecall.chunkwise``: NaN where a bad value reaches, in h per row or per column,
in the end state per entry; zero cotangents through them) and resets; the two agree to
float32 rounding. ``mlstm.chunkwise_sequence`` uses it for the raw read on the CPU
(``applies``); a program lowered for another platform runs the chunkwise form there.
"""

from __future__ import annotations

import functools

import jax

from orthorecall import cpu_kernel
from orthorecall.reads import ReadConfig


def applies(read: ReadConfig, backend: str | None = None) -> bool:
    """Whether ``mlstm.chunkwise_sequence`` runs ``read`` through the kernel on ``backend``
    (default: JAX's): the raw read with the additive write, on the CPU, when the CPU
    kernels are available."""
    if not (read.is_raw and read.has_chunkwise_form):
        return False
    return (backend or jax.default_backend()) == "cpu" and cpu_kernel.available()


def sequence(q, k, v, log_f, i_pre, reset, c0, n0, m0, *, interval: int, fallback):
    """h (B, T, H, d) and the end state (C, n, m) of the raw-read recurrence.

    q, k̂ (= k/√d), v (B, T, H, d); log f, ĩ (B, T, H) float32; reset (B, T) bool; the
    start state C0 (B, H, d, d), n0 (B, H, d), m0 (B, H); any further leading axes are
    batch. ``interval``: steps between the states saved for backward (their memory is
    (B, T / interval, H, d, d)). ``fallback``: the same function of the same operands,
    for a program lowered for another platform.
    """
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        log_f,
        i_pre,
        reset,
        c0,
        n0,
        m0,
        cpu=functools.partial(_kernel, interval=interval),
        default=fallback,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _kernel(q, k, v, log_f, i_pre, reset, c0, n0, m0, interval):
    # Nothing saved: a forward that is not differentiated.
    h, c, n, m, *_ = cpu_kernel.raw_memory_forward(q, k, v, log_f, i_pre, reset, c0, n0, m0, 0)
    return h, c, n, m


def _kernel_fwd(q, k, v, log_f, i_pre, reset, c0, n0, m0, interval):
    operands = (q, k, v, log_f, i_pre, reset, c0, n0, m0)
    h, c, n, m, *saved = cpu_kernel.raw_memory_forward(*operands, interval)
    outputs = (h, c, n, m)
    return outputs, (operands, tuple(saved), outputs)


def _kernel_bwd(interval, residuals, cotangents):
    operands, saved, outputs = residuals
    q_bar, k_bar, v_bar, log_f_bar, i_bar, c0_bar, n0_bar, m0_bar = cpu_kernel.raw_memory_backward(
        operands, saved, outputs, cotangents, interval
    )
    return q_bar, k_bar, v_bar, log_f_bar, i_bar, None, c0_bar, n0_bar, m0_bar


_kernel.defvjp(_kernel_fwd, _kernel_bwd)
