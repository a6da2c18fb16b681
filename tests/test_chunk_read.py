"""The chunk read (every position's read from the chunk-start memory) against float64
numpy and against its XLA formulation, which forms the memories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from orthorecall import chunk_read as cr
from orthorecall import cpu_kernel, reads
from orthorecall import newton_schulz as ns
from tests import numpy_reference as ref
from tests.test_newton_schulz import assert_close

kernel_only = pytest.mark.skipif(
    cpu_kernel._compiler() is None, reason="no C++ compiler: the kernel cannot be built here"
)
NAMES = ("memory", "scale", "decay", "keys", "values", "queries")


def _chunk(seed, batch, length, d, zero_memory=False, zero_writes=False):
    """Operands shaped as the chunkwise mLSTM passes them: a causal decay matrix with
    exact zeros above the diagonal, scaled keys."""
    rng = np.random.default_rng(seed)
    memory = rng.standard_normal((batch, d, d))
    scale = rng.uniform(0.1, 1.0, (batch, length))
    decay = np.tril(rng.uniform(0.1, 1.0, (batch, length, length)))
    keys = rng.standard_normal((batch, length, d)) / np.sqrt(d)
    values = rng.standard_normal((batch, length, d))
    queries = rng.standard_normal((batch, length, d))
    if zero_memory:
        memory[:] = 0.0
    if zero_writes:
        keys[:] = 0.0
    h_bar = rng.standard_normal((batch, length, d))
    cast = lambda x: jnp.asarray(x, jnp.float32)
    return tuple(map(cast, (memory, scale, decay, keys, values, queries))), cast(h_bar)


def _numpy_chunk_read(memory, scale, decay, keys, values, queries, steps):
    """float64: C_t formed by explicit sums, then qᵀ NS(C_t), for one batch element."""
    length = queries.shape[0]
    out = []
    for t in range(length):
        c = scale[t] * memory
        for s in range(length):
            c = c + decay[t, s] * np.outer(keys[s], values[s])
        out.append(queries[t] @ ref.newton_schulz(c, steps))
    return np.stack(out)


def _read(read, implementation):
    return lambda *operands: cr.chunk_read(*operands, read, implementation=implementation)


def _value_and_vjp(read, implementation, operands, h_bar):
    h, vjp = jax.vjp(_read(read, implementation), *operands)
    return h, vjp(h_bar)


@kernel_only
@pytest.mark.parametrize(
    "d, read_name",
    [
        (48, "ns5"),  # the model's width: the kernel reads through the Gram matrix
        (13, "ns5"),  # narrow and not a multiple of the vector width: explicit iteration
        (20, "ns3_muon"),  # a quintic coefficient set: explicit iteration
    ],
)
def test_fused_kernel_matches_the_formed_read(d, read_name):
    read = reads.read_from_name(read_name)
    assert read.implementation() == "cpu_kernel"
    operands, h_bar = _chunk(0, 3, 16, d)
    h, grads = jax.jit(lambda *a: _value_and_vjp(read, "auto", a[:-1], a[-1]))(*operands, h_bar)
    want_h, want_grads = jax.jit(lambda *a: _value_and_vjp(read, "xla", a[:-1], a[-1]))(
        *operands, h_bar
    )
    # The fused call is what runs, forward and backward.
    loss = lambda *a: jnp.sum(jnp.sin(_read(read, "auto")(*a)))
    hlo = jax.jit(jax.value_and_grad(loss)).lower(*operands).as_text()
    assert cpu_kernel.CHUNK_FORWARD_TARGET in hlo and cpu_kernel.CHUNK_BACKWARD_TARGET in hlo
    np.testing.assert_allclose(h, want_h, rtol=1e-4, atol=2e-5 * np.abs(want_h).max())
    for name, got, want in zip(NAMES, grads, want_grads, strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale, err_msg=name)
    steps = ns.iteration_coefficients(read.coefficients, read.num_iterations)
    for b in range(3):
        assert_close(h[b], _numpy_chunk_read(*(np.asarray(x)[b] for x in operands), steps))


@kernel_only
def test_fused_gradients_match_float64_finite_differences():
    # Small enough for central differences of every operand entry in float64.
    read = reads.NS5
    operands, h_bar = _chunk(1, 1, 3, 5)
    steps = ns.iteration_coefficients("cubic", 5)
    _, grads = _value_and_vjp(read, "auto", operands, h_bar)
    base = [np.asarray(x, np.float64)[0] for x in operands]
    weights = np.asarray(h_bar, np.float64)[0]
    for index, (name, grad) in enumerate(zip(NAMES, grads, strict=True)):
        want = np.zeros_like(base[index])
        for entry in np.ndindex(*want.shape):
            shifted = []
            for sign in (1.0, -1.0):
                args = [x.copy() for x in base]
                args[index][entry] += sign * 1e-6
                shifted.append(np.sum(_numpy_chunk_read(*args, steps) * weights))
            want[entry] = (shifted[0] - shifted[1]) / 2e-6
        assert_close(np.asarray(grad)[0], want, rtol=2e-3, atol=2e-4), name


@kernel_only
@pytest.mark.parametrize("case", ["zero_memory", "zero_everything"])
def test_zero_memories_read_zero_with_finite_gradients(case):
    # The start of a sequence (C0 = 0) and positions nothing was written to yet: the
    # Frobenius floor keeps the read at 0 and its gradients finite, as the formed read.
    operands, h_bar = _chunk(2, 2, 8, 24, zero_memory=True, zero_writes=case == "zero_everything")
    h, grads = _value_and_vjp(reads.NS5, "auto", operands, h_bar)
    want_h, want_grads = _value_and_vjp(reads.NS5, "xla", operands, h_bar)
    if case == "zero_everything":
        assert np.all(np.asarray(h) == 0.0)
    np.testing.assert_allclose(h, want_h, rtol=1e-4, atol=1e-5)
    for name, got, want in zip(NAMES, grads, want_grads, strict=True):
        assert np.all(np.isfinite(got)), name
        atol = 1e-4 * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=atol, err_msg=name)


@kernel_only
def test_vmap_over_a_leading_axis_equals_the_batched_call():
    operands, _ = _chunk(3, 4, 6, 20)
    split = [x.reshape((2, 2) + x.shape[1:]) for x in operands]
    vmapped = jax.vmap(_read(reads.NS5, "auto"))(*split)
    np.testing.assert_allclose(
        vmapped.reshape(4, 6, 20), _read(reads.NS5, "auto")(*operands), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("read", [reads.RAW, reads.POLAR], ids=["raw", "polar"])
def test_other_reads_form_the_memories(read):
    operands, _ = _chunk(4, 2, 5, 6)
    h = cr.chunk_read(*operands, read)
    memories = cr.chunk_memories(*operands[:5])
    want = jnp.einsum("...i,...ij->...j", operands[5], read(memories))
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_form_the_memories_in_xla(platform):
    operands, _ = _chunk(5, 2, 4, 8)
    step = jax.jit(jax.grad(lambda *a: cr.chunk_read(*a, reads.NS5).sum(), argnums=(0, 3)))
    module = export.export(step, platforms=[platform])(*operands).mlir_module()
    assert "orthorecall_" not in module
    assert "dot_general" in module


def test_chunk_read_validates_its_inputs():
    operands, _ = _chunk(6, 2, 4, 8)
    bad_decay = list(operands)
    bad_decay[2] = bad_decay[2][..., :3]
    with pytest.raises(ValueError, match=r"decay must have shape \(2, 4, 4\)"):
        cr.chunk_read(*bad_decay, reads.NS5)
    with pytest.raises(ValueError, match="implementation='pallas' is not known"):
        cr.chunk_read(*operands, reads.NS5, implementation="pallas")
