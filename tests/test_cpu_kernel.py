"""The fused CPU read kernel against float64 numpy and the pure-JAX read."""

import ctypes
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from orthorecall import cpu_kernel, reads
from orthorecall import newton_schulz as ns
from tests import numpy_reference as ref
from tests.conftest import assert_script_passes_on_eight_cpu_devices
from tests.test_newton_schulz import SCALES, assert_close, fd_gradient, scaled_memories

pytestmark = pytest.mark.skipif(
    cpu_kernel._compiler() is None, reason="no C++ compiler: the kernel cannot be built here"
)


def _inputs(seed, count, d, scale=1.0):
    rng = np.random.default_rng(seed)
    c = (scale * rng.standard_normal((count, d, d))).astype(np.float32)
    q = rng.standard_normal((count, d)).astype(np.float32)
    h_bar = rng.standard_normal((count, d)).astype(np.float32)
    return c, q, h_bar


def _numpy_read_and_vjp(c, q, h_bar, steps, eps=1e-6):
    """h = NS(C)ᵀq in float64, and (C̄, q̄) by central differences of <h, h̄>."""
    h = ref.newton_schulz(c, steps).T @ q
    loss = lambda m: ref.newton_schulz(m, steps).T @ q @ h_bar
    c_bar = np.zeros_like(c, np.float64)
    for index in np.ndindex(*c.shape):
        step = np.zeros_like(c, np.float64)
        step[index] = eps
        c_bar[index] = (loss(c + step) - loss(c - step)) / (2 * eps)
    q_bar = ref.newton_schulz(c, steps) @ h_bar
    return h, c_bar, q_bar


def _xla_read(c, q):
    """The pure-JAX formulation of the NS5 read, the kernel's reference in JAX."""
    return ns.newton_schulz_read(c, q, 5, implementation="xla")


def _xla_backward(c, q, h_bar):
    return jax.vjp(_xla_read, c, q)[1](h_bar)


def test_kernel_builds_and_is_used_on_cpu():
    assert cpu_kernel.available()
    c, q, _ = _inputs(0, 2, 8)
    hlo = jax.jit(lambda c, q: ns.newton_schulz_read(c, q)).lower(c, q).as_text()
    assert cpu_kernel.FORWARD_TARGET in hlo
    grad_hlo = (
        jax.jit(jax.grad(lambda c, q: ns.newton_schulz_read(c, q).sum())).lower(c, q).as_text()
    )
    assert cpu_kernel.BACKWARD_TARGET in grad_hlo


def test_cubic_reads_up_to_six_iterations_of_wide_memories_go_through_the_gram_matrix():
    library = ctypes.cdll.LoadLibrary(str(cpu_kernel.build()))
    uses_gram = library.OrthorecallNsReadUsesGram
    uses_gram.restype = ctypes.c_int

    def path(coefficients, k, d=48):
        flat = np.asarray(ns.iteration_coefficients(coefficients, k), np.float32).reshape(-1)
        pointer = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        return uses_gram(pointer, flat.size, d)

    assert [path("cubic", k) for k in range(8)] == [0, 1, 1, 1, 1, 1, 1, 0]
    assert path("muon", 5) == path("polar_express", 3) == 0
    # Small memories keep the explicit iteration (faster there, see the kernel's comment).
    assert [path("cubic", 5, d) for d in (5, 16, 17, 20, 33)] == [0, 0, 1, 1, 1]
    # The same rule as the pure-JAX Gram read's.
    for k in range(8):
        assert path("cubic", k) == (reads.read_from_name(f"ns{k}").gram_steps() is not None)


# Widths cover no padding (16, 48), padding to 16 (5, 20) and two tiles (33).
@pytest.mark.parametrize("d", [5, 16, 20, 33, 48])
@pytest.mark.parametrize(
    "coefficients,k",
    # Cubic with k <= 6 runs through the Gram matrix, the rest as the explicit iteration.
    [("cubic", 5), ("muon", 3), ("polar_express", 6), ("cubic", 1), ("cubic", 6), ("cubic", 7)],
)
@pytest.mark.slow
def test_forward_and_backward_match_float64_numpy(d, coefficients, k):
    c, q, h_bar = _inputs(d + k, 2, d)
    steps = ns.iteration_coefficients(coefficients, k)
    h = np.asarray(cpu_kernel.ns_read_forward(c, q, steps))
    c_bar, q_bar = (np.asarray(x) for x in cpu_kernel.ns_read_backward(c, q, h_bar, steps))
    for m in range(len(c)):
        want_h, want_c_bar, want_q_bar = _numpy_read_and_vjp(
            c[m].astype(np.float64), q[m].astype(np.float64), h_bar[m].astype(np.float64), steps
        )
        np.testing.assert_allclose(h[m], want_h, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(q_bar[m], want_q_bar, atol=2e-5, rtol=1e-4)
        scale = np.abs(want_c_bar).max()
        np.testing.assert_allclose(c_bar[m], want_c_bar, atol=2e-4 * scale, rtol=2e-3)


@pytest.mark.slow
def test_agrees_with_pure_jax_read_on_a_large_batch():
    # Many matrices so every thread of the pool takes chunks, with leading
    # batch axes as the chunkwise mLSTM passes them (B, H, L, d, d).
    c, q, h_bar = _inputs(1, 4 * 3 * 40, 48, scale=0.3)
    c, q, h_bar = c.reshape(4, 3, 40, 48, 48), q.reshape(4, 3, 40, 48), h_bar.reshape(4, 3, 40, 48)
    steps = ns.iteration_coefficients("cubic", 5)
    kernel = jax.jit(lambda c, q: cpu_kernel.ns_read_forward(c, q, steps))(c, q)
    pure = jax.jit(_xla_read)(c, q)
    np.testing.assert_allclose(kernel, pure, atol=1e-5, rtol=1e-5)
    kernel_bar = jax.jit(lambda *a: cpu_kernel.ns_read_backward(*a, steps))(c, q, h_bar)
    pure_bar = jax.jit(_xla_backward)(c, q, h_bar)
    for got, want in zip(kernel_bar, pure_bar):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4)


@pytest.mark.slow
def test_zero_memory_reads_zero_with_the_floor_gradient():
    # An all-zero memory (fresh state) hits the Frobenius floor: h = 0 and the
    # gradient is that of C / 1e-6 through the iteration (not of C / |C|).
    c = np.zeros((1, 6, 6), np.float32)
    q = np.ones((1, 6), np.float32)
    h_bar = np.linspace(-1, 1, 6, dtype=np.float32)[None]
    steps = ns.iteration_coefficients("cubic", 5)
    assert not np.any(np.asarray(cpu_kernel.ns_read_forward(c, q, steps)))
    got = cpu_kernel.ns_read_backward(c, q, h_bar, steps)
    want = _xla_backward(c, q, h_bar)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, rtol=1e-6)


@pytest.mark.slow
def test_vmap_and_grad_through_the_public_read():
    c, q, _ = _inputs(2, 6, 12)
    c, q = c.reshape(2, 3, 12, 12), q.reshape(2, 3, 12)
    read = reads.read_from_name("ns5")
    loss = lambda c, q: jnp.sum(jnp.sin(read.retrieve(c, q)))
    value, grads = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1))))(c, q)
    pure = lambda c, q: jnp.sum(jnp.sin(_xla_read(c, q)))
    want_value, want_grads = jax.vmap(jax.value_and_grad(pure, argnums=(0, 1)))(c, q)
    np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_disabled_or_unbuildable_kernel_falls_back_to_pure_jax(monkeypatch):
    c, q, _ = _inputs(3, 2, 8)
    want = np.asarray(_xla_read(c, q))
    try:
        cpu_kernel.available.cache_clear()
        monkeypatch.setenv("ORTHORECALL_CPU_KERNEL", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Disabling on purpose is silent.
            assert not cpu_kernel.available()
        hlo = jax.jit(lambda c, q: ns.newton_schulz_read(c, q)).lower(c, q).as_text()
        assert cpu_kernel.FORWARD_TARGET not in hlo
        np.testing.assert_allclose(ns.newton_schulz_read(c, q), want, rtol=1e-6)

        cpu_kernel.available.cache_clear()
        monkeypatch.setenv("ORTHORECALL_CPU_KERNEL", "1")
        monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert not cpu_kernel.available()
    finally:
        monkeypatch.undo()
        cpu_kernel.available.cache_clear()
    assert cpu_kernel.available()


@pytest.mark.slow
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHORECALL_CACHE_DIR", str(tmp_path))
    first = cpu_kernel.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build() == first and first.stat().st_mtime_ns == stamp
    # No temporary files are left next to the library.
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_build_failure_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHORECALL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_FLAGS", cpu_kernel._FLAGS + ("-fno-such-orthorecall-flag",))
    with pytest.raises(cpu_kernel.KernelBuildError, match="failed"):
        cpu_kernel.build()
    assert list(tmp_path.iterdir()) == []


def test_read_validates_shapes():
    with pytest.raises(ValueError, match="query of shape"):
        ns.newton_schulz_read(jnp.zeros((2, 4, 4)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="square"):
        ns.newton_schulz_read(jnp.zeros((2, 4, 5)), jnp.zeros((2, 4)))


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orthorecall import newton_schulz as ns
mesh = Mesh(np.array(jax.devices()), ("seed",))
rng = np.random.default_rng(0)
c = jnp.asarray(rng.standard_normal((8, 6, 12, 12)), jnp.float32)
q = jnp.asarray(rng.standard_normal((8, 6, 12)), jnp.float32)
c, q = jax.device_put((c, q), NamedSharding(mesh, PartitionSpec("seed")))
loss = lambda c, q: jnp.sum(jnp.sin(ns.newton_schulz_read(c, q)))
step = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1))))
# Run what was inspected (calling the jitted function would compile it a second time).
step = step.lower(c, q).compile()
compiled = step.as_text()
assert "orthorecall_ns_read_backward" in compiled
assert "all-gather" not in compiled, "the read was gathered onto every device"
value, (c_bar, q_bar) = step(c, q)
assert c_bar.sharding.spec[0] == "seed", c_bar.sharding
pure = lambda c, q: jnp.sum(jnp.sin(ns.newton_schulz_read(c, q, implementation="xla")))
want_value, (want_c, want_q) = jax.vmap(jax.value_and_grad(pure, argnums=(0, 1)))(
    np.asarray(c), np.asarray(q))
np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(c_bar, want_c, rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(q_bar, want_q, rtol=1e-4, atol=1e-5)

# The chunk read (memories formed in the kernel) is partitioned the same way.
from orthorecall import chunk_read, reads
shapes = [(8, 6, 12, 12), (8, 6, 5), (8, 6, 5, 5), (8, 6, 5, 12), (8, 6, 5, 12), (8, 6, 5, 12)]
operands = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
operands = jax.device_put(operands, NamedSharding(mesh, PartitionSpec("seed")))
chunk_loss = lambda impl: lambda *a: jnp.sum(
    jnp.sin(chunk_read.chunk_read(*a, reads.NS5, implementation=impl)))
grads = jax.jit(jax.grad(chunk_loss("auto"), argnums=tuple(range(6))))
grads = grads.lower(*operands).compile()
compiled = grads.as_text()
assert "orthorecall_chunk_read_backward" in compiled
assert "all-gather" not in compiled, "the chunk read was gathered onto every device"
got = grads(*operands)
assert got[0].sharding.spec[0] == "seed", got[0].sharding
want = jax.grad(chunk_loss("xla"), argnums=tuple(range(6)))(*(np.asarray(x) for x in operands))
for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * np.abs(w).max())
print("ok")
"""


@pytest.mark.slow
def test_sharded_over_eight_devices_reads_each_shard_locally():
    assert_script_passes_on_eight_cpu_devices(_SHARDED_SCRIPT)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_lowering_uses_the_pure_jax_read(platform):
    # Lowering only (no accelerator needed): the CPU kernel must not reach a
    # GPU/TPU program, while the same function lowers with it for the CPU.
    c, q, _ = _inputs(4, 3, 8)
    step = jax.jit(jax.grad(lambda c, q: ns.newton_schulz_read(c, q).sum()))
    module = export.export(step, platforms=[platform])(c, q).mlir_module()
    assert "orthorecall_ns_read" not in module
    assert "dot_general" in module


@pytest.mark.parametrize("scale", SCALES)
def test_kernel_at_every_scale_matches_float64_numpy(scale):
    # d = 20 is padded inside the kernel; the padding must not enter the largest
    # magnitude or the norm.
    assert cpu_kernel.available()
    c, q, h_bar = scaled_memories(20, scale, shape=(2, 20, 20))
    steps = ns.iteration_coefficients("cubic", 5)
    h = np.asarray(cpu_kernel.ns_read_forward(c, q, steps))
    c_bar, q_bar = (np.asarray(x) for x in cpu_kernel.ns_read_backward(c, q, h_bar, steps))
    for m in range(len(c)):
        read = ref.newton_schulz(c[m], steps)
        assert_close(h[m], q[m] @ read)
        assert_close(q_bar[m], read @ h_bar[m])
        loss = lambda x, m=m: q[m] @ ref.newton_schulz(x, steps) @ h_bar[m]
        assert np.all(np.isfinite(c_bar[m]))
        assert_close(c_bar[m], fd_gradient(loss, c[m]), rtol=2e-3, atol=2e-4)


def test_kernel_rescales_each_matrix_exactly():
    # A power of two moves a memory across the rescaling threshold (2^32) without
    # changing its read or the scaled gradient by a bit.
    assert cpu_kernel.available()
    c, q, h_bar = scaled_memories(21, 1.0, shape=(4, 20, 20))
    steps = ns.iteration_coefficients("cubic", 5)
    shifts = np.float32([1.0, 2.0**31, 2.0**32, 2.0**100])[:, None, None]
    big = c * shifts
    np.testing.assert_array_equal(
        cpu_kernel.ns_read_forward(big, q, steps), cpu_kernel.ns_read_forward(c, q, steps)
    )
    big_c_bar, big_q_bar = cpu_kernel.ns_read_backward(big, q, h_bar, steps)
    c_bar, q_bar = cpu_kernel.ns_read_backward(c, q, h_bar, steps)
    np.testing.assert_array_equal(big_q_bar, q_bar)
    np.testing.assert_array_equal(np.asarray(big_c_bar) * shifts, c_bar)
