"""Loss and accuracy on the recall task, computed as the reference does.

Per batch: cross-entropy averaged over positions whose target is not the
ignore index, and argmax accuracy over the same positions. Over a validation
set: the mean over batches of those per-batch values (not a pooled mean).

Bad data never turns into a plausible number. ``evaluate`` (a host entry point)
refuses it with a ValueError. The traceable ``masked_metrics`` and
``per_batch_metrics`` cannot raise under jit: a batch with a scored target
outside [0, V) (it is no class) or with NaN logits at a scored position (from an
input token outside [0, V), see ``model.apply``) gets NaN loss and accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from orthorecall import model as model_lib
from orthorecall.validation import check_int

IGNORE_INDEX = -100


def masked_metrics(logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX):
    """Mean cross-entropy and accuracy over the scored positions of a batch.

    Args:
        logits: (..., T, V) float.
        targets: (..., T) int; ``ignore_index`` marks unscored positions, every
            other target must lie in [0, V).

    Returns:
        (loss, accuracy, num_scored) as float32 scalars (loss and accuracy are
        NaN, as in PyTorch, when nothing is scored). Loss and accuracy are also
        NaN when a scored target lies outside [0, V) (rather than being scored as
        some class: -1 would otherwise read class V - 1) or when a scored
        position's logits hold a NaN (whose argmax would be class 0); such
        positions still count in ``num_scored``.
    """
    # Wide enough to compare with V and the ignore index whatever the targets' dtype.
    targets = jnp.asarray(targets)
    targets = targets.astype(
        jax.dtypes.canonicalize_dtype(jnp.promote_types(targets.dtype, jnp.int32))
    )
    scored = targets != ignore_index
    in_range = (targets >= 0) & (targets < logits.shape[-1])
    safe_targets = jnp.where(scored & in_range, targets, 0)
    logits = logits.astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe_targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(scored)
    loss = jnp.sum(jnp.where(scored, nll, 0.0)) / count
    correct = jnp.argmax(logits, axis=-1) == safe_targets
    accuracy = jnp.sum(correct & scored) / count
    # Selected, not computed: in-range data keeps its exact value and gradient.
    bad_target = jnp.any(scored & ~in_range)
    loss = jnp.where(bad_target, jnp.nan, loss)
    bad_logits = jnp.any(scored & jnp.any(jnp.isnan(logits), axis=-1))
    accuracy = jnp.where(bad_target | bad_logits, jnp.nan, accuracy)
    return loss, accuracy, count


def per_batch_metrics(
    params,
    inputs,
    targets,
    config: model_lib.ModelConfig,
    ignore_index: int = IGNORE_INDEX,
    read_mix=None,
):
    """Loss and accuracy of every batch of a validation set (traceable).

    Args:
        params: model parameters.
        inputs, targets: int arrays (num_batches, batch_size, T).
        read_mix: None, or the scaffold anneal's α (``model.apply``).

    Returns:
        (losses, accuracies), float32 arrays (num_batches,). Nothing is checked
        (this runs under jit): a batch with an input token or a scored target
        outside [0, V) gets NaN loss and accuracy (``masked_metrics``).
    """

    def one_batch(batch):
        batch_inputs, batch_targets = batch
        logits = model_lib.apply(params, batch_inputs, config, read_mix=read_mix)
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
        ValueError: inputs and targets of different or wrong shapes, empty or
            not integer; input token ids outside [0, vocab_size); targets outside
            [0, vocab_size) that are not ``ignore_index``.
    """
    ignore_index = check_int("ignore_index", ignore_index)
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.ndim != 3 or inputs.shape != targets.shape:
        raise ValueError(
            "inputs and targets must both have shape (num_batches, batch_size, T); got "
            f"{inputs.shape} and {targets.shape}."
        )
    if inputs.size == 0:
        raise ValueError(
            f"inputs and targets are empty (shape {inputs.shape}); evaluate needs at least "
            "one batch of one sequence of one token."
        )
    for name, array in (("inputs", inputs), ("targets", targets)):
        # bool is not np.integer; float ids would be truncated without a word.
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"{name} must be an integer array of token ids; got {array.dtype}. Convert "
                f"whole-number ids with {name}.astype(np.int32)."
            )
    vocab_size = config.vocab_size
    if inputs.min() < 0 or inputs.max() >= vocab_size:
        raise ValueError(
            f"input tokens must lie in [0, {vocab_size}); found "
            f"[{inputs.min()}, {inputs.max()}]. Does the data's vocab_size match the model?"
        )
    outside = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if outside.any():
        values = np.unique(targets[outside])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index} "
            f"(unscored); found {int(outside.sum())} that do not: [{shown}]. Mark unscored "
            "positions with ignore_index (or pass the ignore_index the data uses), and check "
            "that the data's vocab_size matches the model's."
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
