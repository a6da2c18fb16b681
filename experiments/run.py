"""Train and compare reads over many seeds: the study's main command.

    python -m experiments.run --config=configs/noisy_ar.py[:PRESET] [--workdir=DIR]
        [--config.train.steps=500 ...] [--notensorboard] [--verbosity=0]

``configs/...`` resolves relative to the current directory first, then to this
package (``experiments/configs/``), so the command works from the repository root.
Every ``--config.FIELD=VALUE`` override must name a field of the configuration.
Re-running the same command on the same workdir resumes from its newest complete
checkpoint that verifies (damaged ones are moved aside to ``checkpoints/corrupt-STEP``);
a workdir of a different configuration, or one another process is using, is refused
with exit code 2. Ctrl-C (or SIGTERM) stops after writing a checkpoint once the first
step has run (before it, at once).

Several processes (hosts) run one study together through JAX's distributed runtime:
start the same command in each with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or ``--distributed`` where JAX reads them from the
cluster's environment: Slurm, Open MPI, Cloud TPU). The seeds are sharded over every
process's devices; process 0 writes the files (run_config.json, metrics, TensorBoard,
the report), checkpoints are written by all (Orbax) into the shared workdir, and a
stop signal to any process stops all of them at the same step.

Progress is a bar on a terminal and plain status lines otherwise; training curves also
go to TensorBoard (``tensorboard --logdir DIR/tensorboard``). Library logging (Orbax,
JAX) is shown from WARNING up; ``--verbosity=0`` shows its INFO messages too.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from experiments.cli import library_logging_at_warning

_CONFIGS_HOME = pathlib.Path(__file__).resolve().parent

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Configuration file, optionally with ':PRESET' "
    "(configs/noisy_ar.py resolves to experiments/configs/noisy_ar.py).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: workdirs/<config.name>).")
_TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", True, "Write TensorBoard event files under <workdir>/tensorboard."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Several processes: HOST:PORT of process 0's coordinator (jax.distributed).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Several processes: how many take part.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "Several processes: this one's index, 0 to num_processes - 1.",
    lower_bound=0,
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Start jax.distributed with what it detects from the cluster's environment (Slurm, "
    "Open MPI, Cloud TPU); implied by any of the three flags above.",
)


class UsageError(Exception):
    """The command line cannot run; the message says what to change."""


def resolve_config_path(argument: str) -> str:
    """``PATH[:PRESET]`` with PATH resolved: as given when it exists relative to the
    current directory, else relative to this package (``configs/noisy_ar.py`` ->
    ``experiments/configs/noisy_ar.py``)."""
    path, sep, preset = argument.partition(":")
    if not os.path.exists(path) and (_CONFIGS_HOME / path).is_file():
        path = str(_CONFIGS_HOME / path)
    return f"{path}{sep}{preset}"


def _config_argument(argv: Sequence[str]) -> tuple[int, str] | None:
    """(index, value) of the last ``--config=VALUE`` / ``--config VALUE`` in argv."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            found = (i, arg.split("=", 1)[1])
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            found = (i + 1, argv[i + 1])
    return found


def with_resolved_config(argv: Sequence[str]) -> list[str]:
    """A copy of ``argv`` whose (last) ``--config`` value is resolved with
    :func:`resolve_config_path`; the other arguments are unchanged."""
    argv = list(argv)
    found = _config_argument(argv)
    if found is not None:
        index, value = found
        resolved = resolve_config_path(value)
        if "=" in argv[index]:  # --config=VALUE, else VALUE after a bare --config
            argv[index] = argv[index].split("=", 1)[0] + "=" + resolved
        else:
            argv[index] = resolved
    return argv


def load_config(path: str, display: str | None = None):
    """The configuration of ``PATH[:PRESET]``, loaded as ``--config`` loads it.

    Raises:
        UsageError: the file cannot be loaded or its ``get_config`` refuses the preset.
    """
    holder = flags.FlagValues()  # Throwaway: the real flags are parsed afterwards.
    flag = config_flags.DEFINE_config_file("config", flag_values=holder, sys_argv=[])
    try:
        holder(["run", f"--config={path}"])
        config = flag.value
        config.keys()  # ml_collections defers a file it could not load until first use.
    except flags.Error as e:  # get_config raised, e.g. for an unknown preset
        raise UsageError(f"--config={display or path}: {str(e).strip().splitlines()[-1]}") from None
    except OSError:
        raise UsageError(
            f"--config={display or path}: no such file (looked in the current "
            f"directory and in {_CONFIGS_HOME})"
        ) from None
    return config


def check_overrides(config, argv: Sequence[str], source: str = "the configuration file") -> None:
    """Refuses ``--config.a.b=...`` overrides that name no field of ``config`` (loaded
    from ``source``).

    Raises:
        UsageError: naming each unknown field and the fields its parent has.
    """
    problems = []
    for arg in argv:
        if not arg.startswith(("--config.", "-config.", "--noconfig.")):
            continue
        field = arg.split("=", 1)[0].split(".", 1)[1]
        node, path = config, ["config"]
        for part in field.split("."):
            if not hasattr(node, "keys") or part not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                problems.append(
                    f"--config.{field}: {'.'.join(path)} has no field {part!r} "
                    f"(its fields: {known})"
                )
                break
            node, path = node[part], path + [part]
    if problems:
        raise UsageError(
            "; ".join(problems) + f". The fields are defined in {source.partition(':')[0]}."
        )


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, after resolving the configuration's path and checking the
    overrides against the configuration (ml_collections would otherwise fail on an
    unknown field with a bare AttributeError from inside flag parsing).

    Exits with status 2 and a message on stderr when the command line is wrong (absl
    alone would exit 1 on a bad value and raise on an unknown field).
    """
    found = _config_argument(argv)
    argv = with_resolved_config(argv)
    try:
        if found is not None:
            value = found[1]
            config = load_config(resolve_config_path(value), display=value)
            check_overrides(config, argv, source=value)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # e.g. a value of the wrong type
            raise UsageError(f"{e}. Pass --helpshort to see the flags.") from None
    except UsageError as e:
        print(f"run: configuration error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/noisy_ar.py[:PRESET] is required.")
    library_logging_at_warning()
    distributed = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(v is not None for v in distributed):
        from orthorecall import multihost

        try:
            multihost.initialize(*distributed)
        except ValueError as e:
            print(f"run: distributed setup error: {e}", file=sys.stderr)
            sys.exit(2)
    from experiments import train
    from experiments.workdir import WorkdirError

    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    try:
        train.train_and_evaluate(config, workdir, tensorboard=_TENSORBOARD.value)
    except train.ConfigError as e:
        print(f"run: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkdirError as e:
        print(f"run: workdir error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
