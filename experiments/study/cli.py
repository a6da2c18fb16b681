"""What the project's command lines share."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import sys
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

# Where ``configs/...`` resolves when it is not relative to the current directory.
_CONFIGS_HOME = pathlib.Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what to do."""


@contextlib.contextmanager
def exit_status_on_refusal(program: str):
    """Ends the command with status 2, the message on stderr, when the run inside refuses
    its configuration (``ConfigError``), its command line (``UsageError``) or its workdir
    (``WorkdirError``), and with 130
    when a signal stopped it (after its checkpoint)."""
    from experiments.study.workdir import WorkdirError  # Orbax and JAX: only when a run starts.

    try:
        yield
    except ConfigError as e:
        print(f"{program}: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkdirError as e:
        print(f"{program}: workdir error: {e}", file=sys.stderr)
        sys.exit(2)
    except UsageError as e:
        print(f"{program}: usage error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


# XLA's CPU runtime can run independent parts of a program concurrently on its thread
# pool. On a 2-core machine that deadlocks (every thread idle, forever) on the agents'
# seed-vmapped PPO programs from width 64 on (a GRU core as well as the mLSTM's); they
# run with it off. Neither results nor GPU/TPU runs depend on it.
_XLA_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def avoid_xla_cpu_scheduler_deadlock() -> None:
    """Turns XLA's concurrency-optimized CPU scheduler off (see above) unless
    ``XLA_FLAGS`` already sets it. Call it before JAX starts a backend (before the
    first computation): XLA reads its flags once."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags_now:
        os.environ["XLA_FLAGS"] = f"{flags_now} {_XLA_CPU_SCHEDULER_FLAG}".strip()


def library_logging_at_warning() -> None:
    """Shows library logging (Orbax, JAX) from WARNING up unless ``--verbosity`` was given.

    Call it first thing in an ``app.run`` main: once flags are parsed, absl turns INFO on
    for every library, and Orbax alone writes dozens of lines per checkpoint.
    ``--verbosity=0`` brings INFO back, ``--verbosity=1`` DEBUG.
    """
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


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


def config_argument(argv: Sequence[str]) -> tuple[int, str] | None:
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
    found = config_argument(argv)
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


def config_flag_parser(program: str):
    """A ``flags_parser`` for ``app.run`` of a command with a ``--config`` file flag:
    absl's flag parsing, after resolving the configuration's path and checking the
    overrides against the configuration (ml_collections would otherwise fail on an
    unknown field with a bare AttributeError from inside flag parsing).

    The parser exits with status 2 and a message on stderr (``PROGRAM: configuration
    error: ...``) when the command line is wrong (absl alone would exit 1 on a bad
    value and raise on an unknown field).
    """
    return functools.partial(_parse_flags, program)


def _parse_flags(program: str, argv: Sequence[str]) -> list[str]:
    found = config_argument(argv)
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
        print(f"{program}: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
