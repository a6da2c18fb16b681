"""The reads of a matrix memory: what the mLSTM reads from C_t with its query.

A read maps the memory C (d x d, per head and position) to the matrix R(C) the query
reads from, h = qᵀ R(C):

* ``raw``: R(C) = C, the baseline mLSTM;
* ``newton_schulz``: R(C) = NS_k(C), the orthogonalized read of the reference (k = 5,
  cubic coefficients) and its variants (any k, Muon's and Polar Express's
  coefficients); the iteration itself lives in :mod:`orthorecall.newton_schulz`;
* ``polar``: R(C) = U Vᵀ, the exact orthogonal polar factor that NS_k approaches.

A read is a :class:`ReadConfig` (hashable: models take it as a static argument); the
study's ``--config.reads`` names parse with :func:`read_from_name`. To add a read: its
math in a function here (or in a module of its own when it is large), a ``kind`` in
``READ_KINDS``, a branch in :meth:`ReadConfig.__call__` (and in
:meth:`ReadConfig.retrieve` when it can read without forming R(C)), and a name in
:func:`read_from_name`. The recurrence (:mod:`orthorecall.mlstm`) calls only
``ReadConfig.retrieve``.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp

from orthorecall import gram_read, newton_schulz, precision
from orthorecall.validation import check_int

READ_KINDS = ("raw", "newton_schulz", "polar")
# ReadConfig's defaults, which it also stores in the fields a read does not use.
_DEFAULT_ITERATIONS = 5
_DEFAULT_COEFFICIENTS = "cubic"
# Singular values below this fraction of the largest are treated as zero by the
# exact polar read: sqrt(float32 eps), far above float32 rounding noise
# (about d * eps) and far below any singular value NS_5 visibly lifts.
POLAR_RANK_RTOL = 2.0**-11.5


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _polar_factor(x: jax.Array, jax_precision) -> jax.Array:
    return _polar_forward(x)[0]


def _polar_forward(x):
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    # A memory built from fewer outer products than its width is rank
    # deficient; its zero singular values come out of float32 arithmetic as
    # noise around eps * σ_max. Their polar directions would be arbitrary, so
    # anything below the relative threshold counts as zero (mapped to zero,
    # as NS maps a zero singular value).
    tol = jnp.max(s, axis=-1, keepdims=True) * POLAR_RANK_RTOL
    keep = (s > tol).astype(x.dtype)
    q = jnp.matmul(u * keep[..., None, :], vt)
    return q, (u, s * keep, vt, keep)


def _polar_fwd(x, jax_precision):
    q, residuals = _polar_forward(x)
    return q, residuals


def _polar_bwd(jax_precision, residuals, g):
    # Under the precision in force when the forward was traced (orthorecall.precision).
    with precision.scope(jax_precision):
        return _polar_backward(residuals, g)


def _polar_backward(residuals, g):
    # For X = U Σ Vᵀ the polar factor Q = U Vᵀ has dQ = U Ω Vᵀ with
    # Ω = (M - Mᵀ) / (σ_i + σ_j), M = Uᵀ dX V. Only sums of singular values
    # appear, so repeated singular values are harmless; pairs whose sum is zero
    # (the kernel of a rank-deficient memory) have no defined derivative and we
    # give them zero, as the NS iteration does at a zero singular value.
    u, s, vt, keep = residuals
    v = jnp.swapaxes(vt, -1, -2)
    m = jnp.matmul(jnp.swapaxes(u, -1, -2), jnp.matmul(g, v))
    # Only the kept directions carry Q; the others see no cotangent.
    both = keep[..., :, None] * keep[..., None, :]
    denom = s[..., :, None] + s[..., None, :]
    safe = jnp.where(both > 0, denom, 1.0)
    omega = jnp.where(both > 0, (m - jnp.swapaxes(m, -1, -2)) / safe, 0.0)
    return (jnp.matmul(u, jnp.matmul(omega, vt)),)


_polar_factor.defvjp(_polar_fwd, _polar_bwd)


def polar(x: jax.Array) -> jax.Array:
    """The exact orthogonal polar factor U Vᵀ of X (the limit of NS_k).

    Singular values below ``POLAR_RANK_RTOL * σ_max`` are treated as zero and map to zero,
    so rank-deficient memories give a partial isometry and an all-zero memory
    gives zero. The gradient is the analytic derivative of the polar factor
    (finite for repeated and for zero singular values).

    U Vᵀ does not depend on the scale of X, and neither does the result for any finite
    X: a matrix whose largest magnitude is outside [2^-32, 2^32) is multiplied by a
    power of two first (exactly), so that its singular values cannot overflow (σ_max,
    up to d times the largest entry, would be inf near 3e38 and the read 0) or
    underflow. Other matrices are decomposed as they are. A matrix with an inf or NaN
    entry reads NaN.

    Args:
        x: array (..., d, d) of any float dtype.

    Returns:
        float32 array (..., d, d).

    Raises:
        ValueError: non-square input.
    """
    newton_schulz.check_square(x, "polar")
    x = x.astype(jnp.float32)
    return _polar_factor(x * newton_schulz.rescaling(x, upscale=True), precision.current())


@dataclasses.dataclass(frozen=True)
class ReadConfig:
    """How the cell reads its memory. Hashable, so it can be a static jit arg.

    Equality means "the same read": two configs compare (and hash) equal exactly when
    they compute the same function. Fields a read does not use are set to one value
    when the config is made: ``raw`` and ``polar`` keep the defaults (5, ``"cubic"``)
    whatever is passed, and NS with 0 iterations (the normalization alone) keeps
    ``"cubic"`` whatever the coefficient set. Unused fields are still validated.

    Attributes:
        kind: ``"raw"`` (the baseline: C itself), ``"newton_schulz"`` (NS_k(C), the
            orthogonalized read) or ``"polar"`` (the exact polar factor of C).
        num_iterations: k for ``"newton_schulz"`` (the reference uses 5), at most
            ``newton_schulz.MAX_ITERATIONS``.
        coefficients: coefficient set for ``"newton_schulz"``.
    """

    kind: str = "raw"
    num_iterations: int = _DEFAULT_ITERATIONS
    coefficients: str = _DEFAULT_COEFFICIENTS

    def __post_init__(self):
        if self.kind not in READ_KINDS:
            raise ValueError(
                f"ReadConfig.kind={self.kind!r} is not a known read; use one of {READ_KINDS}."
            )
        # A Python int, so that equal reads hash equally as static jit arguments.
        num_iterations = check_int("num_iterations", self.num_iterations, minimum=0)
        # Validates the iteration bound and the coefficient set with the messages users
        # will see.
        newton_schulz.iteration_coefficients(self.coefficients, num_iterations)
        coefficients = self.coefficients
        if self.kind != "newton_schulz":
            num_iterations, coefficients = _DEFAULT_ITERATIONS, _DEFAULT_COEFFICIENTS
        elif num_iterations == 0:
            coefficients = _DEFAULT_COEFFICIENTS
        object.__setattr__(self, "num_iterations", num_iterations)
        object.__setattr__(self, "coefficients", coefficients)

    @property
    def is_raw(self) -> bool:
        return self.kind == "raw"

    def implementation(self, backend: str | None = None) -> str:
        """What :meth:`retrieve` runs on ``backend`` (default: JAX's default backend):
        ``"cpu_kernel"`` or ``"pallas_gpu"`` (the fused Newton–Schulz reads, see
        ``newton_schulz.read_implementation``) or ``"xla"``."""
        if self.kind == "newton_schulz":
            return newton_schulz.read_implementation(
                self.num_iterations, self.coefficients, backend
            )
        return "xla"

    def gram_steps(self):
        """The (a_j, b_j) per iteration when the read has a Gram form
        (``orthorecall.gram_read``: cubic-type NS_k, 1 <= k <= 6), else None."""
        if self.kind != "newton_schulz":
            return None
        return gram_read.gram_steps(self.num_iterations, self.coefficients)

    def __call__(self, memory: jax.Array) -> jax.Array:
        """Applies the read to memories (..., d, d); raw returns them unchanged."""
        if self.kind == "raw":
            return memory
        if self.kind == "polar":
            return polar(memory)
        return newton_schulz.newton_schulz(memory, self.num_iterations, self.coefficients)

    def retrieve(self, memory: jax.Array, query: jax.Array) -> jax.Array:
        """qᵀ R(C) for memories (..., d, d) and queries (..., d): the vector the
        mLSTM reads. For NS_k this never forms NS_k(C) (``newton_schulz_read``)."""
        if self.kind == "newton_schulz":
            return newton_schulz.newton_schulz_read(
                memory, query, self.num_iterations, self.coefficients
            )
        return jnp.einsum(
            "...i,...ij->...j", query.astype(jnp.float32), self(memory).astype(jnp.float32)
        )


RAW = ReadConfig("raw")
NS5 = ReadConfig("newton_schulz", 5, "cubic")
POLAR = ReadConfig("polar")


# nsK or nsK_<coefficient set>: ASCII digits only (str.isdigit also accepts '²' and
# other scripts' digits), lower case, nothing around.
_NS_NAME = re.compile(r"ns([0-9]+)(?:_(.+))?", re.ASCII)


def read_from_name(name: str) -> ReadConfig:
    """Parses a read name: ``raw``/``baseline``, ``nsK`` (cubic, K iterations, 0 <= K <=
    ``newton_schulz.MAX_ITERATIONS``), ``nsK_muon``, ``nsK_polar_express``, ``polar``.

    Names are exact: lower case, no spaces. Names of the same read give equal (and
    equally hashed) configs, so equality tells aliases apart from different reads:
    ``raw`` and ``baseline``; ``ns5``, ``ns05`` and ``ns5_cubic``; ``ns0`` and
    ``ns0_muon`` (no iteration, so no coefficients).

    Raises:
        ValueError: the name is none of these, or K is above the bound; the message
            names the name.
    """
    if name in ("raw", "baseline"):
        return RAW
    if name == "polar":
        return POLAR
    match = _NS_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or match[2] not in (None, *newton_schulz.COEFFICIENT_SETS):
        raise ValueError(
            f"read name {name!r} is not understood; use 'raw' (or 'baseline'), 'polar', "
            f"'nsK' (K iterations, 0 <= K <= {newton_schulz.MAX_ITERATIONS}, e.g. 'ns5'), "
            "'nsK_muon' or 'nsK_polar_express' (lower case, no spaces)."
        )
    digits = match[1].lstrip("0") or "0"
    try:
        # int() refuses thousands of digits with a message of its own; a count that
        # long is above the bound anyway.
        if len(digits) > len(str(newton_schulz.MAX_ITERATIONS)):
            raise newton_schulz.iteration_bound_error(digits)
        return ReadConfig("newton_schulz", int(digits), match[2] or _DEFAULT_COEFFICIENTS)
    except ValueError as error:
        raise ValueError(f"read name {name!r}: {error}") from None
