"""The Newton–Schulz iteration NS_k and the orthogonalized read qᵀ NS_k(C).

The orthogonalized read of the reference (docs/specification.md) replaces the memory C by
NS_k(C): Frobenius-normalize, then k odd-polynomial iterations that push every
non-zero singular value toward 1 while keeping the singular vectors, i.e. toward
the orthogonal polar factor U Vᵀ of C = U Σ Vᵀ. Zero singular values stay zero,
so a rank-deficient (or all-zero) memory maps to a partial isometry (or zero).

Every iteration is X <- X (a I + b A + c A²) with A = Xᵀ X (an odd polynomial
p(x) = a x + b x³ + c x⁵ applied to the singular values). Coefficient sets:

* ``"cubic"`` (default, the reference): a, b, c = 1.5, -0.5, 0, the classic
    Newton–Schulz step 0.5 X (3I - XᵀX). Converges for singular values in (0, √3).
* ``"muon"``: Muon's quintic (3.4445, -4.7750, 2.0315). Fast but only drives
    singular values into roughly [0.7, 1.2]; it does not converge to U Vᵀ.
* ``"polar_express"``: the per-iteration schedule of Amsel et al. (2025,
    "The Polar Express", arXiv:2505.16932), with its 1.01 safety factor; iterations
    past the table repeat its last entry (1.875, -1.25, 0.375).

All arithmetic is float32 whatever the input dtype (bfloat16 memories would
lose the small singular values the iteration has to lift).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from orthorecall import cpu_kernel, pallas_read, precision

# The normalization constants live in a leaf module that the kernels import too.
from orthorecall.scaling import FROBENIUS_FLOOR, rescaling
from orthorecall.validation import check_int, switched_on

_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS_SAFETY = 1.01
COEFFICIENT_SETS = ("cubic", "muon", "polar_express")
# The most iterations a read may ask for. The iterations are unrolled when traced, so
# trace time and program size grow with k (ns99999 was reported to trace for minutes
# in 3 GB), while the result stops changing long before: on d = 48 float32
# memories cubic NS reaches its fixed point (no entry moving by 1e-5 any more) after
# 23 iterations for Gaussian matrices, 29 and 40 for condition numbers 1e4 and 1e6,
# and 66 for a rank-16 memory, whose zero singular values, float32 rounding noise
# after normalization, need the longest to be lifted to 1. The bound leaves room
# above that; a normalized singular value s needs about log(1/s)/log(1.5) iterations,
# so 100 lifts any above about 1e-16 (float32 resolves about 1e-7 of the largest).
MAX_ITERATIONS = 100
# How newton_schulz_read may run: "auto" picks the fused CPU kernel on the CPU backend
# (when it builds), the Pallas kernel on NVIDIA GPUs (where it applies, see
# read_implementation) and the XLA formulation elsewhere; "xla" always runs the latter.
IMPLEMENTATIONS = ("auto", "xla")


def iteration_bound_error(given: object) -> ValueError:
    """The error for an iteration count above ``MAX_ITERATIONS`` (``given``)."""
    return ValueError(
        f"num_iterations must be <= {MAX_ITERATIONS} (Newton–Schulz reaches its float32 "
        f"fixed point well before; see newton_schulz.MAX_ITERATIONS), got {given}"
    )


def iteration_coefficients(
    coefficients: str, num_iterations: int
) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of ``num_iterations`` steps of a coefficient set.

    Every entry point (``newton_schulz``, ``newton_schulz_read``, ``ReadConfig``) checks
    its iteration count here.

    Args:
        coefficients: one of ``COEFFICIENT_SETS``.
        num_iterations: number of iterations, 0 to ``MAX_ITERATIONS``.

    Returns:
        A tuple of ``num_iterations`` (a, b, c) float triples.

    Raises:
        ValueError: unknown coefficient set, or an iteration count that is negative or
            above ``MAX_ITERATIONS``.
    """
    num_iterations = check_int("num_iterations", num_iterations, minimum=0)
    if num_iterations > MAX_ITERATIONS:
        raise iteration_bound_error(num_iterations)
    if coefficients == "cubic":
        return ((1.5, -0.5, 0.0),) * num_iterations
    if coefficients == "muon":
        return ((3.4445, -4.7750, 2.0315),) * num_iterations
    if coefficients == "polar_express":
        s = _POLAR_EXPRESS_SAFETY
        # The safety factor shrinks every polynomial but the converged last one.
        table = [(a / s, b / s**3, c / s**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]]
        table.append(_POLAR_EXPRESS_RAW[-1])
        return tuple(table[min(i, len(table) - 1)] for i in range(num_iterations))
    raise ValueError(
        f"coefficients={coefficients!r} is not a known coefficient set; "
        f"use one of {COEFFICIENT_SETS}."
    )


def check_square(x: jax.Array, name: str) -> None:
    """Raises a ValueError naming ``name`` unless ``x`` is (..., d, d)."""
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{name} expects a batch of square matrices (..., d, d), got shape {x.shape}."
        )


def frobenius_normalize(x: jax.Array) -> jax.Array:
    """X / max(||X||_F, 1e-6) over the last two axes, in float32, for any finite X.

    Matrices whose largest magnitude is 2^32 or more are first multiplied by a power of
    two (``rescaling``), which is exact, so their sum of squares cannot overflow (it
    would from about 1.2e18 on, and the read would be 0): the result is that of the
    scaled-down matrix. Smaller matrices go through the reference's formula untouched,
    bit for bit; there the floor decides whenever the sum of squares could underflow.
    A matrix with an inf or NaN entry normalizes to NaN (all of it, once iterated);
    XLA:CPU flushes subnormal entries to zero.

    Args:
        x: array (..., d, d) of any float dtype.

    Returns:
        float32 array of the same shape; all-zero matrices stay zero.

    Raises:
        ValueError: if ``x`` is not a batch of square matrices.
    """
    check_square(x, "frobenius_normalize")
    x = x.astype(jnp.float32)
    x = x * rescaling(x)
    norm_sq = jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)
    # max(sqrt(s), floor) == sqrt(max(s, floor²)); taking the max before the
    # square root keeps the gradient finite at s = 0. A downscaled matrix has a norm
    # of at least 2, so the floor needs no rescaling.
    return x * jax.lax.rsqrt(jnp.maximum(norm_sq, FROBENIUS_FLOOR**2))


def newton_schulz(x: jax.Array, num_iterations: int = 5, coefficients: str = "cubic") -> jax.Array:
    """NS_k(X): Frobenius normalization then k Newton–Schulz iterations.

    ``num_iterations=0`` is the Frobenius normalization alone. Gradients flow
    through every iteration.

    Args:
        x: array (..., d, d) of any float dtype (a batch of memories).
        num_iterations: 0 <= k <= ``MAX_ITERATIONS``.
        coefficients: one of ``COEFFICIENT_SETS``; ``"cubic"`` is the reference.

    Returns:
        float32 array (..., d, d).

    Raises:
        ValueError: non-square input, unknown coefficients, k outside [0, ``MAX_ITERATIONS``].
    """
    steps = iteration_coefficients(coefficients, num_iterations)
    return _iterations(frobenius_normalize(x), steps)


def _forward_iterates(x, steps):
    """The iterate after ``steps`` and, per step, its input X and Gram XᵀX."""
    saved = []
    for a, b, c in steps:
        gram = jnp.matmul(jnp.swapaxes(x, -1, -2), x)
        saved.append((x, gram))
        poly = b * gram if c == 0.0 else b * gram + c * jnp.matmul(gram, gram)
        x = a * x + jnp.matmul(x, poly)
    return x, saved


def _iterations(x, steps):
    # The backward runs under the precision in force now (orthorecall.precision).
    return _recorded_iterations(x, steps, precision.current())


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _recorded_iterations(x, steps, jax_precision):
    return _forward_iterates(x, steps)[0]


def _iterations_fwd(x, steps, jax_precision):
    # Only the input is kept: backward recomputes the iterates, so the memory
    # of the read does not grow with the iteration count.
    return _forward_iterates(x, steps)[0], x


def _iterations_bwd(steps, jax_precision, x, cotangent):
    with precision.scope(jax_precision):
        return _iterations_backward(steps, x, cotangent)


def _iterations_backward(steps, x, cotangent):
    # Y = a X + X P(G), P(G) = b G + c G², G = XᵀX:
    #   X̄ = a Ȳ + Ȳ P(G) + X (Ḡ + Ḡᵀ),  Ḡ = b XᵀȲ + c (G XᵀȲ + XᵀȲ G).
    _, saved = _forward_iterates(x, steps)
    for (x, gram), (a, b, c) in zip(reversed(saved), reversed(steps), strict=True):
        xt_ybar = jnp.matmul(jnp.swapaxes(x, -1, -2), cotangent)
        if c == 0.0:
            poly, gram_bar = b * gram, b * xt_ybar
        else:
            poly = b * gram + c * jnp.matmul(gram, gram)
            gram_bar = b * xt_ybar + c * (jnp.matmul(gram, xt_ybar) + jnp.matmul(xt_ybar, gram))
        cotangent = (
            a * cotangent
            + jnp.matmul(cotangent, poly)
            + jnp.matmul(x, gram_bar + jnp.swapaxes(gram_bar, -1, -2))
        )
    return (cotangent,)


_recorded_iterations.defvjp(_iterations_fwd, _iterations_bwd)


def newton_schulz_read(
    memory: jax.Array,
    query: jax.Array,
    num_iterations: int = 5,
    coefficients: str = "cubic",
    *,
    implementation: str = "auto",
) -> jax.Array:
    """qᵀ NS_k(C): the orthogonalized memory read by a query, without forming NS_k(C).

    This is what the mLSTM needs (h_j = Σ_i q_i NS_k(C)_ij) and what it runs:
    on the CPU backend a fused kernel (``orthorecall.cpu_kernel``) keeps each
    memory in cache through all iterations and never writes NS_k(C) or its
    iterates to memory, forward or backward; on NVIDIA GPUs a Pallas kernel
    (``orthorecall.pallas_read``) does the same on chip, for widths up to
    ``pallas_read.MAX_WIDTH``; elsewhere, or when neither applies, it is
    ``einsum(q, newton_schulz(C))``. All compute the same function (to float32
    rounding) and the same gradients. :func:`read_implementation` says which one runs.

    Args:
        memory: (..., d, d) memories, any float dtype.
        query: (..., d) queries with the same leading shape.
        num_iterations: 0 <= k <= ``MAX_ITERATIONS``.
        coefficients: one of ``COEFFICIENT_SETS``.
        implementation: ``"auto"`` (the kernel where it applies) or ``"xla"`` (the
            ``einsum`` formulation on every backend, e.g. to compare the two).

    Returns:
        float32 (..., d).

    Raises:
        ValueError: mismatched shapes, unknown coefficients or implementation,
            k outside [0, ``MAX_ITERATIONS``].
    """
    check_square(memory, "newton_schulz_read")
    if query.shape != memory.shape[:-1]:
        raise ValueError(
            f"newton_schulz_read expects query of shape memory.shape[:-1] = "
            f"{memory.shape[:-1]}, got {query.shape}."
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not known; use one of {IMPLEMENTATIONS}."
        )
    steps = iteration_coefficients(coefficients, num_iterations)
    kernel = "xla"
    if implementation == "auto":
        kernel = _implementation(steps, _process_backend(), memory.shape[-1])
    return _ns_read(
        memory.astype(jnp.float32),
        query.astype(jnp.float32),
        steps,
        kernel,
        precision.current(),
    )


def read_implementation(
    num_iterations: int = 5,
    coefficients: str = "cubic",
    backend: str | None = None,
    width: int | None = None,
) -> str:
    """What :func:`newton_schulz_read` (``implementation="auto"``) runs on ``backend``
    (default: JAX's default backend) for memories of ``width`` (None: any the kernels
    take): ``"cpu_kernel"``, ``"pallas_gpu"`` (NVIDIA GPUs, widths up to
    ``pallas_read.MAX_WIDTH``, under a matmul precision it implements, not disabled by
    ``ORTHORECALL_PALLAS=0``) or ``"xla"``.

    Raises:
        ValueError: unknown coefficients or k outside [0, ``MAX_ITERATIONS``].
    """
    steps = iteration_coefficients(coefficients, num_iterations)
    return _implementation(steps, backend or _process_backend(), width)


def _implementation(steps, backend: str, width: int | None) -> str:
    # Decided at trace time from the default backend, as JAX places the computation:
    # GPU/TPU programs never build the CPU kernel, and a program exported from a CPU
    # process for another platform gets the XLA formulation there (platform_dependent).
    if not steps:
        return "xla"
    if backend == "cpu":
        return "cpu_kernel" if cpu_kernel.available() else "xla"
    if (
        backend in ("gpu", "cuda")
        and switched_on("ORTHORECALL_PALLAS")
        and pallas_read.available()
        and (width is None or width <= pallas_read.MAX_WIDTH)
        and precision.current() in pallas_read.SUPPORTED_PRECISIONS
    ):
        # In a GPU process the kernels are compiled once per configuration first: if
        # Triton fails, a warning says why and the XLA read runs (never a crash later,
        # when XLA compiles the whole program).
        if _process_backend() != "gpu":  # asked about GPUs elsewhere: nothing to compile
            return "pallas_gpu"
        failure = pallas_read.compile_failure(
            steps, width or pallas_read.MAX_WIDTH, precision.current()
        )
        return "pallas_gpu" if failure is None else "xla"
    return "xla"


def _process_backend() -> str:
    """The backend this process's programs run on (a seam for tests)."""
    return jax.default_backend()


def _jax_read(memory, query, steps):
    return jnp.einsum("...i,...ij->...j", query, _iterations(frobenius_normalize(memory), steps))


def _jax_backward(memory, query, h_bar, steps):
    return jax.vjp(functools.partial(_jax_read, steps=steps), memory, query)[1](h_bar)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _ns_read(memory, query, steps, kernel, jax_precision):
    return _ns_read_fwd(memory, query, steps, kernel, jax_precision)[0]


# The fused kernels by implementation name, and the platform whose programs run them.
_FORWARD_KERNELS = {
    "cpu_kernel": cpu_kernel.ns_read_forward,
    "pallas_gpu": pallas_read.ns_read_forward,
}
_BACKWARD_KERNELS = {
    "cpu_kernel": cpu_kernel.ns_read_backward,
    "pallas_gpu": pallas_read.ns_read_backward,
}
_KERNEL_PLATFORMS = {"cpu_kernel": "cpu", "pallas_gpu": "cuda"}


def _by_backend(kernel, kernel_fns, jax_fn, steps, jax_precision, *operands):
    """The kernel ``kernel`` names in programs for its platform, the pure-JAX form
    elsewhere (and when ``kernel`` is "xla")."""
    jax_fn = functools.partial(jax_fn, steps=steps)
    if kernel == "xla":
        return jax_fn(*operands)
    kernel_fn = functools.partial(kernel_fns[kernel], steps=steps)
    if kernel == "pallas_gpu":  # Triton products take the precision explicitly.
        kernel_fn = functools.partial(kernel_fn, jax_precision=jax_precision)
    return jax.lax.platform_dependent(
        *operands, **{_KERNEL_PLATFORMS[kernel]: kernel_fn}, default=jax_fn
    )


def _ns_read_fwd(memory, query, steps, kernel, jax_precision):
    h = _by_backend(kernel, _FORWARD_KERNELS, _jax_read, steps, jax_precision, memory, query)
    return h, (memory, query)


def _ns_read_bwd(steps, kernel, jax_precision, residuals, h_bar):
    memory, query = residuals
    with precision.scope(jax_precision):
        return tuple(
            _by_backend(
                kernel, _BACKWARD_KERNELS, _jax_backward, steps, jax_precision, memory, query, h_bar
            )
        )


_ns_read.defvjp(_ns_read_fwd, _ns_read_bwd)


def singular_value_map(
    sigma: Sequence[float] | jax.Array, coefficients: str, num_iterations: int
) -> jax.Array:
    """The scalar map the iteration applies to (already normalized) singular
    values; useful to study coefficient sets without building matrices."""
    s = jnp.asarray(sigma, jnp.float32)
    for a, b, c in iteration_coefficients(coefficients, num_iterations):
        s = a * s + b * s**3 + c * s**5
    return s
