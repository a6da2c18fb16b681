"""Evaluate a reference PyTorch checkpoint on its reference validation set.

    python -m experiments.evaluate_reference --checkpoint=PATH

Loads the checkpoint without torch, rebuilds the validation set from the run
configuration stored in the file (seed s -> numpy default_rng(10000 + s),
16 batches of 16 unless flags say otherwise) and prints one JSON object with
``accuracy`` and ``loss`` (means over batches of per-batch values, as the
reference computes them), ``variant``, ``seed``, ``num_sequences`` and more.

Anything wrong with the command line or the file (missing, unreadable, foreign,
malformed, non-finite weights, a cfg field of the wrong type, a non-finite result)
is one message on stderr and exit code 2; running out of memory exits with 1.
"""

from __future__ import annotations

import json
import math
import sys
import time

from absl import app, flags

from experiments.cli import library_logging_at_warning

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Path of a reference .pt checkpoint.")
_NUM_BATCHES = flags.DEFINE_integer(
    "num_batches",
    None,
    "Validation batches (default: the checkpoint's val_batches, else 16).",
    lower_bound=1,
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    None,
    "Sequences per batch (default: the checkpoint's val_batch_size, else 16).",
    lower_bound=1,
)
_CHUNK_SIZE = flags.DEFINE_integer(
    "chunk_size", 64, "Chunk length of the chunkwise form.", lower_bound=1
)
_SEQUENCE_FORM = flags.DEFINE_enum(
    "sequence_form", "chunkwise", ["chunkwise", "recurrent"], "Which form of the recurrence to run."
)
_DEFAULT_COUNT = 16  # validation batches, and sequences per batch, of the reference


def _cfg_count(cfg, key: str) -> int:
    from orthorecall.validation import check_int

    value = cfg.get(key)
    return _DEFAULT_COUNT if value is None else check_int(f"cfg[{key!r}]", value, minimum=1)


def evaluate_checkpoint(
    path, *, num_batches=None, batch_size=None, chunk_size=64, sequence_form="chunkwise"
) -> dict:
    """Loads ``path`` and evaluates it on its reference validation set.

    Returns:
        dict with accuracy, loss, variant, seed, num_sequences, num_batches,
        batch_size, vocab_size, seq_len, noise_vocab_size, frac_noise, seconds;
        accuracy and loss are finite.

    Raises:
        FileNotFoundError (other OSErrors as ``open``), torch_format.TorchCheckpointError,
        ValueError: as ``reference_checkpoint.load_reference_checkpoint``; or a cfg
        whose task fields (seed, seq_len, ...) are missing or invalid, naming the field;
        a validation set that MAD's generator cannot draw; a non-finite accuracy or loss.
        Every message starts with ``path``.
    """
    from orthorecall import data, evaluation, reference_checkpoint
    from orthorecall.validation import check_int

    checkpoint = reference_checkpoint.load_reference_checkpoint(
        path, chunk_size=chunk_size, sequence_form=sequence_form
    )
    cfg = checkpoint.cfg
    try:
        if cfg.get("seed") is None:
            raise ValueError("the stored cfg lacks 'seed'; cannot rebuild the validation set.")
        seed = check_int("cfg['seed']", cfg["seed"], minimum=0)
        try:
            # Task fields the cfg does not record take the reference task's values.
            task = data.NoisyRecallTask.from_mapping(cfg)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the stored cfg describes no valid task: {e}") from e
        if task.vocab_size != checkpoint.config.vocab_size:
            raise ValueError(
                f"cfg vocab_size={task.vocab_size} but the embedding has "
                f"{checkpoint.config.vocab_size} rows."
            )
        num_batches = num_batches or _cfg_count(cfg, "val_batches")
        batch_size = batch_size or _cfg_count(cfg, "val_batch_size")
        try:
            inputs, targets = data.reference_validation_set(
                task, seed=seed, num_batches=num_batches, batch_size=batch_size
            )
        except data.NoKeyPresentedError as e:
            raise ValueError(f"the validation set of this cfg cannot be drawn: {e}") from None
        start = time.perf_counter()
        metrics = evaluation.evaluate(checkpoint.params, checkpoint.config, inputs, targets)
        seconds = time.perf_counter() - start
        bad = [name for name in ("accuracy", "loss") if not math.isfinite(metrics[name])]
        if bad:
            pairs = zip(metrics["batch_accuracy"], metrics["batch_loss"], strict=True)
            batches = [i for i, pair in enumerate(pairs) if not all(map(math.isfinite, pair))]
            raise ValueError(
                f"the evaluation gave a non-finite {' and '.join(bad)} (in batches {batches} "
                f"of {num_batches}) although every weight is finite: the weights overflow "
                "float32 on this data, so the checkpoint cannot be evaluated."
            )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return {
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "variant": cfg["variant"],
        "seed": seed,
        "num_sequences": metrics["num_sequences"],
        "num_batches": num_batches,
        "batch_size": batch_size,
        "vocab_size": task.vocab_size,
        "seq_len": task.seq_len,
        "noise_vocab_size": task.noise_vocab_size,
        "frac_noise": task.frac_noise,
        "read": checkpoint.config.cell.read.kind,
        "seconds": round(seconds, 3),
    }


def _exit_with(message: str, code: int = 2):
    print(f"evaluate_reference: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):
    """absl's flag parsing, with a wrong flag reported in one line and exit code 2
    (absl alone exits with 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with(f"usage error: {e}. Pass --helpshort to see the flags.")


def main(argv):
    library_logging_at_warning()
    if len(argv) > 1:
        _exit_with(f"usage error: unexpected arguments {argv[1:]}; pass --checkpoint=PATH.")
    if not _CHECKPOINT.value:
        _exit_with("usage error: --checkpoint=PATH is required.")
    try:
        result = evaluate_checkpoint(
            _CHECKPOINT.value,
            num_batches=_NUM_BATCHES.value,
            batch_size=_BATCH_SIZE.value,
            chunk_size=_CHUNK_SIZE.value,
            sequence_form=_SEQUENCE_FORM.value,
        )
    except OSError as e:  # missing, a directory, unreadable
        _exit_with(f"error: cannot read the checkpoint: {e}")
    except ValueError as e:  # TorchCheckpointError included
        _exit_with(f"error: {e}")
    except MemoryError:
        _exit_with(
            f"error: out of memory evaluating {_CHECKPOINT.value}; try fewer "
            "--num_batches or a smaller --batch_size.",
            code=1,
        )
    # allow_nan=False: a NaN that slipped past the checks above fails here rather than
    # printing invalid JSON.
    print(json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
