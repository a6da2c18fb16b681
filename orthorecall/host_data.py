"""The reference's numpy training data for many seeds, drawn ahead and in parallel.

``data.ReferenceTrainingStream`` draws MAD's examples one at a time in Python: about
160 ms per batch of 64 x 1024 tokens on one core, so 24 seeds drawn in the training
loop would hold an accelerator idle for seconds each step. :class:`ParallelStreams`
draws every seed's next batch in worker processes (seeds are independent streams, so
they can be drawn side by side; each stream stays sequential and bit-exact) while the
devices run the current step, and says how long the training loop had to wait for
data (``wait_seconds``), so that a run can tell when this source throttles it.

Workers are started with ``spawn``: forking a process whose JAX runtime already runs
threads can deadlock the child. Spawned workers import the main module, so a script
that trains must keep its work under ``if __name__ == "__main__":`` (as
``python -m experiments.run`` does); if the workers cannot run, the batches are drawn
in the calling process instead, with a warning.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import time
import warnings
from collections.abc import Sequence

import numpy as np

from orthorecall.data import NoisyRecallTask, ReferenceTrainingStream
from orthorecall.validation import check_int


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group: the trainer finishes its step and
    # checkpoints the streams' states, which it holds; workers dying on it would only
    # break the pool under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _draw(states: list[dict]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One batch of each stream given by its state: (inputs, targets, states after)."""
    streams = [ReferenceTrainingStream.from_state(state) for state in states]
    batches = [stream.next_batch() for stream in streams]
    return (
        np.stack([b[0] for b in batches]),
        np.stack([b[1] for b in batches]),
        [stream.state() for stream in streams],
    )


class ParallelStreams:
    """The ``ReferenceTrainingStream`` of each seed, drawn one batch ahead in processes.

    ``next_batches()`` returns the next batch of every seed, stacked (seed axis first),
    exactly what drawing each stream in turn would give; ``states()`` the streams'
    states after the batches returned so far (for checkpoints: ``from_states`` resumes
    bit-exactly, whatever was drawn ahead).

    Args:
        task: the task.
        seeds: one stream per seed (``default_rng(seed)``).
        batch_size: examples per batch.
        workers: processes drawing batches (default: one per seed, at most the host's
            CPU count); 0 draws in the calling process, without drawing ahead.

    Use as a context manager, or call ``close()``, to stop the workers.
    """

    def __init__(
        self,
        task: NoisyRecallTask,
        *,
        seeds: Sequence[int],
        batch_size: int,
        workers: int | None = None,
    ):
        streams = [ReferenceTrainingStream(task, seed=int(s), batch_size=batch_size) for s in seeds]
        self._start([s.state() for s in streams], workers)

    @classmethod
    def from_states(cls, states: Sequence[dict], *, workers: int | None = None) -> ParallelStreams:
        """Resumes the streams of ``states()`` (each validated by
        ``ReferenceTrainingStream.from_state``)."""
        streams = cls.__new__(cls)
        states = [ReferenceTrainingStream.from_state(s).state() for s in states]
        streams._start(states, workers)
        return streams

    def _start(self, states: list[dict], workers: int | None) -> None:
        if not states:
            raise ValueError("ParallelStreams needs at least one seed.")
        if workers is None:
            workers = min(len(states), os.cpu_count() or 1)
        self._workers = check_int("workers", workers, minimum=0)
        self._states = states
        self.wait_seconds = 0.0  # Spent in next_batches waiting for batches.
        self.batches_returned = 0
        self._pool = None
        self._pending = None
        if self._workers:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_interrupts,
            )
            self._pending = self._submit(self._states)

    def _submit(self, states: list[dict]) -> list[concurrent.futures.Future]:
        # Contiguous runs of seeds, one task per worker: fewer, larger messages.
        chunks = np.array_split(np.arange(len(states)), min(self._workers, len(states)))
        return [self._pool.submit(_draw, [states[i] for i in chunk]) for chunk in chunks]

    @property
    def workers(self) -> int:
        """Worker processes drawing batches (0: drawn in this process, not ahead)."""
        return self._workers

    def next_batches(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), int32 (seeds, batch_size, L) each; starts drawing the next."""
        started = time.perf_counter()
        if self._pool is None:
            inputs, targets, states = _draw(self._states)
        else:
            try:
                parts = [future.result() for future in self._pending]
            except concurrent.futures.process.BrokenProcessPool as error:
                return self._without_workers(error)
            inputs = np.concatenate([p[0] for p in parts])
            targets = np.concatenate([p[1] for p in parts])
            states = [state for p in parts for state in p[2]]
            self._pending = self._submit(states)
        self.wait_seconds += time.perf_counter() - started
        self._states = states
        self.batches_returned += 1
        return inputs, targets

    def _without_workers(self, error: Exception) -> tuple[np.ndarray, np.ndarray]:
        # The states are those of the batches returned so far, so nothing is lost: the
        # same batches follow, drawn here.
        warnings.warn(
            f"orthorecall: the worker processes drawing the numpy training data failed "
            f"({error}); drawing it in this process from now on (same batches, slower). "
            "A script that starts training must guard it with `if __name__ == '__main__':` "
            "(workers are spawned, and import the main module).",
            RuntimeWarning,
            stacklevel=3,
        )
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._workers = None, 0
        return self.next_batches()

    def states(self) -> list[dict]:
        """Each stream's state after the batches returned so far (JSON-able dicts)."""
        return [dict(s) for s in self._states]

    def close(self) -> None:
        """Stops the workers (batches drawn ahead are dropped; ``states()`` is unchanged)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ParallelStreams:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
