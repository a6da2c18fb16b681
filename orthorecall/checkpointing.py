"""Orbax checkpoints of a whole multi-seed run.

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters,
optimizer states, data keys of every seed and read) and ``meta`` (JSON: step,
metrics so far, the numpy data streams' states, the run configuration).
Saves are asynchronous and atomic (Orbax writes into a temporary directory and
renames it when complete); the latest ``keep`` are kept.

Resuming takes the newest checkpoint that is complete: a directory without
Orbax's completion markers, or one that fails to restore, is skipped with a
warning and never loaded.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

# Files Orbax writes last, when a checkpoint directory is complete.
_COMPLETION_MARKERS = ("_CHECKPOINT_METADATA",)


class RunCheckpointer:
    """Saves and restores (state pytree, meta JSON) pairs under ``directory``.

    Args:
        directory: checkpoint folder (created if missing).
        save_every: steps between periodic saves (``save`` with ``force``
            saves regardless).
        keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}.")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_every,
            enable_async_checkpointing=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints whose directories are complete, newest first."""
        steps = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            if all((step_dir / marker).exists() for marker in _COMPLETION_MARKERS):
                steps.append(step)
            else:
                logging.warning("ignoring incomplete checkpoint %s", step_dir)
        return steps

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts saving (asynchronously); returns whether a save was started.
        A step that already has a checkpoint is not saved again."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
        """Restores the newest complete checkpoint.

        Args:
            like: a pytree with the structure, shapes, dtypes and shardings of
                the state (e.g. a freshly initialized state).

        Returns:
            (step, state, meta), or None when there is no usable checkpoint.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        for step in self.complete_steps():
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # A damaged checkpoint must not stop a resume.
                logging.warning(
                    "checkpoint %d could not be restored (%s); trying an older one", step, e
                )
                continue
            return step, restored["state"], restored["meta"]
        return None

    def close(self) -> None:
        """Waits for pending asynchronous saves to be on disk, then releases Orbax."""
        self._manager.wait_until_finished()
        self._manager.close()
