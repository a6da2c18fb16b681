"""TensorBoard event files of a training run (through ``tensorboardX``).

Layout under ``<workdir>/tensorboard`` (one TensorBoard "run" per directory)::

    <read>/seed_<s>/    train/loss, train/grad_norm, val/accuracy, val/loss   (one seed)
    <read>/all_seeds/   train/loss_mean, val/accuracy_mean, val/loss_mean,
                        val/solved, val/diverged                              (the read)

so that ``tensorboard --logdir <workdir>/tensorboard`` overlays every seed's curves
(filter runs with e.g. ``ns5/seed`` or ``all_seeds``). Means are over the seeds whose
value is finite; ``val/solved`` counts seeds solved so far as the report counts them.

A resumed run passes the step it resumes from as ``purge_step``: events a crashed run
wrote after its last checkpoint are then hidden by TensorBoard instead of doubling
the curves.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from tensorboardX import SummaryWriter

ALL_SEEDS = "all_seeds"


def finite_mean(values) -> float | None:
    """The mean of the finite values, None when there is none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


class RunSummaries:
    """One event writer per (read, seed) and per read, under ``directory``.

    Args:
        directory: the TensorBoard log directory (created if missing).
        reads: read names.
        seeds: the run's seeds (padding seeds excluded).
        purge_step: on resume, the step resumed from (see the module docstring).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        reads: Sequence[str],
        seeds: Sequence[int],
        purge_step: int | None = None,
    ):
        self.directory = os.fspath(directory)
        width = len(str(max(seeds)))  # Runs sort by name: zero-pad the seeds.
        self._seed_runs = {int(s): f"seed_{int(s):0{width}d}" for s in seeds}
        # Event files are named by the second they are opened in: a run resumed within
        # the same second would truncate its predecessor's file without a suffix.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self._writers = {
            (read, name): SummaryWriter(
                os.path.join(self.directory, read, name),
                purge_step=purge_step,
                flush_secs=30,
                filename_suffix=suffix,
            )
            for read in reads
            for name in [ALL_SEEDS, *self._seed_runs.values()]
        }

    def _scalar(self, read: str, run: str, tag: str, value, step: int) -> None:
        if value is not None and math.isfinite(value):
            self._writers[read, run].add_scalar(tag, float(value), step)

    def train(self, step: int, metrics: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
        """Training metrics at ``step``: read -> {"loss": per seed, "grad_norm": per seed}.
        Non-finite values (diverged seeds) are not written."""
        for read, values in metrics.items():
            for name, loss, grad_norm in zip(
                self._seed_runs.values(), values["loss"], values["grad_norm"], strict=True
            ):
                self._scalar(read, name, "train/loss", loss, step)
                self._scalar(read, name, "train/grad_norm", grad_norm, step)
            self._scalar(read, ALL_SEEDS, "train/loss_mean", finite_mean(values["loss"]), step)

    def evaluation(self, step: int, records: Sequence[Mapping], solved: Mapping[str, int]) -> None:
        """The evaluation records of ``step`` (the trainer's metrics.jsonl rows: read,
        seed, accuracy, loss, nonfinite) and the seeds solved so far per read."""
        by_read: dict[str, list[Mapping]] = {}
        for record in records:
            by_read.setdefault(record["read"], []).append(record)
            name = self._seed_runs[record["seed"]]
            self._scalar(record["read"], name, "val/accuracy", record["accuracy"], step)
            self._scalar(record["read"], name, "val/loss", record["loss"], step)
        for read, rows in by_read.items():
            accuracy = [r["accuracy"] for r in rows if r["accuracy"] is not None]
            loss = [r["loss"] for r in rows if r["loss"] is not None]
            self._scalar(read, ALL_SEEDS, "val/accuracy_mean", finite_mean(accuracy), step)
            self._scalar(read, ALL_SEEDS, "val/loss_mean", finite_mean(loss), step)
            self._scalar(read, ALL_SEEDS, "val/solved", solved[read], step)
            self._scalar(
                read, ALL_SEEDS, "val/diverged", sum(bool(r["nonfinite"]) for r in rows), step
            )

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
