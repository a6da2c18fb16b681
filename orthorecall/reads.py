"""The reads of a matrix memory: what the mLSTM reads from C_t with its query.

A read maps the memory C (d x d, per head and position) to the matrix R(C) the query
reads from, h = qᵀ R(C):

* ``raw``: R(C) = C, the baseline mLSTM;
* ``newton_schulz``: R(C) = NS_k(C), the orthogonalized read of the reference (k = 5,
  cubic coefficients) and its variants (any k, Muon's and Polar Express's
  coefficients); the iteration itself lives in :mod:`orthorecall.newton_schulz`;
* ``polar``: R(C) = U Vᵀ, the exact orthogonal polar factor that NS_k approaches;
* ``rls``: the whitened read of the replication's mechanism study: the query is
  multiplied by P_t ≈ (Σ k̂k̂ᵀ + λI)⁻¹ (kept by Sherman–Morrison in the recurrence,
  :mod:`orthorecall.mlstm`), so the memory is read by ridge regression.

The replication's mechanism study also varies how the memory is written and trained,
and those variants are named like reads (``--config.reads``), so a config carries them:

* ``straight_through``: ``"forward"`` (``nsK_fwd``: NS_k's value, the raw read's
  gradient) or ``"backward"`` (``nsK_bwd``: the raw read's value, NS_k's gradient);
* ``write``: ``"delta"`` (``delta``, ``delta_nsK``): the delta rule
  C_t = f (I − k̂k̂ᵀ) C_{t−1} + i k̂vᵀ instead of C_t = f C_{t−1} + i k̂vᵀ;
* ``frozen``: ``"k"`` (``randk``) or ``"qk"`` (``randqk``): the key (and query)
  projections stay at their random initialization (``training`` never updates them).

``docs/specification.md`` states each in full.

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

READ_KINDS = ("raw", "newton_schulz", "polar", "rls")
STRAIGHT_THROUGH = ("none", "forward", "backward")
WRITES = ("additive", "delta")
# Which of the cell's parameters stay at their initialization ("randk", "randqk").
FROZEN = {"none": (), "k": ("k_proj",), "qk": ("q_proj", "k_proj")}
# λ of the whitened read (the replication's value).
DEFAULT_RIDGE = 1e-2
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


@jax.custom_vjp
def _value_with_gradient_of(value: jax.Array, gradient_source: jax.Array) -> jax.Array:
    return value


def _value_with_gradient_of_fwd(value, gradient_source):
    return value, None


def _value_with_gradient_of_bwd(_, g):
    return jnp.zeros_like(g), g


_value_with_gradient_of.defvjp(_value_with_gradient_of_fwd, _value_with_gradient_of_bwd)


def straight_through(value: jax.Array, gradient_source: jax.Array) -> jax.Array:
    """``value`` exactly, differentiated as if it were ``gradient_source`` (same shape).

    Not ``source + stop_gradient(value - source)``, whose value differs from ``value``
    by float rounding; nothing is differentiated through ``value``.
    """
    if value.shape != gradient_source.shape:
        raise ValueError(
            f"straight_through: value {value.shape} and gradient source "
            f"{gradient_source.shape} must have the same shape."
        )
    return _value_with_gradient_of(jax.lax.stop_gradient(value), gradient_source)


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
            orthogonalized read), ``"polar"`` (the exact polar factor of C) or ``"rls"``
            (the whitened read: query P_t q_t).
        num_iterations: k for ``"newton_schulz"`` (the reference uses 5), at most
            ``newton_schulz.MAX_ITERATIONS``.
        coefficients: coefficient set for ``"newton_schulz"``.
        straight_through: ``"none"``; ``"forward"``: this read's value with the raw
            read's gradient; ``"backward"``: the raw read's value with this read's
            gradient (``"newton_schulz"`` and ``"polar"`` only).
        write: ``"additive"`` (the mLSTM's) or ``"delta"`` (erase along k̂ first).
        frozen: ``"none"``, ``"k"`` or ``"qk"``: the projections training leaves at
            their initialization (``frozen_parameters``).
        ridge: λ of the ``"rls"`` read (> 0).
    """

    kind: str = "raw"
    num_iterations: int = _DEFAULT_ITERATIONS
    coefficients: str = _DEFAULT_COEFFICIENTS
    straight_through: str = "none"
    write: str = "additive"
    frozen: str = "none"
    ridge: float = DEFAULT_RIDGE

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
        for field, allowed in (
            ("straight_through", STRAIGHT_THROUGH),
            ("write", WRITES),
            ("frozen", tuple(FROZEN)),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"ReadConfig.{field}={getattr(self, field)!r} is not known; use one of "
                    f"{allowed}."
                )
        if self.straight_through != "none" and self.kind not in ("newton_schulz", "polar"):
            raise ValueError(
                f"ReadConfig.straight_through={self.straight_through!r} swaps the gradient of "
                f"a read with the raw read's; kind={self.kind!r} has no such pair (use "
                "'newton_schulz' or 'polar')."
            )
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise ValueError(f"ReadConfig.ridge must be a positive number, got {self.ridge!r}.")
        if not 0 < self.ridge < float("inf"):
            raise ValueError(f"ReadConfig.ridge must be finite and > 0, got {self.ridge!r}.")
        if self.kind == "rls" and self.write != "additive":
            raise ValueError("the rls read keeps the additive write; write='delta' is not defined.")
        # A Python float, the same for every read that does not use it (equal reads hash equally).
        object.__setattr__(
            self, "ridge", float(self.ridge) if self.kind == "rls" else DEFAULT_RIDGE
        )

    @property
    def is_raw(self) -> bool:
        """The read is C itself (whatever the write or the frozen parameters)."""
        return self.kind == "raw"

    @property
    def has_chunkwise_form(self) -> bool:
        """Whether ``mlstm.chunkwise_sequence`` has a chunk-parallel form of this variant:
        the additive write and a read of C_t alone. The delta write and the rls read run
        their recurrence there instead."""
        return self.write == "additive" and self.kind != "rls"

    def replace(self, **changes) -> ReadConfig:
        """A copy with ``changes`` applied (validated like a new configuration)."""
        return dataclasses.replace(self, **changes)

    @property
    def own_read(self) -> ReadConfig:
        """This read without its straight-through swap: the read whose value
        (``"forward"``) or gradient (``"backward"``) it takes."""
        return self.replace(straight_through="none")

    def frozen_parameters(self) -> tuple[str, ...]:
        """Names of the cell parameters training keeps at their initialization."""
        return FROZEN[self.frozen]

    def combine_straight_through(self, own: jax.Array, raw: jax.Array) -> jax.Array:
        """The read's output from the outputs of ``own_read`` and of the raw read (same
        shapes): ``own`` itself without a straight-through swap."""
        if self.straight_through == "forward":
            return straight_through(own, raw)
        if self.straight_through == "backward":
            return straight_through(raw, own)
        return own

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
        (``orthorecall.gram_read``: cubic-type NS_k, 1 <= k <= 6, additive write, no
        straight-through swap), else None."""
        if self.kind != "newton_schulz" or self.straight_through != "none":
            return None
        if self.write != "additive":
            return None
        return gram_read.gram_steps(self.num_iterations, self.coefficients)

    def __call__(self, memory: jax.Array) -> jax.Array:
        """Applies the read to memories (..., d, d); raw returns them unchanged.

        Raises:
            ValueError: the rls read, which is a function of the keys' history too
                (``mlstm.memory_step`` computes it).
        """
        if self.kind == "rls":
            raise ValueError(
                "the rls read whitens the query with the keys' history; it is not a "
                "function of C alone (run it through orthorecall.mlstm)."
            )
        if self.straight_through != "none":
            return self.combine_straight_through(self.own_read(memory), memory)
        if self.kind == "raw":
            return memory
        if self.kind == "polar":
            return polar(memory)
        return newton_schulz.newton_schulz(memory, self.num_iterations, self.coefficients)

    def retrieve(self, memory: jax.Array, query: jax.Array) -> jax.Array:
        """qᵀ R(C) for memories (..., d, d) and queries (..., d): the vector the
        mLSTM reads. For NS_k this never forms NS_k(C) (``newton_schulz_read``).
        The rls read's query is whitened before (``mlstm``); its R is the identity."""
        if self.straight_through != "none":
            raw = jnp.einsum(
                "...i,...ij->...j", query.astype(jnp.float32), memory.astype(jnp.float32)
            )
            return self.combine_straight_through(self.own_read.retrieve(memory, query), raw)
        if self.kind == "rls":
            return jnp.einsum(
                "...i,...ij->...j", query.astype(jnp.float32), memory.astype(jnp.float32)
            )
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
    ``newton_schulz.MAX_ITERATIONS``), ``nsK_muon``, ``nsK_polar_express``, ``polar``,
    and the replication's mechanism variants: ``nsK_fwd`` / ``nsK_bwd`` (straight-through
    halves of any NS name, e.g. ``ns5_muon_fwd``), ``delta`` and ``delta_nsK`` (delta-rule
    write), ``rls`` (whitened read), ``randk`` / ``randqk`` (frozen random key, or query
    and key, projections).

    Names are exact: lower case, no spaces. Names of the same read give equal (and
    equally hashed) configs, so equality tells aliases apart from different reads:
    ``raw`` and ``baseline``; ``ns5``, ``ns05`` and ``ns5_cubic``; ``ns0`` and
    ``ns0_muon`` (no iteration, so no coefficients).

    Raises:
        ValueError: the name is none of these, or K is above the bound; the message
            names the name.
    """
    if not isinstance(name, str):
        raise ValueError(f"read name {name!r} is not a string; use e.g. 'raw' or 'ns5'.")
    variants = {
        "rls": ReadConfig("rls"),
        "delta": ReadConfig("raw", write="delta"),
        "randk": ReadConfig("raw", frozen="k"),
        "randqk": ReadConfig("raw", frozen="qk"),
    }
    if name in variants:
        return variants[name]
    base, swap, write = name, "none", "additive"
    for suffix, half in (("_fwd", "forward"), ("_bwd", "backward")):
        if name.startswith("ns") and name.endswith(suffix):
            base, swap = name[: -len(suffix)], half
    if name.startswith("delta_ns"):
        base, write = name[len("delta_") :], "delta"
    return _plain_read_from_name(base, name).replace(straight_through=swap, write=write)


def _plain_read_from_name(name: str, full_name: str) -> ReadConfig:
    """raw, baseline, polar, nsK[_coefficients]; errors name ``full_name``."""
    if name in ("raw", "baseline"):
        return RAW
    if name == "polar":
        return POLAR
    match = _NS_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or match[2] not in (None, *newton_schulz.COEFFICIENT_SETS):
        raise ValueError(
            f"read name {full_name!r} is not understood; use 'raw' (or 'baseline'), 'polar', "
            f"'nsK' (K iterations, 0 <= K <= {newton_schulz.MAX_ITERATIONS}, e.g. 'ns5'), "
            "'nsK_muon' or 'nsK_polar_express', a straight-through half 'nsK_fwd' or "
            "'nsK_bwd', 'delta', 'delta_nsK', 'rls', 'randk' or 'randqk' (lower case, no "
            "spaces)."
        )
    digits = match[1].lstrip("0") or "0"
    try:
        # int() refuses thousands of digits with a message of its own; a count that
        # long is above the bound anyway.
        if len(digits) > len(str(newton_schulz.MAX_ITERATIONS)):
            raise newton_schulz.iteration_bound_error(digits)
        return ReadConfig("newton_schulz", int(digits), match[2] or _DEFAULT_COEFFICIENTS)
    except ValueError as error:
        raise ValueError(f"read name {full_name!r}: {error}") from None
