"""The reference language model: sizes, initialization, seeds, stepping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from orthorecall import model as model_lib
from orthorecall import reads
from orthorecall.cell import CellConfig


@pytest.mark.slow
def test_reference_size_and_layout():
    config = model_lib.ModelConfig()
    params = model_lib.init_params(jax.random.PRNGKey(0), config)
    # REFERENCE §2: about 78K parameters at V = 80 (the shipped checkpoints
    # hold exactly this many).
    assert model_lib.count_params(params) == 77_716
    cell = params["blocks"][0]["mlstm"]
    assert cell["up_proj"].shape == (94, 384)
    assert cell["q_proj"].shape == (48, 4, 4)
    assert cell["input_gate"]["kernel"].shape == (576, 4)
    assert params["head"]["kernel"].shape == (94, 80)


@pytest.mark.slow
def test_reference_initialization():
    config = model_lib.ModelConfig(vocab_size=96)
    params = model_lib.init_params(jax.random.PRNGKey(1), config)
    cell = params["blocks"][0]["mlstm"]
    np.testing.assert_allclose(np.std(cell["up_proj"]), math.sqrt(2 / (5 * 94)), rtol=0.03)
    np.testing.assert_allclose(np.std(cell["down_proj"]), 2 / math.sqrt(94), rtol=0.03)
    np.testing.assert_allclose(np.std(params["embedding"]), 1.0, rtol=0.03)
    np.testing.assert_allclose(cell["forget_gate"]["bias"], [3.0, 4.0, 5.0, 6.0], rtol=1e-6)
    assert not np.any(cell["input_gate"]["kernel"]) and not np.any(cell["forget_gate"]["kernel"])
    assert np.all(cell["skip"] == 1.0) and not np.any(cell["out_norm"]["scale"])
    assert np.max(np.abs(params["head"]["kernel"])) <= 1 / math.sqrt(94)


def _tokens(seed, batch=2, length=19, vocab=80):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab)


@pytest.mark.slow
def test_parameters_stack_over_seeds_with_vmap():
    # A narrow model: what is checked is the seed axis, not the width (the reference
    # width took 40 s here, most of it compiling).
    config = model_lib.ModelConfig(
        cell=CellConfig(
            read=reads.NS5, chunk_size=8, embedding_dim=16, num_heads=2, inner_multiple=8
        )
    )
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    stacked = jax.vmap(lambda k: model_lib.init_params(k, config))(keys)
    tokens = _tokens(3)
    batched = jax.jit(jax.vmap(lambda p: model_lib.apply(p, tokens, config)))(stacked)
    for i, key in enumerate(keys):
        single = model_lib.apply(model_lib.init_params(key, config), tokens, config)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single), atol=1e-5)


@pytest.mark.parametrize("num_blocks", [1, 2])
@pytest.mark.slow
def test_step_matches_apply_with_resets(num_blocks):
    config = model_lib.ModelConfig(
        cell=CellConfig(read=reads.NS5, chunk_size=8, num_blocks=num_blocks)
    )
    params = model_lib.init_params(jax.random.PRNGKey(4), config)
    tokens = _tokens(5)
    reset = np.zeros(tokens.shape, bool)
    reset[1, 6] = True
    logits = model_lib.apply(params, tokens, config, reset=jnp.asarray(reset))
    state = model_lib.initial_state(config, tokens.shape[0])
    step = jax.jit(model_lib.step, static_argnames="config")
    for t in range(tokens.shape[1]):
        out, state = step(params, state, tokens[:, t], jnp.asarray(reset[:, t]), config=config)
        np.testing.assert_allclose(np.asarray(out), np.asarray(logits[:, t]), atol=1e-4, rtol=1e-4)


def test_validation_messages():
    with pytest.raises(ValueError, match="vocab_size"):
        model_lib.ModelConfig(vocab_size=1)
    with pytest.raises(ValueError, match="chunk_size"):
        model_lib.ModelConfig(cell=CellConfig(chunk_size=0))
    with pytest.raises(ValueError, match=r"cell must be a cell\.CellConfig"):
        model_lib.ModelConfig(cell={"embedding_dim": 16})
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        model_lib.ModelConfig(vocab_size=80.0)
    config = model_lib.ModelConfig()
    # Tokens are checked before any computation: abstract parameters suffice.
    params = jax.eval_shape(lambda key: model_lib.init_params(key, config), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="integer"):
        model_lib.apply(params, np.zeros((2, 5)), config)
    with pytest.raises(ValueError, match="batch, time"):
        model_lib.apply(params, np.zeros((5,), np.int32), config)


SMALL = model_lib.ModelConfig(
    vocab_size=24,
    cell=CellConfig(embedding_dim=16, num_heads=2, inner_multiple=8, read=reads.NS5),
)


@pytest.mark.slow
def test_out_of_range_token_stays_inside_its_episode_in_every_form():
    # Token V (out of range: its embedding is NaN) at t = 6 of sequences 0 and 1;
    # sequence 0 starts a new episode at t = 13, sequence 2 is clean.
    params = model_lib.init_params(jax.random.PRNGKey(6), SMALL)
    tokens = np.array(_tokens(7, batch=3, length=21, vocab=SMALL.vocab_size))
    tokens[:2, 6] = SMALL.vocab_size
    reset = np.zeros(tokens.shape, bool)
    reset[0, 13] = True
    expected = np.zeros(tokens.shape, bool)
    expected[0, 6:13] = expected[1, 6:] = True
    recurrent = model_lib.apply(
        params,
        tokens,
        SMALL.replace(cell=SMALL.cell.replace(sequence_form="recurrent")),
        reset=reset,
    )
    fresh = model_lib.apply(params, tokens[:1, 13:], SMALL)
    for chunk_size in (4, 8):
        config = SMALL.replace(cell=SMALL.cell.replace(chunk_size=chunk_size))
        logits = np.asarray(model_lib.apply(params, tokens, config, reset=reset))
        np.testing.assert_array_equal(np.isnan(logits).any(-1), expected)
        np.testing.assert_array_equal(np.isnan(np.asarray(recurrent)).any(-1), expected)
        np.testing.assert_allclose(
            logits[~expected], np.asarray(recurrent)[~expected], atol=1e-4, rtol=1e-4
        )
        np.testing.assert_allclose(logits[0, 13:], np.asarray(fresh[0]), atol=1e-4, rtol=1e-4)


def test_reset_and_state_validation():
    config = SMALL.replace(cell=SMALL.cell.replace(num_blocks=2))
    params = jax.eval_shape(lambda key: model_lib.init_params(key, config), jax.random.PRNGKey(0))
    tokens = np.zeros((3, 5), np.int32)
    state = model_lib.initial_state(config, 3)
    with pytest.raises(ValueError, match=r"reset must have shape \(3,\) \(batch,\); got \(1,\)"):
        model_lib.step(params, state, tokens[:, 0], np.ones((1,), bool), config)
    with pytest.raises(ValueError, match=r"reset must be a bool array.*got int32"):
        model_lib.step(params, state, tokens[:, 0], np.ones((3,), np.int32), config)
    with pytest.raises(ValueError, match=r"reset must have shape \(3, 5\) \(batch, time\)"):
        model_lib.apply(params, tokens, config, reset=np.ones((1, 5), bool))
    for bad_state in (state[:1], state + state, state[0]):
        for call in (
            lambda s: model_lib.step(params, s, tokens[:, 0], None, config),
            lambda s: model_lib.apply(params, tokens, config, state=s),
        ):
            with pytest.raises(ValueError, match=r"one cell\.CellState per block.*num_blocks=2"):
                call(bad_state)


@pytest.mark.slow
def test_out_of_range_tokens_give_nan_logits_at_their_positions_only():
    # -1 used to read the last embedding row (token V - 1) and V to give NaN; every id
    # outside [0, V) must give NaN, never another token's logits. A reset right after
    # each bad token keeps its NaN from running on through the memory.
    params = model_lib.init_params(jax.random.PRNGKey(8), SMALL)
    v = SMALL.vocab_size
    tokens = np.array(_tokens(9, batch=3, length=12, vocab=v))
    tokens[0, 3], tokens[1, 8], tokens[2, 0] = -1, v, -v
    reset = np.zeros(tokens.shape, bool)
    reset[0, 4] = reset[1, 9] = reset[2, 1] = True
    expected = np.zeros(tokens.shape, bool)
    expected[0, 3] = expected[1, 8] = expected[2, 0] = True
    logits = np.asarray(model_lib.apply(params, tokens, SMALL, reset=reset))
    np.testing.assert_array_equal(np.isnan(logits).any(-1), expected)
    np.testing.assert_array_equal(np.isnan(logits).all(-1), expected)
    # The same positions through step, with narrow integer dtypes as well.
    state = model_lib.initial_state(SMALL, 4)
    for dtype in (np.int32, np.int8, np.uint8):
        step_tokens = np.array([-1, 3, v, 255], dtype=np.int64).astype(dtype)
        out, _ = model_lib.step(params, state, jnp.asarray(step_tokens), None, SMALL)
        np.testing.assert_array_equal(
            np.isnan(np.asarray(out)).any(-1), step_tokens.astype(np.int64) != 3
        )
        reference, _ = model_lib.step(params, state, jnp.full((4,), 3, jnp.int32), None, SMALL)
        np.testing.assert_array_equal(np.asarray(out)[1], np.asarray(reference)[1])


@pytest.mark.slow
def test_checked_apply_and_step_report_out_of_range_tokens_under_checkify():
    params = model_lib.init_params(jax.random.PRNGKey(10), SMALL)
    tokens = np.array(_tokens(11, batch=2, length=7, vocab=SMALL.vocab_size))
    checked_apply = checkify.checkify(jax.jit(model_lib.checked_apply, static_argnames="config"))
    error, logits = checked_apply(params, tokens, config=SMALL)
    assert error.get() is None
    np.testing.assert_allclose(logits, model_lib.apply(params, tokens, SMALL), atol=1e-5)
    tokens[1, 4], tokens[0, 2] = 30, -2
    error, _ = checked_apply(params, tokens, config=SMALL)
    message = error.get()
    assert "2 token id(s) outside [0, 24)" in message and "from -2 to 30" in message, message
    with pytest.raises(checkify.JaxRuntimeError, match=r"outside \[0, 24\)"):
        error.throw()

    checked_step = checkify.checkify(jax.jit(model_lib.checked_step, static_argnames="config"))
    state = model_lib.initial_state(SMALL, 2)
    error, _ = checked_step(params, state, jnp.array([3, 24]), None, config=SMALL)
    assert "1 token id(s) outside [0, 24)" in error.get() and "from 3 to 24" in error.get()
    error, _ = checked_step(params, state, jnp.array([3, 23]), None, config=SMALL)
    assert error.get() is None
