"""Probe trained models the three ways of the replication (arXiv:2607.19390).

    python -m experiments.probes.probe --probe=swap|decode|oracle
        (--workdir=DIR [--models=raw,ns5] [--seeds=0,1] | --checkpoint=A.pt[,B.pt])
        [--reads=raw,ns5] [--num_sequences=N] [--memory_normalization=frobenius]
        --out=OUT.json

* ``swap``: accuracy and loss of the trained parameters under each of ``--reads``
  (``acc_<read>``, ``loss_<read>``); the model's own read reproduces its run's numbers.
* ``decode``: a ridge decoder from the memory C_t at every scored query, sliced by the
  model's own stored key k̂ (``decode_o0``: the key's position; ``decode_o1``: the value's,
  where the causal conv has the pair's k̂ vᵀ written), to the value; the
  wrong-key control slices with another key of the sequence (``wrongkey_o0/o1``);
  ``lambda_o0/o1`` the chosen ridge, ``n_samples`` the scored queries.
* ``oracle``: accuracy with every scored query q_t replaced by the stored key k_{u+o}
  (``oracle+0``, ``oracle+1``) beside the model's own (``native``).

``docs/specification.md`` ("Probes") defines each. Every model is probed on its own
run's validation set (its first ``--num_sequences``; default all of it). The records go
to OUT.json (a list, one per model and seed) and a table to OUT.md, also printed.
Anything wrong with the command line, a checkpoint or a workdir is one message on
stderr and exit code 2.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from experiments.probes.records import NORMALIZATIONS, PROBES, markdown_table, run, table_path
from experiments.study.cli import (
    ConfigError,
    config_flag_parser,
    exit_status_on_refusal,
    library_logging_at_warning,
)
from experiments.study.config_checks import FLAGS as FLAG_CHECKS

DEFAULT_SWAP_READS = "raw,ns5"

_PROBE = flags.DEFINE_enum("probe", None, list(PROBES), "Which probe to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A study's workdir (python -m experiments.run).")
_CHECKPOINT = flags.DEFINE_list("checkpoint", None, "Reference .pt checkpoints, comma-separated.")
_MODELS = flags.DEFINE_list(
    "models", None, "With --workdir: the reads (models) to probe; default all."
)
_SEEDS = flags.DEFINE_list("seeds", None, "With --workdir: the seeds to probe; default all.")
_READS = flags.DEFINE_list(
    "reads", None, f"--probe=swap: the reads to evaluate with (default {DEFAULT_SWAP_READS})."
)
_NUM_SEQUENCES = flags.DEFINE_integer(
    "num_sequences",
    None,
    "Validation sequences per model (a multiple of its batch size); default its run's set.",
)
_NORMALIZATION = flags.DEFINE_enum(
    "memory_normalization",
    "frobenius",
    list(NORMALIZATIONS),
    "--probe=decode: each head's C_t divided by its Frobenius norm (frobenius), or the "
    "recurrence's stabilized C_t as it is (stabilized, the replication's).",
)
_OUT = flags.DEFINE_string(
    "out", None, "Where the JSON records go; the table goes beside it (.md)."
)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def _check_command_line() -> tuple[str, list[str]]:
    """(probe, swap reads), or ConfigError naming what to change."""
    from orthorecall.reads import read_from_name

    if _PROBE.value is None:
        raise ConfigError(f"--probe is required: one of {', '.join(PROBES)}.")
    if (_WORKDIR.value is None) == (not _CHECKPOINT.value):
        raise ConfigError("give either --workdir=DIR or --checkpoint=FILE.pt[,FILE.pt], not both.")
    if _CHECKPOINT.value and (_MODELS.value or _SEEDS.value):
        raise ConfigError(
            "--models and --seeds choose among a workdir's models; with --checkpoint, "
            "list the files."
        )
    if not _OUT.value:
        raise ConfigError("--out=OUT.json is required.")
    # Both files are written after all the compute: refuse what cannot be written now.
    out = FLAG_CHECKS.output_file("out", _OUT.value)
    FLAG_CHECKS.output_file("out", table_path(out))
    if _READS.value and _PROBE.value != "swap":
        raise ConfigError(
            f"--reads is for --probe=swap; --probe={_PROBE.value} uses each model's own read."
        )
    reads = _READS.value or DEFAULT_SWAP_READS.split(",")
    for name in reads:
        try:
            read_from_name(name)
        except ValueError as e:
            raise ConfigError(f"--reads: {e}") from None
    if len(set(reads)) != len(reads):
        raise ConfigError(f"--reads lists a read twice: {reads}.")
    if _NUM_SEQUENCES.value is not None:
        FLAG_CHECKS.int("num_sequences", _NUM_SEQUENCES.value, minimum=1)
    return _PROBE.value, reads


# A model's validation set that would take longer than this to draw is refused (the
# study's limit, experiments.study.train.MAX_VALIDATION_SECONDS).
MAX_VALIDATION_SECONDS = 600.0


def _check_sizes(models, num_sequences: int | None) -> None:
    """Every model's validation set, before the first probe runs: a whole number of its
    batches, drawn within ``MAX_VALIDATION_SECONDS`` at ``orthorecall.footprint``'s rate."""
    from orthorecall import footprint

    for model in models:
        count = model.num_sequences if num_sequences is None else num_sequences
        if count % model.batch_size:
            FLAG_CHECKS.fail(
                "num_sequences",
                f"{count} is not a multiple of the validation batch size {model.batch_size} "
                f"of {model.label} (accuracy is the mean over batches, as the reference "
                "computes it).",
            )
        seconds = footprint.numpy_generation_seconds(
            num_sequences=count, seq_len=model.task.full_len
        )
        if seconds > MAX_VALIDATION_SECONDS:
            FLAG_CHECKS.fail(
                "num_sequences",
                f"{count} sequences of {model.task.full_len} tokens would take about "
                f"{seconds:,.0f} s to draw (at most {MAX_VALIDATION_SECONDS:.0f} s); ask for "
                "fewer.",
            )


def _seeds() -> list[int] | None:
    if not _SEEDS.value:
        return None
    try:
        seeds = [int(seed) for seed in _SEEDS.value]
    except ValueError:
        raise ConfigError(f"--seeds={','.join(_SEEDS.value)}: seeds are integers.") from None
    for seed in seeds:
        FLAG_CHECKS.seeds("seeds", seed)
    return seeds


def main(argv: Sequence[str]) -> None:
    library_logging_at_warning()
    with exit_status_on_refusal("probe"):
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; pass flags only (--helpshort).")
        probe, reads = _check_command_line()
        seeds = _seeds()
        from experiments.probes import sources as probe_sources

        if _WORKDIR.value is not None:
            models = probe_sources.from_workdir(_WORKDIR.value, _MODELS.value, seeds)
        else:
            models = probe_sources.from_checkpoints(_CHECKPOINT.value)
        _check_sizes(models, _NUM_SEQUENCES.value)
        records = run(
            probe,
            models,
            reads=reads,
            num_sequences=_NUM_SEQUENCES.value,
            normalization=_NORMALIZATION.value,
            on_record=lambda record: print(json.dumps(record), flush=True),
        )
        out = pathlib.Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")
        table = markdown_table(records)
        table_path(out).write_text(table)
        print(table, end="")
        print(f"wrote {out} and {table_path(out)}", file=sys.stderr)


parse_flags = config_flag_parser("probe")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
