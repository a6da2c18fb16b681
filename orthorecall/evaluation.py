"""Loss and accuracy on the recall task, computed as the reference does.

Per batch: cross-entropy averaged over positions whose target is not the
ignore index, and argmax accuracy over the same positions. Over a validation
set: the mean over batches of those per-batch values (not a pooled mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from orthorecall import model as model_lib

IGNORE_INDEX = -100


def masked_metrics(logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX):
    """Mean cross-entropy and accuracy over the scored positions of a batch.

    Args:
        logits: (..., T, V) float.
        targets: (..., T) int; ``ignore_index`` marks unscored positions.

    Returns:
        (loss, accuracy, num_scored) as float32 scalars (loss and accuracy are
        NaN, as in PyTorch, when nothing is scored).
    """
    scored = targets != ignore_index
    safe_targets = jnp.where(scored, targets, 0)
    logits = logits.astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe_targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(scored)
    loss = jnp.sum(jnp.where(scored, nll, 0.0)) / count
    correct = jnp.argmax(logits, axis=-1) == safe_targets
    accuracy = jnp.sum(correct & scored) / count
    return loss, accuracy, count


def per_batch_metrics(
    params, inputs, targets, config: model_lib.ModelConfig, ignore_index: int = IGNORE_INDEX
):
    """Loss and accuracy of every batch of a validation set (traceable).

    Args:
        params: model parameters.
        inputs, targets: int arrays (num_batches, batch_size, T).

    Returns:
        (losses, accuracies), float32 arrays (num_batches,).
    """

    def one_batch(batch):
        batch_inputs, batch_targets = batch
        logits = model_lib.apply(params, batch_inputs, config)
        return masked_metrics(logits, batch_targets, ignore_index)[:2]

    return jax.lax.map(one_batch, (inputs, targets))


_per_batch_metrics = jax.jit(per_batch_metrics, static_argnames=("config", "ignore_index"))


def evaluate(
    params,
    config: model_lib.ModelConfig,
    inputs,
    targets,
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """Evaluates a model on a validation set of batches.

    Args:
        params: model parameters.
        config: the model configuration.
        inputs, targets: integer arrays (num_batches, batch_size, T).
        ignore_index: target value of unscored positions.

    Returns:
        dict with ``accuracy`` and ``loss`` (means over batches of per-batch
        values, Python floats), ``batch_accuracy`` and ``batch_loss`` (lists)
        and ``num_sequences``.

    Raises:
        ValueError: inputs and targets of different or wrong shapes, or token
            ids outside [0, vocab_size).
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.ndim != 3 or inputs.shape != targets.shape:
        raise ValueError(
            "inputs and targets must both have shape (num_batches, batch_size, T); got "
            f"{inputs.shape} and {targets.shape}."
        )
    if inputs.min() < 0 or inputs.max() >= config.vocab_size:
        raise ValueError(
            f"input tokens must lie in [0, {config.vocab_size}); found "
            f"[{inputs.min()}, {inputs.max()}]. Does the data's vocab_size match the model?"
        )
    losses, accuracies = _per_batch_metrics(
        params,
        jnp.asarray(inputs, jnp.int32),
        jnp.asarray(targets, jnp.int32),
        config,
        ignore_index,
    )
    losses, accuracies = np.asarray(losses, np.float64), np.asarray(accuracies, np.float64)
    return {
        "accuracy": float(accuracies.mean()),
        "loss": float(losses.mean()),
        "batch_accuracy": accuracies.tolist(),
        "batch_loss": losses.tolist(),
        "num_sequences": int(inputs.shape[0] * inputs.shape[1]),
    }
