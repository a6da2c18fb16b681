"""The Newton–Schulz iteration and read against float64 numpy, their limits and their
gradients, and the read's implementations."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import newton_schulz as ns
from orthorecall import reads
from tests import numpy_reference as ref


def _matrices(seed, count=6, d=12, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((count, d, d))).astype(np.float32)


@pytest.mark.parametrize("coefficients", ns.COEFFICIENT_SETS)
@pytest.mark.parametrize("k", [0, 1, 5, 8])
def test_matches_float64_numpy(coefficients, k):
    x = _matrices(k)
    got = np.asarray(ns.newton_schulz(jnp.asarray(x), k, coefficients))
    steps = ns.iteration_coefficients(coefficients, k)
    want = np.stack([ref.newton_schulz(m, steps) for m in x])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_cubic_is_the_reference_iteration():
    # 0.5 X (3I - XᵀX), written out independently.
    x = _matrices(1, count=1)[0].astype(np.float64)
    x /= np.linalg.norm(x)
    for _ in range(5):
        x = 0.5 * x @ (3 * np.eye(len(x)) - x.T @ x)
    got = np.asarray(ns.newton_schulz(jnp.asarray(_matrices(1, count=1)), 5))[0]
    np.testing.assert_allclose(got, x, atol=2e-6)


def test_polar_express_schedule_values():
    steps = ns.iteration_coefficients("polar_express", 10)
    np.testing.assert_allclose(
        steps[0],
        (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5),
    )
    assert steps[7] == steps[9] == (1.875, -1.25, 0.375)


@pytest.mark.slow
def test_singular_values_converge_to_one_as_k_grows():
    x = jnp.asarray(_matrices(3, count=4, d=16))
    errors = []
    for k in (1, 3, 5, 10, 20, 40):
        s = np.linalg.svd(np.asarray(ns.newton_schulz(x, k), np.float64), compute_uv=False)
        errors.append(np.max(np.abs(s - 1.0)))
    assert all(a >= b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-4
    # And the limit is the polar factor.
    np.testing.assert_allclose(
        np.asarray(ns.newton_schulz(x, 60)), np.asarray(reads.polar(x)), atol=1e-4
    )


def test_muon_does_not_converge_but_stays_near_one():
    sigma = jnp.linspace(0.05, 1.0, 50)
    mapped = np.asarray(ns.singular_value_map(sigma, "muon", 5))
    assert mapped.min() > 0.6 and mapped.max() < 1.3
    assert np.max(np.abs(mapped - 1.0)) > 0.1  # not the polar limit


@pytest.mark.slow
def test_xla_implementation_equals_the_default_one():
    # On the CPU backend "auto" is the fused kernel (when it builds): both must agree.
    c = jnp.asarray(_matrices(9, count=5, d=12))
    q = jnp.asarray(np.random.default_rng(9).standard_normal((5, 12)), jnp.float32)
    auto = ns.newton_schulz_read(c, q, 5)
    xla = ns.newton_schulz_read(c, q, 5, implementation="xla")
    np.testing.assert_allclose(np.asarray(auto), np.asarray(xla), atol=2e-5, rtol=1e-4)
    want = np.einsum("bi,bij->bj", np.asarray(q), np.asarray(ns.newton_schulz(c, 5)))
    np.testing.assert_allclose(np.asarray(xla), want, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="implementation='cuda' is not known"):
        ns.newton_schulz_read(c, q, 5, implementation="cuda")


def test_read_implementation_by_backend(monkeypatch):
    # Accelerators never run the CPU kernel; zero iterations have nothing to fuse.
    assert ns.read_implementation(5, "cubic", backend="gpu") == "pallas_gpu"
    assert ns.read_implementation(5, "cubic", backend="gpu", width=48) == "pallas_gpu"
    assert ns.read_implementation(5, "muon", backend="gpu", width=64) == "pallas_gpu"
    assert ns.read_implementation(5, "cubic", backend="tpu") == "xla"
    assert ns.read_implementation(0, "cubic", backend="cpu") == "xla"
    assert ns.read_implementation(0, "cubic", backend="gpu") == "xla"
    # Wider than the Pallas kernel's tiles, or under a precision it does not implement,
    # or switched off: the XLA read.
    assert ns.read_implementation(5, "cubic", backend="gpu", width=65) == "xla"
    with jax.default_matmul_precision("highest"):
        assert ns.read_implementation(5, "cubic", backend="gpu") == "pallas_gpu"
    with jax.default_matmul_precision("BF16_BF16_F32_X3"):
        assert ns.read_implementation(5, "cubic", backend="gpu") == "xla"
    monkeypatch.setenv("ORTHORECALL_PALLAS", "0")
    assert ns.read_implementation(5, "cubic", backend="gpu") == "xla"
    from orthorecall import cpu_kernel

    expected = "cpu_kernel" if cpu_kernel.available() else "xla"
    assert ns.read_implementation(5, "cubic", backend="cpu") == expected


# Largest magnitudes from far below the Frobenius floor (where the read is C / 1e-6) to
# the top of the float32 range; from about 1.2e18 on the plain sum of squares overflows.
SCALES = [1e-30, 1e-8, 1.0, 1e10, 1e20, 1e30, 3e38]
# XLA:CPU flushes subnormal results to zero, so a gradient entry below this (at 3e38
# the exact one is about 1 / |C|_F) may read as zero.
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)
# (B, H, d, d): one shape for all the scale tests, so that they share compiled programs.
SHAPE = (2, 2, 6, 6)


def scaled_memories(seed, scales, shape=SHAPE):
    """float32 memories whose largest magnitude is ``scales`` (broadcast over the leading
    axes), queries and read cotangents."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal(shape)
    largest = np.abs(c).max(axis=(-2, -1), keepdims=True)
    c *= np.reshape(scales, (*np.shape(scales), 1, 1)) / largest
    q, h_bar = rng.standard_normal((2, *shape[:-1])).astype(np.float32)
    return c.astype(np.float32), q, h_bar


def fd_gradient(f64, c):
    """Central differences of the float64 function ``f64`` at the matrix ``c``."""
    c = np.asarray(c, np.float64)
    eps = 1e-5 * np.abs(c).max()
    grad = np.zeros_like(c)
    for index in np.ndindex(*c.shape):
        step = np.zeros_like(c)
        step[index] = eps
        grad[index] = (f64(c + step) - f64(c - step)) / (2 * eps)
    return grad


def assert_close(got, want, rtol=1e-4, atol=2e-5):
    """float32 against float64, with ``atol`` relative to the largest wanted value."""
    want = np.asarray(want, np.float64)
    floor = max(atol * np.abs(want).max(), SMALLEST_NORMAL)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=floor)


def _ref_ns(c, steps):
    """float64 NS of every matrix of a batch."""
    flat = np.asarray(c, np.float64).reshape(-1, *c.shape[-2:])
    return np.stack([ref.newton_schulz(m, steps) for m in flat]).reshape(c.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _ns(c, k=5, coefficients="cubic"):
    return ns.newton_schulz(c, k, coefficients)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _read(c, q, k=5, coefficients="cubic", implementation="auto"):
    return ns.newton_schulz_read(c, q, k, coefficients, implementation=implementation)


@jax.jit
def _ns_grad(c, weight):
    return jax.grad(lambda m: jnp.sum(ns.newton_schulz(m, 5) * weight))(c)


@functools.partial(jax.jit, static_argnums=3)
def _read_grads(c, q, h_bar, implementation):
    loss = lambda m, q: jnp.sum(ns.newton_schulz_read(m, q, implementation=implementation) * h_bar)
    return jax.grad(loss, argnums=(0, 1))(c, q)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("coefficients,k", [("cubic", 5), ("muon", 3), ("polar_express", 6)])
def test_values_at_every_scale_match_float64_numpy(scale, coefficients, k):
    c, q, _ = scaled_memories(0, scale)
    want = _ref_ns(c, ns.iteration_coefficients(coefficients, k))
    assert_close(_ns(c, k, coefficients), want)
    for implementation in ns.IMPLEMENTATIONS:
        got = _read(c, q, k, coefficients, implementation)
        assert_close(got, np.einsum("...i,...ij->...j", q, want))


def test_each_matrix_of_a_batch_is_scaled_on_its_own():
    # Below the floor, ordinary, rescaled and at the top of the range, side by side.
    c, q, _ = scaled_memories(1, [[1e-30, 1.0], [1e20, 3e38]])
    want = _ref_ns(c, ns.iteration_coefficients("cubic", 5))
    got = {"ns": _ns(c)} | {i: _read(c, q, implementation=i) for i in ns.IMPLEMENTATIONS}
    for index in np.ndindex(*c.shape[:-2]):
        assert_close(got["ns"][index], want[index])
        for implementation in ns.IMPLEMENTATIONS:
            assert_close(got[implementation][index], q[index] @ want[index])


@pytest.mark.parametrize("scale", SCALES)
def test_gradients_at_every_scale_match_float64_numpy(scale):
    # Away from the floor NS(sC) = NS(C), so the gradient at sC is the one at C over s;
    # below it the read is C / 1e-6 and the gradient does not shrink with C.
    c, q, h_bar = scaled_memories(2, scale)
    steps = ns.iteration_coefficients("cubic", 5)
    weight = np.random.default_rng(3).standard_normal(c.shape).astype(np.float32)
    plain = _ns_grad(c, weight)
    by_implementation = [_read_grads(c, q, h_bar, i) for i in ns.IMPLEMENTATIONS]
    for index in np.ndindex(*c.shape[:-2]):
        m, qm, hm, wm = c[index], q[index], h_bar[index], weight[index]
        want = fd_gradient(lambda x, w=wm: np.sum(ref.newton_schulz(x, steps) * w), m)
        assert np.all(np.isfinite(plain[index]))
        assert_close(plain[index], want, rtol=2e-3, atol=2e-4)
        want_c = fd_gradient(lambda x, q=qm, h=hm: q @ ref.newton_schulz(x, steps) @ h, m)
        want_q = ref.newton_schulz(m, steps) @ hm
        for c_bar, q_bar in by_implementation:
            assert np.all(np.isfinite(c_bar[index]))
            assert_close(c_bar[index], want_c, rtol=2e-3, atol=2e-4)
            assert_close(q_bar[index], want_q)


@pytest.mark.parametrize("shift", [8, 31, 32, 33, 40, 64, 100, 127])
def test_power_of_two_scaling_is_exact(shift):
    # Multiplying by a power of two is exact in float32, and so is the normalization's
    # rescaling: NS(2^j C) is NS(C) bit for bit, on either side of the rescaling threshold.
    c, q, _ = scaled_memories(4, 1.0)
    big = c * np.float32(2.0**shift)
    np.testing.assert_array_equal(_ns(big), _ns(c))
    for implementation in ns.IMPLEMENTATIONS:
        np.testing.assert_array_equal(
            _read(big, q, implementation=implementation), _read(c, q, implementation=implementation)
        )


def test_ordinary_memories_are_normalized_by_the_reference_formula():
    # Below 2^32 nothing is rescaled: the same float32 operations as the reference's
    # C / max(|C|_F, 1e-6), so results stay identical to the last bit, op by op or fused.
    def plain(x):
        norm_sq = jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)
        return x * jax.lax.rsqrt(jnp.maximum(norm_sq, 1e-12))

    for scale in (1e-9, 1e-6, 1e-3, 1.0, 1e3, 1e9):
        c = jnp.asarray(scaled_memories(5, scale, shape=(3, 4, 12, 12))[0])
        np.testing.assert_array_equal(ns.frobenius_normalize(c), plain(c))
        np.testing.assert_array_equal(jax.jit(ns.frobenius_normalize)(c), jax.jit(plain)(c))


def test_non_finite_memories_read_nan_and_leave_the_others_alone():
    c, q, h_bar = scaled_memories(6, 1.0)
    broken = c.copy()
    broken[0, 1, 2, 3], broken[1, 0, 0, 0] = np.inf, np.nan
    fine = [(0, 0), (1, 1)]
    got = _ns(broken)
    assert np.isnan(got[0, 1]).all() and np.isnan(got[1, 0]).all()
    want = _ns(c)
    for index in fine:
        np.testing.assert_array_equal(got[index], want[index])
    for implementation in ns.IMPLEMENTATIONS:
        h = _read(broken, q, implementation=implementation)
        assert np.isnan(h[0, 1]).all() and np.isnan(h[1, 0]).all()
        c_bar, q_bar = _read_grads(broken, q, h_bar, implementation)
        assert np.isnan(c_bar[0, 1]).all() and np.isnan(c_bar[1, 0]).all()
        want_h = _read(c, q, implementation=implementation)
        want_c_bar, want_q_bar = _read_grads(c, q, h_bar, implementation)
        for index in fine:
            np.testing.assert_array_equal(h[index], want_h[index])
            np.testing.assert_array_equal(c_bar[index], want_c_bar[index])
            np.testing.assert_array_equal(q_bar[index], want_q_bar[index])
