"""The Newton–Schulz read through the memory's Gram matrix, without d x d products.

For the iteration X ← X (a_j I + b_j XᵀX) (the cubic NS_k and any schedule of
that form, i.e. no quintic term), every iterate is X_0 times a polynomial in
G = X_0ᵀX_0: with G_j = X_jᵀX_j and M_j = a_j I + b_j G_j, X_{j+1} = X_j M_j and
G_{j+1} = G_j M_j² (all polynomials in G, so they commute). Hence

    NS_k(C)ᵀ q = M_{k-1} ··· M_1 M_0 (X_0ᵀ q),

and no G_j is ever formed: G_j v = M_{j-1} G_{j-1} M_{j-1} v, down to G_0 = G. The read
costs (3^k - 1) / 2 matrix-vector products with G (121 for NS5) instead of 2k matrix
products, and needs only G and Cᵀq, both of which a recurrence can carry in O(d²) per
step (``gram_update``) instead of O(d³).

Where this is worth it, and why only up to ``MAX_GRAM_ITERATIONS`` iterations: the
number of products grows as 3^k, and float32 rounding leaves G with eigenvalues a few
ulps below zero, which g → g (a + b g)² amplifies by up to (a)² = 2.25 per iteration
(harmless for k <= 6: a factor of 130 on 1e-7 of ‖G‖); the explicit iteration
re-squares X every step and has neither problem.

Shapes: (..., d, d) Gram matrices, (..., d) vectors; everything float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from orthorecall import newton_schulz, precision

# 3^6 = 729 products: beyond this the explicit iteration (2k products of d³) is
# cheaper at the model's d = 48, and rounding in G starts to matter (module docstring).
MAX_GRAM_ITERATIONS = 6

Steps = tuple[tuple[float, float], ...]


def gram_steps(num_iterations: int, coefficients: str = "cubic") -> Steps | None:
    """The (a_j, b_j) of each iteration when the read can go through the Gram matrix
    (no quintic term, 1 <= k <= ``MAX_GRAM_ITERATIONS``), else None."""
    steps = newton_schulz.iteration_coefficients(coefficients, num_iterations)
    if not 1 <= len(steps) <= MAX_GRAM_ITERATIONS or any(c != 0.0 for _, _, c in steps):
        return None
    return tuple((float(a), float(b)) for a, b, _ in steps)


def matvec_count(num_iterations: int) -> int:
    """Matrix-vector products with G that ``nested_read`` does for k iterations."""
    return (3**num_iterations - 1) // 2


def _matvec(gram, vector):
    return jnp.einsum("...ij,...j->...i", gram, vector)


def _evaluate(gram, y, steps: Steps, offsets=None):
    """M_{k-1} ··· M_0 y with G_0 = ``gram``; the inputs of the products with G in the
    order they are made. ``offsets``, when given, are added to the products' results
    (zeros: their cotangents are those of the products' outputs)."""
    inputs = []

    def times_gram(level, v):  # G_level v
        if level == 0:
            inputs.append(v)
            w = _matvec(gram, v)
            if offsets is not None:
                w = w + offsets[len(inputs) - 1]
            return w
        u = times_m(level - 1, v)
        return times_m(level - 1, times_gram(level - 1, u))

    def times_m(level, v):  # M_level v = a v + b G_level v
        a, b = steps[level]
        return a * v + b * times_gram(level, v)

    h = y
    for level in range(len(steps)):
        h = times_m(level, h)
    return h, inputs


def nested_read(gram: jax.Array, y: jax.Array, steps: Steps) -> jax.Array:
    """M_{k-1} ··· M_0 y for a normalized Gram matrix G_0 = X_0ᵀX_0 and y = X_0ᵀq.

    Args:
        gram: (..., d, d) symmetric, float32.
        y: (..., d) float32.
        steps: the (a_j, b_j) of each iteration (``gram_steps``).

    Returns:
        (..., d): X_kᵀ q.

    The VJP keeps only ``gram`` and ``y``: backward recomputes the products' inputs U
    (N x d, N = ``matvec_count``), gets every product's output cotangent W̄ in one
    reverse sweep that never touches Ḡ, and forms Ḡ = W̄ᵀU as one (d x N)(N x d)
    product instead of N outer products. Backward runs under the matrix-product precision
    in force when the forward was traced (``orthorecall.precision``).
    """
    return _nested_read(gram, y, steps, precision.current())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _nested_read(gram, y, steps, jax_precision):
    return _evaluate(gram, y, steps)[0]


def _nested_read_fwd(gram, y, steps, jax_precision):
    return _evaluate(gram, y, steps)[0], (gram, y)


def _nested_read_bwd(steps, jax_precision, residuals, h_bar):
    with precision.scope(jax_precision):
        return _nested_read_backward(steps, residuals, h_bar)


def _nested_read_backward(steps, residuals, h_bar):
    gram, y = residuals
    count = matvec_count(len(steps))
    offsets = jnp.zeros((count,) + y.shape, y.dtype)
    inputs = _evaluate(gram, y, steps)[1]
    # Cotangents of y and of every product's output, with G held fixed.
    _, pullback = jax.vjp(lambda yy, oo: _evaluate(gram, yy, steps, oo)[0], y, offsets)
    y_bar, out_bars = pullback(h_bar)
    gram_bar = jnp.einsum("n...i,n...j->...ij", out_bars, jnp.stack(inputs))
    return gram_bar, y_bar


_nested_read.defvjp(_nested_read_fwd, _nested_read_bwd)


def gram_read(gram: jax.Array, memory_t_query: jax.Array, steps: Steps) -> jax.Array:
    """NS_k(C)ᵀ q from G = CᵀC and Cᵀq, C unnormalized.

    The Frobenius normalization is that of ``newton_schulz.frobenius_normalize``
    (‖C‖_F² = tr G, floored at 1e-6²) without its rescaling of huge memories: tr G
    must be finite, i.e. the memory's entries below about 1e18 (a stabilized mLSTM
    memory stays many orders of magnitude below).

    Args:
        gram: (..., d, d) CᵀC.
        memory_t_query: (..., d) Cᵀq.
        steps: ``gram_steps(k, coefficients)``.

    Returns:
        (..., d) float32.
    """
    gram = gram.astype(jnp.float32)
    memory_t_query = memory_t_query.astype(jnp.float32)
    norm_sq = jnp.maximum(jnp.trace(gram, axis1=-2, axis2=-1), newton_schulz.FROBENIUS_FLOOR**2)
    scale = jax.lax.rsqrt(norm_sq)
    return nested_read(
        gram * jnp.square(scale)[..., None, None], memory_t_query * scale[..., None], steps
    )


def read_through_gram(memory: jax.Array, query: jax.Array, steps: Steps) -> jax.Array:
    """NS_k(C)ᵀ q for memories (..., d, d) and queries (..., d), via G = X_0ᵀX_0.

    Normalizes C first (``newton_schulz.frobenius_normalize``, rescaling included), so
    any finite memory is read as by the explicit iteration.
    """
    newton_schulz.check_square(memory, "read_through_gram")
    x0 = newton_schulz.frobenius_normalize(memory)
    query = query.astype(jnp.float32)
    gram = jnp.einsum("...ki,...kj->...ij", x0, x0)
    y = jnp.einsum("...ki,...k->...i", x0, query)
    return nested_read(gram, y, steps)


def gram_update(
    gram: jax.Array,
    previous_memory: jax.Array,
    key: jax.Array,
    value: jax.Array,
    forget_scale: jax.Array,
    input_scale: jax.Array,
) -> jax.Array:
    """The Gram matrix of C' = f C + i k vᵀ from that of C, in O(d²):

        C'ᵀC' = f² CᵀC + f i (a vᵀ + v aᵀ) + i² (kᵀk) v vᵀ,   a = Cᵀk.

    Args:
        gram: (..., d, d) CᵀC.
        previous_memory: (..., d, d) C.
        key, value: (..., d).
        forget_scale, input_scale: (...) f and i.

    Returns:
        (..., d, d) C'ᵀC'.
    """
    a = jnp.einsum("...ki,...k->...i", previous_memory, key)
    f = forget_scale[..., None, None]
    i = input_scale[..., None, None]
    cross = a[..., :, None] * value[..., None, :]
    key_sq = jnp.sum(jnp.square(key), axis=-1)[..., None, None]
    return (
        jnp.square(f) * gram
        + (f * i) * (cross + jnp.swapaxes(cross, -1, -2))
        + (jnp.square(i) * key_sq) * (value[..., :, None] * value[..., None, :])
    )


def check_steps(steps: Sequence) -> Steps:
    """``steps`` as a tuple of (a, b) float pairs, or a ValueError saying what is wrong."""
    try:
        steps = tuple((float(a), float(b)) for a, b in steps)
    except (TypeError, ValueError) as error:
        raise ValueError(f"steps must be (a, b) pairs of numbers; got {steps!r}.") from error
    if not 1 <= len(steps) <= MAX_GRAM_ITERATIONS:
        raise ValueError(
            f"the Gram read takes 1 to {MAX_GRAM_ITERATIONS} iterations, got {len(steps)}; "
            "use newton_schulz.newton_schulz_read beyond."
        )
    return steps
