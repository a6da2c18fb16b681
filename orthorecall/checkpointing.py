"""Orbax checkpoints of a whole multi-seed run, verified on restore.

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters,
optimizer states, data keys of every seed and read) and ``meta`` (JSON: step,
metrics so far, the numpy data streams' states, the run configuration).
Saves are asynchronous and atomic (Orbax writes into a temporary directory and
renames it when complete); the latest ``keep`` are kept.

Orbax does not detect damaged data: one flipped bit in an array file restores
as a wrong number. So every save also records, inside ``meta``, a SHA-256 of
each array (dtype, shape and bytes) and of the rest of ``meta``; a restore
recomputes them. Resuming takes the newest checkpoint that is complete and
verifies: one that fails (or cannot be read) is moved aside to
``corrupt-<step>`` in the same folder, never deleted, so that it is neither
resumed nor kept by the retention policy in place of a good older one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from orthorecall import multihost

# Files Orbax writes last, when a checkpoint directory is complete.
_COMPLETION_MARKERS = ("_CHECKPOINT_METADATA",)
# The key of ``meta`` under which a checkpoint's checksums are stored.
INTEGRITY_KEY = "integrity"
_INTEGRITY_FORMAT = 1
QUARANTINE_PREFIX = "corrupt-"


class CheckpointVerificationError(Exception):
    """A checkpoint's content does not match the checksums recorded when it was saved
    (or it cannot be read at all)."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose arrays are not those of the state to restore (another
    model, or another version of the state's layout): not damage, so nothing is moved."""


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A checkpoint that failed verification and was moved aside."""

    step: int
    moved_to: pathlib.Path
    reason: str

    def describe(self) -> str:
        return (
            f"checkpoint of step {self.step} failed verification ({self.reason}); "
            f"moved to {self.moved_to}"
        )


@dataclasses.dataclass(frozen=True)
class Restored:
    """The newest checkpoint that verified."""

    step: int
    state: Any
    meta: dict
    verified: bool  # False only for checkpoints written before checksums existed.


def _canonical_json(value) -> str:
    # Python's JSON writes floats by repr, so a JSON round trip gives the same text.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def meta_digest(meta: dict) -> str:
    """SHA-256 of ``meta`` (without its integrity record) as canonical JSON."""
    payload = {k: v for k, v in meta.items() if k != INTEGRITY_KEY}
    return hashlib.sha256(_canonical_json(payload).encode()).hexdigest()


def _leaf_name(path) -> str:
    """'states/raw/params/0/...': the same whether a node is a dict, a dataclass, a
    named tuple or a list, as Orbax restores them all as dicts and lists."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _named_leaves(tree: Any) -> dict[str, Any]:
    return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_digests(state: Any) -> dict[str, str]:
    """Name of each array in ``state`` -> SHA-256 of its dtype, shape and bytes."""
    leaves = _named_leaves(state)
    # Every process gets (and digests) the global arrays, also those sharded over
    # several processes: they must all record, and verify, the same digests.
    host = multihost.host_copy(list(leaves.values()))
    digests = {}
    for name, value in zip(leaves, host, strict=True):
        value = np.ascontiguousarray(value)
        digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
        digests[name] = digest.hexdigest()
    return digests


def _is_empty(leaf) -> bool:
    return any(size == 0 for size in np.shape(leaf))


def _storable(state: Any) -> Any:
    """``state`` with each zero-size array (which holds no data, and which Orbax refuses
    to save) replaced by a scalar zero of its dtype; ``_unstorable`` undoes it from a
    template. Other arrays, and so older checkpoints, are untouched."""
    return jax.tree_util.tree_map(
        lambda leaf: np.zeros((), np.dtype(leaf.dtype)) if _is_empty(leaf) else leaf, state
    )


def _unstorable(state: Any, like: Any) -> Any:
    """The restored ``state`` with the zero-size arrays of ``like`` back in place."""

    def back(stored, template):
        if not _is_empty(template):
            return stored
        empty = np.zeros(template.shape, np.dtype(template.dtype))
        sharding = getattr(template, "sharding", None)
        return jax.device_put(empty, sharding) if sharding is not None else jax.numpy.asarray(empty)

    return jax.tree_util.tree_map(back, state, like)


def _verify_meta(meta: Any) -> bool:
    """Raises when ``meta`` does not match its checksum; returns whether it had one."""
    if not isinstance(meta, dict):
        raise CheckpointVerificationError(f"meta is a {type(meta).__name__}, not a JSON object")
    integrity = meta.get(INTEGRITY_KEY)
    if integrity is None:
        return False
    if not isinstance(integrity, dict) or integrity.get("format") != _INTEGRITY_FORMAT:
        raise CheckpointVerificationError(f"unknown integrity record {integrity!r:.80}")
    if meta_digest(meta) != integrity.get("meta"):
        raise CheckpointVerificationError("the meta item does not match its checksum")
    return True


def _verify_state(state: Any, meta: dict) -> None:
    expected = meta[INTEGRITY_KEY].get("state")
    actual = state_digests(state)
    if not isinstance(expected, dict) or set(expected) != set(actual):
        raise CheckpointVerificationError("the state's arrays are not those checksummed")
    damaged = sorted(path for path in actual if actual[path] != expected[path])
    if damaged:
        shown = ", ".join(damaged[:3]) + (
            f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        )
        raise CheckpointVerificationError(f"checksum mismatch in {shown}")


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
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        # Checkpoints this checkpointer moved aside, oldest event first.
        self.rejected: list[Rejected] = []
        self._closed = False

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

    def quarantined(self) -> list[pathlib.Path]:
        """Checkpoints moved aside after failing verification (by this or an earlier run)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.name.startswith(QUARANTINE_PREFIX))

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts saving (asynchronously); returns whether a save was started.

        ``meta`` must be JSON-serializable (no NaN: use None). A step that already has a
        checkpoint is not saved again.
        """
        if step in self._manager.all_steps():
            return False
        if not (force or self._manager.should_save(step)):
            return False
        # What a restore reads back (keys in their order: metrics.jsonl is written from it).
        meta = json.loads(json.dumps(meta, allow_nan=False))
        state = _storable(state)
        meta[INTEGRITY_KEY] = {
            "format": _INTEGRITY_FORMAT,
            "meta": meta_digest(meta),
            "state": state_digests(state),
        }
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def read_meta(self, step: int) -> tuple[dict, bool]:
        """The verified meta of checkpoint ``step`` (without its integrity record) and
        whether it had checksums to verify.

        Raises:
            CheckpointVerificationError: the meta cannot be read or fails its checksum.
        """
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:  # Whatever Orbax raises on a damaged item.
            raise CheckpointVerificationError(f"meta unreadable: {_short(e)}") from e
        verified = _verify_meta(meta)
        return meta, verified

    def read_state(self, step: int, like: Any, meta: dict) -> Any:
        """Restores and verifies the state of checkpoint ``step`` against ``meta``.

        Args:
            like: the state's template (see ``restore_latest``), or None to restore the
                arrays as saved, without sharding (for inspection; zero-size arrays come back as
                the scalar zeros that stand for them).

        Raises:
            CheckpointMismatchError: readable, but its arrays' names, shapes or dtypes
                differ from ``like``'s.
            CheckpointVerificationError: the state cannot be read or fails its checksums.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _storable(like))
        if like is not None:
            self._check_template(step, abstract)
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as e:  # Whatever Orbax raises on damaged or mismatched data.
            raise CheckpointVerificationError(f"state unreadable: {_short(e)}") from e
        if INTEGRITY_KEY in meta:
            _verify_state(state, meta)
        return state if like is None else _unstorable(state, like)

    def _check_template(self, step: int, abstract: Any) -> None:
        try:
            stored = _named_leaves(self._manager.item_metadata(step)["state"])
        except Exception as e:  # Whatever Orbax raises on damaged metadata.
            raise CheckpointVerificationError(f"state metadata unreadable: {_short(e)}") from e
        wanted = _named_leaves(abstract)
        problems = [f"{name} is missing" for name in sorted(set(wanted) - set(stored))]
        problems += [f"{name} is not expected" for name in sorted(set(stored) - set(wanted))]
        for name in sorted(set(wanted) & set(stored)):
            have, want = stored[name], wanted[name]
            if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != want.dtype:
                problems.append(
                    f"{name} is {np.dtype(have.dtype).name}{list(have.shape)}, "
                    f"expected {want.dtype.name}{list(want.shape)}"
                )
        if problems:
            shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
            raise CheckpointMismatchError(
                f"the checkpoint of step {step} in {self.directory} holds other arrays than "
                f"the state to restore ({shown}): was it written for another model or by "
                "another version of orthorecall?"
            )

    def quarantine(self, step: int, reason: str) -> Rejected:
        """Moves checkpoint ``step`` aside (kept for inspection, out of Orbax's steps)."""
        source = self.directory / str(step)
        target = self.directory / f"{QUARANTINE_PREFIX}{step}"
        if target.exists():  # Damaged twice at the same step: keep both.
            target = self.directory / f"{QUARANTINE_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        # Every process finds the same damage (they read the same files); one moves it.
        if multihost.is_primary():
            os.replace(source, target)
        multihost.sync(f"quarantine-{step}")
        self._manager.reload()
        rejected = Rejected(step, target, reason)
        self.rejected.append(rejected)
        logging.warning("%s", rejected.describe())
        return rejected

    def newest_meta(self, check_meta=None) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose meta verifies, moving aside
        (``quarantine``) those whose meta does not; None when there is none.

        ``check_meta(step, meta)``, when given, may raise to refuse the checkpoint (e.g. a
        different configuration); its exception propagates and nothing is moved.
        """
        for step in self.complete_steps():
            try:
                meta, _ = self.read_meta(step)
            except CheckpointVerificationError as e:
                self.quarantine(step, str(e))
                continue
            if check_meta is not None:
                check_meta(step, meta)
            return step, _without_integrity(meta)
        return None

    def restore_latest(self, like: Any, check_meta=None) -> Restored | None:
        """Restores the newest complete checkpoint that verifies.

        Args:
            like: a pytree with the structure, shapes, dtypes and shardings of
                the state (e.g. a freshly initialized state).
            check_meta: optional ``check_meta(step, meta)`` that raises to refuse a
                checkpoint for another reason than damage; the exception propagates.

        Returns:
            The restored checkpoint, or None when there is none that verifies. Those
            that fail are moved aside on the way (see ``rejected``).
        """
        for step in self.complete_steps():
            try:
                meta, verified = self.read_meta(step)
                if check_meta is not None:
                    check_meta(step, meta)
                state = self.read_state(step, like, meta)
            except CheckpointVerificationError as e:
                self.quarantine(step, str(e))
                continue
            if not verified:
                logging.warning(
                    "checkpoint %d predates checksums: restored without verification", step
                )
            return Restored(step, state, _without_integrity(meta), verified)
        return None

    def close(self) -> None:
        """Waits for pending asynchronous saves to be on disk, then releases Orbax
        (a second call does nothing)."""
        if self._closed:
            return
        self._manager.wait_until_finished()
        self._manager.close()
        self._closed = True


def _without_integrity(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != INTEGRITY_KEY}


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"
