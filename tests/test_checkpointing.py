"""RunCheckpointer: checksums verified on restore, damaged checkpoints moved aside (never
resumed, never kept by retention over a good one), templates of another model refused
without moving anything. Small trees, no training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import checkpointing


def tree_of(step: int) -> dict:
    """A state whose every array depends on the step (a wrong step shows)."""
    base = np.arange(3000, dtype=np.float32).reshape(3, 1000) / 7.0
    return {
        "params": {"w": jnp.asarray(base * step), "b": jnp.full((17,), step, jnp.float32)},
        "keys": jnp.asarray(np.full((3, 2), step, np.uint32)),
        "layers": [jnp.eye(4) * step, jnp.ones((2, 2), jnp.int32) * step],
    }


def save_steps(directory: Path, steps, keep: int = 5) -> None:
    checkpointer = checkpointing.RunCheckpointer(directory, save_every=1, keep=keep)
    for step in steps:
        checkpointer.save(step, tree_of(step), {"step": step, "metrics": [0.5, None, step]})
    checkpointer.close()


def restore(directory: Path, like=None, keep: int = 5):
    checkpointer = checkpointing.RunCheckpointer(directory, save_every=1, keep=keep)
    try:
        return checkpointer.restore_latest(like), list(checkpointer.rejected)
    finally:
        checkpointer.close()


def assert_equal_trees(a, b):
    leaves_a, def_a = jax.tree_util.tree_flatten(a)
    leaves_b, def_b = jax.tree_util.tree_flatten(b)
    assert def_a == def_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    save_steps(directory, (1, 2))
    return directory


def test_round_trip_verifies(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    restored, rejected = restore(directory, tree_of(0))
    assert restored.step == 2 and restored.verified and not rejected
    assert restored.meta == {"step": 2, "metrics": [0.5, None, 2]}
    assert_equal_trees(restored.state, tree_of(2))
    # Without a template (inspection), the arrays verify too (as dicts and lists).
    restored, rejected = restore(directory)
    assert restored.step == 2 and not rejected
    np.testing.assert_array_equal(restored.state["params"]["w"], tree_of(2)["params"]["w"])


def test_zero_size_arrays_round_trip(tmp_path):
    """Orbax refuses to save arrays without elements (an mLSTM carry with a conv window of
    1 has one); they come back with their shape and dtype."""
    state = {
        "conv": jnp.zeros((2, 4, 0, 8), jnp.bfloat16),
        "memory": jnp.arange(6.0).reshape(2, 3),
        "none_yet": np.zeros((0,), np.int32),
    }
    checkpointer = checkpointing.RunCheckpointer(tmp_path / "checkpoints", save_every=1)
    checkpointer.save(1, state, {"step": 1})
    checkpointer.close()
    like = jax.tree_util.tree_map(jnp.ones_like, state)
    restored, rejected = restore(tmp_path / "checkpoints", like)
    assert restored.verified and not rejected
    assert_equal_trees(restored.state, state)
    assert restored.state["conv"].shape == (2, 4, 0, 8)
    assert restored.state["conv"].dtype == jnp.bfloat16


# Orbax leaves the failed reads' asyncio tasks to be reported at exit.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bits_in_array_data_never_restore_wrong_numbers(saved, tmp_path):
    """The issue's failure: one flipped bit in an array file was resumed silently. Now,
    wherever the bit is, the restore gives the saved numbers of some step, and the
    damaged checkpoint, when it is rejected, is moved aside by name."""
    files = data_files(saved / "2")
    assert files
    rng = np.random.default_rng(0)
    trials = 0
    for index, file in enumerate(files):
        size = file.stat().st_size
        for position in sorted({size // 2, *rng.integers(0, size, 3).tolist()}):
            directory = tmp_path / f"trial_{index}_{position}" / "checkpoints"
            shutil.copytree(saved, directory)
            damaged = directory / "2" / file.relative_to(saved / "2")
            content = bytearray(damaged.read_bytes())
            content[position] ^= 1 << int(rng.integers(8))
            damaged.write_bytes(bytes(content))
            restored, rejected = restore(directory, tree_of(0))
            assert_equal_trees(restored.state, tree_of(restored.step))
            if restored.step == 1:
                assert [(r.step, r.moved_to.name) for r in rejected] == [(2, "corrupt-2")]
                assert (directory / "corrupt-2").is_dir() and not (directory / "2").exists()
            trials += 1
    assert trials >= 4


def test_largest_array_file_damage_is_detected_and_retention_keeps_good_ones(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    largest = max(data_files(directory / "2"), key=lambda p: p.stat().st_size)
    content = bytearray(largest.read_bytes())
    content[len(content) // 2] ^= 0x10
    largest.write_bytes(bytes(content))

    checkpointer = checkpointing.RunCheckpointer(directory, save_every=1, keep=2)
    restored = checkpointer.restore_latest(tree_of(0))
    assert restored.step == 1
    assert [r.step for r in checkpointer.rejected] == [2]
    assert "checksum mismatch" in checkpointer.rejected[0].reason
    assert "params/w" in checkpointer.rejected[0].reason  # The damaged array, by name.
    # Training goes on from step 1: step 2 is saved again, then 3; with keep=2 the
    # retention policy keeps the two newest good ones, and the damaged one stays aside.
    assert checkpointer.save(2, tree_of(2), {"step": 2})
    assert checkpointer.save(3, tree_of(3), {"step": 3})
    checkpointer.close()
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3", "corrupt-2"]
    restored, rejected = restore(directory, tree_of(0))
    assert restored.step == 3 and not rejected


def test_edited_meta_is_rejected(saved, tmp_path):
    """Valid JSON with one number changed (a metric) fails the meta checksum."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    path = directory / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["metrics"][0] = 0.75
    path.write_text(json.dumps(meta))
    restored, rejected = restore(directory, tree_of(0))
    assert restored.step == 1
    assert rejected[0].step == 2 and "meta" in rejected[0].reason


def test_every_checkpoint_damaged_gives_none_and_keeps_them(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    for step in (1, 2):
        (directory / str(step) / "meta" / "metadata").write_text("{damaged")
    restored, rejected = restore(directory, tree_of(0))
    assert restored is None
    assert [r.step for r in rejected] == [2, 1]
    checkpointer = checkpointing.RunCheckpointer(directory, save_every=1)
    try:
        assert [p.name for p in checkpointer.quarantined()] == ["corrupt-1", "corrupt-2"]
        assert checkpointer.complete_steps() == []
    finally:
        checkpointer.close()


def test_damaged_twice_at_the_same_step_keeps_both(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    shutil.copytree(saved / "2", directory / "corrupt-2")  # From an earlier run.
    (directory / "2" / "meta" / "metadata").write_text("{damaged")
    restored, rejected = restore(directory, tree_of(0))
    assert restored.step == 1
    assert rejected[0].moved_to.name.startswith("corrupt-2-")
    assert (directory / "corrupt-2").is_dir()


def test_template_of_another_model_is_refused_and_nothing_moved(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    other = tree_of(0)
    other["params"]["w"] = jnp.zeros((3, 999), jnp.float32)
    other["params"]["extra"] = jnp.zeros(2)
    checkpointer = checkpointing.RunCheckpointer(directory, save_every=1)
    try:
        with pytest.raises(checkpointing.CheckpointMismatchError) as error:
            checkpointer.restore_latest(other)
        assert not checkpointer.rejected
    finally:
        checkpointer.close()
    message = str(error.value)
    assert "params/w is float32[3, 1000], expected float32[3, 999]" in message
    assert "params/extra is missing" in message
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_checkpoint_without_checksums_restores_unverified(saved, tmp_path):
    """Checkpoints written before checksums existed still resume (with a warning)."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    for step in (1, 2):
        path = directory / str(step) / "meta" / "metadata"
        meta = json.loads(path.read_text())
        del meta[checkpointing.INTEGRITY_KEY]
        path.write_text(json.dumps(meta))
    restored, rejected = restore(directory, tree_of(0))
    assert restored.step == 2 and not restored.verified and not rejected
    assert_equal_trees(restored.state, tree_of(2))


def test_check_meta_refusal_propagates_and_moves_nothing(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)

    def refuse(step, meta):
        raise RuntimeError(f"not this run: {step} {meta['step']}")

    checkpointer = checkpointing.RunCheckpointer(directory, save_every=1)
    try:
        with pytest.raises(RuntimeError, match="not this run: 2 2"):
            checkpointer.newest_meta(refuse)
        with pytest.raises(RuntimeError, match="not this run: 2 2"):
            checkpointer.restore_latest(tree_of(0), refuse)
        assert checkpointer.newest_meta() == (2, {"step": 2, "metrics": [0.5, None, 2]})
    finally:
        checkpointer.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_meta_with_nan_is_refused_at_save(tmp_path):
    checkpointer = checkpointing.RunCheckpointer(tmp_path, save_every=1)
    try:
        with pytest.raises(ValueError):
            checkpointer.save(1, tree_of(1), {"loss": float("nan")})
    finally:
        checkpointer.close()
