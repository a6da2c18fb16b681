"""The mLSTM cell as a layer: forms, stepping, resets, state hand-over."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import cell as cell_lib
from orthorecall import reads

CONFIG = cell_lib.CellConfig(
    embedding_dim=16, num_heads=2, inner_multiple=8, chunk_size=8, read=reads.NS5
)
B, T = 3, 21


def _setup(seed=0, config=CONFIG):
    params = cell_lib.init_params(jax.random.PRNGKey(seed), config)
    # Non-zero gate weights, so the gates depend on the input as after training.
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), 2)
    for name, key in zip(("input_gate", "forget_gate"), keys):
        params[name]["kernel"] = 0.3 * jax.random.normal(key, params[name]["kernel"].shape)
    x = jax.random.normal(jax.random.PRNGKey(seed + 2), (B, T, config.embedding_dim))
    return params, x


def _step_loop(params, x, reset, config, state=None):
    state = cell_lib.initial_state(config, x.shape[0]) if state is None else state
    outs = []
    for t in range(x.shape[1]):
        y, state = cell_lib.step(params, state, x[:, t], reset[:, t], config)
        outs.append(y)
    return jnp.stack(outs, axis=1), state


def test_inner_and_head_widths_follow_the_reference_rounding():
    reference = cell_lib.CellConfig()
    assert (reference.inner_dim, reference.head_dim) == (192, 48)


@pytest.mark.slow
def test_chunkwise_recurrent_and_step_agree_with_resets():
    params, x = _setup()
    reset = np.zeros((B, T), bool)
    reset[0, 5] = reset[1, 9] = reset[2, 0] = reset[0, 6] = True
    reset = jnp.asarray(reset)
    chunkwise, s1 = cell_lib.scan(params, x, CONFIG, reset=reset)
    recurrent, s2 = cell_lib.scan(
        params,
        x,
        CONFIG.__class__(**{**CONFIG.__dict__, "sequence_form": "recurrent"}),
        reset=reset,
    )
    stepped, s3 = _step_loop(params, x, reset, CONFIG)
    for other, state in ((recurrent, s2), (stepped, s3)):
        np.testing.assert_allclose(np.asarray(chunkwise), np.asarray(other), atol=2e-5, rtol=1e-4)
        for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(state)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_reset_clears_memory_and_conv_window():
    params, x = _setup(1)
    reset = np.zeros((B, T), bool)
    reset[:, 10] = True
    with_reset, _ = cell_lib.scan(params, x, CONFIG, reset=jnp.asarray(reset))
    fresh, _ = cell_lib.scan(params, x[:, 10:], CONFIG)
    np.testing.assert_allclose(
        np.asarray(with_reset[:, 10:]), np.asarray(fresh), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("cut", [7, 12])
@pytest.mark.slow
def test_state_hands_over_between_calls(cut):
    params, x = _setup(2)
    reset = np.zeros((B, T), bool)
    reset[1, cut - 1] = True  # a reset inside the conv window carried over
    reset = jnp.asarray(reset)
    whole, _ = cell_lib.scan(params, x, CONFIG, reset=reset)
    first, mid = cell_lib.scan(params, x[:, :cut], CONFIG, reset=reset[:, :cut])
    rest, _ = _step_loop(params, x[:, cut:], reset[:, cut:], CONFIG, state=mid)
    np.testing.assert_allclose(
        np.asarray(jnp.concatenate([first, rest], 1)), np.asarray(whole), atol=2e-5, rtol=1e-4
    )


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_state():
    config = cell_lib.CellConfig(**{**CONFIG.__dict__, "compute_dtype": "bfloat16"})
    params, x = _setup(3)
    y, state = cell_lib.scan(params, x, config)
    assert y.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state))
    y32, _ = cell_lib.scan(params, x, CONFIG)
    assert float(jnp.max(jnp.abs(y - y32))) < 0.1 * float(jnp.max(jnp.abs(y32)))


def test_config_and_input_validation():
    with pytest.raises(ValueError, match="num_heads"):
        cell_lib.CellConfig(embedding_dim=16, num_heads=5, inner_multiple=8)
    with pytest.raises(ValueError, match="sequence_form"):
        cell_lib.CellConfig(sequence_form="parallel")
    with pytest.raises(ValueError, match="compute_dtype"):
        cell_lib.CellConfig(compute_dtype="float16")
    # Inputs are checked before any computation: abstract parameters suffice.
    params = jax.eval_shape(lambda key: cell_lib.init_params(key, CONFIG), jax.random.PRNGKey(5))
    x = np.zeros((B, T, CONFIG.embedding_dim), np.float32)
    with pytest.raises(ValueError, match="embedding_dim=16"):
        cell_lib.scan(params, x[..., :8], CONFIG)
    with pytest.raises(ValueError, match="reset"):
        cell_lib.scan(params, x, CONFIG, reset=np.zeros((B,), bool))


@pytest.mark.slow
def test_non_finite_input_stays_inside_its_episode_in_every_form():
    # A NaN input at t = 6 of sequences 0 and 1; sequence 0 starts a new episode at
    # t = 13, sequence 2 is clean. Chunks of 8 put positions before the NaN in its
    # chunk, and the reset in the next one.
    params, x = _setup(4)
    x = np.array(x)
    x[:2, 6, 3] = np.nan
    reset = np.zeros((B, T), bool)
    reset[0, 13] = True
    expected = np.zeros((B, T), bool)
    expected[0, 6:13] = expected[1, 6:] = True
    recurrent_config = CONFIG.replace(sequence_form="recurrent")
    chunkwise, _ = cell_lib.scan(params, x, CONFIG, reset=reset)
    recurrent, _ = cell_lib.scan(params, x, recurrent_config, reset=reset)
    stepped, _ = _step_loop(params, jnp.asarray(x), jnp.asarray(reset), CONFIG)
    for y in (chunkwise, recurrent, stepped):
        np.testing.assert_array_equal(np.isnan(np.asarray(y)).any(-1), expected)
        np.testing.assert_allclose(
            np.asarray(y)[~expected], np.asarray(recurrent)[~expected], atol=2e-5, rtol=1e-4
        )
    fresh, _ = cell_lib.scan(params, x[:1, 13:], CONFIG)
    np.testing.assert_allclose(
        np.asarray(chunkwise[0, 13:]), np.asarray(fresh[0]), atol=2e-5, rtol=1e-4
    )

    # Gradients of the finite outputs: the chunkwise form gives NaN nowhere the
    # recurrence does not, and both keep the other episodes' input gradients finite.
    weight = jax.random.normal(jax.random.PRNGKey(9), chunkwise.shape)

    def loss(params, x, config):
        y, _ = cell_lib.scan(params, x, config, reset=reset)
        return jnp.sum(jnp.where(expected[..., None], 0.0, y * weight))

    grad = jax.grad(loss, argnums=(0, 1))
    want_params, want_x = grad(params, x, recurrent_config)
    got_params, got_x = grad(params, x, CONFIG)
    bad = lambda g: ~np.isfinite(np.asarray(g)).all(-1)
    assert not bad(want_x)[0, 13:].any() and not bad(want_x)[2].any()
    assert not np.any(bad(got_x) & ~bad(want_x))
    finite = ~bad(want_x)
    np.testing.assert_allclose(
        np.asarray(got_x)[finite], np.asarray(want_x)[finite], atol=1e-5, rtol=1e-3
    )
    # Through the NaN positions themselves (0 x NaN in the projections' backward) the
    # parameter gradients are NaN in the recurrence; the chunkwise form may do better.
    for got_leaf, want_leaf in zip(
        jax.tree_util.tree_leaves(got_params), jax.tree_util.tree_leaves(want_params)
    ):
        assert np.isfinite(got_leaf).all() or not np.isfinite(want_leaf).all()


def test_reset_and_state_validation():
    params = jax.eval_shape(lambda key: cell_lib.init_params(key, CONFIG), jax.random.PRNGKey(5))
    x = np.zeros((B, T, CONFIG.embedding_dim), np.float32)
    state = cell_lib.initial_state(CONFIG, B)
    with pytest.raises(ValueError, match=r"reset must have shape \(3,\) \(batch,\); got \(1,\)"):
        cell_lib.step(params, state, x[:, 0], np.ones((1,), bool), CONFIG)
    with pytest.raises(ValueError, match=r"reset must be a bool array.*got int64"):
        cell_lib.step(params, state, x[:, 0], np.ones((B,), np.int64), CONFIG)
    with pytest.raises(ValueError, match=r"reset must be a bool array.*got int32"):
        cell_lib.scan(params, x, CONFIG, reset=jnp.zeros((B, T), jnp.int32))
    with pytest.raises(ValueError, match=r"state is for 1 sequences, x for 3"):
        cell_lib.step(params, cell_lib.initial_state(CONFIG, 1), x[:, 0], None, CONFIG)
    with pytest.raises(ValueError, match=r"state is for 1 sequences, x for 3"):
        cell_lib.scan(params, x, CONFIG, state=cell_lib.initial_state(CONFIG, 1))


@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_block_diagonal_projection_and_its_gradients_match_float64(batch):
    # The projection's forward and hand-written backward against the dense block-diagonal
    # matrix in float64 numpy: y = x Wᵀ_bd, x̄ = g W_bd, W̄_j = g_jᵀ x_j.
    rng = np.random.default_rng(3)
    blocks, width = 6, 4
    x = rng.standard_normal(batch + (blocks * width,))
    weight = rng.standard_normal((blocks, width, width))
    g = rng.standard_normal(x.shape)
    dense = np.zeros((blocks * width, blocks * width))
    for j in range(blocks):
        dense[j * width : (j + 1) * width, j * width : (j + 1) * width] = weight[j]
    y, vjp = jax.vjp(
        cell_lib._block_diagonal, jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32)
    )
    x_bar, weight_bar = vjp(jnp.asarray(g, jnp.float32))
    flat_x, flat_g = x.reshape(-1, blocks * width), g.reshape(-1, blocks * width)
    want_weight_bar = np.stack(
        [
            flat_g[:, j * width : (j + 1) * width].T @ flat_x[:, j * width : (j + 1) * width]
            for j in range(blocks)
        ]
    )
    np.testing.assert_allclose(np.asarray(y), x @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_bar), g @ dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(weight_bar), want_weight_bar, rtol=1e-5, atol=1e-5)
