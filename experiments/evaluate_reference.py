"""Evaluate a reference PyTorch checkpoint on its reference validation set.

    python -m experiments.evaluate_reference --checkpoint=PATH

Loads the checkpoint without torch, rebuilds the validation set from the run
configuration stored in the file (seed s -> numpy default_rng(10000 + s),
16 batches of 16 unless flags say otherwise) and prints one JSON object with
``accuracy`` and ``loss`` (means over batches of per-batch values, as the
reference computes them), ``variant``, ``seed``, ``num_sequences`` and more.
A missing, unreadable or foreign file is reported on stderr with exit code 2.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from experiments.cli import library_logging_at_warning

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Path of a reference .pt checkpoint.")
_NUM_BATCHES = flags.DEFINE_integer(
    "num_batches", None, "Validation batches (default: the checkpoint's val_batches, else 16)."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Sequences per batch (default: the checkpoint's val_batch_size, else 16)."
)
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 64, "Chunk length of the chunkwise form.")
_SEQUENCE_FORM = flags.DEFINE_enum(
    "sequence_form", "chunkwise", ["chunkwise", "recurrent"], "Which form of the recurrence to run."
)


def evaluate_checkpoint(
    path, *, num_batches=None, batch_size=None, chunk_size=64, sequence_form="chunkwise"
) -> dict:
    """Loads ``path`` and evaluates it on its reference validation set.

    Returns:
        dict with accuracy, loss, variant, seed, num_sequences, num_batches,
        batch_size, vocab_size, seq_len, noise_vocab_size, frac_noise, seconds.

    Raises:
        FileNotFoundError, torch_format.TorchCheckpointError, ValueError: as
        ``reference_checkpoint.load_reference_checkpoint``, or a cfg missing
        the task fields.
    """
    from orthorecall import data, evaluation, reference_checkpoint

    checkpoint = reference_checkpoint.load_reference_checkpoint(
        path, chunk_size=chunk_size, sequence_form=sequence_form
    )
    cfg = checkpoint.cfg
    if "seed" not in cfg:
        raise ValueError(f"{path}: the stored cfg lacks 'seed'; cannot rebuild the validation set.")
    try:
        # Task fields the cfg does not record take the reference task's values.
        task = data.NoisyRecallTask.from_mapping(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: the stored cfg describes no valid task: {e}") from e
    if task.vocab_size != checkpoint.config.vocab_size:
        raise ValueError(
            f"{path}: cfg vocab_size={task.vocab_size} but the embedding has "
            f"{checkpoint.config.vocab_size} rows."
        )
    num_batches = num_batches or cfg.get("val_batches") or 16
    batch_size = batch_size or cfg.get("val_batch_size") or 16
    inputs, targets = data.reference_validation_set(
        task, seed=int(cfg["seed"]), num_batches=num_batches, batch_size=batch_size
    )
    start = time.perf_counter()
    metrics = evaluation.evaluate(checkpoint.params, checkpoint.config, inputs, targets)
    return {
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "variant": cfg["variant"],
        "seed": int(cfg["seed"]),
        "num_sequences": metrics["num_sequences"],
        "num_batches": num_batches,
        "batch_size": batch_size,
        "vocab_size": task.vocab_size,
        "seq_len": task.seq_len,
        "noise_vocab_size": task.noise_vocab_size,
        "frac_noise": task.frac_noise,
        "read": checkpoint.config.cell.read.kind,
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv):
    library_logging_at_warning()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint=PATH is required.")
    for flag in (_NUM_BATCHES, _BATCH_SIZE, _CHUNK_SIZE):
        if flag.value is not None and flag.value < 1:
            raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}.")
    from orthorecall import torch_format

    try:
        result = evaluate_checkpoint(
            _CHECKPOINT.value,
            num_batches=_NUM_BATCHES.value,
            batch_size=_BATCH_SIZE.value,
            chunk_size=_CHUNK_SIZE.value,
            sequence_form=_SEQUENCE_FORM.value,
        )
    except (
        FileNotFoundError,
        IsADirectoryError,
        torch_format.TorchCheckpointError,
        ValueError,
    ) as e:
        print(f"evaluate_reference: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
