"""The replication's mechanism variants (straight-through halves, delta write, rls
read, frozen projections) against float64 numpy and against the reads they swap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import cell as cell_lib
from orthorecall import mlstm
from orthorecall.reads import NS5, RAW, ReadConfig, read_from_name, straight_through
from tests import numpy_reference

B, T, H, D = 2, 13, 2, 4


def _inputs(seed=0, t=T):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, t, H, D)).astype(np.float32) for _ in range(3))
    igate = rng.normal(size=(B, t, H)).astype(np.float32)
    fgate = (rng.normal(size=(B, t, H)) + 2.0).astype(np.float32)
    return q, k, v, igate, fgate


def _reset(t=T):
    reset = np.zeros((B, t), bool)
    reset[1, 6] = True
    return reset


@pytest.mark.parametrize(
    "name, reference_read, write, ridge",
    [
        ("delta", lambda c: c, "delta", None),
        (
            "delta_ns5",
            lambda c: numpy_reference.newton_schulz(c, [numpy_reference.CUBIC] * 5),
            "delta",
            None,
        ),
        ("rls", lambda c: c, "additive", 1e-2),
    ],
)
def test_variant_recurrence_matches_float64_numpy(name, reference_read, write, ridge):
    read = read_from_name(name)
    args = _inputs()
    reset = _reset()
    want = numpy_reference.mlstm_variant_recurrence(
        *args, reference_read, write=write, ridge=ridge, reset=reset
    )
    got, _ = mlstm.recurrent_sequence(*map(jnp.asarray, args), read=read, reset=jnp.asarray(reset))
    # The whitening inverse is ill-conditioned (λ = 1e-2 against keys of norm ~1), so
    # float32 Sherman–Morrison updates keep about three digits there.
    tolerance = 1e-3 if name == "rls" else 2e-4
    np.testing.assert_allclose(np.asarray(got), want, rtol=tolerance, atol=tolerance / 10)
    # The chunkwise entry point runs the same recurrence, in checkpointed chunks that
    # need not divide T.
    for chunk_size in (1, 5, 64):
        chunked, _ = mlstm.chunkwise_sequence(
            *map(jnp.asarray, args), read=read, reset=jnp.asarray(reset), chunk_size=chunk_size
        )
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(got), rtol=1e-6, atol=1e-6)


def test_rls_reads_stored_values_back_by_ridge_regression():
    # Orthogonal keys of norm sqrt(d), written with f = 1 and i = 1: P is nearly the
    # inverse of Σ k̂k̂ᵀ = I, so querying with a stored key returns its value.
    d = 4
    keys = np.eye(d, dtype=np.float32) * np.sqrt(d)
    values = np.random.default_rng(1).normal(size=(d, d)).astype(np.float32)
    q = keys[None, :, None]
    k = keys[None, :, None]
    v = values[None, :, None]
    igate = np.zeros((1, d, 1), np.float32)
    fgate = np.full((1, d, 1), 30.0, np.float32)  # f = 1 to float32
    _, state = mlstm.recurrent_sequence(q, k, v, igate, fgate, read=read_from_name("rls"))
    for j in range(d):
        query = jnp.asarray(keys[j])[None, None]
        zero = jnp.zeros((1, 1))
        h, _ = mlstm.memory_step(
            state,
            query,
            jnp.zeros_like(query),
            jnp.zeros_like(query),
            zero - 1e4,
            zero + 30.0,
            None,
            read_from_name("rls"),
        )
        # P = I / (1 + λ): q' = sqrt(d) e_j / (1 + λ) reads sqrt(d) v_j / (1 + λ), over
        # the normalizer q'ᵀn = sqrt(d) / (1 + λ) > 1: v_j itself.
        np.testing.assert_allclose(np.asarray(h)[0, 0], values[j], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["delta", "rls"])
def test_variant_gradients_agree_between_the_two_forms(name):
    read = read_from_name(name)
    args = tuple(map(jnp.asarray, _inputs(2)))
    reset = jnp.asarray(_reset())
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, H, D)), jnp.float32)

    def loss(form, *xs):
        out, _ = form(*xs, read=read, reset=reset)
        return jnp.sum(out * weights)

    chunked = functools.partial(mlstm.chunkwise_sequence, chunk_size=4)
    want = jax.grad(functools.partial(loss, mlstm.recurrent_sequence), argnums=range(5))(*args)
    got = jax.grad(functools.partial(loss, chunked), argnums=range(5))(*args)
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
@pytest.mark.parametrize("half, value_of, gradient_of", [("fwd", NS5, RAW), ("bwd", RAW, NS5)])
def test_straight_through_half_has_one_reads_value_and_the_others_gradient(
    form, half, value_of, gradient_of
):
    read = read_from_name(f"ns5_{half}")
    args = tuple(map(jnp.asarray, _inputs(4)))
    reset = jnp.asarray(_reset())
    weights = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, H, D)), jnp.float32)
    sequence = (
        mlstm.recurrent_sequence
        if form == "recurrent"
        else functools.partial(mlstm.chunkwise_sequence, chunk_size=5)
    )

    def run(r, *xs):
        return sequence(*xs, read=r, reset=reset)[0]

    np.testing.assert_array_equal(np.asarray(run(read, *args)), np.asarray(run(value_of, *args)))
    # A loss linear in h̃ = numerator / normalizer: the normalizer does not depend on
    # v or on the read, so the cotangent of each read's output is the same for every
    # read and the gradient with respect to v is the other read's. (Gradients of q, k
    # and the gates also pass through the normalizer, weighted by the read's value.)
    loss = lambda r, values: jnp.sum(run(r, *args[:2], values, *args[3:]) * weights)
    got = jax.grad(functools.partial(loss, read))(args[2])
    want = jax.grad(functools.partial(loss, gradient_of))(args[2])
    other = jax.grad(functools.partial(loss, value_of))(args[2])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(other), rtol=1e-2, atol=1e-3)


def test_straight_through_combinator_is_exact_in_value_and_swaps_the_gradient():
    value = jnp.asarray([1.0, 2.0, 3.0])
    f = lambda x: jnp.sum(straight_through(jnp.sin(x), x**2))
    x = jnp.asarray([0.3, -1.2, 2.0])
    np.testing.assert_array_equal(straight_through(value, value * 0.5), value)
    np.testing.assert_allclose(jax.grad(f)(x), 2 * x, rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        straight_through(value, value[:2])


def test_retrieve_of_a_straight_through_half_swaps_gradients_of_memory_and_query():
    rng = np.random.default_rng(6)
    c = jnp.asarray(rng.normal(size=(3, D, D)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(3, D)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, D)), jnp.float32)
    for half, value_of, gradient_of in (("fwd", NS5, RAW), ("bwd", RAW, NS5)):
        read = read_from_name(f"ns5_{half}")
        np.testing.assert_array_equal(read.retrieve(c, q), value_of.retrieve(c, q))
        got = jax.vjp(read.retrieve, c, q)[1](g)
        want = jax.vjp(gradient_of.retrieve, c, q)[1](g)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["delta", "delta_ns5", "rls", "ns5_fwd"])
def test_cell_scan_and_step_agree_for_variants(name):
    config = cell_lib.CellConfig(
        embedding_dim=8, num_heads=2, inner_multiple=8, read=read_from_name(name), chunk_size=4
    )
    params = cell_lib.init_params(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 8))
    state = cell_lib.initial_state(config, 2)
    assert (state.memory.p is not None) == (name == "rls")
    y_scan, final = cell_lib.scan(params, x, config, state=state)
    ys = []
    for t in range(x.shape[1]):
        y, state = cell_lib.step(params, state, x[:, t], None, config)
        ys.append(y)
    np.testing.assert_allclose(np.stack(ys, 1), y_scan, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(state)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_variant_names_parse_to_their_configs():
    assert read_from_name("ns5_fwd") == NS5.replace(straight_through="forward")
    assert read_from_name("ns3_bwd") == ReadConfig("newton_schulz", 3, straight_through="backward")
    assert read_from_name("delta") == RAW.replace(write="delta")
    assert read_from_name("delta_ns5") == NS5.replace(write="delta")
    assert read_from_name("rls") == ReadConfig("rls", ridge=1e-2)
    assert read_from_name("randk").frozen_parameters() == ("k_proj",)
    assert read_from_name("randqk").frozen_parameters() == ("q_proj", "k_proj")
    assert read_from_name("ns5").frozen_parameters() == ()
    for bad in ("ns5_fwd_fwd", "delta_raw", "delta_ns5_fwd", "rls_fwd", "raw_bwd", "randv"):
        with pytest.raises(ValueError, match=repr(bad)):
            read_from_name(bad)


def test_variant_configs_are_validated():
    with pytest.raises(ValueError, match="straight_through"):
        ReadConfig("raw", straight_through="forward")
    with pytest.raises(ValueError, match="write"):
        ReadConfig("raw", write="overwrite")
    with pytest.raises(ValueError, match="ridge"):
        ReadConfig("rls", ridge=0.0)
    with pytest.raises(ValueError, match="delta"):
        ReadConfig("rls", write="delta")
    with pytest.raises(ValueError, match="rls"):
        read_from_name("rls")(jnp.zeros((D, D)))
    # Variants without a Gram form or a chunk-parallel form say so.
    assert read_from_name("ns5_fwd").gram_steps() is None
    assert read_from_name("delta_ns5").gram_steps() is None
    assert not read_from_name("delta").has_chunkwise_form
    with pytest.raises(ValueError, match="gram"):
        cell_lib.CellConfig(read=read_from_name("ns5_bwd"), sequence_form="gram")


def test_rls_state_must_carry_its_inverse():
    args = tuple(map(jnp.asarray, _inputs(t=3)))
    with pytest.raises(ValueError, match=r"state\.p"):
        mlstm.recurrent_sequence(
            *args, read=read_from_name("rls"), state=mlstm.initial_memory_state(B, H, D)
        )
    with pytest.raises(ValueError, match=r"state\.p"):
        mlstm.recurrent_sequence(
            *args, read=RAW, state=mlstm.initial_memory_state(B, H, D, read_from_name("rls"))
        )
