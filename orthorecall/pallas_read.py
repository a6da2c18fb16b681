"""The fused Newton–Schulz read for NVIDIA GPUs, written in Pallas (Triton backend).

On GPUs the pure-JAX read (``newton_schulz._jax_read``) is a chain of small batched
products: every iterate X_j and Gram matrix G_j = X_jᵀX_j of every memory makes a round
trip through global memory, k times forward and again in the backward pass, which also
keeps all k iterates alive between its recompute and its reverse sweep. Here one Triton
program takes one memory C (and its query q) from global memory, and everything else
happens on chip: the Frobenius normalization with its floor, the k iterations
X <- a X + X (b G + c G²), and the read h = qᵀ NS_k(C). Only h (d floats) goes back
(``ns_read_forward``). The backward (``ns_read_backward``) is two programs per memory:
the first runs the iterations again and writes each step's input X_j to global memory
(with q̄), the second forms Ȳ = q h̄ᵀ, runs the reverse iterations of
``newton_schulz._iterations_backward`` reading X_j, and the normalization's VJP, and
writes C̄. It is the same function as ``_jax_read`` and ``_jax_backward`` (to float32
rounding): the tests compare the two in Pallas' interpret mode, on CPU.

Widths. Triton's blocks must have power-of-two sides and its matrix product wants at
least 16, so a d x d memory is handled as a D x D block, D the next power of two
>= max(d, 16). The padding is zeros, loaded with masks from the unpadded array (no
padded copy is written to global memory), and it is exact: X0's padded rows and columns
are zero, hence so are those of G = XᵀX, of X P(G) and of every later iterate (and, in
the backward, of Ȳ = q h̄ᵀ, XᵀȲ, Ḡ and X̄), while the sum of squares, and with it the
normalization, only gains zeros. Sums over the padded index only add exact zeros, so
the d x d corner is what an unpadded computation gives. Widths above ``MAX_WIDTH`` are
refused (ValueError) so the caller can fall back to XLA; see there why.

Huge memories. ``scaling.rescaling`` (a per-matrix power of two, without
gradient) is applied in the JAX wrapper, before the kernel, exactly as
``frobenius_normalize`` applies it: the kernel sees x = s C with s piecewise constant,
so C̄ = s x̄.

Backward: the iterates through global memory. Each reverse step needs its forward
step's input X_j (and G_j = X_jᵀX_j). Keeping the k inputs as values of one unrolled
program spilled 50-85 KB per thread (ptxas gave up at 32 registers); recomputing X_j
from X0 in a loop inside the reverse loop (k(k+1)/2 forward steps instead of k) kept
X0 and Ȳ live beside a forward step and still spilled 0.1-0.3 KB. The Triton backend
of Pallas has no scratch memory, and a program that wrote the iterates to global memory
and read them back would need a barrier between its threads that Pallas does not
offer. So the backward is two kernels (``_Call.backward``): the first writes X_0 ..
X_{k-1} (k D² floats per memory, padded to the block), the kernel boundary orders the
writes before the reads, and the second's reverse step loads X_j where each product
needs it (``_Loaded``): by blocks of 16 rows for the Gram-type products XᵀX and XᵀȲ,
whole for X (Ḡ + Ḡᵀ), so that no copy of X_j stays live across the step, and its loop
is software-pipelined (``REVERSE_STAGES``). The cost is k D² floats written and 4k D²
loaded per memory (80 and 320 KB at D = 64 for NS5; the loads mostly hit the caches)
and one more launch; ``results/gpu_compile_report.json`` has what it saves in spills,
docs/accelerators.md weighs the two.

Precision. Every product is requested explicitly (``jax_precision`` as recorded by
``orthorecall.precision.current()``), since Triton's float32 ``tt.dot`` defaults to
TensorFloat-32: see ``SUPPORTED_PRECISIONS`` and ``_Products``. Float32 ("highest", the
model's default) runs on tensor cores as three TF32 products per product (3xTF32, split
and rounded in the kernel, so that interpret mode computes what the GPU does): IEEE
products would be FMAs, whose operands fill the registers.

Lowering. ``interpret=False`` lowers for CUDA only (Pallas refuses the CPU backend
unless interpreted); ``interpret=True`` runs the same kernel body as XLA operations on
any backend, which is how the tests check it on CPU. The kernels are always given
Triton ``CompilerParams``: without them JAX 0.10 picks its Mosaic GPU backend for
``pallas_call``. The functions are not meant to be differentiated by JAX: the caller
pairs them in a ``jax.custom_vjp`` (as ``newton_schulz._ns_read`` does with
``cpu_kernel``). They batch under ``vmap`` (pallas_call adds a grid axis) but have no
partitioning rule: under SPMD sharding of the leading axes XLA would gather them, so a
sharded caller should run them per shard (``shard_map``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import warnings

import jax
import jax.numpy as jnp

from orthorecall import scaling

try:  # Missing from some JAX builds; ``available()`` says so instead of the import failing.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the installed JAX
    pl = plgpu = None

Steps = tuple[tuple[float, float, float], ...]

# The widest memory (d) the kernels take; wider ones raise ValueError (the caller falls
# back to XLA). A program holds several D x D float32 tiles at once (the iterate, its
# Gram matrix, the products' operands and accumulators): at D = 64 one tile is 16 KiB
# (32 registers per thread over 4 warps), and the kernels take up to 64 KiB of shared
# memory and up to 255 registers per thread (results/gpu_compile_report.json). At
# D = 128 a tile is 64 KiB, four times the registers and shared memory: beyond the
# register file and the 99-101 KiB per block of consumer Ampere/Ada GPUs. 64 covers the
# model's d = 48; raising it needs measurements on the GPUs concerned.
MAX_WIDTH = 64
# Warps per program, at every width. Triton lays the products of a chain of dependent
# products (these kernels) out with all warps along the rows (warpsPerCTA
# [num_warps, 1]) and 16 rows per warp: with 8 warps a 64-row block is held twice over,
# each warp holding a whole operand, so the registers per thread are those of 4 warps.
# 4 warps do the same work with half the threads: two programs per SM instead of one
# (results/gpu_compile_report.json). Measured again with the Gram products in blocks
# (D = 64, "highest"): 8 warps left the sm_80 backward at 255 registers with about the
# same spills (NS 296 B against 280, chunk 472 against 564), the sm_90 backward at
# 68-120 B against 112-148 and its forward at 181-194 registers against 158-165 (one
# program of 8 warps instead of three of 4); none reached zero. 16 warps capped the
# registers at 128 and spilled 1-6 KB.
NUM_WARPS = 4
# Software-pipelining stages of the backward's reverse-sweep kernel, whose loop loads the
# iterates X_j from global memory (the other kernels' loops load nothing: one stage).
# With 2, Triton's pipeliner stages the loads of X_j's blocks through shared memory
# (asynchronous copies) instead of registers: by the compile report ("highest",
# D = 48/64) the reverse kernel's spills on sm_80 48-56 -> 0-16 B (NS read) and
# 32-40 -> 0 (chunk read), and none with the reverse step's products of
# ``_reverse_step``; none on sm_90 either way; for 16 (sm_80) and 32 KiB (sm_90) more
# shared memory. 3 stages were no better (16 B, 64-96 KiB).
REVERSE_STAGES = 2
# Smallest block side: Triton's tt.dot needs every dimension >= 16.
_MIN_BLOCK = 16
# The custom call pallas_call's Triton lowering emits with jaxlib <= 0.10.2 (later
# jaxlibs compile the kernel at lowering and emit "triton_kernel_call_ffi").
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"

# The precisions of ``jax.default_matmul_precision`` (as ``precision.current()``
# returns them) the kernels implement, and how:
#   "highest", "float32", "F32_F32_F32": float32-faithful products on tensor cores: each
#       is three TF32 products of operands split and rounded in the kernel (3xTF32,
#       ``_Products._dots``), passed as lax.Precision.DEFAULT, which Pallas' Triton
#       lowering (jax/_src/pallas/triton/lowering.py, _dot_general_lowering) turns into
#       tt.dot {inputPrecision = tf32}. Against a float64 read their error is that of
#       IEEE float32 products (tests/test_pallas_read.py); IEEE tt.dots (HIGHEST) would
#       run as FMAs and spill.
#   None, "default", "high", "tensorfloat32", "TF32_TF32_F32": TensorFloat-32 products,
#       what XLA does on NVIDIA GPUs for these: lax.Precision.DEFAULT or HIGH, lowered to
#       tt.dot {inputPrecision = tf32}.
#   "bfloat16", "BF16_BF16_F32": both operands rounded to bfloat16 in the kernel, the
#       product accumulated in float32 (preferred_element_type); the lowering emits a
#       bf16 x bf16 -> f32 tt.dot (its inputPrecision only concerns f32 operands).
# Other presets (TF32/BF16 multi-pass, float16, float8) raise ValueError: XLA then.
_IEEE = ("highest", "float32", "F32_F32_F32")
_TF32 = (None, "default", "high", "tensorfloat32", "TF32_TF32_F32")
_BF16 = ("bfloat16", "BF16_BF16_F32")
SUPPORTED_PRECISIONS = _IEEE + _TF32 + _BF16


@functools.cache
def available() -> bool:
    """Whether Pallas and its Triton backend import in this JAX (a GPU is not needed to
    lower for CUDA, and not at all in interpret mode)."""
    if pl is None or plgpu is None:
        return False
    try:
        # What pallas_call's CUDA lowering imports to pick the Triton backend.
        importlib.import_module("jax._src.pallas.triton.pallas_call_registration")
    except ImportError:
        return False
    return True


@functools.cache
def compile_failure(steps: Steps, width: int, jax_precision: str | None) -> str | None:
    """None if the forward and backward kernels build for memories of ``width`` (lowered
    to Triton for CUDA, and compiled where this process has a GPU); else why not, after
    warning once (RuntimeWarning). ``newton_schulz`` then runs the XLA read: a Triton
    failure is caught here, once per configuration, instead of failing the whole
    program when XLA compiles it."""

    def read_and_vjp(c, q, h_bar):
        kwargs = {"steps": steps, "jax_precision": jax_precision}
        return (
            ns_read_forward(c, q, **kwargs),
            ns_read_backward(c, q, h_bar, **kwargs),
        )

    matrix = jax.ShapeDtypeStruct((1, width, width), jnp.float32)
    vector = jax.ShapeDtypeStruct((1, width), jnp.float32)
    try:
        lowered = jax.jit(read_and_vjp).trace(matrix, vector, vector)
        lowered = lowered.lower(lowering_platforms=("cuda",))
        if jax.default_backend() == "gpu":
            lowered.compile()
    except Exception as error:  # any failure of Pallas, Triton or XLA: use the XLA read
        reason = f"{type(error).__name__}: {error}".strip()
        if len(reason) > 2000:
            reason = reason[:2000] + " ..."
        warnings.warn(
            f"The Pallas Newton–Schulz read does not build for d = {width} under matmul "
            f"precision {jax_precision!r} ({reason}); using the XLA read instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return reason
    return None


def block_width(d: int) -> int:
    """The block side D the kernels use for d x d memories: the next power of two >= d,
    at least 16."""
    return max(_MIN_BLOCK, 1 << (d - 1).bit_length())


def ns_read_forward(
    memory: jax.Array,
    query: jax.Array,
    *,
    steps: Steps,
    jax_precision: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """h = NS(C)ᵀ q by the Pallas kernel, one program per memory.

    Computes what ``newton_schulz._jax_read(memory, query, steps)`` computes.

    Args:
        memory: C, (..., d, d) with d <= ``MAX_WIDTH``, any real float dtype (computed in
            float32).
        query: q, (..., d), the same leading shape.
        steps: the (a, b, c) of each of k >= 1 iterations
            (``newton_schulz.iteration_coefficients``); c == 0 skips the G² product.
        jax_precision: the precision of the products, one of ``SUPPORTED_PRECISIONS``
            (``orthorecall.precision.current()``; None is TensorFloat-32 on GPUs).
        interpret: run the kernel as XLA operations (any backend, e.g. CPU for tests)
            instead of lowering it to Triton (CUDA only).

    Returns:
        float32 (..., d).

    Raises:
        ValueError: non-square memory, mismatched shapes, a non-real dtype, d above
            ``MAX_WIDTH``, malformed or empty steps, an unsupported precision.
        RuntimeError: Pallas' Triton backend is not available (``available()``).
    """
    memory, query = _check_operands("ns_read_forward", memory, query)
    call = _Call.of(memory, steps, jax_precision, interpret)
    batch_shape, d = memory.shape[:-2], memory.shape[-1]
    if call.count == 0:
        return jnp.zeros(query.shape, jnp.float32)
    memory = memory * scaling.rescaling(memory)
    h = call.forward()(memory.reshape(call.count, d, d), query.reshape(call.count, d))
    return h.reshape(*batch_shape, d)


def ns_read_backward(
    memory: jax.Array,
    query: jax.Array,
    h_bar: jax.Array,
    *,
    steps: Steps,
    jax_precision: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(C̄, q̄), the VJP of ``ns_read_forward`` at (memory, query) for h̄, by the Pallas
    kernel, one program per memory.

    Equals ``newton_schulz._jax_backward(memory, query, h_bar, steps)``: C̄ is the
    normalization's VJP of the reverse iterations from Ȳ = q h̄ᵀ, q̄ = NS(C) h̄.

    Args:
        memory: C, (..., d, d) with d <= ``MAX_WIDTH``, any real float dtype.
        query: q, (..., d).
        h_bar: h̄, (..., d), the cotangent of the read.
        steps, jax_precision, interpret: as for ``ns_read_forward``.

    Returns:
        float32 (C̄ (..., d, d), q̄ (..., d)).

    Raises:
        ValueError, RuntimeError: as ``ns_read_forward``, and an h̄ whose shape is not
            the query's.
    """
    memory, query = _check_operands("ns_read_backward", memory, query)
    h_bar = _real_float32("ns_read_backward", "h_bar", h_bar)
    if h_bar.shape != query.shape:
        raise ValueError(
            f"ns_read_backward expects h_bar of the query's shape {query.shape}, got {h_bar.shape}."
        )
    call = _Call.of(memory, steps, jax_precision, interpret)
    batch_shape, d = memory.shape[:-2], memory.shape[-1]
    if call.count == 0:
        return jnp.zeros(memory.shape, jnp.float32), jnp.zeros(query.shape, jnp.float32)
    # The rescaling is piecewise constant and treated as such by the XLA read
    # (stop_gradient), so the chain rule through x = scale * C is C̄ = scale * x̄.
    scale = scaling.rescaling(memory)
    x_bar, q_bar = call.backward()(
        (memory * scale).reshape(call.count, d, d),
        query.reshape(call.count, d),
        h_bar.reshape(call.count, d),
    )
    return scale * x_bar.reshape(memory.shape), q_bar.reshape(*batch_shape, d)


def _real_float32(caller: str, name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{caller} expects a real floating {name}, got dtype {x.dtype}.")
    return x.astype(jnp.float32)


def _check_operands(caller: str, memory, query) -> tuple[jax.Array, jax.Array]:
    memory = _real_float32(caller, "memory", memory)
    query = _real_float32(caller, "query", query)
    if memory.ndim < 2 or memory.shape[-1] != memory.shape[-2]:
        raise ValueError(
            f"{caller} expects a batch of square memories (..., d, d), got shape {memory.shape}."
        )
    if query.shape != memory.shape[:-1]:
        raise ValueError(
            f"{caller} expects query of shape memory.shape[:-1] = {memory.shape[:-1]}, "
            f"got {query.shape}."
        )
    d = memory.shape[-1]
    if d < 1:
        raise ValueError(f"{caller} expects memories of width d >= 1, got shape {memory.shape}.")
    if d > MAX_WIDTH:
        raise ValueError(
            f"{caller} supports widths d <= MAX_WIDTH = {MAX_WIDTH} (a wider memory's tiles "
            f"do not fit on chip; use the XLA read), got d = {d}."
        )
    return memory, query


def _check_steps(steps) -> Steps:
    """``steps`` as a tuple of plain float triples (the kernels unroll them)."""
    try:
        triples = [tuple(step) for step in steps]
    except TypeError:
        triples = []
    valid = bool(triples) and all(
        len(step) == 3
        and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in step
        )
        for step in triples
    )
    if not valid:
        raise ValueError(
            "steps must be a non-empty sequence of finite (a, b, c) triples, one per "
            "Newton–Schulz iteration (newton_schulz.iteration_coefficients; k = 0, the "
            f"normalization alone, is not a kernel read), got {steps!r}."
        )
    return tuple(tuple(float(v) for v in step) for step in triples)


def tf32_round(x):
    """x rounded to TensorFloat-32 (10 explicit mantissa bits, to nearest, ties away from
    zero), as float32: a bit operation, so the kernel's own rounding, identical in
    interpret mode and on the GPU, whose tensor cores then take the value exactly."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    bits = jax.lax.bitwise_and(bits + _TF32_HALF, _TF32_MASK)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# Adding half a unit of the 13 dropped bits to the magnitude bits, then clearing them,
# rounds the magnitude to nearest (a carry into the exponent is the correct result).
_TF32_HALF = 1 << 12
_TF32_MASK = -(1 << 13)


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """A D x D operand in global memory (a kernel's ref, already indexed): loaded where
    a product needs it, whole or by blocks of rows, rather than kept live in registers."""

    ref: object  # (n, D, D)
    index: object  # which of its n matrices (may be traced)

    @property
    def shape(self):
        return tuple(self.ref.shape[1:])

    def whole(self):
        return plgpu.load(self.ref.at[self.index])

    def rows(self, start: int, size: int):
        # One indexer (Pallas' Triton lowering takes no chain of them).
        return plgpu.load(self.ref.at[self.index, pl.ds(start, size), :])


def _value(x):
    return x.whole() if isinstance(x, _Loaded) else x


@dataclasses.dataclass(frozen=True)
class _Products:
    """The matrix products of a kernel body, at one precision (see
    ``SUPPORTED_PRECISIONS``)."""

    precision: jax.lax.Precision
    bfloat16: bool
    split: bool = False

    @classmethod
    def of(cls, jax_precision: str | None) -> _Products:
        if jax_precision in _IEEE:
            # Three TensorFloat-32 products per float32 one (see _dot): tensor cores.
            return cls(jax.lax.Precision.DEFAULT, False, True)
        if jax_precision in _TF32:
            precision = jax.lax.Precision.DEFAULT
            if jax_precision in ("high", "tensorfloat32"):
                precision = jax.lax.Precision.HIGH
            return cls(precision, False)
        if jax_precision in _BF16:
            # _dot rounds the operands to bfloat16, whose products are exact in float32:
            # HIGHEST adds nothing but keeps the lowering from tagging the dot tf32.
            return cls(jax.lax.Precision.HIGHEST, True)
        raise ValueError(
            f"jax_precision={jax_precision!r} is not supported by the Pallas read; use one "
            f"of {SUPPORTED_PRECISIONS} (or the XLA read)."
        )

    def _one(self, a, b, dims):
        """The product contracting axis dims[0] of a with axis dims[1] of b."""
        return jax.lax.dot_general(
            a,
            b,
            ((dims[:1], dims[1:]), ((), ())),
            precision=self.precision,
            preferred_element_type=jnp.float32,
        )

    def _dots(self, pairs, init=None):
        """init + Σ a b over the (a, b, dims) of ``pairs``, into one float32
        accumulator (Triton folds each sum into the next product's accumulator)."""
        if not self.split:
            pairs = [(_value(a), _value(b), d) for a, b, d in pairs]
        if self.bfloat16:
            pairs = [(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), d) for a, b, d in pairs]
        total = init
        if not self.split:
            for a, b, dims in pairs:
                term = self._one(a, b, dims)
                total = term if total is None else total + term
            return total
        # Float32 products on tensor cores (3xTF32): a = a_hi + a_lo with both parts
        # rounded to TF32 here (a_lo = tf32(a - a_hi) keeps all but about 2^-22 of a),
        # and a b = a_hi b_hi + a_lo b_hi + a_hi b_lo, dropping a_lo b_lo (2^-22
        # relative). The partial products of TF32 values are exact, accumulated in
        # float32. The error of the Newton–Schulz read is that of IEEE float32 products
        # (tests/test_pallas_read.py measures both against float64). Interpret mode
        # checks this arithmetic; how the tensor cores round their float32 accumulation
        # is the GPU's (to be checked on a device: experiments/accelerators/check.py).
        #
        # The Gram-type products (aᵀ b, ``tmm``) run over the contraction in blocks
        # of _K_BLOCK, the hi/lo parts of one block live at a time. With mma.sync
        # (sm_80) every warp holds the whole second operand in registers (Triton lays
        # these chains of products out with all warps along the rows): 128 registers
        # per thread for a 64 x 64 float32 operand, 256 for its hi and lo parts, of
        # which a 16-row block holds a quarter. The other products are not split:
        # in interpret mode splitting them too took the backward's error against
        # float64 past twice the IEEE float32 read's (tests/test_pallas_read.py).
        for a, b, dims in pairs:
            # (An operand in global memory, ``_Loaded``, is loaded by blocks here.)
            blocks = _k_blocks(a, b, dims) if dims == (0, 0) else [(_value(a), _value(b))]
            for a_k, b_k in blocks:
                a_hi, b_hi = tf32_round(a_k), tf32_round(b_k)
                # hi·hi, lo·hi, hi·lo: the order that spilled least on sm_80.
                for x, y in (
                    (a_hi, b_hi),
                    (tf32_round(a_k - a_hi), b_hi),
                    (a_hi, tf32_round(b_k - b_hi)),
                ):
                    term = self._one(x, y, dims)
                    total = term if total is None else total + term
        return total

    def mm(self, a, b, *more, init=None, symmetric=False):
        """init + a b (+ the products of further pairs ``more``: a2, b2, ...).

        ``symmetric``: every b is symmetric, so a b = a bᵀ is computed contracting b's
        second axis (for the 3xTF32 products: fewer registers on sm_80, by the compile
        report; the one-pass products contract the first, which spilled less there)."""
        pairs = [(a, b), *zip(more[::2], more[1::2], strict=True)]
        dims = (1, 1) if symmetric and self.split else (1, 0)
        return self._dots([(x, y, dims) for x, y in pairs], init)

    def tmm(self, a, b):
        """aᵀ b (the lowering transposes the operand on chip)."""
        return self._dots([(a, b, (0, 0))])


# The contraction block of the split 3xTF32 products (tt.dot needs at least 16), and the
# shortest contraction split: at D = 32 the split backward kept 4 B of spills on sm_80
# (168 registers), the whole one none (254).
_K_BLOCK = 16
_K_SPLIT_FROM = 64


def _k_blocks(a, b, dims):
    """(a_k, b_k) over blocks of _K_BLOCK of the contracted axes (dims) of a and b
    (one block below _K_SPLIT_FROM)."""
    size = a.shape[dims[0]]
    if size < _K_SPLIT_FROM:
        return [(_value(a), _value(b))]
    parts = size // _K_BLOCK

    def blocks(x, axis):
        # An operand in global memory is loaded block by block (each block in the
        # product's layout, never the whole operand at once).
        if isinstance(x, _Loaded):
            return [x.rows(m * _K_BLOCK, _K_BLOCK) for m in range(parts)]
        return jnp.split(x, parts, axis=axis)

    return list(zip(blocks(a, dims[0]), blocks(b, dims[1]), strict=True))


def _inverse_norm(c, floor: float):
    """(s, r): the sum of squares of the block and r = rsqrt(max(s, floor²)), the
    scale of frobenius_normalize."""
    # Triton reduces one axis at a time.
    s = jnp.sum(jnp.sum(c * c, axis=1), axis=0)
    return s, jax.lax.rsqrt(jnp.maximum(s, floor * floor))


def _quintic(steps: Steps) -> bool:
    """Whether any step has a G² term (the cubic steps skip its product)."""
    return any(c != 0.0 for _, _, c in steps)


def _coefficients(steps: Steps, i):
    """(a, b, c) of step ``i`` (a traced loop index): constants when every step has the
    same, else picked from the table by arithmetic (no select between constants, which
    Pallas' Triton lowering of JAX 0.10.2 mistypes)."""
    if all(step == steps[0] for step in steps):
        return steps[0]
    hits = [(i == n).astype(jnp.float32) for n in range(len(steps))]
    return tuple(
        sum(step[m] * hit for step, hit in zip(steps, hits, strict=True)) for m in range(3)
    )


def _polynomial(products: _Products, gram, b, c, quintic: bool):
    """P(G) = b G + c G²; the G² product only for quintic steps."""
    if not quintic:
        return b * gram
    return b * gram + c * products.mm(gram, gram, symmetric=True)


def _step(products: _Products, steps: Steps, i, x):
    """X_{i+1} = a X + X P(G) from X = X_i, G = XᵀX (step ``i``, may be traced)."""
    a, b, c = _coefficients(steps, i)
    poly = _polynomial(products, products.tmm(x, x), b, c, _quintic(steps))
    # a X + X P(G) rather than X (a I + P(G)): with 3xTF32 products the latter's
    # errors were up to 4 times the float32 read's (against float64), these 1x.
    if products.split:
        # 3xTF32: a X as the accumulator's start, P(G) contracted along its second
        # axis (it is symmetric): fewer registers on sm_80 by the compile report.
        return products.mm(x, poly, init=a * x, symmetric=True)
    return a * x + products.mm(x, poly)


def _iterate(products: _Products, x, steps: Steps):
    """The iterate after all steps, as a loop: one step's products are live at a time,
    and the program stays small."""
    return jax.lax.fori_loop(0, len(steps), functools.partial(_step, products, steps), x)


def _read_iterates(
    products: _Products, steps: Steps, floor: float, c, load_h_bar, store_x, store_q_bar
):
    """The first half of the backward, in a kernel body: the forward iterations from the
    (rescaled) block C, each step's input X_j handed to ``store_x(j, X_j)`` (for the
    reverse sweep, ``_read_reverse``), and q̄ = X_k h̄ to ``store_q_bar``, h̄ from
    ``load_h_bar()`` after the iterations (not kept live through them: by the compile
    report no spills instead of 8 B in the NS kernel at d = 48 on sm_80, 161 registers
    instead of 177 on sm_90)."""
    _, r = _inverse_norm(c, floor)

    def step(i, x):
        store_x(i, x)
        return _step(products, steps, i, x)

    x_k = jax.lax.fori_loop(0, len(steps), step, c * r)
    # h = qᵀ X_k: q̄ = X_k h̄ (and X̄_k = q h̄ᵀ, the reverse sweep's start).
    store_q_bar(jnp.sum(x_k * load_h_bar()[None, :], axis=1))


def _reverse_step(products: _Products, steps: Steps, j, x_j, y_bar):
    """X̄_j from X̄_{j+1} = Ȳ through step j, Y = a X + X P(G), G = XᵀX
    (``newton_schulz._iterations_backward``):
    X̄ = a Ȳ + Ȳ P(G) + X (Ḡ + Ḡᵀ),  Ḡ = b XᵀȲ + c (G XᵀȲ + XᵀȲ G).
    X_j is a ``_Loaded`` operand (global memory), loaded by each product."""
    quintic = _quintic(steps)
    a, b, cc = _coefficients(steps, j)
    gram = products.tmm(x_j, x_j)
    if products.bfloat16:
        # bfloat16: Ȳ P(G) added before XᵀȲ is formed, so that Ȳ is dead after it
        # (cubic steps): at most four tiles live (X_j, Ȳ, G or XᵀȲ, the sum).
        poly = _polynomial(products, gram, b, cc, quintic)
        y_bar_next = a * y_bar + products.mm(y_bar, poly)
        xt_y_bar = products.tmm(x_j, y_bar)
        gram_bar = b * xt_y_bar
        if quintic:
            gram_bar += cc * (products.mm(gram, xt_y_bar) + products.mm(xt_y_bar, gram))
        return y_bar_next + products.mm(x_j, gram_bar + gram_bar.T)
    xt_y_bar = products.tmm(x_j, y_bar)
    gram_bar = b * xt_y_bar
    if quintic:
        gram_bar += cc * (products.mm(gram, xt_y_bar) + products.mm(xt_y_bar, gram))
    poly = _polynomial(products, gram, b, cc, quintic)
    if products.split:
        # 3xTF32: both products into one accumulator started at a Ȳ, Ȳ P(G) first (X_j
        # loaded once more for the second), the symmetric factors contracted along their
        # first axis. By the compile report (D = 48/64, sm_80, with ``REVERSE_STAGES``):
        # no spills, against 16 B (NS, d = 48) contracting their second axis, 40-56 B
        # with X (Ḡ + Ḡᵀ) first, 0-64 B with separate sums.
        return products.mm(y_bar, poly, x_j, gram_bar + gram_bar.T, init=a * y_bar)
    # TensorFloat-32: separate sums spilled least.
    return a * y_bar + products.mm(y_bar, poly) + products.mm(x_j, gram_bar + gram_bar.T)


def _read_reverse(products: _Products, steps: Steps, floor: float, q, h_bar, load_x, load_c):
    """The second half of the backward, in a kernel body: C̄ of h = qᵀ NS(C) for h̄
    (``newton_schulz._jax_backward`` on one rescaled block), from the iterates X_j that
    ``load_x(j)`` gives (written by ``_read_iterates``), and C from ``load_c()`` for the
    normalization's VJP: the reverse sweep holds Ȳ and one step's tiles, nothing is
    recomputed."""

    def reverse_step(t, y_bar):
        j = len(steps) - 1 - t
        return _reverse_step(products, steps, j, load_x(j), y_bar)

    y_bar = jax.lax.fori_loop(0, len(steps), reverse_step, q[:, None] * h_bar[None, :])
    c = load_c()
    s, r = _inverse_norm(c, floor)
    # X0 = C r, r = rsqrt(max(s, floor²)), s = ΣC²: where s > floor²,
    # dr/ds = -r³/2, so C̄ = r X̄0 - r³ <X̄0, C> C; below the floor r is constant.
    # At s == floor² jnp.maximum's derivative is split evenly between its
    # arguments, so half the second term (as the XLA read).
    floor_sq = floor * floor
    # (Comparisons cast to float: Pallas' Triton lowering of JAX 0.10.2 types a
    # jnp.where between two constants as its i1 predicate and fails.)
    share = (s > floor_sq).astype(jnp.float32) + 0.5 * (s == floor_sq).astype(jnp.float32)
    inner = jnp.sum(jnp.sum(y_bar * c, axis=1), axis=0)
    return r * y_bar - (share * r * r * r * inner) * c


def _masks(d: int, width: int):
    """Which entries of a D-vector and of a D x D block are inside the d x d memory."""
    index = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
    rows = jax.lax.broadcasted_iota(jnp.int32, (width, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (width, width), 1)
    return index < d, (rows < d) & (cols < d)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One shape and configuration of the kernels: ``count`` memories of width d."""

    count: int
    d: int
    steps: Steps
    products: _Products
    interpret: bool

    @classmethod
    def of(cls, memory, steps, jax_precision, interpret) -> _Call:
        steps = _check_steps(steps)
        products = _Products.of(jax_precision)
        if not available():
            raise RuntimeError(
                "the Pallas read needs jax.experimental.pallas with its Triton backend, "
                "which this JAX does not provide; use the XLA read."
            )
        count = math.prod(memory.shape[:-2])
        return cls(count, memory.shape[-1], steps, products, bool(interpret))

    @property
    def width(self) -> int:
        return block_width(self.d)

    def _pallas_call(self, kernel, in_specs, out_specs, out_shape, num_stages=1):
        return pl.pallas_call(
            kernel,
            grid=(self.count,),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            # Without Triton's parameters JAX 0.10 lowers pallas_call with Mosaic GPU.
            # 4 warps, one warp group, at every width: ``NUM_WARPS``. One stage, except
            # for the reverse sweep's loads (``REVERSE_STAGES``).
            compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=num_stages),
            interpret=self.interpret,
        )

    def _matrix_spec(self):
        # Blocks wider than the array: the kernel loads and stores them with masks.
        return pl.BlockSpec((None, self.width, self.width), lambda i: (i, 0, 0))

    def _vector_spec(self):
        return pl.BlockSpec((None, self.width), lambda i: (i, 0))

    def forward(self):
        """(count, d, d) rescaled memories, (count, d) queries -> (count, d) reads."""
        d, steps, products = self.d, self.steps, self.products
        floor = scaling.FROBENIUS_FLOOR

        def ns_read_forward_kernel(memory_ref, query_ref, h_ref):
            vector_mask, matrix_mask = _masks(d, self.width)
            c = plgpu.load(memory_ref, mask=matrix_mask, other=0.0)
            q = plgpu.load(query_ref, mask=vector_mask, other=0.0)
            _, r = _inverse_norm(c, floor)
            x = _iterate(products, c * r, steps)
            # qᵀX as a broadcast and a sum: a 1 x D product is below tt.dot's 16, and
            # this way the read is float32 whatever the precision of the iterations.
            plgpu.store(h_ref, jnp.sum(q[:, None] * x, axis=0), mask=vector_mask)

        return self._pallas_call(
            ns_read_forward_kernel,
            in_specs=[self._matrix_spec(), self._vector_spec()],
            out_specs=self._vector_spec(),
            out_shape=jax.ShapeDtypeStruct((self.count, d), jnp.float32),
        )

    def backward(self):
        """(count, d, d) rescaled memories, (count, d) queries and h̄ -> (x̄, q̄), by two
        kernels: the iterations, writing every step's input X_j (count, k, D, D) to
        global memory, then the reverse sweep reading them (module docstring)."""
        d, w, steps, products = self.d, self.width, self.steps, self.products
        k = len(steps)
        floor = scaling.FROBENIUS_FLOOR

        def ns_read_iterates_kernel(memory_ref, h_bar_ref, iterates_ref, q_bar_ref):
            vector_mask, matrix_mask = _masks(d, w)
            c = plgpu.load(memory_ref, mask=matrix_mask, other=0.0)
            _read_iterates(
                products,
                steps,
                floor,
                c,
                lambda: plgpu.load(h_bar_ref, mask=vector_mask, other=0.0),
                lambda j, x: plgpu.store(iterates_ref.at[j], x),
                lambda q_bar: plgpu.store(q_bar_ref, q_bar, mask=vector_mask),
            )

        def ns_read_backward_kernel(memory_ref, query_ref, h_bar_ref, iterates_ref, memory_bar_ref):
            vector_mask, matrix_mask = _masks(d, w)
            q = plgpu.load(query_ref, mask=vector_mask, other=0.0)
            h_bar = plgpu.load(h_bar_ref, mask=vector_mask, other=0.0)
            memory_bar = _read_reverse(
                products,
                steps,
                floor,
                q,
                h_bar,
                # Loaded where each product needs it, the Gram-type ones by blocks.
                lambda j: _Loaded(iterates_ref, j),
                lambda: plgpu.load(memory_ref, mask=matrix_mask, other=0.0),
            )
            plgpu.store(memory_bar_ref, memory_bar, mask=matrix_mask)

        iterates_spec = pl.BlockSpec((None, k, w, w), lambda i: (i, 0, 0, 0))
        iterates_call = self._pallas_call(
            ns_read_iterates_kernel,
            in_specs=[self._matrix_spec(), self._vector_spec()],
            out_specs=[iterates_spec, self._vector_spec()],
            out_shape=[
                # Padded to the block (no masks): the zeros are exact (module docstring).
                jax.ShapeDtypeStruct((self.count, k, w, w), jnp.float32),
                jax.ShapeDtypeStruct((self.count, d), jnp.float32),
            ],
        )
        reverse_call = self._pallas_call(
            ns_read_backward_kernel,
            in_specs=[
                self._matrix_spec(),
                self._vector_spec(),
                self._vector_spec(),
                iterates_spec,
            ],
            out_specs=self._matrix_spec(),
            out_shape=jax.ShapeDtypeStruct((self.count, d, d), jnp.float32),
            num_stages=REVERSE_STAGES,
        )

        def backward(memory, query, h_bar):
            iterates, q_bar = iterates_call(memory, h_bar)
            return reverse_call(memory, query, h_bar, iterates), q_bar

        return backward
