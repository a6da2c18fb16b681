"""The multi-seed, multi-read training loop with checkpoints and reports.

``train_and_evaluate(config, workdir)`` validates the configuration, locks
``workdir``, checks that its checkpoints are of this configuration, builds
every seed's state for every read, resumes from the newest checkpoint that
verifies when there is one, trains with one jitted step for all seeds and reads,
evaluates every ``eval_every`` steps on each seed's reference validation set,
checkpoints asynchronously, and writes the report (``experiments.report``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import string
import time
from collections.abc import Sequence
from typing import IO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.cli import ConfigError
from experiments.progress import Progress
from experiments.report.statistics import finite_or_none
from experiments.stopping import StopOnSignal
from experiments.summaries import RunSummaries, finite_mean
from experiments.workdir import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    WorkdirLock,
    check_workdir_without_checkpoint,
    checkpoint_config_check,
    config_fingerprint,
    restore_latest_or_refuse,
)
from orthorecall import (
    anneal,
    checkpointing,
    data,
    evaluation,
    footprint,
    host_data,
    mlstm,
    multihost,
    reference_checkpoint,
    training,
)
from orthorecall import cell as cell_lib
from orthorecall import model as model_lib
from orthorecall.reads import read_from_name
from orthorecall.validation import check_int

TENSORBOARD_DIR = "tensorboard"
# Every train.log_every steps: one row per read and seed (loss, gradient norm, rate).
TRAIN_LOG_FILE = "train_log.jsonl"
# What config.init_from's path may name, replaced by each seed's number and read's name.
INIT_FROM_PLACEHOLDERS = ("seed", "read")
# A read name ending in this trains that read under the scaffold anneal (config.anneal).
ANNEAL_SUFFIX = "_anneal"


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


def _reason(error: ValueError, name: str) -> str:
    """The library's "NAME must ..." message without its leading NAME."""
    message = str(error)
    return message[len(name) + 1 :] if message.startswith(f"{name} ") else message


def _get(config: ml_collections.ConfigDict, field: str):
    node = config
    for part in field.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            _fail(field, "is missing; start from a preset of experiments/configs/noisy_ar.py.")
    return node


def _check_int(field: str, value, minimum: int, maximum: int | None = None, hint: str = "") -> int:
    try:
        value = check_int(field, value, minimum=minimum)
    except ValueError as e:
        _fail(field, f"{_reason(e, field)}.")
    if maximum is not None and value > maximum:
        _fail(field, f"must be <= {maximum}, got {value}{hint}.")
    return value


def _check_real(field: str, value, hint: str, **bounds) -> float:
    try:
        return training.check_real(field, value, **bounds)
    except ValueError as e:
        _fail(field, f"{_reason(e, field)}; {hint}.")


def _check_choice(field: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(field, f"{value!r} is not one of {choices}.")
    return value


def _check_name(name) -> None:
    # The default workdir is workdirs/<name>: one path component.
    if not isinstance(name, str) or not name.strip():
        _fail("name", f"must be a non-empty string (the run's folder name), got {name!r}.")
    if name in (".", "..") or any(c in name for c in "/\\\0") or not name.isprintable():
        _fail(
            "name",
            f"{name!r} cannot be a folder name; use letters, digits, '_', '-' or '.', "
            "without '/' or '\\\\'.",
        )
    if name != name.strip() or len(name.encode()) > 255:
        _fail("name", f"{name!r} has leading or trailing spaces or is over 255 bytes.")


def _section(config: ml_collections.ConfigDict, section: str, known) -> dict:
    """The fields of ``config.<section>`` as a dict, refusing fields it does not know."""
    node = _get(config, section)
    fields = node.to_dict() if hasattr(node, "to_dict") else node
    if not isinstance(fields, dict):
        _fail(section, f"must be a ConfigDict of fields, got {node!r}.")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        _fail(section, f"unknown field(s) {unknown}; its fields are {sorted(known)}.")
    return fields


def _section_error(section: str, error: Exception, fields) -> None:
    """A library ValueError/TypeError about a section's field, as the field's ConfigError."""
    message = str(error)
    for field in sorted(fields, key=len, reverse=True):  # chunk_size before chunk
        if message.startswith(f"{field} ") or message.startswith(f"{field}="):
            reason = message[len(field) :].lstrip(" =")
            _fail(f"{section}.{field}", reason if reason.endswith(".") else f"{reason}.")
    _fail(section, message if message.endswith(".") else f"{message}.")


def read_names(config: ml_collections.ConfigDict) -> list[str]:
    """The names of ``config.reads``, in order.

    Raises:
        ConfigError: not a comma-separated string of names.
    """
    reads = _get(config, "reads")
    if not isinstance(reads, str):
        _fail("reads", f"must be a comma-separated string such as 'raw,ns5', got {reads!r}.")
    names = [name.strip() for name in reads.split(",") if name.strip()]
    if not names:
        _fail("reads", "no read given; use e.g. 'raw,ns5'.")
    return names


def annealed_reads(names: Sequence[str]) -> list[str]:
    """The reads trained under the scaffold anneal: the names ending in ``_anneal``
    (``ns5_anneal``: the ns5 model, its read annealed into the raw one)."""
    return [name for name in names if name.endswith(ANNEAL_SUFFIX)]


def anneal_schedule(config: ml_collections.ConfigDict) -> anneal.AnnealSchedule | None:
    """The ``config.anneal`` schedule when some read is annealed, else None.

    Raises:
        ConfigError: an ``_anneal`` read without an ``anneal`` section, or a bad field.
    """
    if not annealed_reads(read_names(config)):
        return None
    if "anneal" not in config:
        _fail(
            "anneal",
            "is missing: reads ending in '_anneal' follow the schedule of a config.anneal "
            "section (mode, start, end, threshold, dwell, span, settle); start from the "
            "cpu_anneal preset of experiments/configs/noisy_ar.py.",
        )
    fields = _section(config, "anneal", [f.name for f in dataclasses.fields(anneal.AnnealSchedule)])
    try:
        return anneal.AnnealSchedule(**fields)
    except (ValueError, TypeError) as e:
        _section_error("anneal", e, fields)


def model_configs(config: ml_collections.ConfigDict) -> dict[str, model_lib.ModelConfig]:
    """Read name -> ModelConfig, validating every model and read field.

    Raises:
        ConfigError: naming the offending field; reads listed twice, also under two
            names of the same read ('baseline' and 'raw', 'ns05' and 'ns5').
    """
    names = read_names(config)
    reads = {}
    for name in names:
        annealed = name.endswith(ANNEAL_SUFFIX)
        try:
            read = read_from_name(name.removesuffix(ANNEAL_SUFFIX) if annealed else name)
            if annealed:
                mlstm.check_read_mix(read, 1.0)
        except ValueError as e:
            _fail("reads", str(e))
        read = (read, annealed)
        for other, other_read in reads.items():
            if other == name:
                _fail("reads", f"{name!r} is listed twice; list each read once.")
            if other_read == read:
                _fail(
                    "reads",
                    f"{name!r} is the same read as {other!r}: it would train the same model "
                    "twice and compare it with itself; list each read once.",
                )
        reads[name] = read
    # The read comes from config.reads, not from the model's fields.
    known = [f.name for f in dataclasses.fields(cell_lib.CellConfig) if f.name != "read"]
    fields = _section(config, "model", known)
    if "proj_factor" in fields:  # CellConfig would take True, fail with a bare TypeError
        # on a string and overflow on inf; the memory estimate needs it finite.
        _check_real(
            "model.proj_factor",
            fields["proj_factor"],
            "the inner width is proj_factor x embedding_dim (reference 2.0)",
            minimum=0,
            minimum_inclusive=False,
        )
    configs = {}
    for name, (read, _) in reads.items():
        try:
            cell = cell_lib.CellConfig(read=read, **fields)
        except (ValueError, TypeError, OverflowError) as e:
            _section_error("model", e, fields)
        try:
            configs[name] = model_lib.ModelConfig(vocab_size=config.task.vocab_size, cell=cell)
        except (ValueError, TypeError) as e:
            _section_error("task", e, ["vocab_size"])
    return configs


def task_from_config(config: ml_collections.ConfigDict) -> data.NoisyRecallTask:
    """The task of ``config.task``.

    Raises:
        ConfigError: naming the offending field.
    """
    fields = _section(config, "task", [f.name for f in dataclasses.fields(data.NoisyRecallTask)])
    try:
        return data.NoisyRecallTask(**fields)
    except (ValueError, TypeError) as e:
        _section_error("task", e, [f.name for f in dataclasses.fields(data.NoisyRecallTask)])


def init_from_paths(
    config: ml_collections.ConfigDict, names: Sequence[str], seeds: Sequence[int]
) -> dict[str, list[pathlib.Path]] | None:
    """Read name -> the file each seed of ``seeds`` starts from (``config.init_from``,
    its ``{seed}`` and ``{read}`` replaced), or None when the run starts from our
    initializer. Checks the template only, not the files.

    Raises:
        ConfigError: not a path, or a placeholder other than ``{seed}`` and ``{read}``.
    """
    template = config.get("init_from")
    if template is None:
        return None
    hint = (
        "give the path of a reference checkpoint (.pt), where {seed} and {read} stand for "
        "each seed's number and each read's name, e.g. "
        "data/reference_parity/init/v80_s512_seed{seed}_init.pt"
    )
    if not isinstance(template, str) or not template.strip():
        _fail("init_from", f"must be None or a path, got {template!r}; {hint}.")
    try:
        fields = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as e:
        _fail("init_from", f"{template!r} is not a path template ({e}); {hint}.")
    unknown = [field for field in fields if field not in INIT_FROM_PLACEHOLDERS]
    if unknown:
        _fail(
            "init_from",
            f"{template!r} names {unknown}: the only placeholders are {{seed}} and "
            "{read} (write {{ and }} for literal braces).",
        )
    try:
        return {
            name: [pathlib.Path(template.format(seed=int(s), read=name)) for s in seeds]
            for name in names
        }
    except (ValueError, TypeError) as e:
        _fail("init_from", f"{template!r} cannot be filled in ({e}); {hint}.")


def load_initial_params(
    config: ml_collections.ConfigDict,
    configs: dict[str, model_lib.ModelConfig],
    seeds: Sequence[int],
) -> dict[str, list] | None:
    """Read name -> each seed's initial parameters from ``config.init_from`` (None when
    it is not set). Every file is checked (``reference_checkpoint.
    check_initial_checkpoint``: no tensor data read) before any is loaded.

    Raises:
        ConfigError: a missing or unreadable file, or one whose widths differ from the
            configuration's, naming the seed, the read, and the field or tensor.
    """
    paths = init_from_paths(config, list(configs), seeds)
    if paths is None:
        return None

    def attempt(action, name, seed, path):
        try:
            return action(path, configs[name])
        except FileNotFoundError:
            _fail(
                "init_from",
                f"{path} does not exist (seed {seed}, read {name!r}); check the path and "
                "its {seed} / {read} placeholders.",
            )
        except (ValueError, OSError) as e:
            _fail("init_from", f"seed {seed}, read {name!r}: {e}")

    for name, files in paths.items():
        for seed, path in zip(seeds, files, strict=True):
            attempt(reference_checkpoint.check_initial_checkpoint, name, seed, path)
    loaded = {}  # One load per file, however many seeds and reads start from it.
    params = {name: [] for name in paths}
    for name, files in paths.items():
        for seed, path in zip(seeds, files, strict=True):
            if path not in loaded:
                loaded[path] = attempt(reference_checkpoint.initial_params, name, seed, path)
            params[name].append(loaded[path])
    return params


# Seeds become uint32 PRNG keys (PRNGKey(s) keeps s mod 2**32: first_seed=2**32 would
# silently rerun seed 0).
SEED_LIMIT = 2**32
# A refused validation set would take longer than this to draw (data.reference_
# validation_set, on one core: the published presets' 24 x 16 x 16 sequences take 31-63 s
# at footprint's conservative rate, 15-30 s measured; this allows 10x the reference's
# sets at seq_len 1024, 20x at 512).
MAX_VALIDATION_SECONDS = 600.0
# ... and the numpy training stream longer than this per step (the reference preset
# with data_source="numpy" takes about 8 s per step at that rate).
MAX_NUMPY_BATCH_SECONDS = 60.0


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    available_memory: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, model_lib.ModelConfig]:
    """Checks everything that can be checked before any compute (in milliseconds: no
    compile, no data generation): every field's type and range, reads that alias each
    other, the seed range, and whether a training step and an evaluation fit in the
    devices' memory (``orthorecall.footprint``) and the validation set can be drawn in
    reasonable time.

    Args:
        config: the study's configuration.
        available_memory: bytes each device can use; default: asked from ``devices``
            (``footprint.per_device_available_memory``: on CPU the host's available
            memory, split between the CPU devices).
        devices: the devices the seeds are sharded over; default ``jax.devices()``, as
            ``training.seed_mesh``.

    Returns:
        The model configuration of every read.

    Raises:
        ConfigError: naming the offending field and the constraint.
    """
    _check_name(_get(config, "name"))
    task = task_from_config(config)
    if not task.multi_query:
        _fail(
            "task.multi_query",
            "the study uses multi_query=True; single-query training "
            "targets are not supported by the trainer.",
        )
    if task.ignore_index != evaluation.IGNORE_INDEX:
        _fail(
            "task.ignore_index",
            f"the trainer scores with evaluation.IGNORE_INDEX ({evaluation.IGNORE_INDEX}), so "
            f"validation targets marked {task.ignore_index} would be scored; leave the field "
            "out.",
        )
    for field in (
        "batch_size",
        "eval_every",
        "val_batches",
        "val_batch_size",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
    ):
        _check_int(f"train.{field}", _get(config, f"train.{field}"), minimum=1)
    # Optional: configurations written before the field existed leave it out.
    segment_length = _get(config, "train").get("segment_length")
    if segment_length is not None:
        _check_int("train.segment_length", segment_length, minimum=1)
    steps = _check_int(
        "train.steps",
        _get(config, "train.steps"),
        1,
        training.MAX_STEPS,
        " (optax's int32 step count)",
    )
    _check_real(
        "train.learning_rate",
        _get(config, "train.learning_rate"),
        "the peak learning rate (reference 3e-3)",
        minimum=0,
        minimum_inclusive=False,
    )
    schedule = _check_choice("train.schedule", _get(config, "train.schedule"), training.SCHEDULES)
    stretch_steps = _check_int(
        "train.stretch_steps",
        _get(config, "train.stretch_steps"),
        1,
        training.MAX_STEPS,
        " (optax's int32 step count)",
    )
    if schedule == "stretched_cosine" and stretch_steps < steps:
        _fail(
            "train.stretch_steps",
            f"must be >= train.steps ({steps}) for stretched_cosine, got {stretch_steps}.",
        )
    for field, hint in (
        ("b1", "Adam's first-moment decay (reference 0.9)"),
        ("b2", "Adam's second-moment decay (reference 0.999)"),
    ):
        _check_real(
            f"train.{field}",
            _get(config, f"train.{field}"),
            hint,
            minimum=0,
            maximum=1,
            maximum_inclusive=False,
        )
    _check_real(
        "train.eps",
        _get(config, "train.eps"),
        "Adam's denominator floor (reference 1e-8)",
        minimum=0,
        minimum_inclusive=False,
    )
    _check_real(
        "train.weight_decay",
        _get(config, "train.weight_decay"),
        "0 disables it (reference 0.01)",
        minimum=0,
    )
    clip_norm = _get(config, "train.clip_norm")
    if clip_norm is not None:
        _check_real(
            "train.clip_norm",
            clip_norm,
            "None disables the clip (reference 1.0)",
            minimum=0,
            minimum_inclusive=False,
        )
    _check_choice("train.data_source", _get(config, "train.data_source"), ("jax", "numpy"))
    num_seeds = _check_int("seeds.num_seeds", _get(config, "seeds.num_seeds"), minimum=1)
    first_seed = _check_int("seeds.first_seed", _get(config, "seeds.first_seed"), minimum=0)
    if first_seed + num_seeds > SEED_LIMIT:
        _fail(
            "seeds.first_seed",
            f"seeds {first_seed}..{first_seed + num_seeds - 1} go past 2**32 - 1: seeds "
            "are uint32 PRNG keys, so seed 2**32 + s would repeat seed s; keep "
            f"seeds.first_seed + seeds.num_seeds <= {SEED_LIMIT}.",
        )
    _check_real(
        "solved_threshold",
        _get(config, "solved_threshold"),
        "the accuracy that counts a seed as solved (reference 0.8)",
        minimum=0,
        maximum=1,
        minimum_inclusive=False,
    )
    configs = model_configs(config)
    init_from_paths(config, list(configs), [first_seed])
    schedule = anneal_schedule(config)
    if schedule is not None and schedule.mode == "window" and schedule.end > config.train.steps:
        _fail(
            "anneal.end",
            f"the window ends at step {schedule.end}, after the run's {config.train.steps} "
            "steps: its last evaluation would not see α = 0; end it by train.steps.",
        )
    taps = next(iter(configs.values())).cell.conv_kernel_size
    if taps > task.example_len:
        # Each tap is traced as its own operations: 10**5 taps take minutes to trace.
        _fail(
            "model.conv_kernel_size",
            f"must be <= the {task.example_len} positions of a sequence (task.seq_len - 1), "
            f"got {taps}: taps further back only ever see zeros (reference 4).",
        )
    _check_resources(config, task, configs, available_memory, devices)
    return configs


def _check_resources(config, task, configs, available_memory, devices) -> None:
    """Refuses a configuration whose steps cannot fit in the devices' memory even one
    seed at a time (``orthorecall.footprint``) or whose numpy data would take too long
    to draw."""
    devices = list(jax.devices() if devices is None else devices)
    seed_groups(config, configs, available_memory=available_memory, devices=devices)
    # As training.padded_seed_count: every device holds the same number of seeds.
    seeds_per_device = -(-config.seeds.num_seeds // len(devices))
    _check_generation_time(config, task, seeds_per_device * len(devices))


def seed_groups(
    config: ml_collections.ConfigDict,
    configs: dict[str, model_lib.ModelConfig],
    *,
    available_memory: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> int:
    """How many groups of seeds the trainer updates and evaluates one after the other on
    each device (``training.make_train_step``'s ``seed_groups``): 1 when a training step
    and an evaluation of all the device's seeds fit in its memory, otherwise the fewest
    groups (a divisor of the device's seed count) that make both fit, from
    ``orthorecall.footprint``'s estimates. Nothing about the results depends on it, so
    it is decided on the machine at hand and not part of the configuration.

    Args: as :func:`validate_config` (``configs`` is what that returns).

    Raises:
        ConfigError: the parameters or the validation set alone do not fit, or even one
            seed at a time does not.
    """
    devices = list(jax.devices() if devices is None else devices)
    seeds_per_device = -(-config.seeds.num_seeds // len(devices))
    train, length = config.train, task_from_config(config).example_len
    reads = list(configs.values())
    backend = devices[0].platform
    state = footprint.state_bytes(reads, seeds_per_device=seeds_per_device)
    val_set = footprint.validation_set_bytes(
        num_sequences=seeds_per_device * train.val_batches * train.val_batch_size,
        seq_len=length,
    )
    # The trainer also keeps host copies of the validation set (every seed's, and their
    # stack), which on CPU come out of the devices' memory.
    host_copies = 2 * val_set if backend == "cpu" else 0

    def train_need(groups):
        # The validation set stays on the devices through training.
        return (
            host_copies
            + val_set
            + footprint.train_step_memory_estimate(
                reads,
                batch_size=train.batch_size,
                seq_len=length,
                seeds_per_device=seeds_per_device,
                backend=backend,
                segment_length=train.get("segment_length"),
                seed_groups=groups,
            )
        )

    def eval_need(groups):
        # The optimizer state stays on the devices through evaluation.
        return (
            host_copies
            + state
            + footprint.eval_step_memory_estimate(
                reads,
                num_batches=train.val_batches,
                batch_size=train.val_batch_size,
                seq_len=length,
                seeds_per_device=seeds_per_device,
                backend=backend,
                seed_groups=groups,
            )
        )

    if available_memory is None:
        available_memory = multihost.agreed_minimum(
            footprint.per_device_available_memory(_local(devices))
        )
    if available_memory is None:  # The platform reports nothing: nothing to compare with.
        return 1
    where = (
        f"per device ({seeds_per_device} seed(s) x {len(reads)} read(s) on each of "
        f"{len(devices)} device(s))"
    )
    available = footprint.format_bytes(available_memory)
    if state > available_memory:
        _fail(
            "model",
            f"the parameters and optimizer state alone need about "
            f"{footprint.format_bytes(state)} {where}, the device has {available} available; "
            "reduce model.embedding_dim, model.proj_factor, model.num_blocks or "
            "task.vocab_size, or seeds.num_seeds.",
        )
    if host_copies + val_set > available_memory:
        _fail(
            "train.val_batch_size",
            f"the validation sets alone need about "
            f"{footprint.format_bytes(host_copies + val_set)} {where}, the device has "
            f"{available} available; reduce train.val_batch_size or train.val_batches.",
        )
    divisors = [g for g in range(1, seeds_per_device + 1) if seeds_per_device % g == 0]
    for groups in divisors:
        if train_need(groups) <= available_memory and eval_need(groups) <= available_memory:
            return groups
    if train_need(seeds_per_device) > available_memory:
        _fail(
            "train.batch_size",
            f"one training step needs about "
            f"{footprint.format_bytes(train_need(seeds_per_device))} {where} even with one "
            f"seed at a time, the device has {available} available; reduce "
            "train.batch_size or task.seq_len, "
            "set or lower train.segment_length (or model.chunk_size for a Newton-Schulz "
            "read, or the model's width).",
        )
    _fail(
        "train.val_batch_size",
        f"one evaluation needs about {footprint.format_bytes(eval_need(seeds_per_device))} "
        f"{where} even with one seed at a time, the device has {available} available; reduce "
        "train.val_batch_size or train.val_batches.",
    )


def _local(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """The devices of this process among ``devices`` (whose memory it can ask about)."""
    if jax.process_count() == 1:
        return list(devices)
    return [d for d in devices if d.process_index == jax.process_index()]


def _check_generation_time(config, task, padded_seeds) -> None:
    # Every padded seed's validation set (and, with the numpy source, training batch) is
    # drawn by data's Python generator on one host core, before the first evaluation.
    train = config.train
    seconds = footprint.numpy_generation_seconds(
        num_sequences=padded_seeds * train.val_batches * train.val_batch_size,
        seq_len=task.full_len,
    )
    if seconds > MAX_VALIDATION_SECONDS:
        _fail(
            "train.val_batch_size",
            f"the validation sets ({padded_seeds} seeds x {train.val_batches} x "
            f"{train.val_batch_size} sequences of {task.full_len} tokens) would take about "
            f"{_duration(seconds)} to draw with data.reference_validation_set (about "
            f"{footprint.NUMPY_TOKENS_PER_SECOND:.0e} tokens/s); reduce train.val_batches or "
            "train.val_batch_size (the reference evaluates 16 x 16 sequences per seed) or "
            f"task.seq_len to stay under {_duration(MAX_VALIDATION_SECONDS)}.",
        )
    if train.data_source == "numpy":
        seconds = footprint.numpy_generation_seconds(
            num_sequences=padded_seeds * train.batch_size, seq_len=task.full_len
        )
        if seconds > MAX_NUMPY_BATCH_SECONDS:
            _fail(
                "train.batch_size",
                f"with train.data_source='numpy' every step draws {padded_seeds} x "
                f"{train.batch_size} sequences of {task.full_len} tokens on the host, about "
                f"{_duration(seconds)} per step; use train.data_source='jax' (the same "
                "distribution, drawn on the device) or reduce train.batch_size or "
                "seeds.num_seeds.",
            )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_description(config, names) -> dict:
    """What ``experiments.report`` needs to know about the run."""
    return {
        "name": config.name,
        "regime": f"v{config.task.vocab_size}_s{config.task.seq_len}",
        "total_steps": config.train.steps,
        "eval_every": config.train.eval_every,
        "reads": names,
        "num_seeds": config.seeds.num_seeds,
        "seeds": list(
            range(config.seeds.first_seed, config.seeds.first_seed + config.seeds.num_seeds)
        ),
        "solved_threshold": config.solved_threshold,
        "batch_size": config.train.batch_size,
        "vocab_size": config.task.vocab_size,
        "seq_len": config.task.seq_len,
        "noise_vocab_size": config.task.noise_vocab_size,
        "frac_noise": config.task.frac_noise,
        "multi_query": config.task.multi_query,
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
        "config": json.loads(config.to_json()),
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    tensorboard: bool = True,
    console: IO[str] | None = None,
) -> dict:
    """Runs (or resumes) the study described by ``config`` in ``workdir``.

    Args:
        config: the study's configuration (``experiments/configs/noisy_ar.py``).
        workdir: where checkpoints, metrics, TensorBoard events and the report go.
        tensorboard: also write TensorBoard event files under ``workdir/tensorboard``
            (``experiments.summaries``).
        console: where progress goes (default stdout): a progress bar when it is a
            terminal, plain status lines otherwise (``experiments.progress``).

    Returns:
        The results dict written to ``workdir/results.json``.

    Raises:
        ConfigError: an invalid configuration, before anything is written.
        WorkdirError: a workdir in use by another process, of another configuration,
            or holding only damaged checkpoints; before any compute.
    """
    configs = validate_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if not multihost.is_primary():
        # Process 0 holds the lock for all; the others write nothing and print nothing.
        with open(os.devnull, "w") as silent:
            return _train_in_workdir(config, configs, workdir, False, silent)
    with WorkdirLock(workdir):
        return _train_in_workdir(config, configs, workdir, tensorboard, console)


def _train_in_workdir(config, configs, workdir, tensorboard, console) -> dict:
    """train_and_evaluate, once the configuration is valid and the workdir locked."""
    from experiments import report  # Plotting stays out of library imports.

    names = list(configs)
    annealed = annealed_reads(names)
    schedule = anneal_schedule(config)
    primary = multihost.is_primary()  # The one process that writes files.
    config_dict = json.loads(config.to_json())
    fingerprint = config_fingerprint(config_dict)
    train = config.train
    checkpointer = checkpointing.RunCheckpointer(
        workdir / "checkpoints", save_every=train.checkpoint_every, keep=train.keep_checkpoints
    )
    streams = None  # The numpy data source's host streams (host_data.ParallelStreams).
    try:
        # Before any compute: the newest checkpoint must be of this configuration.
        check_config = checkpoint_config_check(workdir, config_dict)
        initial = None
        if checkpointer.newest_meta(check_config) is None:
            check_workdir_without_checkpoint(workdir, checkpointer, config_dict)
            # A fresh start: its config.init_from files are checked before any compute
            # (a resumed run never reads them again).
            num_seeds = config.seeds.num_seeds
            initial = load_initial_params(
                config, configs, range(config.seeds.first_seed, config.seeds.first_seed + num_seeds)
            )

        task = task_from_config(config)
        groups = seed_groups(config, configs)
        mesh = training.seed_mesh()
        num_seeds = config.seeds.num_seeds
        seeds = config.seeds.first_seed + np.arange(training.padded_seed_count(num_seeds, mesh))
        optimizer = training.make_optimizer(
            learning_rate=train.learning_rate,
            total_steps=train.steps,
            schedule=train.schedule,
            stretch_steps=train.stretch_steps,
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            clip_norm=train.clip_norm,
        )

        # Padding seeds (several devices) start from the initializer: they are dropped.
        padding = [None] * (len(seeds) - num_seeds)
        states = {
            name: training.init_seed_states(
                seeds,
                configs[name],
                optimizer,
                None if initial is None else initial[name] + padding,
            )
            for name in names
        }
        # Data keys differ from initialization keys but are fixed by the seed.
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 1))(
            jnp.asarray(seeds, jnp.uint32)
        )
        tree = training.shard_seeds({"states": states, "keys": keys}, mesh)

        step, records, resumed_from = 0, [], None
        # The step at which each seed's gated anneal was triggered (anneal.NOT_TRIGGERED
        # until then), kept in the checkpoint's metadata.
        triggers = {n: np.full(len(seeds), anneal.NOT_TRIGGERED, np.int32) for n in annealed}
        restored = restore_latest_or_refuse(checkpointer, tree, check_config)
        if restored is not None:
            step, tree, records = restored.step, restored.state, restored.meta["metrics"]
            tree = training.shard_seeds(tree, mesh)
            resumed_from = step
            for n in annealed:
                triggers[n] = np.asarray(restored.meta["triggers"][n], np.int32)
        if train.data_source == "numpy":
            # Drawn ahead, in worker processes, while the devices run a step.
            if restored is not None:
                streams = host_data.ParallelStreams.from_states(restored.meta["streams"])
            else:
                streams = host_data.ParallelStreams(task, seeds=seeds, batch_size=train.batch_size)
        description = _run_description(config, names) | {
            "config_fingerprint": fingerprint,
            "seed_groups": groups,
        }
        if primary:
            _atomic_write(workdir / RUN_CONFIG_FILE, json.dumps(description, indent=1))

        val_sets = [
            data.reference_validation_set(
                task, seed=int(s), num_batches=train.val_batches, batch_size=train.val_batch_size
            )
            for s in seeds
        ]
        val_inputs = training.shard_seeds(jnp.asarray(np.stack([v[0] for v in val_sets])), mesh)
        val_targets = training.shard_seeds(jnp.asarray(np.stack([v[1] for v in val_sets])), mesh)
        sample = None
        if streams is None:
            sample = lambda key: data.sample_noisy_recall(key, task, batch_size=train.batch_size)
        train_step = training.make_train_step(
            configs,
            optimizer,
            sample,
            segment_length=train.get("segment_length"),
            seed_groups=groups,
        )
        eval_step = training.make_eval_step(configs, seed_groups=groups)

        # As the report counts them: reached the threshold and never diverged.
        solved = {name: set() for name in names}

        def count_solved(record):
            if record["nonfinite"]:
                solved[record["read"]].discard(record["seed"])
            elif record["accuracy"] is not None and record["accuracy"] >= config.solved_threshold:
                solved[record["read"]].add(record["seed"])

        for r in records:
            count_solved(r)

        def meta():
            # A copy: Orbax writes the JSON item asynchronously, after more records are appended.
            return {
                "step": step,
                "metrics": list(records),
                "streams": None if streams is None else streams.states(),
                "config": config_dict,
                "config_fingerprint": fingerprint,
                "triggers": {n: t.tolist() for n, t in triggers.items()},
            }

        def budgets():
            """Read -> each seed's step budget: train.steps, longer for a seed whose
            gated anneal ends after it (anneal.AnnealSchedule.budget)."""
            out = {n: np.full(len(seeds), train.steps, np.int64) for n in names}
            for n in annealed:
                out[n] = schedule.budget(triggers[n], train.steps)
            return out

        def total_steps() -> int:
            return int(max(b.max() for b in budgets().values()))

        learning_rate = training.learning_rate_schedule(
            train.schedule, train.learning_rate, train.steps, train.stretch_steps
        )
        if primary:
            _truncate_train_log(workdir / TRAIN_LOG_FILE, step)

        def write_metrics():
            if primary:
                _atomic_write(
                    workdir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records)
                )

        summaries = None
        if tensorboard:
            summaries = RunSummaries(
                workdir / TENSORBOARD_DIR, names, seeds[:num_seeds], purge_step=resumed_from
            )
        progress = Progress(total_steps(), step, train.log_every, stream=console)
        if resumed_from is not None:
            damaged = "".join(
                f"; checkpoint of step {r.step} failed verification, moved to {r.moved_to.name}"
                for r in checkpointer.rejected
            )
            progress.note(f"resuming {workdir} from step {resumed_from}{damaged}")
        if groups > 1:
            progress.note(
                f"the seeds of each device run in {groups} groups one after the other: all "
                "at once would not fit in its memory (same results, proportionally slower)"
            )
        # Ctrl-C / SIGTERM stop between steps, with a checkpoint (experiments.stopping).
        stop = StopOnSignal()
        timer = first_step = None

        try:
            with progress:
                while step < total_steps():
                    budget = budgets()
                    read_mix = active = None
                    if annealed:
                        read_mix = training.shard_seeds(
                            {n: schedule.alpha(step, triggers[n]) for n in annealed}, mesh
                        )
                        active = training.shard_seeds({n: step < budget[n] for n in names}, mesh)
                    batch = None
                    if streams is not None:
                        batch = training.shard_seeds(streams.next_batches(), mesh)
                        if timer is not None and step == first_step + THROTTLE_CHECK_STEPS:
                            _note_if_data_throttles(progress, streams, time.perf_counter() - timer)
                    # The anneal's arguments only when there is one: the step of a run
                    # without it is the program it always was.
                    anneal_args = (read_mix, active) if annealed else ()
                    new_states, new_keys, step_metrics = train_step(
                        tree["states"], tree["keys"], batch, *anneal_args
                    )
                    tree = {"states": new_states, "keys": new_keys}
                    if not stop.armed:
                        stop.arm()
                        # Compiled: from here the wait for data is compared with the steps.
                        timer, first_step = time.perf_counter(), step + 1
                        if streams is not None:
                            streams.wait_seconds = 0.0
                    step += 1
                    progress.advance(step)
                    ends = step == train.steps or any(np.any(step == b) for b in budget.values())
                    evaluate_now = step % train.eval_every == 0 or ends
                    log_now = step % train.log_every == 0 or ends
                    if evaluate_now or log_now:
                        # Padding seeds (several devices) are dropped here, once.
                        metrics, bad = multihost.host_copy(
                            (
                                step_metrics,
                                {n: tree["states"][n].nonfinite for n in names},
                            )
                        )
                        metrics = {
                            n: {k: v[:num_seeds] for k, v in m.items()} for n, m in metrics.items()
                        }
                        bad = {n: b[:num_seeds] for n, b in bad.items()}
                        for n in names if annealed else ():
                            # Seeds past their budget were not trained: no loss to show.
                            spent = step > budget[n][:num_seeds]
                            for key in ("loss", "grad_norm"):
                                metrics[n][key] = np.where(spent, np.nan, metrics[n][key])
                    if evaluate_now:
                        eval_mix = None
                        if annealed:
                            eval_mix = training.shard_seeds(
                                {n: schedule.alpha(step, triggers[n]) for n in annealed}, mesh
                            )
                        results = multihost.host_copy(
                            eval_step(
                                tree["states"],
                                val_inputs,
                                val_targets,
                                *((eval_mix,) if annealed else ()),
                            )
                        )
                        new_records = _evaluation_records(
                            step, names, seeds[:num_seeds], results, metrics, bad
                        )
                        if annealed:
                            new_records = _anneal_fields(
                                new_records, step, seeds[:num_seeds], schedule, triggers, budget
                            )
                            for n in annealed:
                                accuracy = np.where(
                                    step <= budget[n], results[n]["accuracy"], np.nan
                                )
                                triggers[n] = schedule.triggered(triggers[n], step, accuracy)
                            if total_steps() > progress.total:
                                progress.note(
                                    f"a seed triggered its anneal at step {step}: the run "
                                    f"goes on to step {total_steps()} so that its last "
                                    "evaluation is at alpha = 0"
                                )
                                progress.extend(total_steps())
                        for record in new_records:
                            records.append(record)
                            count_solved(record)
                        write_metrics()
                        if summaries is not None:
                            summaries.evaluation(
                                step, new_records, {n: len(s) for n, s in solved.items()}
                            )
                        if progress.is_bar:  # The bar keeps no history: one line per evaluation.
                            progress.note(
                                _evaluation_line(step, names, new_records, solved, num_seeds)
                            )
                    if log_now and primary:
                        _append_train_log(
                            workdir / TRAIN_LOG_FILE,
                            _train_log_rows(
                                step,
                                names,
                                seeds[:num_seeds],
                                metrics,
                                bad,
                                learning_rate(step - 1),
                            ),
                        )
                    if log_now:
                        nonfinite = {n: int(np.sum(bad[n])) for n in names}
                        mean_loss = {n: finite_mean(metrics[n]["loss"]) for n in names}
                        progress.update(
                            step,
                            mean_loss,
                            {n: len(s) for n, s in solved.items()},
                            num_seeds,
                            nonfinite,
                        )
                        if summaries is not None:
                            summaries.train(step, metrics)
                    checkpointer.save(step, tree, meta(), force=step >= total_steps())
                    # All processes stop at the same step, whichever one was signalled.
                    if multihost.any_process(stop.requested):
                        break
        finally:
            stop.restore()
            if summaries is not None:
                summaries.close()
        if step < total_steps():  # Stopped by a signal, between two steps.
            print(f"\ninterrupted at step {step}: writing a checkpoint...", flush=True)
            checkpointer.save(step, tree, meta(), force=True)
            checkpointer.close()
            write_metrics()
            print(f"checkpoint of step {step} saved; run the same command to resume.", flush=True)
            raise KeyboardInterrupt
        checkpointer.close()
        write_metrics()
        if primary:
            results = report.build_report(workdir)
            print(report.format_summary(results), flush=True)
        multihost.sync("report")
        if not primary:
            results = json.loads((workdir / report.RESULTS_JSON).read_text())
        return results
    finally:
        checkpointer.close()
        if streams is not None:
            streams.close()


# After this many steps past the first (compiled) one, a run on numpy data says whether
# drawing it holds the devices up.
THROTTLE_CHECK_STEPS = 10
# ... which it does when the loop waited for batches this fraction of the time.
THROTTLE_FRACTION = 0.2


def _note_if_data_throttles(progress, streams, elapsed: float) -> None:
    if elapsed <= 0 or streams.wait_seconds < THROTTLE_FRACTION * elapsed:
        return
    progress.note(
        f"the numpy data source held the devices up: the loop waited "
        f"{100 * streams.wait_seconds / elapsed:.0f}% of the time for batches drawn on the "
        f"host ({streams.workers} worker process(es)). train.data_source='jax' draws the "
        "same distribution on the devices; numpy is the reference's exact stream."
    )


def _train_log_rows(step, names, seeds, metrics, bad, learning_rate) -> list[dict]:
    """The train_log.jsonl rows of one step: that step's training loss, the gradient's
    global norm before clipping and the learning rate the update used, per read and
    seed. A seed that was not updated (diverged, or past its anneal budget) has no rate."""
    rows = []
    for name in names:
        loss, grad_norm = metrics[name]["loss"], metrics[name]["grad_norm"]
        for i, seed in enumerate(seeds):
            updated = not bad[name][i] and np.isfinite(loss[i])
            rows.append(
                {
                    "read": name,
                    "seed": int(seed),
                    "step": step,
                    "loss": finite_or_none(loss[i]),
                    "grad_norm": finite_or_none(grad_norm[i]),
                    "learning_rate": float(learning_rate) if updated else None,
                }
            )
    return rows


def _append_train_log(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def _truncate_train_log(path: pathlib.Path, step: int) -> None:
    """Keeps the train log's rows up to ``step`` (the step the run resumes from; 0 for a
    fresh start), as metrics.jsonl is rewritten from the checkpoint: the steps after it
    are run again. A line cut short by a kill goes too."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    _atomic_write(path, "".join(kept))


def _evaluation_records(step, names, seeds, results, metrics, bad) -> list[dict]:
    """The metrics.jsonl rows of one evaluation: one per read and seed."""
    records = []
    for name in names:
        for i, seed in enumerate(seeds):
            accuracy = float(results[name]["accuracy"][i])
            finite = np.isfinite(accuracy) and not bad[name][i]
            records.append(
                {
                    "read": name,
                    "seed": int(seed),
                    "step": step,
                    "accuracy": accuracy if finite else None,
                    "loss": float(results[name]["loss"][i]) if finite else None,
                    "train_loss": finite_or_none(metrics[name]["loss"][i]),
                    "nonfinite": bool(bad[name][i]),
                }
            )
    return records


def _anneal_fields(records, step, seeds, schedule, triggers, budget) -> list[dict]:
    """An annealed run's rows: those of seeds within their budget (a seed whose budget
    ended is no longer trained or reported), with ``alpha`` on the annealed reads'."""
    index = {int(seed): i for i, seed in enumerate(seeds)}
    kept = []
    for record in records:
        i = index[record["seed"]]
        if step > budget[record["read"]][i]:
            continue
        if record["read"] in triggers:
            trigger = triggers[record["read"]][i]
            record["alpha"] = float(schedule.alpha(step, trigger))
            record["anneal_trigger_step"] = (
                None if trigger == anneal.NOT_TRIGGERED else int(trigger)
            )
        kept.append(record)
    return kept


def _evaluation_line(step, names, records, solved, num_seeds) -> str:
    parts = []
    for name in names:
        accuracy = finite_mean(
            [r["accuracy"] for r in records if r["read"] == name and r["accuracy"] is not None]
        )
        mean = "n/a" if accuracy is None else f"{100 * accuracy:.1f}%"
        parts.append(f"{name}: mean accuracy {mean}, solved {len(solved[name])}/{num_seeds}")
    return f"evaluation at step {step}: " + " | ".join(parts)
