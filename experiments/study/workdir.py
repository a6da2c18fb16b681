"""A run's workdir: who owns it, and which configuration its results belong to.

* ``WorkdirLock``: one process per workdir. An advisory ``flock`` on
  ``<workdir>/.lock``, which the kernel releases when its holder dies however it
  dies, so a lock left by a killed process never blocks the next run; the file
  names the holder for the message a second process gets.
* ``config_fingerprint`` / ``differing_fields``: a run's identity is its
  configuration less the fields that may change on resumption; every checkpoint
  stores it (``experiments.study.train``), and resuming compares it with the command's.
* ``read_run_description``: ``run_config.json``, or a clear error when it is
  unreadable.
* ``checkpoint_config_check`` / ``check_workdir_without_checkpoint``: before any
  compute, a run refuses a workdir whose checkpoints or results belong to another
  configuration, or whose only checkpoints are damaged.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import pathlib
import socket
import sys

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected.
    fcntl = None

from experiments.report.records import CONFIG_FILE as RUN_CONFIG_FILE
from experiments.report.records import METRICS_FILE, RESULTS_JSON
from orthorecall import checkpointing

LOCK_FILE = ".lock"
# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = frozenset({"train.log_every"})
# Fields added after runs were made without them, with the value that those runs had:
# a stored configuration without the field counts as having that value.
FIELDS_ADDED_LATER = {
    "train.segment_length": None,
    "model.matmul_precision": "highest",
    "init_from": None,
}


class WorkdirError(Exception):
    """The workdir cannot be used as asked; the message says why and what to do."""


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_fingerprint(config: dict) -> str:
    """SHA-256 of a configuration (a JSON dict) without its resumable fields."""
    identity = {k: v for k, v in flatten(config).items() if k not in RESUMABLE_FIELDS}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def differing_fields(previous: dict, current: dict) -> str:
    """'field: workdir has A, now B; ...' for the non-resumable fields that differ
    ('' when none do)."""
    previous, current = flatten(previous), flatten(current)
    differing = sorted(
        k
        for k in set(previous) | set(current)
        if k not in RESUMABLE_FIELDS and _value(previous, k) != _value(current, k)
    )
    return "; ".join(
        f"{k}: workdir has {_value(previous, k)!r}, now {_value(current, k)!r}" for k in differing
    )


def _value(flat_config: dict, field: str):
    return flat_config.get(field, FIELDS_ADDED_LATER.get(field))


def read_run_description(workdir: pathlib.Path) -> dict | None:
    """The content of ``run_config.json``; None when the file does not exist.

    Raises:
        WorkdirError: the file exists but is not a run description (unreadable,
            malformed JSON, or without its ``config``).
    """
    path = workdir / RUN_CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path} cannot be read ({e}).") from None
    try:
        description = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(description, dict) or not isinstance(description.get("config"), dict):
        raise WorkdirError(f"{path} is not a run description (it has no 'config' object).")
    return description


def has_results(workdir: pathlib.Path) -> bool:
    """Whether the workdir holds evaluation results (metrics or a report)."""
    metrics = workdir / METRICS_FILE
    return (metrics.is_file() and metrics.stat().st_size > 0) or (workdir / RESULTS_JSON).exists()


class WorkdirLock:
    """Holds ``<workdir>/.lock`` for one process (a context manager).

    Raises (on entry):
        WorkdirError: another live process holds the workdir.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> WorkdirLock:
        if fcntl is None:
            return self
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                file.close()
                raise
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise WorkdirError(
                f"{self.path.parent} is in use by {holder}. Wait for that run to end (or "
                "stop it), or use another --workdir."
            ) from None
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        file.write(
            f"process {os.getpid()} on {socket.gethostname()}, started {started}: "
            f"{' '.join(sys.argv)[:300]}\n"
        )
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            # The file stays: deleting it would let two processes lock two different
            # files of the same name.
            self._file.truncate(0)
            self._file.close()  # Closing releases the flock.
            self._file = None


def check_stored_config(workdir: pathlib.Path, stored: dict, config_dict: dict) -> None:
    differences = differing_fields(stored, config_dict)
    if differences:
        raise WorkdirError(
            f"{workdir} holds a run with a different configuration ({differences}). Use "
            "another --workdir, or repeat the original configuration to resume it."
        )


def checkpoint_config_check(workdir: pathlib.Path, config_dict: dict):
    """``check_meta`` for the checkpointer: refuses a checkpoint of another configuration."""

    def check(step: int, meta: dict) -> None:
        stored = meta.get("config")
        if stored is None:  # Written before checkpoints stored their configuration.
            description = read_run_description(workdir)
            if description is None:
                raise WorkdirError(
                    f"the checkpoint of step {step} in {workdir} does not record its "
                    f"configuration (an older orthorecall wrote it) and {RUN_CONFIG_FILE} is "
                    "missing, so resuming it under this command cannot be checked. Use "
                    "another --workdir."
                )
            stored = description["config"]
        check_stored_config(workdir, stored, config_dict)

    return check


def restore_latest_or_refuse(checkpointer, like, check_config):
    """``checkpointer.restore_latest(like, check_config)``, but a workdir whose every
    checkpoint failed verification is refused (``WorkdirError``) rather than silently
    started over; the damaged checkpoints stay where they were moved."""
    restored = checkpointer.restore_latest(like, check_config)
    if restored is None and checkpointer.rejected:
        raise WorkdirError(
            f"no checkpoint in {checkpointer.directory} passes verification: "
            + "; ".join(r.describe() for r in checkpointer.rejected)
            + ". They are kept there; the run was not started over."
        )
    return restored


def check_workdir_without_checkpoint(workdir: pathlib.Path, checkpointer, config_dict) -> None:
    """A workdir without a usable checkpoint: starting (over) must not lose results."""
    damaged = checkpointer.quarantined()
    if damaged:
        raise WorkdirError(
            f"{workdir} holds no checkpoint that passes verification, only damaged ones "
            f"moved aside: {', '.join(p.name for p in damaged)}. Starting over would "
            "discard that run: move the workdir's results away (or use another --workdir) "
            f"and delete the {checkpointing.QUARANTINE_PREFIX}* folders to start over."
        )
    if not has_results(workdir):
        return  # Nothing to lose: a new workdir, or a start that failed before results.
    try:
        description = read_run_description(workdir)
    except WorkdirError as e:
        raise WorkdirError(
            f"{e} {workdir} holds results of a run without checkpoints whose configuration "
            "cannot be told. Use another --workdir, or move the results away."
        ) from None
    if description is None:
        raise WorkdirError(
            f"{workdir} holds results ({METRICS_FILE}) but neither checkpoints nor "
            f"{RUN_CONFIG_FILE}: their configuration cannot be told. Use another "
            "--workdir, or move the results away."
        )
    check_stored_config(workdir, description["config"], config_dict)
