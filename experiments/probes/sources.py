"""The trained models a probe looks at (``experiments/probes/probe.py``), and their validation data.

Two kinds of source:

* a study's workdir (``python -m experiments.run``): its newest checkpoint that
  verifies, one model per read and seed. The checkpoint is only read: a damaged one is
  skipped with a warning, never moved aside (that is the training run's business).
* reference PyTorch checkpoints (``.pt``, ``orthorecall.reference_checkpoint``).

Every model is probed on its own run's validation set (``data.reference_validation_set``
with the model's training seed), so a probe's native numbers are the run's own.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from experiments.study.cli import ConfigError
from experiments.study.workdir import WorkdirError
from orthorecall import data
from orthorecall import model as model_lib

CHECKPOINTS_DIR = "checkpoints"
# The reference's validation set: 16 batches of 16 sequences.
REFERENCE_VALIDATION = (16, 16)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """One trained model and what its probes need.

    Attributes:
        label: the record's identifying fields (``ckpt`` or ``workdir`` and ``step``,
            ``variant``: the trained read's name, ``seed``).
        params: its parameters (no seed axis).
        config: its model configuration (the read it was trained with).
        task: the task it was trained on.
        seed: its training seed (the validation set is drawn from 10000 + seed).
        batch_size: sequences per validation batch (accuracy is a mean over batches).
        num_sequences: its run's validation set size.
    """

    label: dict
    params: Any
    config: model_lib.ModelConfig
    task: data.NoisyRecallTask
    seed: int
    batch_size: int
    num_sequences: int


def validation_batches(model: TrainedModel, num_sequences: int | None = None):
    """The first ``num_sequences`` (default: the run's whole set) of the model's
    validation sequences, as (inputs, targets) of shape (batches, batch_size, T).

    Raises:
        ConfigError: a count that is not a multiple of the batch size.
    """
    count = model.num_sequences if num_sequences is None else num_sequences
    if count < 1 or count % model.batch_size:
        raise ConfigError(
            f"--num_sequences={count}: must be a positive multiple of the validation batch "
            f"size {model.batch_size} (accuracy is the mean over batches, as the reference "
            "computes it)."
        )
    inputs, targets = data.reference_validation_set(
        model.task,
        seed=model.seed,
        num_batches=count // model.batch_size,
        batch_size=model.batch_size,
    )
    return inputs, targets


# ---------------------------------------------------------------------------------------
# Reference checkpoints
# ---------------------------------------------------------------------------------------


def from_checkpoints(paths: Sequence[str]) -> list[TrainedModel]:
    """The models of reference ``.pt`` files.

    Raises:
        ConfigError: a missing or unreadable file, or one that is not a reference model.
    """
    from orthorecall import reference_checkpoint  # torch_format: only when asked for

    models = []
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--checkpoint={path}: no such file.")
        try:
            checkpoint = reference_checkpoint.load_reference_checkpoint(path)
            cfg = checkpoint.cfg
            if cfg.get("seed") is None:
                raise ValueError("the stored cfg lacks 'seed'; its validation set is unknown.")
            task = data.NoisyRecallTask.from_mapping(cfg)
        except (OSError, ValueError) as e:  # TorchCheckpointError is a ValueError
            raise ConfigError(f"--checkpoint={path}: {e}") from None
        batches = int(cfg.get("val_batches") or REFERENCE_VALIDATION[0])
        batch_size = int(cfg.get("val_batch_size") or REFERENCE_VALIDATION[1])
        label = {"ckpt": os.path.basename(path), "variant": cfg["variant"], "seed": cfg["seed"]}
        models.append(
            TrainedModel(
                label=label,
                params=checkpoint.params,
                config=checkpoint.config,
                task=task,
                seed=int(cfg["seed"]),
                batch_size=batch_size,
                num_sequences=batches * batch_size,
            )
        )
    return models


# ---------------------------------------------------------------------------------------
# A study's workdir
# ---------------------------------------------------------------------------------------


def _newest_verified_checkpoint(directory: pathlib.Path):
    """(step, state tree, meta) of the newest checkpoint that verifies; nothing is moved."""
    from orthorecall import checkpointing  # Orbax: only when a workdir is probed

    checkpointer = checkpointing.RunCheckpointer(directory, save_every=1)
    try:
        steps = checkpointer.complete_steps()
        if not steps:
            raise WorkdirError(f"{directory} holds no complete checkpoint to probe.")
        failures = []
        for step in steps:
            try:
                meta, _ = checkpointer.read_meta(step)
                state = checkpointer.read_state(step, None, meta)
            except checkpointing.CheckpointVerificationError as e:
                logging.warning(
                    "checkpoint %d of %s fails verification (%s); trying an older one",
                    step,
                    directory,
                    e,
                )
                failures.append(f"step {step}: {e}")
                continue
            return step, state, meta
        raise WorkdirError(
            f"no checkpoint in {directory} passes verification: {'; '.join(failures)}."
        )
    finally:
        checkpointer.close()


def from_workdir(
    workdir: str, names: Sequence[str] | None = None, seeds: Sequence[int] | None = None
) -> list[TrainedModel]:
    """The models of a study's newest verified checkpoint: every read (or ``names``) and
    every seed (or ``seeds``), in the run's order.

    A read trained under the scaffold anneal (``ns5_anneal``) is the model of its read
    (``ns5``), as ``experiments.study.train.model_configs`` builds it.

    Raises:
        WorkdirError: no such workdir, no checkpoint, none that verifies.
        ConfigError: a name or seed the run does not have, or a stored configuration
            that no longer validates.
    """
    from experiments.study import study_config  # the study's configuration rules

    root = pathlib.Path(workdir)
    if not root.is_dir():
        raise WorkdirError(f"--workdir={workdir}: no such directory.")
    directory = root / CHECKPOINTS_DIR
    if not directory.is_dir():
        raise WorkdirError(
            f"{root} has no {CHECKPOINTS_DIR}/ folder: is it a workdir of python -m "
            "experiments.run?"
        )
    step, state, meta = _newest_verified_checkpoint(directory)
    if "config" not in meta:
        raise WorkdirError(
            f"the checkpoint of step {step} in {directory} does not record its configuration."
        )
    config = ml_collections.ConfigDict(meta["config"])
    configs = study_config.model_configs(config)
    task = study_config.task_from_config(config)
    run_seeds = [config.seeds.first_seed + i for i in range(config.seeds.num_seeds)]
    names = list(configs) if names is None else list(names)
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise ConfigError(f"--models: {unknown} not trained in {root}; it has {list(configs)}.")
    seeds = run_seeds if seeds is None else list(seeds)
    missing = [seed for seed in seeds if seed not in run_seeds]
    if missing:
        raise ConfigError(f"--seeds: {missing} not in the run of {root} (seeds {run_seeds}).")
    models = []
    for name in names:
        seed_state = state["states"][name]
        nonfinite = np.asarray(seed_state["nonfinite"])
        host_params = jax.tree_util.tree_map(np.asarray, seed_state["params"])
        for seed in seeds:
            index = run_seeds.index(seed)
            params = jax.tree_util.tree_map(lambda a, i=index: a[i], host_params)
            label = {
                "workdir": str(root),
                "step": step,
                "variant": name,
                "seed": seed,
                "diverged": bool(nonfinite[index]),
            }
            models.append(
                TrainedModel(
                    label=label,
                    params=params,
                    config=configs[name],
                    task=task,
                    seed=seed,
                    batch_size=config.train.val_batch_size,
                    num_sequences=config.train.val_batches * config.train.val_batch_size,
                )
            )
    return models
