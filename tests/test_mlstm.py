"""The recurrence and the chunkwise form against a float64 numpy recurrence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import mlstm, reads
from orthorecall import newton_schulz as ns
from tests import numpy_reference as ref

B, T, H, D = 2, 29, 2, 6


def _inputs(seed, with_reset=True):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(3))
    igate = (2.0 * rng.standard_normal((B, T, H))).astype(np.float32)
    fgate = (2.0 + 2.0 * rng.standard_normal((B, T, H))).astype(np.float32)
    reset = rng.random((B, T)) < 0.1 if with_reset else None
    if with_reset:
        reset[0, 7] = True  # at least one reset, mid-chunk for most chunk sizes
    return q, k, v, igate, fgate, reset


def _numpy_read(read):
    if read.is_raw:
        return lambda c: c
    if read.kind == "polar":
        return ref.polar
    return functools.partial(
        ref.newton_schulz, steps=ns.iteration_coefficients(read.coefficients, read.num_iterations)
    )


def _run(form, read, q, k, v, igate, fgate, reset, chunk_size=None, state=None):
    args = [jnp.asarray(a) for a in (q, k, v, igate, fgate)]
    reset = None if reset is None else jnp.asarray(reset)
    if form == "recurrent":
        return mlstm.recurrent_sequence(*args, read=read, reset=reset, state=state)
    return mlstm.chunkwise_sequence(
        *args, read=read, reset=reset, state=state, chunk_size=chunk_size
    )


READS = [reads.RAW, reads.NS5, reads.ReadConfig("newton_schulz", 3, "polar_express")]


@pytest.mark.parametrize("read", READS, ids=lambda r: f"{r.kind}{r.num_iterations}{r.coefficients}")
@pytest.mark.parametrize(
    "form,chunk_size",
    [
        ("recurrent", None),
        ("chunkwise", 1),
        ("chunkwise", 4),
        ("chunkwise", 8),
        ("chunkwise", 29),
        ("chunkwise", 64),
        ("chunkwise", None),
    ],
)
@pytest.mark.slow
def test_forms_match_float64_recurrence(read, form, chunk_size):
    q, k, v, igate, fgate, reset = _inputs(0)
    want, (c, n, m) = ref.mlstm_recurrence(q, k, v, igate, fgate, _numpy_read(read), reset)
    got, state = _run(form, read, q, k, v, igate, fgate, reset, chunk_size)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(state.c), c, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(state.n), n, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(state.m), m, atol=2e-5, rtol=2e-4)


def test_default_chunk_size_by_read_and_backend():
    # The CPU choice is measured (see default_chunk_size); T = 29 above makes
    # the default chunk of a non-raw read pad its tail.
    assert mlstm.default_chunk_size(reads.NS5, "cpu") == 16
    assert mlstm.default_chunk_size(reads.POLAR, "cpu") == 16
    assert mlstm.default_chunk_size(reads.RAW, "cpu") == 64
    assert mlstm.default_chunk_size(reads.NS5, "gpu") == 64
    assert mlstm.default_chunk_size(reads.NS5) == mlstm.default_chunk_size(
        reads.NS5, jax.default_backend()
    )


@pytest.mark.slow
def test_polar_read_matches_float64_recurrence():
    # The polar factor is ill-conditioned when the memory is nearly rank
    # deficient (early steps), so the tolerance is looser than for NS.
    q, k, v, igate, fgate, _ = _inputs(1, with_reset=False)
    want, _ = ref.mlstm_recurrence(q, k, v, igate, fgate, ref.polar)
    for form, chunk in (("recurrent", None), ("chunkwise", 8)):
        got, _ = _run(form, reads.POLAR, q, k, v, igate, fgate, None, chunk)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_initial_state_and_splitting_a_sequence():
    q, k, v, igate, fgate, reset = _inputs(2)
    whole, final = _run("chunkwise", reads.NS5, q, k, v, igate, fgate, reset, 8)
    cut = 13
    first, mid = _run(
        "chunkwise", reads.NS5, *(a[:, :cut] for a in (q, k, v, igate, fgate, reset)), 8
    )
    second, final2 = _run(
        "recurrent", reads.NS5, *(a[:, cut:] for a in (q, k, v, igate, fgate, reset)), state=mid
    )
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final2.c), np.asarray(final.c), atol=1e-5)


@pytest.mark.slow
def test_reset_equals_fresh_start():
    q, k, v, igate, fgate, _ = _inputs(3, with_reset=False)
    reset = np.zeros((B, T), bool)
    reset[:, 11] = True
    with_reset, _ = _run("chunkwise", reads.NS5, q, k, v, igate, fgate, reset, 8)
    fresh, _ = _run("chunkwise", reads.NS5, *(a[:, 11:] for a in (q, k, v, igate, fgate)), None, 8)
    np.testing.assert_allclose(
        np.asarray(with_reset)[:, 11:], np.asarray(fresh), atol=1e-5, rtol=1e-4
    )


@pytest.mark.slow
def test_memory_step_is_one_recurrent_step():
    q, k, v, igate, fgate, reset = _inputs(4)
    seq, _ = _run("recurrent", reads.NS5, q, k, v, igate, fgate, reset)
    state = mlstm.initial_memory_state(B, H, D)
    for t in range(4):
        h, state = mlstm.memory_step(
            state,
            q[:, t],
            k[:, t],
            v[:, t],
            igate[:, t],
            fgate[:, t],
            jnp.asarray(reset[:, t]),
            reads.NS5,
        )
        np.testing.assert_allclose(np.asarray(h), np.asarray(seq[:, t]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("read", [reads.RAW, reads.NS5], ids=["raw", "ns5"])
@pytest.mark.slow
def test_gradients_agree_between_forms(read):
    q, k, v, igate, fgate, reset = _inputs(5)
    weight = jnp.asarray(np.random.default_rng(9).standard_normal((B, T, H, D)), jnp.float32)

    def loss(args, form, chunk):
        out, state = _run(form, read, *args, reset, chunk)
        return jnp.sum(out * weight) + jnp.sum(state.c)

    args = tuple(jnp.asarray(a) for a in (q, k, v, igate, fgate))
    want = jax.grad(loss)(args, "recurrent", None)
    for chunk in (4, 7):
        got = jax.grad(loss)(args, "chunkwise", chunk)
        for g, w in zip(got, want):
            # Gradients that are exactly zero in the recurrence (a forget gate
            # at a reset step) come out of the chunk's cumulative sums as
            # rounding of the order of eps x the largest gradient.
            scale = float(jnp.max(jnp.abs(w)))
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6 * scale, rtol=5e-4)


@pytest.mark.slow
def test_gradient_matches_float64_finite_differences():
    q, k, v, igate, fgate, reset = _inputs(6)
    weight = np.random.default_rng(10).standard_normal((B, T, H, D))
    read64 = _numpy_read(reads.NS5)

    def f64(ig):
        return np.sum(ref.mlstm_recurrence(q, k, v, ig, fgate, read64, reset)[0] * weight)

    grad = jax.grad(
        lambda ig: jnp.sum(_run("chunkwise", reads.NS5, q, k, v, ig, fgate, reset, 8)[0] * weight)
    )(jnp.asarray(igate))
    direction = np.random.default_rng(11).standard_normal(igate.shape)
    eps = 1e-5
    want = (f64(igate + eps * direction) - f64(igate - eps * direction)) / (2 * eps)
    got = float(np.sum(np.asarray(grad, np.float64) * direction))
    assert abs(got - want) < 2e-3 * max(1.0, abs(want)), (got, want)


@pytest.mark.slow
def test_zero_state_start_has_finite_gradients():
    # Queries that see a zero memory (the very first step with ĩ -> -inf).
    q, k, v, igate, fgate, _ = _inputs(7, with_reset=False)
    igate = igate.copy()
    igate[:, 0] = -80.0
    grads = jax.grad(
        lambda ig: jnp.sum(_run("chunkwise", reads.NS5, q, k, v, ig, fgate, None, 8)[0])
    )(jnp.asarray(igate))
    assert np.all(np.isfinite(np.asarray(grads)))


def test_shape_errors():
    q, k, v, igate, fgate, _ = _inputs(8)
    with pytest.raises(ValueError, match="input_gate"):
        mlstm.chunkwise_sequence(q, k, v, igate[:, :-1], fgate, read=reads.RAW)
    with pytest.raises(ValueError, match="reset"):
        mlstm.recurrent_sequence(q, k, v, igate, fgate, read=reads.RAW, reset=jnp.zeros((B,), bool))
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm.chunkwise_sequence(q, k, v, igate, fgate, read=reads.RAW, chunk_size=0)
