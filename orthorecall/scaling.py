"""The Frobenius normalization's constants and the exact rescaling of huge matrices.

A leaf module (it imports no other project module) shared by the Newton–Schulz read
(``newton_schulz``) and its fused kernels (``pallas_read``, ``pallas_chunk_read``), so
that the kernels need not import the module that dispatches to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Smallest Frobenius norm divided by, as in the reference: keeps the all-zero
# memory (start of a sequence, after a reset) at zero with finite gradients.
FROBENIUS_FLOOR = 1e-6

# Matrices whose largest magnitude is at least 2^this are rescaled before their sum of
# squares (``rescaling``): low enough that the sum of the others cannot overflow
# (d² · 2^64 < 2^128 for any d < 2^32), high enough that memories of ordinary size
# are not touched at all and keep the reference's arithmetic (rescaling is exact too,
# but leaving them alone needs no argument). kernels/ns_read.cc uses the same one.
RESCALE_EXPONENT = 32


def rescaling(x: jax.Array, *, upscale: bool = False) -> jax.Array:
    """Per matrix, 1 or the power of two 2^-j that brings the largest magnitude of ``x``
    into [2, 4): the latter where that magnitude is 2^32 or more, and, with ``upscale``,
    where it is below 2^-32 (but not 0).

    Multiplying by it is exact (barring subnormal entries, which fall below float32's
    resolution of the largest one anyway), so a scale-invariant function of the
    rescaled matrix is that of the original, while matrices of ordinary size are left
    alone bit for bit.

    Args:
        x: float32 array (..., d, d).
        upscale: also scale up tiny matrices. Not for the Newton–Schulz normalization,
            whose floor must see the matrix as it is.

    Returns:
        float32 (..., 1, 1), a normal float32 number, without gradient (it is piecewise
        constant in ``x``, so the derivative of s X is exactly s). A matrix with an inf
        or NaN entry gets 2^-126, and stays non-finite.
    """
    largest = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=(-2, -1), keepdims=True)
    # The biased exponent read from the bits: exact for every float32, where
    # log2 is not; NaN and inf have 255, zero and subnormals 0.
    biased = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(largest, jnp.int32), 23)
    exponent = biased - 127  # largest is in [2^e, 2^(e+1)) when normal
    rescale = exponent >= RESCALE_EXPONENT
    if upscale:
        rescale |= (exponent < -RESCALE_EXPONENT) & (largest > 0)
    # Into [2, 4) rather than [1, 2): 2^-127 is subnormal, 2^-126 is not.
    shift = jnp.where(rescale, jnp.clip(exponent - 1, -127, 126), 0)
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(127 - shift, 23), jnp.float32)
