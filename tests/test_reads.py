"""The reads (raw, NS_k, exact polar) as the cell uses them: against float64 numpy,
their gradients, zero memories, names and validation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import newton_schulz as ns
from orthorecall import reads
from tests import numpy_reference as ref
from tests.test_newton_schulz import (
    SCALES,
    SMALLEST_NORMAL,
    assert_close,
    fd_gradient,
    scaled_memories,
)


def _matrices(seed, count=6, d=12, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((count, d, d))).astype(np.float32)


def test_polar_matches_numpy_and_handles_rank_deficiency():
    rng = np.random.default_rng(4)
    full = rng.standard_normal((3, 10, 10)).astype(np.float32)
    low = (rng.standard_normal((3, 10, 3)) @ rng.standard_normal((3, 3, 10))).astype(np.float32)
    for x in (full, low):
        got = np.asarray(reads.polar(jnp.asarray(x)))
        want = np.stack([ref.polar(m) for m in x])
        np.testing.assert_allclose(got, want, atol=1e-4)
    s = np.linalg.svd(np.asarray(reads.polar(jnp.asarray(low)), np.float64), compute_uv=False)
    np.testing.assert_allclose(s[:, :3], 1.0, atol=1e-5)
    np.testing.assert_allclose(s[:, 3:], 0.0, atol=1e-5)


@pytest.mark.parametrize(
    "read",
    [
        reads.ReadConfig("newton_schulz", 5),
        reads.ReadConfig("newton_schulz", 0),
        reads.ReadConfig("newton_schulz", 5, "muon"),
        reads.POLAR,
    ],
)
@pytest.mark.slow
def test_zero_memory_has_finite_value_and_gradient(read):
    zero = jnp.zeros((2, 8, 8))
    value = read(zero)
    assert np.all(np.asarray(value) == 0.0)
    probe = jnp.asarray(_matrices(5, count=2, d=8))
    grad = jax.grad(lambda c: jnp.sum(read(c) * probe))(zero)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.slow
def test_float32_arithmetic_for_bfloat16_inputs():
    x = jnp.asarray(_matrices(6)).astype(jnp.bfloat16)
    for read in (reads.NS5, reads.POLAR):
        out = read(x)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(out), np.asarray(read(x.astype(jnp.float32))), atol=1e-6
        )


def _directional_fd(f64, x, direction, eps=1e-6):
    return (f64(x + eps * direction) - f64(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("name", ["ns5", "ns3_muon", "ns5_polar_express", "ns0", "polar"])
@pytest.mark.slow
def test_gradients_match_finite_differences(name):
    read = reads.read_from_name(name)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 10))
    weight = rng.standard_normal((10, 10))
    if read.kind == "polar":
        f64 = lambda m: np.sum(ref.polar(m) * weight)
    else:
        steps = ns.iteration_coefficients(read.coefficients, read.num_iterations)
        f64 = lambda m: np.sum(ref.newton_schulz(m, steps) * weight)
    grad = np.asarray(
        jax.grad(lambda m: jnp.sum(read(m) * weight))(jnp.asarray(x, jnp.float32)), np.float64
    )
    for trial in range(3):
        direction = rng.standard_normal((10, 10))
        want = _directional_fd(f64, x, direction)
        got = np.sum(grad * direction)
        assert abs(got - want) <= 1e-3 * max(1.0, abs(want)), (trial, got, want)


@pytest.mark.slow
def test_polar_gradient_finite_for_rank_deficient_memory():
    rng = np.random.default_rng(8)
    low = jnp.asarray((rng.standard_normal((12, 2)) @ rng.standard_normal((2, 12))), jnp.float32)
    grad = jax.grad(lambda c: jnp.sum(reads.polar(c) * jnp.arange(144.0).reshape(12, 12)))(low)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_read_names_and_validation():
    assert reads.read_from_name("baseline") == reads.RAW
    assert reads.read_from_name("ns5") == reads.NS5
    assert reads.read_from_name("ns7_muon") == reads.ReadConfig("newton_schulz", 7, "muon")
    with pytest.raises(ValueError, match="read name"):
        reads.read_from_name("ns_five")
    with pytest.raises(ValueError, match="coefficients"):
        reads.ReadConfig("newton_schulz", 5, "quartic")
    with pytest.raises(ValueError, match="num_iterations"):
        reads.ReadConfig("newton_schulz", -1)
    with pytest.raises(ValueError, match="kind"):
        reads.ReadConfig("orthogonal")
    with pytest.raises(ValueError, match="square"):
        ns.newton_schulz(jnp.zeros((3, 4)))


def test_read_configs_are_canonical_and_report_their_implementation():
    assert reads.ReadConfig("newton_schulz", np.int64(5)) == reads.NS5
    assert hash(reads.ReadConfig("newton_schulz", np.int64(5))) == hash(reads.NS5)
    assert reads.RAW.implementation() == reads.POLAR.implementation() == "xla"
    assert reads.NS5.implementation(backend="gpu") == "pallas_gpu"
    assert reads.NS5.implementation(backend="tpu") == "xla"
    assert reads.NS5.implementation(backend="cpu") == ns.read_implementation(5, "cubic", "cpu")


@pytest.mark.parametrize(
    "read",
    [reads.RAW, reads.NS5, reads.POLAR, reads.ReadConfig("newton_schulz", 3, "polar_express")],
)
def test_retrieve_is_the_query_times_the_read(read):
    c = jnp.asarray(_matrices(10, count=4, d=8))
    q = jnp.asarray(np.random.default_rng(10).standard_normal((4, 8)), jnp.float32)
    want = np.einsum("bi,bij->bj", np.asarray(q, np.float64), np.asarray(read(c), np.float64))
    np.testing.assert_allclose(np.asarray(read.retrieve(c, q)), want, atol=2e-5, rtol=1e-4)


@jax.jit
def _polar_and_gradient(c, weight):
    return jax.value_and_grad(lambda m: jnp.sum(reads.polar(m) * weight))(c)[1], reads.polar(c)


@pytest.mark.parametrize("scale", SCALES)
def test_polar_at_every_scale_matches_float64_numpy(scale):
    # U Vᵀ does not depend on the scale at all (no floor): at 3e38 the largest singular
    # value itself overflows float32 unless the matrix is scaled down first.
    c, _, _ = scaled_memories(11, scale)
    weight = np.random.default_rng(12).standard_normal(c.shape).astype(np.float32)
    grad, value = _polar_and_gradient(c, weight)
    for index in np.ndindex(*c.shape[:-2]):
        m = c[index]
        assert_close(value[index], ref.polar(m), atol=1e-4)
        want = fd_gradient(lambda x, w=weight[index]: np.sum(ref.polar(x) * w), m)
        assert np.all(np.isfinite(grad[index]))
        assert_close(grad[index], want, rtol=2e-3, atol=2e-4)


def test_polar_of_non_finite_memories_is_nan_and_leaves_the_others_alone():
    c, _, _ = scaled_memories(13, 1.0)
    broken = c.copy()
    broken[0, 1, 2, 3], broken[1, 0, 0, 0] = -np.inf, np.nan
    weight = np.ones_like(c)
    grad, value = _polar_and_gradient(broken, weight)
    want_grad, want_value = _polar_and_gradient(c, weight)
    for index in [(0, 1), (1, 0)]:
        assert np.isnan(value[index]).all() and np.isnan(grad[index]).all()
    for index in [(0, 0), (1, 1)]:
        np.testing.assert_array_equal(value[index], want_value[index])
        np.testing.assert_array_equal(grad[index], want_grad[index])


@pytest.mark.parametrize("name", ["ns5", "ns3_muon", "ns6_polar_express", "polar"])
def test_reads_by_name_do_not_depend_on_the_memory_scale(name):
    # What the cell runs (retrieve and its gradient) for memories beyond the point
    # where the plain sum of squares overflows, against the same memories at scale 1.
    read = reads.read_from_name(name)
    c, q, h_bar = scaled_memories(14, 1.0)
    scales = np.array([[1e10, 1e20], [1e30, 3e38]], np.float32)[..., None, None]
    big = c * scales

    @jax.jit
    def retrieve_and_grads(c, q):
        loss = lambda c, q: jnp.sum(read.retrieve(c, q) * h_bar)
        return read.retrieve(c, q), jax.grad(loss, argnums=(0, 1))(c, q)

    h, (c_bar, q_bar) = retrieve_and_grads(c, q)
    big_h, (big_c_bar, big_q_bar) = retrieve_and_grads(big, q)
    np.testing.assert_allclose(big_h, h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(big_q_bar, q_bar, rtol=1e-4, atol=1e-5)
    # d read(sC) / d(sC) = (1/s) d read(C) / dC, down to float32's smallest normal.
    want_c_bar = np.asarray(c_bar, np.float64) / scales
    atol = np.maximum(1e-5 * np.abs(want_c_bar).max(axis=(-2, -1), keepdims=True), SMALLEST_NORMAL)
    assert np.all(np.abs(big_c_bar - want_c_bar) <= atol + 1e-3 * np.abs(want_c_bar))


def test_iteration_count_is_bounded():
    bound = ns.MAX_ITERATIONS
    assert reads.read_from_name(f"ns{bound}") == reads.ReadConfig("newton_schulz", bound)
    refused = {
        "name": lambda k: reads.read_from_name(f"ns{k}"),
        "name with coefficients": lambda k: reads.read_from_name(f"ns{k}_muon"),
        "config": lambda k: reads.ReadConfig("newton_schulz", k),
        "iteration": lambda k: ns.newton_schulz(jnp.zeros((2, 2)), k),
        "read": lambda k: ns.newton_schulz_read(jnp.zeros((2, 2)), jnp.zeros(2), k),
    }
    for what, make in refused.items():
        for count in (bound + 1, 99999):
            with pytest.raises(ValueError, match=rf"<= {bound}\b.*got {count}\b"):
                make(count)
                pytest.fail(f"{what} accepted {count} iterations")
    # Thousands of digits: refused with the bound, not by int()'s digit limit.
    with pytest.raises(ValueError, match=rf"<= {bound}\b"):
        reads.read_from_name("ns" + "9" * 5000)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ns",
        "ns-1",
        "ns+5",
        "nsfoo",
        "ns_five",
        "ns_5",
        "ns5_",
        "ns5_unknown",
        "ns5__muon",
        "ns5_cubic_muon",
        " ns5",
        "ns5 ",
        "ns 5",
        "ns5\n",
        "NS5",
        "Raw",
        "BASELINE",
        "ns5_Muon",
        "ns²",  # str.isdigit() is true for these two
        "ns٥",
        "polar5",
    ],
)
def test_malformed_read_names_are_refused_naming_the_name(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        reads.read_from_name(name)


@pytest.mark.parametrize(
    "names",
    [
        ("raw", "baseline"),
        ("ns5", "ns05", "ns005", "ns5_cubic", "ns05_cubic"),
        ("ns0", "ns00", "ns0_cubic", "ns0_muon", "ns0_polar_express"),
        ("ns3_muon", "ns03_muon"),
        ("ns6_polar_express", "ns006_polar_express"),
        ("polar",),
    ],
)
def test_names_of_the_same_read_give_equal_configs(names):
    configs = [reads.read_from_name(name) for name in names]
    assert all(config == configs[0] for config in configs), configs
    assert len({hash(config) for config in configs}) == 1


def test_configs_are_equal_exactly_when_the_reads_are():
    names = [
        "raw",
        "polar",
        "ns0",
        "ns1",
        "ns5",
        "ns6",
        "ns1_muon",
        "ns5_muon",
        "ns5_polar_express",
    ]
    configs = [reads.read_from_name(name) for name in names]
    assert len(set(configs)) == len(configs)
    # Fields a read does not use do not tell configs apart.
    assert reads.ReadConfig("raw", 3, "muon") == reads.RAW
    assert reads.ReadConfig("polar", 0, "polar_express") == reads.POLAR
    assert reads.ReadConfig("newton_schulz", 0, "muon") == reads.read_from_name("ns0")
    assert hash(reads.ReadConfig("polar", 7)) == hash(reads.POLAR)
    # They are still validated.
    with pytest.raises(ValueError, match="num_iterations"):
        reads.ReadConfig("raw", -1)
    with pytest.raises(ValueError, match="coefficients"):
        reads.ReadConfig("polar", 5, "quartic")
