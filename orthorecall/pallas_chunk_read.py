"""The chunk read for NVIDIA GPUs in Pallas (Triton): each C_t formed on chip.

The GPU counterpart of the CPU chunk kernel (``cpu_kernel.chunk_read_forward``): for a
chunk of L positions with chunk-start memory C0, decay matrix D (L x L), keys K, values
V and queries Q (L x d each),

    C_t = scale_t C0 + Σ_s D[t, s] k_s v_sᵀ = scale_t C0 + Kᵀ diag(D[t, :]) V,
    h_t = NS_k(C_t)ᵀ q_t,

as ``chunk_read._formed_read`` computes it, without writing the L memories of a chunk to
global memory: one program per (chunk, position) loads C0, the decay row, K and V, forms
C_t with one product on chip (contraction over the chunk), and runs the Newton–Schulz
read of ``pallas_read`` on it (``chunk_read_forward``).

The backward (``chunk_read_backward``) is two kernels of one program per (chunk,
position), as ``pallas_read``'s: the first forms C_t again and writes the iterates X_j
of its read (k D² floats per position, n L k D² in all: 5.2 MB per chunk at D = 64,
L = 64, NS5) and q̄_t; the second runs the reverse sweep reading them, forms C_t once
more for the normalization's VJP, and reduces what it can on chip: the scale's
cotangent <C̄_t, C0> and the decay row's, D̄[t, s] = k_sᵀ C̄_t v_s (one product K C̄_t).
The sums over positions, C̄0 = Σ_t scale_t C̄_t, K̄ and V̄, need every
position's C̄_t, which the program writes out (d x d per position, once, in the
backward only; a program per chunk looping over positions would keep them on chip but
holds three more tiles through the read's backward) and XLA contracts.

The same widths (d <= ``pallas_read.MAX_WIDTH``), precisions, huge-memory rescaling and
interpret mode as ``pallas_read``; chunk lengths up to ``MAX_CHUNK``. The functions are
paired in a ``jax.custom_vjp`` by ``chunk_read``.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from orthorecall import pallas_read, scaling

# The longest chunk the kernels take (its K and V tiles are L x D, its decay rows L).
MAX_CHUNK = 128


def chunk_read_forward(
    memory, scale, decay, keys, values, queries, *, steps, jax_precision=None, interpret=False
):
    """h (..., L, d): the Newton–Schulz read of every C_t of the chunk (module docstring).

    Args:
        memory: C0, (..., d, d); scale: (..., L); decay: (..., L, L); keys, values,
            queries: (..., L, d). Any real float dtype (computed in float32).
        steps, jax_precision, interpret: as ``pallas_read.ns_read_forward``.

    Raises:
        ValueError: inconsistent shapes, d above ``pallas_read.MAX_WIDTH``, L above
            ``MAX_CHUNK``, bad steps or precision; RuntimeError: no Pallas Triton backend.
    """
    call, operands = _Call.of(
        memory, scale, decay, keys, values, queries, steps, jax_precision, interpret
    )
    if call.count == 0:
        return jnp.zeros(queries.shape, jnp.float32)
    h = call.forward()(*operands)
    return h.reshape(queries.shape)


def chunk_read_backward(
    memory,
    scale,
    decay,
    keys,
    values,
    queries,
    h_bar,
    *,
    steps,
    jax_precision=None,
    interpret=False,
):
    """The cotangents of (memory, scale, decay, keys, values, queries) for h̄ (..., L, d),
    float32, of ``chunk_read_forward``'s function."""
    call, operands = _Call.of(
        memory, scale, decay, keys, values, queries, steps, jax_precision, interpret
    )
    h_bar = jnp.asarray(h_bar, jnp.float32)
    if h_bar.shape != queries.shape:
        raise ValueError(
            f"chunk_read_backward expects h_bar of the queries' shape {queries.shape}, "
            f"got {h_bar.shape}."
        )
    if call.count == 0:
        return tuple(
            jnp.zeros(x.shape, jnp.float32) for x in (memory, scale, decay, keys, values, queries)
        )
    n, length, d = call.count, call.length, call.d
    _, scale_, decay_, k, v, _ = operands
    memory_bar_t, q_bar, scale_bar, decay_bar = call.backward()(
        *operands, h_bar.reshape(n, length, d)
    )
    # The sums over positions (module docstring), by XLA.
    with jax.default_matmul_precision(_xla_precision(jax_precision)):
        c0_bar = jnp.einsum("nt,ntij->nij", scale_, memory_bar_t)
        k_bar = jnp.einsum("nts,ntij,nsj->nsi", decay_, memory_bar_t, v)
        v_bar = jnp.einsum("nts,ntij,nsi->nsj", decay_, memory_bar_t, k)
    batch = queries.shape[:-2]
    return (
        c0_bar.reshape(*batch, d, d),
        scale_bar.reshape(*batch, length),
        decay_bar.reshape(*batch, length, length),
        k_bar.reshape(*batch, length, d),
        v_bar.reshape(*batch, length, d),
        q_bar.reshape(*batch, length, d),
    )


def _xla_precision(jax_precision):
    return "highest" if jax_precision in pallas_read._IEEE else (jax_precision or "default")


@functools.cache
def compile_failure(steps, width: int, length: int, jax_precision) -> str | None:
    """As ``pallas_read.compile_failure``, for the chunk kernels at chunk length
    ``length``: None if they build, else the reason (warned once)."""
    f32 = jnp.float32
    shapes = [(1, width, width), (1, length), (1, length, length)] + [(1, length, width)] * 4
    shapes = [jax.ShapeDtypeStruct(s, f32) for s in shapes]

    def both(*args):
        kwargs = {"steps": steps, "jax_precision": jax_precision}
        return (
            chunk_read_forward(*args[:6], **kwargs),
            chunk_read_backward(*args, **kwargs),
        )

    try:
        lowered = jax.jit(both).trace(*shapes).lower(lowering_platforms=("cuda",))
        if jax.default_backend() == "gpu":
            lowered.compile()
    except Exception as error:  # any failure: the caller uses the formed read
        reason = f"{type(error).__name__}: {error}".strip()[:2000]
        warnings.warn(
            f"The Pallas chunk read does not build for d = {width}, L = {length} under "
            f"matmul precision {jax_precision!r} ({reason}); forming the memories with "
            "XLA instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return reason
    return None


def _rescaling(c):
    """``scaling.rescaling`` of one block, in the kernel (the same bit operations)."""
    largest = jnp.max(jnp.max(jnp.abs(c), axis=1), axis=0)
    biased = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(largest, jnp.int32), 23)
    exponent = biased - 127
    rescale = (exponent >= scaling.RESCALE_EXPONENT).astype(jnp.int32)
    shift = rescale * jnp.clip(exponent - 1, -127, 126)
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(127 - shift, 23), jnp.float32)


class _Call:
    """One shape and configuration: ``count`` chunks of ``length`` positions, width d."""

    def __init__(self, count, length, d, steps, products, interpret):
        self.count, self.length, self.d = count, length, d
        self.steps, self.products, self.interpret = steps, products, interpret
        self.width = pallas_read.block_width(d)
        self.chunk = pallas_read.block_width(length)

    @classmethod
    def of(cls, memory, scale, decay, keys, values, queries, steps, jax_precision, interpret):
        caller = "the Pallas chunk read"
        names = ("memory", "scale", "decay", "keys", "values", "queries")
        arrays = (memory, scale, decay, keys, values, queries)
        arrays = [
            pallas_read._real_float32(caller, n, x) for n, x in zip(names, arrays, strict=True)
        ]
        memory, scale, decay, keys, values, queries = arrays
        if queries.ndim < 2:
            raise ValueError(f"{caller} expects queries (..., L, d), got shape {queries.shape}.")
        batch, length, d = queries.shape[:-2], queries.shape[-2], queries.shape[-1]
        if not 1 <= d <= pallas_read.MAX_WIDTH:
            raise ValueError(
                f"{caller} supports widths 1 <= d <= MAX_WIDTH = {pallas_read.MAX_WIDTH}, "
                f"got d = {d}."
            )
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
                    f"{caller}: {name} must have shape {shape} for queries of shape "
                    f"{queries.shape}, got {array.shape}."
                )
        if not 1 <= length <= MAX_CHUNK:
            raise ValueError(f"{caller}: chunk length must be in [1, {MAX_CHUNK}], got {length}.")
        base = pallas_read._Call.of(memory, steps, jax_precision, interpret)
        count = math.prod(batch)
        call = cls(count, length, d, base.steps, base.products, base.interpret)
        operands = (
            memory.reshape(count, d, d),
            scale.reshape(count, length),
            decay.reshape(count, length, length),
            keys.reshape(count, length, d),
            values.reshape(count, length, d),
            queries.reshape(count, length, d),
        )
        return call, operands

    def _specs(self):
        """The inputs' blocks; the grid is (chunk i, position t)."""
        w, ln = self.width, self.chunk
        return [
            pl.BlockSpec((None, w, w), lambda i, t: (i, 0, 0)),  # C0
            pl.BlockSpec((None, ln), lambda i, t: (i, 0)),  # scale row
            pl.BlockSpec((None, None, ln), lambda i, t: (i, t, 0)),  # decay row t
            pl.BlockSpec((None, ln, w), lambda i, t: (i, 0, 0)),  # K
            pl.BlockSpec((None, ln, w), lambda i, t: (i, 0, 0)),  # V
            pl.BlockSpec((None, None, w), lambda i, t: (i, t, 0)),  # q_t
        ]

    def _row_spec(self):
        return pl.BlockSpec((None, None, self.width), lambda i, t: (i, t, 0))

    def _pallas_call(self, kernel, in_specs, out_specs, out_shape, num_stages=1):
        return pl.pallas_call(
            kernel,
            grid=(self.count, self.length),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(
                num_warps=pallas_read.NUM_WARPS, num_stages=num_stages
            ),
            interpret=self.interpret,
        )

    def _form(self, refs, form=True):
        """(C_t, C0, scale_t, the decay row, K, V, q_t, masks): C_t formed on chip (None
        unless ``form``)."""
        memory_ref, scale_ref, decay_ref, keys_ref, values_ref, query_ref = refs
        d, length, w, ln = self.d, self.length, self.width, self.chunk
        t = pl.program_id(1)
        vector_mask, matrix_mask = pallas_read._masks(d, w)
        positions = jax.lax.broadcasted_iota(jnp.int32, (ln,), 0)
        chunk_mask = positions < length
        rows = jax.lax.broadcasted_iota(jnp.int32, (ln, w), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (ln, w), 1)
        tile_mask = (rows < length) & (cols < d)
        c0 = plgpu.load(memory_ref, mask=matrix_mask, other=0.0)
        scale_row = plgpu.load(scale_ref, mask=chunk_mask, other=0.0)
        scale_t = jnp.sum(scale_row * (positions == t).astype(jnp.float32))
        decay_row = plgpu.load(decay_ref, mask=chunk_mask, other=0.0)
        k = plgpu.load(keys_ref, mask=tile_mask, other=0.0)
        v = plgpu.load(values_ref, mask=tile_mask, other=0.0)
        q = plgpu.load(query_ref, mask=vector_mask, other=0.0)
        # Kᵀ diag(D[t, :]) V: one product, contracting over the chunk.
        c = scale_t * c0 + self.products.tmm(decay_row[:, None] * k, v) if form else None
        return c, c0, scale_t, decay_row, k, v, q, (vector_mask, matrix_mask, chunk_mask)

    def forward(self):
        n, length, d = self.count, self.length, self.d
        steps, products = self.steps, self.products
        floor = scaling.FROBENIUS_FLOOR

        def chunk_read_forward_kernel(*refs):
            *inputs, h_ref = refs
            c = self._form(inputs)[0]
            c = c * _rescaling(c)
            _, r = pallas_read._inverse_norm(c, floor)
            x = pallas_read._iterate(products, c * r, steps)
            # q_t loaded after the iterations rather than kept live through them (by
            # the compile report: no spills instead of 4 B at d = 48 on sm_80).
            *_, q, (vector_mask, _, _) = self._form(inputs, form=False)
            plgpu.store(h_ref, jnp.sum(q[:, None] * x, axis=0), mask=vector_mask)

        return self._pallas_call(
            chunk_read_forward_kernel,
            in_specs=self._specs(),
            out_specs=self._row_spec(),
            out_shape=jax.ShapeDtypeStruct((n, length, d), jnp.float32),
        )

    def _iterates_kernel(self):
        """The backward's first kernel: the iterations of the read of C_t, writing every
        step's input X_j and then C_t itself to ``iterates_ref``, and q̄."""
        steps, products, k = self.steps, self.products, len(self.steps)
        floor = scaling.FROBENIUS_FLOOR

        def chunk_read_iterates_kernel(*refs):
            *inputs, h_bar_ref, iterates_ref, q_bar_ref = refs
            c, *_, (vector_mask, _, _) = self._form(inputs)
            # C_t itself after the iterates, for the reverse kernel's normalization VJP
            # (the index as an array: interpret mode's store takes no Python int). By the
            # compile report, against forming C_t again there (D = 64, "highest", sm_80):
            # 40 B of spills instead of 124 in the reverse kernel, 4 instead of 40 here.
            plgpu.store(iterates_ref.at[jnp.int32(k)], c)
            pallas_read._read_iterates(
                products,
                steps,
                floor,
                c * _rescaling(c),
                lambda: plgpu.load(h_bar_ref, mask=vector_mask, other=0.0),
                lambda j, x: plgpu.store(iterates_ref.at[j], x),
                lambda q_bar: plgpu.store(q_bar_ref, q_bar, mask=vector_mask),
            )

        return chunk_read_iterates_kernel

    def _reverse_kernel(self):
        """The backward's second kernel: the reverse sweep over the stored iterates, and
        the cotangents of the chunk-start memory's scale and of the decay matrix."""
        steps, products, k = self.steps, self.products, len(self.steps)
        floor = scaling.FROBENIUS_FLOOR

        def chunk_read_backward_kernel(*refs):
            *inputs, h_bar_ref, iterates_ref = refs[:-3]
            memory_bar_ref, scale_bar_ref, decay_bar_ref = refs[-3:]
            _, _, _, _, _, _, q, masks = self._form(inputs, form=False)
            vector_mask, matrix_mask, chunk_mask = masks
            h_bar = plgpu.load(h_bar_ref, mask=vector_mask, other=0.0)
            rescale = []

            def load_c():
                # C_t as the first kernel formed it, for the normalization's VJP.
                c = plgpu.load(iterates_ref.at[jnp.int32(k)])
                rescale.append(_rescaling(c))
                return c * rescale[0]

            x_bar = pallas_read._read_reverse(
                products,
                steps,
                floor,
                q,
                h_bar,
                lambda j: pallas_read._Loaded(iterates_ref, j),
                load_c,
            )
            c_bar = rescale[0] * x_bar
            plgpu.store(memory_bar_ref, c_bar, mask=matrix_mask)
            # C0, K and V loaded again (cached) rather than kept live through the read.
            _, c0, _, _, k_, v, _, _ = self._form(inputs, form=False)
            # scale_t's cotangent <C̄_t, C0>; D[t, s]'s k_sᵀ C̄_t v_s.
            scale_bar = jnp.sum(jnp.sum(c_bar * c0, axis=1), axis=0)
            t = pl.program_id(1)
            positions = jax.lax.broadcasted_iota(jnp.int32, (self.chunk,), 0)
            plgpu.store(
                scale_bar_ref,
                scale_bar * (positions == t).astype(jnp.float32),
                mask=positions == t,
            )
            decay_bar = jnp.sum(products.mm(k_, c_bar) * v, axis=1)
            plgpu.store(decay_bar_ref, decay_bar, mask=chunk_mask)

        return chunk_read_backward_kernel

    def backward(self):
        """The backward as two kernels per (chunk, position): the iterations of the read
        of C_t, writing every step's input X_j (n, L, k, D, D) to global memory, then the
        reverse sweep reading them and the cotangents (module docstring)."""
        n, length, d, w = self.count, self.length, self.d, self.width
        k = len(self.steps)
        ln = self.chunk
        iterates_spec = pl.BlockSpec((None, None, k + 1, w, w), lambda i, t: (i, t, 0, 0, 0))
        # h̄ and q̄ of the first kernel: where d == L the offset of their row (i, t),
        # i L d + t d, is the decay row's, which Triton computes once and keeps live
        # through the iterations. As rows of an (n L, d) array it is (i L + t) d,
        # computed after them: by the compile report (D = 64, "highest") no spills
        # instead of 4 B on sm_80, 175 registers instead of 181 on sm_90. Not at other
        # widths: there the flat rows cost registers on sm_90 (d = 48: 177 against 170).
        if d == length:
            rows_spec = pl.BlockSpec((None, w), lambda i, t: (i * length + t, 0))
            rows_shape = (n * length, d)
        else:
            rows_spec, rows_shape = self._row_spec(), (n, length, d)
        iterates_call = self._pallas_call(
            self._iterates_kernel(),
            in_specs=self._specs() + [rows_spec],
            out_specs=[iterates_spec, rows_spec],
            out_shape=[
                # Padded to the block, no masks (the zeros are exact).
                jax.ShapeDtypeStruct((n, length, k + 1, w, w), jnp.float32),
                jax.ShapeDtypeStruct(rows_shape, jnp.float32),
            ],
        )
        reverse_call = self._pallas_call(
            self._reverse_kernel(),
            in_specs=self._specs() + [self._row_spec(), iterates_spec],
            out_specs=[
                pl.BlockSpec((None, None, w, w), lambda i, t: (i, t, 0, 0)),
                pl.BlockSpec((None, ln), lambda i, t: (i, 0)),
                pl.BlockSpec((None, None, ln), lambda i, t: (i, t, 0)),
            ],
            out_shape=[
                jax.ShapeDtypeStruct((n, length, d, d), jnp.float32),
                jax.ShapeDtypeStruct((n, length), jnp.float32),
                jax.ShapeDtypeStruct((n, length, length), jnp.float32),
            ],
            num_stages=pallas_read.REVERSE_STAGES,
        )

        def backward(*operands):
            *inputs, h_bar = operands
            iterates, q_bar = iterates_call(*inputs, h_bar.reshape(rows_shape))
            q_bar = q_bar.reshape(n, length, d)
            memory_bar_t, scale_bar, decay_bar = reverse_call(*operands, iterates)
            return memory_bar_t, q_bar, scale_bar, decay_bar

        return backward


pl = pallas_read.pl
plgpu = pallas_read.plgpu
