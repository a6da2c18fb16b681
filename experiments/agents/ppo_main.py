"""Train recurrent PPO agents on memory tasks: the GRU against the mLSTM cell's reads.

    python -m experiments.agents.ppo_main --config=configs/popgym_ppo.py[:PRESET] [--workdir=DIR]
        [--config.cores=gru,raw,ns5 ...] [--verbosity=0]

``configs/...`` resolves relative to the current directory first, then to this package
(``experiments/configs/``). The conventions are ``experiments.run``'s: every
``--config.FIELD=VALUE`` must name a field; re-running the same command on the same
workdir resumes from its newest checkpoint that verifies; a workdir of another
configuration, or one another process is using, is refused with exit code 2; Ctrl-C
(or SIGTERM) stops after writing a checkpoint. The workdir gets ``run_config.json``,
``metrics.jsonl`` (one line per update, core and seed), ``checkpoints/`` and, at the
end, ``results.json``, ``results.md`` and ``curves.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from experiments.study.cli import (
    UsageError,
    avoid_xla_cpu_scheduler_deadlock,
    config_flag_parser,
    exit_status_on_refusal,
    library_logging_at_warning,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Configuration file, optionally with ':PRESET' "
    "(configs/popgym_ppo.py resolves to experiments/configs/popgym_ppo.py).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: workdirs/<config.name>).")

parse_flags = config_flag_parser("agent")


def main(argv: Sequence[str]) -> None:
    with exit_status_on_refusal("agent"):
        if len(argv) > 1:
            raise UsageError(f"unexpected arguments: {list(argv[1:])}")
        if _CONFIG.value is None:
            raise UsageError("--config=configs/popgym_ppo.py[:PRESET] is required.")
    config = _CONFIG.value
    library_logging_at_warning()
    avoid_xla_cpu_scheduler_deadlock()
    from experiments.agents import train

    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    with exit_status_on_refusal("agent"):
        train.train_agents(config, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
