"""Loss and accuracy as the reference computes them, and what is refused or flagged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import evaluation
from orthorecall import model as model_lib
from orthorecall.cell import CellConfig

V = 7
IGNORE = evaluation.IGNORE_INDEX


def _reference_metrics(logits, targets, ignore_index=IGNORE):
    """Float64 numpy: mean NLL and argmax accuracy over the scored positions."""
    logits = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1])
    targets = np.asarray(targets).reshape(-1)
    scored = targets != ignore_index
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -log_probs[scored, targets[scored]]
    return nll.mean(), np.mean(logits[scored].argmax(-1) == targets[scored])


def _batch(seed, shape=(3, 11)):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape + (V,)).astype(np.float32) * 2.0
    targets = rng.integers(0, V, shape)
    targets[rng.random(shape) < 0.3] = IGNORE
    return logits, targets


def test_masked_metrics_match_a_float64_reference():
    logits, targets = _batch(0)
    loss, accuracy, count = jax.jit(evaluation.masked_metrics)(logits, targets)
    want_loss, want_accuracy = _reference_metrics(logits, targets)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(float(accuracy), want_accuracy, rtol=1e-6)
    assert int(count) == np.sum(targets != IGNORE)
    # Another ignore index: -1 marks the unscored positions, -100 is then out of range.
    other = np.where(targets == IGNORE, -1, targets)
    loss, accuracy, _ = evaluation.masked_metrics(logits, other, -1)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(float(accuracy), want_accuracy, rtol=1e-6)


@pytest.mark.parametrize("bad_target", [-1, V, 99, -101])
def test_out_of_range_targets_give_nan_rather_than_a_class(bad_target):
    # -1 used to be scored as class V - 1 and V as NaN loss with a finite accuracy.
    logits, targets = _batch(1)
    targets[1, 4] = bad_target
    loss, accuracy, _ = jax.jit(evaluation.masked_metrics)(logits, targets)
    assert np.isnan(float(loss)) and np.isnan(float(accuracy))
    # Only the batch that holds it.
    losses, accuracies = jax.vmap(evaluation.masked_metrics)(logits, targets)[:2]
    np.testing.assert_array_equal(np.isnan(losses), [False, True, False])
    np.testing.assert_array_equal(np.isnan(accuracies), [False, True, False])


def test_nan_logits_give_nan_accuracy_rather_than_class_zero():
    # argmax over NaN logits is 0: a target 0 there would count as correct.
    logits, targets = _batch(2)
    logits[0, 2] = np.nan
    targets[0, 2] = 0
    loss, accuracy, _ = evaluation.masked_metrics(logits, targets)
    assert np.isnan(float(loss)) and np.isnan(float(accuracy))
    targets[0, 2] = IGNORE  # an unscored position may hold anything
    loss, accuracy, _ = evaluation.masked_metrics(logits, targets)
    want_loss, want_accuracy = _reference_metrics(logits[:, :], targets)
    np.testing.assert_allclose([float(loss), float(accuracy)], [want_loss, want_accuracy], 1e-6)


SMALL = model_lib.ModelConfig(
    vocab_size=V, cell=CellConfig(embedding_dim=8, num_heads=2, inner_multiple=8, chunk_size=4)
)


def _validation_set(seed, num_batches=2, batch_size=2, length=6):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, V, (num_batches, batch_size, length))
    targets = rng.integers(0, V, inputs.shape)
    targets[rng.random(inputs.shape) < 0.5] = IGNORE
    targets[:, :, -1] = 1  # every batch scores something
    return inputs, targets


@pytest.mark.slow
def test_evaluate_averages_per_batch_values():
    params = model_lib.init_params(jax.random.PRNGKey(0), SMALL)
    inputs, targets = _validation_set(3)
    result = evaluation.evaluate(params, SMALL, inputs, targets)
    per_batch = [
        _reference_metrics(model_lib.apply(params, batch, SMALL), batch_targets)
        for batch, batch_targets in zip(inputs, targets)
    ]
    np.testing.assert_allclose(result["batch_loss"], [m[0] for m in per_batch], rtol=1e-5)
    np.testing.assert_allclose(result["batch_accuracy"], [m[1] for m in per_batch], rtol=1e-6)
    np.testing.assert_allclose(result["loss"], np.mean([m[0] for m in per_batch]), rtol=1e-5)
    assert result["num_sequences"] == 4


def _abstract_params():
    return jax.eval_shape(lambda key: model_lib.init_params(key, SMALL), jax.random.PRNGKey(0))


def test_evaluate_refuses_targets_outside_the_vocabulary():
    # Refused before anything is computed: abstract parameters suffice.
    params = _abstract_params()
    inputs, targets = _validation_set(4)
    for bad in (-1, V, 99):
        bad_targets = targets.copy()
        bad_targets[1, 0, 2] = bad
        bad_targets[0, 1, 3] = bad
        with pytest.raises(
            ValueError,
            match=rf"targets must lie in \[0, {V}\).*found 2 that do not: \[{bad}\].*ignore_index",
        ):
            evaluation.evaluate(params, SMALL, inputs, bad_targets)
    with pytest.raises(ValueError, match=r"found 2 that do not: \[-7, 12\]"):
        bad_targets = targets.copy()
        bad_targets[0, 0, :2] = [12, -7]
        evaluation.evaluate(params, SMALL, inputs, bad_targets)
    # The ignore index itself is fine, whatever its value.
    with pytest.raises(ValueError, match=r"\[-100\]"):
        evaluation.evaluate(params, SMALL, inputs, targets, ignore_index=-1)
    with pytest.raises(ValueError, match="input tokens must lie in"):
        evaluation.evaluate(params, SMALL, inputs + V, targets)


def test_evaluate_refuses_non_integer_and_empty_arrays():
    params = _abstract_params()
    inputs, targets = _validation_set(5)
    with pytest.raises(ValueError, match=r"inputs must be an integer array.*got float32"):
        evaluation.evaluate(params, SMALL, inputs.astype(np.float32), targets)
    with pytest.raises(ValueError, match=r"targets must be an integer array.*got float64"):
        evaluation.evaluate(params, SMALL, inputs, targets.astype(np.float64))
    with pytest.raises(ValueError, match=r"inputs must be an integer array.*got bool"):
        evaluation.evaluate(params, SMALL, inputs > 2, targets)
    for shape in ((0, 2, 6), (2, 0, 6), (2, 2, 0)):
        empty = np.zeros(shape, np.int32)
        with pytest.raises(ValueError, match=rf"empty.*{shape[0]}, {shape[1]}, {shape[2]}"):
            evaluation.evaluate(params, SMALL, empty, empty)
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        evaluation.evaluate(params, SMALL, inputs, targets, ignore_index=-100.0)


def test_masked_metrics_accept_narrow_integer_targets():
    logits, targets = _batch(6)
    want = _reference_metrics(logits, targets)
    got = evaluation.masked_metrics(logits, jnp.asarray(targets, jnp.int16))
    np.testing.assert_allclose([float(got[0]), float(got[1])], want, rtol=1e-6)
