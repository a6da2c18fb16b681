"""The Newton–Schulz iteration and read against float64 numpy, their limits and their
gradients, and the read's implementations."""

import itertools

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


def test_read_implementation_by_backend():
    # Accelerators never run the CPU kernel; zero iterations have nothing to fuse.
    assert ns.read_implementation(5, "cubic", backend="gpu") == "xla"
    assert ns.read_implementation(5, "cubic", backend="tpu") == "xla"
    assert ns.read_implementation(0, "cubic", backend="cpu") == "xla"
    from orthorecall import cpu_kernel

    expected = "cpu_kernel" if cpu_kernel.available() else "xla"
    assert ns.read_implementation(5, "cubic", backend="cpu") == expected
