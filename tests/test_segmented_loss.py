"""The loss over recomputed segments (training.next_token_loss(segment_length=...)):
the same function and gradients as the whole-sequence loss, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.study import study_config
from experiments.study.cli import ConfigError
from orthorecall import cell, data, evaluation, reads, training
from orthorecall import model as model_lib
from tests.test_training import tiny_config

TASK = data.NoisyRecallTask(vocab_size=24, seq_len=40, noise_vocab_size=4)


def _setup(read):
    config = model_lib.ModelConfig(
        vocab_size=TASK.vocab_size,
        cell=cell.CellConfig(embedding_dim=16, num_heads=2, read=reads.read_from_name(read)),
    )
    params = model_lib.init_params(jax.random.PRNGKey(0), config)
    inputs, targets = data.sample_noisy_recall(jax.random.PRNGKey(1), TASK, batch_size=3)
    return config, params, inputs, targets


def _loss_and_grad(params, inputs, targets, config, segment_length):
    loss = lambda p: training.next_token_loss(
        p, inputs, targets, config, segment_length=segment_length
    )
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
    "read, segment_length",
    [
        pytest.param("raw", 13, marks=pytest.mark.slow),
        pytest.param("ns5", 8, marks=pytest.mark.slow),
    ],
)
def test_segments_give_the_same_loss_and_gradients(read, segment_length):
    config, params, inputs, targets = _setup(read)
    want_loss, want_grad = _loss_and_grad(params, inputs, targets, config, None)
    loss, grad = _loss_and_grad(params, inputs, targets, config, segment_length)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    for got, want in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(want_grad)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max() + 1e-12)


@pytest.mark.slow
def test_unscored_positions_and_a_long_segment():
    config, params, inputs, targets = _setup("raw")
    # Only the last segment holds scored positions, and one segment is entirely unscored.
    targets = targets.at[:, :30].set(evaluation.IGNORE_INDEX)
    want = _loss_and_grad(params, inputs, targets, config, None)[0]
    assert np.isclose(_loss_and_grad(params, inputs, targets, config, 10)[0], want, rtol=2e-6)
    # A segment at least as long as the sequence is the whole-sequence loss, bit for bit.
    assert _loss_and_grad(params, inputs, targets, config, 500)[0] == want


@pytest.mark.slow
def test_segments_shrink_the_compiled_memory():
    config, params, inputs, targets = _setup("raw")
    inputs, targets = (jnp.tile(x, (4, 8)) for x in (inputs, targets))  # 12 x 320

    def temporaries(segment_length):
        loss = lambda p: training.next_token_loss(
            p, inputs, targets, config, segment_length=segment_length
        )
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(32) < 0.5 * temporaries(None)


def test_bad_segment_lengths_are_refused():
    config, params, inputs, targets = _setup("raw")
    for bad in (0, -3, 2.5, "8"):
        with pytest.raises(ValueError, match="segment_length"):
            training.next_token_loss(params, inputs, targets, config, segment_length=bad)
        with pytest.raises(ValueError, match="segment_length"):
            training.make_train_step({"raw": config}, optax.sgd(0.1), None, segment_length=bad)
    for bad in (0, -2):  # ConfigDict itself refuses other types for an int placeholder.
        with pytest.raises(ConfigError, match=r"train\.segment_length"):
            study_config.validate_config(tiny_config(train__segment_length=bad))
    study_config.validate_config(tiny_config(train__segment_length=4))
    legacy = tiny_config()
    with legacy.unlocked():  # A configuration written before the field existed.
        del legacy.train["segment_length"]
    study_config.validate_config(legacy)


@pytest.mark.slow
def test_train_step_with_segments_follows_the_whole_sequence_step():
    config, _, inputs, targets = _setup("raw")
    optimizer = training.make_optimizer(total_steps=10)
    seeds = np.arange(2)
    batch = (jnp.stack([inputs] * 2), jnp.stack([targets] * 2))
    results = []
    for segment_length in (None, 16):
        states = {"raw": training.init_seed_states(seeds, config, optimizer)}
        step = training.make_train_step({"raw": config}, optimizer, None, segment_length)
        for _ in range(3):
            states, _, metrics = step(states, jnp.zeros((2, 2), jnp.uint32), batch)
        results.append((states["raw"].params, metrics["raw"]["loss"]))
    (params_a, loss_a), (params_b, loss_b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
