"""The raw-read memory's CPU kernel against float64 numpy and the pure-JAX chunk form."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from orthorecall import cpu_kernel, mlstm, raw_memory, reads
from tests import numpy_reference as ref
from tests.conftest import assert_script_passes_on_eight_cpu_devices

pytestmark = pytest.mark.skipif(
    cpu_kernel._compiler() is None, reason="no C++ compiler: the kernel cannot be built here"
)

B, T, H = 3, 37, 2


def _inputs(seed, d, with_reset=True, batch=B, length=T):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, length, H, d)).astype(np.float32) for _ in range(3))
    igate = rng.standard_normal((batch, length, H)).astype(np.float32)
    fgate = (rng.standard_normal((batch, length, H)) + 2.0).astype(np.float32)
    reset = np.zeros((batch, length), bool)
    if with_reset:
        reset[0, 11] = reset[1, 30] = True
    return q, k, v, igate, fgate, reset


def _state(seed, d, batch=B):
    rng = np.random.default_rng(seed)
    return mlstm.MemoryState(
        jnp.asarray(0.3 * rng.standard_normal((batch, H, d, d)), jnp.float32),
        jnp.asarray(0.3 * rng.standard_normal((batch, H, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((batch, H)), jnp.float32),
    )


def _sequence(implementation, *args, reset=None, state=None, chunk_size=None):
    return mlstm.chunkwise_sequence(
        *args,
        read=reads.RAW,
        reset=reset,
        state=state,
        chunk_size=chunk_size,
        implementation=implementation,
    )


def test_kernel_runs_the_raw_read_on_cpu_and_only_it():
    assert raw_memory.applies(reads.RAW)
    assert not raw_memory.applies(reads.NS5)
    assert not raw_memory.applies(reads.RAW.replace(write="delta"))
    assert not raw_memory.applies(reads.RAW, backend="gpu")
    q, k, v, igate, fgate, _ = _inputs(0, 8)
    args = tuple(map(jnp.asarray, (q, k, v, igate, fgate)))

    def lowered(implementation, read=reads.RAW):
        loss = lambda *a: jnp.sum(
            mlstm.chunkwise_sequence(*a, read=read, implementation=implementation)[0]
        )
        return jax.jit(jax.grad(loss)).lower(*args).as_text()

    assert cpu_kernel.RAW_FORWARD_TARGET in lowered("auto")
    assert cpu_kernel.RAW_BACKWARD_TARGET in lowered("auto")
    assert cpu_kernel.RAW_FORWARD_TARGET not in lowered("xla")
    assert cpu_kernel.RAW_FORWARD_TARGET not in lowered("auto", reads.NS5)
    with pytest.raises(ValueError, match="implementation"):
        _sequence("triton", *args)


@pytest.mark.parametrize("d", [8, 20, 48])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_forward_matches_float64_recurrence_and_the_chunk_form(d, chunk_size):
    # d = 20 is no whole number of vectors (the kernel's any-width loops), 8 less than one.
    q, k, v, igate, fgate, reset = _inputs(d + chunk_size, d)
    state = _state(1, d)
    want, want_state = ref.mlstm_recurrence(
        q, k, v, igate, fgate, lambda c: c, reset, state=tuple(map(np.asarray, state[:3]))
    )
    args = tuple(map(jnp.asarray, (q, k, v, igate, fgate)))
    got, got_state = _sequence(
        "auto", *args, reset=jnp.asarray(reset), state=state, chunk_size=chunk_size
    )
    chunk, chunk_state = _sequence(
        "xla", *args, reset=jnp.asarray(reset), state=state, chunk_size=chunk_size
    )
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(got, chunk, atol=2e-5, rtol=2e-4)
    for leaf, want_leaf, chunk_leaf in zip(got_state[:3], want_state, chunk_state[:3]):
        np.testing.assert_allclose(leaf, want_leaf, atol=2e-5, rtol=2e-4)
        np.testing.assert_allclose(leaf, chunk_leaf, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("d,chunk_size", [(8, 5), (20, 64), (48, 16)])
def test_gradients_match_the_chunk_form(d, chunk_size):
    # Every input, the start state included, and cotangents on the end state too.
    q, k, v, igate, fgate, reset = _inputs(10 + d, d)
    rng = np.random.default_rng(11)
    weight = jnp.asarray(rng.standard_normal((B, T, H, d)), jnp.float32)
    c_weight = jnp.asarray(rng.standard_normal((B, H, d, d)), jnp.float32)

    def loss(args, state, implementation):
        h, end = _sequence(
            implementation, *args, reset=jnp.asarray(reset), state=state, chunk_size=chunk_size
        )
        return jnp.sum(h * weight) + jnp.sum(end.c * c_weight) + jnp.sum(end.n) + jnp.sum(end.m)

    args = tuple(map(jnp.asarray, (q, k, v, igate, fgate)))
    state = _state(12, d)
    got = jax.grad(loss, argnums=(0, 1))(args, state, "auto")
    want = jax.grad(loss, argnums=(0, 1))(args, state, "xla")
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, atol=2e-5 * scale, rtol=1e-3)


def test_gradient_matches_float64_finite_differences():
    q, k, v, igate, fgate, reset = _inputs(13, 8)
    weight = np.random.default_rng(14).standard_normal((B, T, H, 8))

    def f64(ig):
        return np.sum(ref.mlstm_recurrence(q, k, v, ig, fgate, lambda c: c, reset)[0] * weight)

    grad = jax.grad(
        lambda ig: jnp.sum(
            _sequence("auto", q, k, v, ig, fgate, reset=jnp.asarray(reset), chunk_size=8)[0]
            * weight
        )
    )(jnp.asarray(igate))
    ref.assert_directional_derivative(f64, igate, grad, seed=15)


def test_vmap_over_seeds_with_leading_axes_and_low_precision_inputs():
    # Seeds vmapped on the outside, as the trainer runs them; bfloat16 inputs are cast.
    seeds = [_inputs(20 + s, 16) for s in range(3)]
    stacked = [jnp.asarray(np.stack(parts)) for parts in zip(*seeds)]
    q, k, v, igate, fgate, _ = stacked

    def loss(q, k, v, igate, fgate, reset):
        h, end = _sequence("auto", q, k, v, igate, fgate, reset=reset, chunk_size=8)
        return jnp.sum(jnp.sin(h)) + jnp.sum(end.c)

    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 3))))(*stacked)
    for s, parts in enumerate(seeds):
        value, grad = jax.value_and_grad(loss, argnums=(0, 3))(*map(jnp.asarray, parts))
        np.testing.assert_allclose(values[s], value, rtol=1e-6)
        for g, w in zip(grad, (grads[0][s], grads[1][s])):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.vmap(lambda *a: _sequence("auto", *a)[0])(*low, igate, fgate)
    cast = [x.astype(jnp.float32) for x in low]
    want = jax.vmap(lambda *a: _sequence("xla", *a)[0])(*cast, igate, fgate)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)


def test_a_single_step():
    q, k, v, igate, fgate, _ = _inputs(30, 16, with_reset=False, batch=1, length=1)
    got, state = _sequence("auto", q, k, v, igate, fgate)
    want, want_state = _sequence("xla", q, k, v, igate, fgate)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.c, want_state.c, rtol=1e-6, atol=1e-7)


def test_kernel_checks_its_operands():
    q, k, v, igate, fgate, reset = _inputs(31, 8)
    state = _state(32, 8)
    log_f = jax.nn.log_sigmoid(jnp.asarray(fgate))
    with pytest.raises(Exception, match="raw_memory: operands must be"):
        jax.block_until_ready(
            cpu_kernel.raw_memory_forward(
                q, k, v, log_f, igate, reset[:, :-1], state.c, state.n, state.m
            )
        )


@pytest.mark.slow
def test_disabled_kernel_runs_the_chunk_form(monkeypatch):
    q, k, v, igate, fgate, _ = _inputs(33, 8)
    want = np.asarray(_sequence("xla", q, k, v, igate, fgate)[0])
    try:
        cpu_kernel.available.cache_clear()
        monkeypatch.setenv("ORTHORECALL_CPU_KERNEL", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not raw_memory.applies(reads.RAW)
        hlo = jax.jit(functools.partial(_sequence, "auto")).lower(q, k, v, igate, fgate).as_text()
        assert cpu_kernel.RAW_FORWARD_TARGET not in hlo
        np.testing.assert_array_equal(_sequence("auto", q, k, v, igate, fgate)[0], want)
    finally:
        monkeypatch.undo()
        cpu_kernel.available.cache_clear()
    assert raw_memory.applies(reads.RAW)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_lowering_runs_the_chunk_form(platform):
    # Lowering only: the CPU kernel must not reach a GPU/TPU program.
    q, k, v, igate, fgate, _ = _inputs(34, 8)
    loss = lambda *a: jnp.sum(_sequence("auto", *a)[0])
    module = export.export(jax.jit(jax.grad(loss)), platforms=[platform])(
        q, k, v, igate, fgate
    ).mlir_module()
    assert "orthorecall_raw_memory" not in module
    assert "dot_general" in module


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orthorecall import mlstm, reads
mesh = Mesh(np.array(jax.devices()), ("seed",))
rng = np.random.default_rng(0)
shape = (8, 2, 21, 3, 16)
q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
igate, fgate = (jnp.asarray(rng.standard_normal(shape[:-1]), jnp.float32) for _ in range(2))
reset = jnp.asarray(rng.random(shape[:3]) < 0.1)
seeds = NamedSharding(mesh, PartitionSpec("seed"))
operands = jax.device_put((q, k, v, igate, fgate, reset), seeds)

def loss(implementation):
    def f(q, k, v, igate, fgate, reset):
        h, end = mlstm.chunkwise_sequence(q, k, v, igate, fgate, read=reads.RAW, reset=reset,
                                          chunk_size=8, implementation=implementation)
        return jnp.sum(jnp.sin(h)) + jnp.sum(end.c)
    return f

step = jax.jit(jax.vmap(jax.value_and_grad(loss("auto"), argnums=(0, 1, 2, 3, 4))))
step = step.lower(*operands).compile()
compiled = step.as_text()
assert "orthorecall_raw_memory_backward" in compiled
assert "all-gather" not in compiled, "the memory was gathered onto every device"
value, grads = step(*operands)
assert grads[0].sharding.spec[0] == "seed", grads[0].sharding
pure = jax.vmap(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2, 3, 4)))
want_value, want = pure(*(np.asarray(x) for x in operands))
np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-5)
for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5 * np.abs(w).max())
print("ok")
"""


@pytest.mark.slow
def test_sharded_over_eight_devices_runs_each_shard_locally():
    assert_script_passes_on_eight_cpu_devices(_SHARDED_SCRIPT)
