"""Train and compare reads over many seeds: the study's main command.

    python -m experiments.run --config=configs/noisy_ar.py[:PRESET] [--workdir=DIR]
        [--config.train.steps=500 ...]

``configs/...`` resolves relative to the current directory first, then to
this package (``experiments/configs/``), so the command works from the
repository root. Re-running the same command on the same workdir resumes from
its newest complete checkpoint; a workdir of a different configuration is
refused. Ctrl-C (or SIGTERM) stops after writing a checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = pathlib.Path(__file__).resolve().parent

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Configuration file, optionally with ':PRESET'.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (default: workdirs/<config.name>).")


def resolve_config_argument(argv: list[str]) -> list[str]:
    """Rewrites ``--config=configs/x.py[:preset]`` to this package's configs
    folder when the path does not exist relative to the current directory."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, sep, preset = arg[len("--config="):].partition(":")
            if not os.path.exists(path) and (_HERE / path).exists():
                arg = f"--config={_HERE / path}{sep}{preset}"
        out.append(arg)
    return out


_STARTED = []


def main(argv):
    _STARTED.append(True)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/noisy_ar.py[:PRESET] is required.")
    from experiments import train

    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    try:
        train.train_and_evaluate(config, workdir)
    except train.ConfigError as e:
        print(f"run: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _run_cli():
    sys.argv = resolve_config_argument(sys.argv)
    try:
        app.run(main)
    except (AttributeError, KeyError) as e:
        if _STARTED:  # Not a flag-parsing problem: a real error, keep its traceback.
            raise
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        print(f"run: configuration error: an override names a field the configuration does "
              f"not have ({e}); overrides given: {overrides}. The fields are listed in "
              "experiments/configs/noisy_ar.py.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _run_cli()
