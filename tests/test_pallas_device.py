"""The Pallas kernels compiled and run on an NVIDIA GPU (not interpret mode): skipped
without one. ``make accelerator-check`` runs this module on a lent device. What the
interpret-mode tests cannot see is checked here: Triton's and ptxas' code, and the
tensor cores' own float32 accumulation under the 3xTF32 products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import chunk_read, pallas_chunk_read, pallas_read, reads
from orthorecall import newton_schulz as ns
from tests.test_pallas_chunk_read import _chunk, _formed
from tests.test_pallas_read import _float64_read_and_vjp, _inputs, _xla_read_and_vjp

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu" or not pallas_read.available(),
    reason="needs an NVIDIA GPU and Pallas' Triton backend",
)

CUBIC5 = ns.iteration_coefficients("cubic", 5)


def _device_read_and_vjp(c, q, h_bar, steps, jax_precision):
    kwargs = {"steps": steps, "jax_precision": jax_precision}
    h = jax.jit(lambda c, q: pallas_read.ns_read_forward(c, q, **kwargs))(c, q)
    c_bar, q_bar = jax.jit(lambda c, q, h: pallas_read.ns_read_backward(c, q, h, **kwargs))(
        c, q, h_bar
    )
    return h, c_bar, q_bar


def _error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


@pytest.mark.parametrize("d", [16, 48, 64])
def test_highest_is_float32_faithful_on_the_device(d):
    """3xTF32 on the tensor cores against float64, within twice the XLA read's float32
    error (XLA on this GPU at "highest")."""
    c, q, h_bar = _inputs(d, (64,), d)
    want = _float64_read_and_vjp(c, q, h_bar, CUBIC5)
    got = _device_read_and_vjp(c, q, h_bar, CUBIC5, "highest")
    with jax.default_matmul_precision("highest"):
        xla = _xla_read_and_vjp(c, q, h_bar, CUBIC5)
    for g, x, w in zip(got, xla, want, strict=True):
        assert _error(g, w) <= 2 * _error(x, w), (_error(g, w), _error(x, w))


@pytest.mark.parametrize("jax_precision", ["tensorfloat32", "bfloat16"])
def test_lower_precisions_run(jax_precision):
    c, q, h_bar = _inputs(3, (32,), 48)
    got = _device_read_and_vjp(c, q, h_bar, CUBIC5, jax_precision)
    with jax.default_matmul_precision("highest"):
        want = _xla_read_and_vjp(c, q, h_bar, CUBIC5)
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g))) and _error(g, w) < 0.1


def test_chunk_read_on_the_device_matches_the_formed_read():
    operands = _chunk(7, (8,), 16, 48)
    h_bar = jnp.asarray(np.random.default_rng(1).standard_normal(operands[-1].shape), jnp.float32)
    kwargs = {"steps": CUBIC5, "jax_precision": "highest"}
    h = jax.jit(lambda *a: pallas_chunk_read.chunk_read_forward(*a, **kwargs))(*operands)
    bars = jax.jit(lambda *a: pallas_chunk_read.chunk_read_backward(*a, **kwargs))(*operands, h_bar)
    with jax.default_matmul_precision("highest"):
        want_h, vjp = jax.vjp(_formed(CUBIC5), *operands)
        want = (want_h, *vjp(h_bar))
    for g, w in zip((h, *bars), want, strict=True):
        assert _error(g, w) < 2e-5


def test_the_dispatch_selects_the_kernels_and_they_build():
    assert pallas_read.compile_failure(CUBIC5, 48, "highest") is None
    assert pallas_chunk_read.compile_failure(CUBIC5, 48, 16, "highest") is None
    with jax.default_matmul_precision("highest"):
        assert ns.read_implementation(5, "cubic", width=48) == "pallas_gpu"
        assert chunk_read._pallas_applies(reads.NS5, 16, 48)
