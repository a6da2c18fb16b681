"""Evaluate a reference PyTorch checkpoint on its reference validation set.

    python -m experiments.study.evaluate_reference --checkpoint=PATH

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

from experiments.study.cli import ConfigError, config_flag_parser, library_logging_at_warning
from experiments.study.config_checks import FLAGS as FLAG_CHECKS

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
        _check_validation_size(num_batches, batch_size, task.seq_len)
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


# A validation set that would take longer than this to draw is refused (the study's
# limit, experiments.study.train.MAX_VALIDATION_SECONDS).
MAX_VALIDATION_SECONDS = 600.0


def _check_validation_size(num_batches: int, batch_size: int, seq_len: int) -> None:
    """Refuses a validation set that would take more than ``MAX_VALIDATION_SECONDS`` to
    draw or more memory than the host has (``orthorecall.footprint``'s figures)."""
    from orthorecall import footprint

    sequences = num_batches * batch_size
    seconds = footprint.numpy_generation_seconds(num_sequences=sequences, seq_len=seq_len)
    need = footprint.validation_set_bytes(num_sequences=sequences, seq_len=seq_len)
    available = footprint.host_available_memory_bytes()
    if seconds > MAX_VALIDATION_SECONDS or (available is not None and need > available):
        raise ValueError(
            f"--num_batches={num_batches} x --batch_size={batch_size} sequences of length "
            f"{seq_len} would take about {seconds:,.0f} s to draw and "
            f"{footprint.format_bytes(need)} to hold (at most {MAX_VALIDATION_SECONDS:.0f} s"
            " and the host's available memory); ask for fewer."
        )


def check_flags(num_batches, batch_size, chunk_size) -> None:
    """The numeric flags (``experiments.study.config_checks``' rules), before the checkpoint
    is read."""
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if value is not None:
            FLAG_CHECKS.int(name, value, minimum=1)
    FLAG_CHECKS.int("chunk_size", chunk_size, minimum=1)


def _exit_with(message: str, code: int = 2):
    print(f"evaluate_reference: {message}", file=sys.stderr)
    sys.exit(code)


parse_flags = config_flag_parser("evaluate_reference")


def main(argv):
    library_logging_at_warning()
    if len(argv) > 1:
        _exit_with(f"usage error: unexpected arguments {argv[1:]}; pass --checkpoint=PATH.")
    if not _CHECKPOINT.value:
        _exit_with("usage error: --checkpoint=PATH is required.")
    try:
        check_flags(_NUM_BATCHES.value, _BATCH_SIZE.value, _CHUNK_SIZE.value)
    except ConfigError as e:
        _exit_with(f"configuration error: {e}")
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
