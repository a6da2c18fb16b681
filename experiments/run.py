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
stop signal to any process stops all of them at the same step. Before anything is
computed or written the processes compare their configurations (fingerprint and
fields), process counts and presets: on any difference every process exits with code
2, naming the differing fields and processes. A process whose peers have not all
arrived within ``--peer_timeout`` seconds (default 120) exits with code 2, naming the
coordinator and how many processes it waited for.

Progress is a bar on a terminal and plain status lines otherwise; training curves also
go to TensorBoard (``tensorboard --logdir DIR/tensorboard``). Library logging (Orbax,
JAX) is shown from WARNING up; ``--verbosity=0`` shows its INFO messages too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from experiments.study.cli import (
    UsageError,
    config_argument,
    config_flag_parser,
    exit_status_on_refusal,
    library_logging_at_warning,
)
from experiments.study.config_checks import FLAGS as FLAG_CHECKS

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
_PEER_TIMEOUT = flags.DEFINE_integer(
    "peer_timeout",
    120,
    "Several processes: seconds to wait for every process to join and agree on the "
    "configuration before giving up with exit code 2.",
    lower_bound=1,
    upper_bound=86_400,
)


parse_flags = config_flag_parser("run")


def main(argv: Sequence[str]) -> None:
    with exit_status_on_refusal("run"):
        if len(argv) > 1:
            raise UsageError(f"unexpected arguments: {list(argv[1:])}")
        if _CONFIG.value is None:
            raise UsageError("--config=configs/noisy_ar.py[:PRESET] is required.")
    config = _CONFIG.value
    library_logging_at_warning()
    distributed = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(v is not None for v in distributed):
        from orthorecall import multihost

        try:
            for flag in (_NUM_PROCESSES, _PROCESS_ID):
                if flag.value is not None:
                    FLAG_CHECKS.int(flag.name, flag.value, minimum=0)
            multihost.initialize(*distributed, timeout_seconds=_PEER_TIMEOUT.value, program="run")
            _agree_across_processes(config, _NUM_PROCESSES.value, _PEER_TIMEOUT.value)
        except (ValueError, multihost.PeersMissing, multihost.Disagreement) as e:
            print(f"run: distributed setup error: {e}", file=sys.stderr)
            if isinstance(e, multihost.PeersMissing):
                # JAX's shutdown at exit would wait minutes more for the missing peers.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            sys.exit(2)
    from experiments.study import train

    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    with exit_status_on_refusal("run"):
        FLAG_CHECKS.output_folder("workdir", workdir)
        train.train_and_evaluate(config, workdir, tensorboard=_TENSORBOARD.value)


def _agree_across_processes(config, num_processes, timeout_seconds) -> None:
    """Every process's configuration (fingerprint and fields), its --num_processes and
    its preset must be process 0's; otherwise every process refuses (multihost.agree)."""
    from experiments.study.workdir import config_fingerprint
    from orthorecall import multihost

    config_dict = json.loads(config.to_json())
    found = config_argument(sys.argv)
    multihost.agree(
        {
            "fingerprint": config_fingerprint(config_dict),
            "num_processes": num_processes,
            "preset": found[1].partition(":")[2] if found else None,
            "config": config_dict,
        },
        timeout_seconds=timeout_seconds,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
