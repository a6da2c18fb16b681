"""The reads against float64 numpy, their limits and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import newton_schulz as ns
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
    np.testing.assert_allclose(steps[0], (8.28721201814563 / 1.01,
                                          -23.595886519098837 / 1.01**3,
                                          17.300387312530933 / 1.01**5))
    assert steps[7] == steps[9] == (1.875, -1.25, 0.375)


def test_singular_values_converge_to_one_as_k_grows():
    x = jnp.asarray(_matrices(3, count=4, d=16))
    errors = []
    for k in (1, 3, 5, 10, 20, 40):
        s = np.linalg.svd(np.asarray(ns.newton_schulz(x, k), np.float64), compute_uv=False)
        errors.append(np.max(np.abs(s - 1.0)))
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4
    # And the limit is the polar factor.
    np.testing.assert_allclose(np.asarray(ns.newton_schulz(x, 60)), np.asarray(ns.polar(x)),
                               atol=1e-4)


def test_polar_matches_numpy_and_handles_rank_deficiency():
    rng = np.random.default_rng(4)
    full = rng.standard_normal((3, 10, 10)).astype(np.float32)
    low = (rng.standard_normal((3, 10, 3)) @ rng.standard_normal((3, 3, 10))).astype(np.float32)
    for x in (full, low):
        got = np.asarray(ns.polar(jnp.asarray(x)))
        want = np.stack([ref.polar(m) for m in x])
        np.testing.assert_allclose(got, want, atol=1e-4)
    s = np.linalg.svd(np.asarray(ns.polar(jnp.asarray(low)), np.float64), compute_uv=False)
    np.testing.assert_allclose(s[:, :3], 1.0, atol=1e-5)
    np.testing.assert_allclose(s[:, 3:], 0.0, atol=1e-5)


@pytest.mark.parametrize("read", [ns.ReadConfig("newton_schulz", 5), ns.ReadConfig("newton_schulz", 0),
                                  ns.ReadConfig("newton_schulz", 5, "muon"), ns.POLAR])
def test_zero_memory_has_finite_value_and_gradient(read):
    zero = jnp.zeros((2, 8, 8))
    value = read(zero)
    assert np.all(np.asarray(value) == 0.0)
    probe = jnp.asarray(_matrices(5, count=2, d=8))
    grad = jax.grad(lambda c: jnp.sum(read(c) * probe))(zero)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_float32_arithmetic_for_bfloat16_inputs():
    x = jnp.asarray(_matrices(6)).astype(jnp.bfloat16)
    for read in (ns.NS5, ns.POLAR):
        out = read(x)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(read(x.astype(jnp.float32))),
                                   atol=1e-6)


def _directional_fd(f64, x, direction, eps=1e-6):
    return (f64(x + eps * direction) - f64(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("name", ["ns5", "ns3_muon", "ns5_polar_express", "ns0", "polar"])
def test_gradients_match_finite_differences(name):
    read = ns.read_from_name(name)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 10))
    weight = rng.standard_normal((10, 10))
    if read.kind == "polar":
        f64 = lambda m: np.sum(ref.polar(m) * weight)
    else:
        steps = ns.iteration_coefficients(read.coefficients, read.num_iterations)
        f64 = lambda m: np.sum(ref.newton_schulz(m, steps) * weight)
    grad = np.asarray(jax.grad(lambda m: jnp.sum(read(m) * weight))(jnp.asarray(x, jnp.float32)),
                      np.float64)
    for trial in range(3):
        direction = rng.standard_normal((10, 10))
        want = _directional_fd(f64, x, direction)
        got = np.sum(grad * direction)
        assert abs(got - want) <= 1e-3 * max(1.0, abs(want)), (trial, got, want)


def test_polar_gradient_finite_for_rank_deficient_memory():
    rng = np.random.default_rng(8)
    low = jnp.asarray((rng.standard_normal((12, 2)) @ rng.standard_normal((2, 12))), jnp.float32)
    grad = jax.grad(lambda c: jnp.sum(ns.polar(c) * jnp.arange(144.0).reshape(12, 12)))(low)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_muon_does_not_converge_but_stays_near_one():
    sigma = jnp.linspace(0.05, 1.0, 50)
    mapped = np.asarray(ns.singular_value_map(sigma, "muon", 5))
    assert mapped.min() > 0.6 and mapped.max() < 1.3
    assert np.max(np.abs(mapped - 1.0)) > 0.1  # not the polar limit


def test_read_names_and_validation():
    assert ns.read_from_name("baseline") == ns.RAW
    assert ns.read_from_name("ns5") == ns.NS5
    assert ns.read_from_name("ns7_muon") == ns.ReadConfig("newton_schulz", 7, "muon")
    with pytest.raises(ValueError, match="read name"):
        ns.read_from_name("ns_five")
    with pytest.raises(ValueError, match="coefficients"):
        ns.ReadConfig("newton_schulz", 5, "quartic")
    with pytest.raises(ValueError, match="num_iterations"):
        ns.ReadConfig("newton_schulz", -1)
    with pytest.raises(ValueError, match="kind"):
        ns.ReadConfig("orthogonal")
    with pytest.raises(ValueError, match="square"):
        ns.newton_schulz(jnp.zeros((3, 4)))
