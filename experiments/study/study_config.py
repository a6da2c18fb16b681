"""The study's configuration: every check that runs before any compute, and what the
trainer derives from a configuration (the reads' model configurations, the task, the
seed groups that fit in memory, the initial parameters of ``config.init_from``).

``validate_config(config)`` checks every field's type and range (through
``experiments.study.config_checks``, the rules every command shares), reads that alias each
other, the seed range, whether a training step and an evaluation fit in the devices'
memory (``orthorecall.footprint``) and whether the validation set can be drawn in
reasonable time; a refusal is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import pathlib
import string
from collections.abc import Sequence
from typing import NoReturn

import jax
import ml_collections

from experiments.study import config_checks as checks
from orthorecall import (
    anneal,
    data,
    evaluation,
    footprint,
    mlstm,
    multihost,
    reference_checkpoint,
    training,
)
from orthorecall import cell as cell_lib
from orthorecall import model as model_lib
from orthorecall.reads import read_from_name

# What config.init_from's path may name, replaced by each seed's number and read's name.
INIT_FROM_PLACEHOLDERS = ("seed", "read")
# A read name ending in this trains that read under the scaffold anneal (config.anneal).
ANNEAL_SUFFIX = "_anneal"
# Where a refusal of a missing field sends the user.
_PRESET_HINT = "start from a preset of experiments/configs/noisy_ar.py"


def _get(config: ml_collections.ConfigDict, field: str):
    return checks.get(config, field, _PRESET_HINT)


def read_names(config: ml_collections.ConfigDict) -> list[str]:
    """The names of ``config.reads``, in order.

    Raises:
        ConfigError: not a comma-separated string of names.
    """
    reads = _get(config, "reads")
    if not isinstance(reads, str):
        checks.fail("reads", f"must be a comma-separated string such as 'raw,ns5', got {reads!r}.")
    names = [name.strip() for name in reads.split(",") if name.strip()]
    if not names:
        checks.fail("reads", "no read given; use e.g. 'raw,ns5'.")
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
        checks.fail(
            "anneal",
            "is missing: reads ending in '_anneal' follow the schedule of a config.anneal "
            "section (mode, start, end, threshold, dwell, span, settle); start from the "
            "cpu_anneal preset of experiments/configs/noisy_ar.py.",
        )
    fields = checks.section(
        config, "anneal", [f.name for f in dataclasses.fields(anneal.AnnealSchedule)]
    )
    try:
        return anneal.AnnealSchedule(**fields)
    except (ValueError, TypeError) as e:
        checks.section_error("anneal", e, fields)


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
            checks.fail("reads", str(e))
        read = (read, annealed)
        for other, other_read in reads.items():
            if other == name:
                checks.fail("reads", f"{name!r} is listed twice; list each read once.")
            if other_read == read:
                checks.fail(
                    "reads",
                    f"{name!r} is the same read as {other!r}: it would train the same model "
                    "twice and compare it with itself; list each read once.",
                )
        reads[name] = read
    # The read comes from config.reads, not from the model's fields.
    known = [f.name for f in dataclasses.fields(cell_lib.CellConfig) if f.name != "read"]
    fields = checks.section(config, "model", known)
    if "proj_factor" in fields:  # CellConfig would take True, fail with a bare TypeError
        # on a string and overflow on inf; the memory estimate needs it finite.
        checks.check_real(
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
            checks.section_error("model", e, fields)
        try:
            configs[name] = model_lib.ModelConfig(vocab_size=config.task.vocab_size, cell=cell)
        except (ValueError, TypeError) as e:
            checks.section_error("task", e, ["vocab_size"])
    return configs


def task_from_config(config: ml_collections.ConfigDict) -> data.NoisyRecallTask:
    """The task of ``config.task``.

    Raises:
        ConfigError: naming the offending field.
    """
    fields = checks.section(
        config, "task", [f.name for f in dataclasses.fields(data.NoisyRecallTask)]
    )
    try:
        return data.NoisyRecallTask(**fields)
    except (ValueError, TypeError) as e:
        checks.section_error("task", e, [f.name for f in dataclasses.fields(data.NoisyRecallTask)])


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
        checks.fail("init_from", f"must be None or a path, got {template!r}; {hint}.")
    try:
        fields = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as e:
        checks.fail("init_from", f"{template!r} is not a path template ({e}); {hint}.")
    unknown = [field for field in fields if field not in INIT_FROM_PLACEHOLDERS]
    if unknown:
        checks.fail(
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
        checks.fail("init_from", f"{template!r} cannot be filled in ({e}); {hint}.")


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
            checks.fail(
                "init_from",
                f"{path} does not exist (seed {seed}, read {name!r}); check the path and "
                "its {seed} / {read} placeholders.",
            )
        except (ValueError, OSError) as e:
            checks.fail("init_from", f"seed {seed}, read {name!r}: {e}")

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


SEED_LIMIT = checks.SEED_LIMIT
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
    checks.check_name(_get(config, "name"))
    task = _check_task(config)
    _check_train_counts(config)
    _check_schedule(config)
    _check_optimizer(config)
    checks.check_choice("train.data_source", _get(config, "train.data_source"), ("jax", "numpy"))
    first_seed = _check_seeds_and_threshold(config)
    # Any integer field without a bound of its own stays within int32 (checked above:
    # the seeds, below 2**32).
    checks.bound_integers(config, exempt=("seeds.first_seed",))
    configs = model_configs(config)
    init_from_paths(config, list(configs), [first_seed])
    _check_anneal_window(config)
    _check_conv_taps(configs, task)
    _check_resources(config, task, configs, available_memory, devices)
    return configs


def _check_task(config: ml_collections.ConfigDict) -> data.NoisyRecallTask:
    """The task, refused unless it is what the trainer scores: multi-query targets,
    unscored positions marked with ``evaluation.IGNORE_INDEX``."""
    task = task_from_config(config)
    if not task.multi_query:
        checks.fail(
            "task.multi_query",
            "the study uses multi_query=True; single-query training "
            "targets are not supported by the trainer.",
        )
    if task.ignore_index != evaluation.IGNORE_INDEX:
        checks.fail(
            "task.ignore_index",
            f"the trainer scores with evaluation.IGNORE_INDEX ({evaluation.IGNORE_INDEX}), so "
            f"validation targets marked {task.ignore_index} would be scored; leave the field "
            "out.",
        )
    return task


def _check_train_counts(config: ml_collections.ConfigDict) -> None:
    """The batch sizes, intervals and counts of ``config.train``: positive integers."""
    for field in (
        "batch_size",
        "eval_every",
        "val_batches",
        "val_batch_size",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
    ):
        checks.check_int(f"train.{field}", _get(config, f"train.{field}"), minimum=1)
    # Optional: configurations written before the field existed leave it out.
    segment_length = _get(config, "train").get("segment_length")
    if segment_length is not None:
        checks.check_int("train.segment_length", segment_length, minimum=1)


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    """The step count, the peak learning rate and its schedule (a stretched cosine
    stretches over at least the run's steps)."""
    steps = checks.check_int(
        "train.steps",
        _get(config, "train.steps"),
        1,
        training.MAX_STEPS,
        " (optax's int32 step count)",
    )
    checks.check_real(
        "train.learning_rate",
        _get(config, "train.learning_rate"),
        "the peak learning rate (reference 3e-3)",
        minimum=0,
        minimum_inclusive=False,
    )
    schedule = checks.check_choice(
        "train.schedule", _get(config, "train.schedule"), training.SCHEDULES
    )
    stretch_steps = checks.check_int(
        "train.stretch_steps",
        _get(config, "train.stretch_steps"),
        1,
        training.MAX_STEPS,
        " (optax's int32 step count)",
    )
    if schedule == "stretched_cosine" and stretch_steps < steps:
        checks.fail(
            "train.stretch_steps",
            f"must be >= train.steps ({steps}) for stretched_cosine, got {stretch_steps}.",
        )


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
    """AdamW's moments, denominator floor and weight decay, and the gradient clip."""
    for field, hint in (
        ("b1", "Adam's first-moment decay (reference 0.9)"),
        ("b2", "Adam's second-moment decay (reference 0.999)"),
    ):
        checks.check_real(
            f"train.{field}",
            _get(config, f"train.{field}"),
            hint,
            minimum=0,
            maximum=1,
            maximum_inclusive=False,
        )
    checks.check_real(
        "train.eps",
        _get(config, "train.eps"),
        "Adam's denominator floor (reference 1e-8)",
        minimum=0,
        minimum_inclusive=False,
    )
    checks.check_real(
        "train.weight_decay",
        _get(config, "train.weight_decay"),
        "0 disables it (reference 0.01)",
        minimum=0,
    )
    clip_norm = _get(config, "train.clip_norm")
    if clip_norm is not None:
        checks.check_real(
            "train.clip_norm",
            clip_norm,
            "None disables the clip (reference 1.0)",
            minimum=0,
            minimum_inclusive=False,
        )


def _check_seeds_and_threshold(config: ml_collections.ConfigDict) -> int:
    """The seed range and the solved threshold; returns the first seed."""
    first_seed, _ = checks.check_seeds(
        "seeds.first_seed",
        _get(config, "seeds.first_seed"),
        _get(config, "seeds.num_seeds"),
        count_field="seeds.num_seeds",
    )
    checks.check_real(
        "solved_threshold",
        _get(config, "solved_threshold"),
        "the accuracy that counts a seed as solved (reference 0.8)",
        minimum=0,
        maximum=1,
        minimum_inclusive=False,
    )
    return first_seed


def _check_anneal_window(config: ml_collections.ConfigDict) -> None:
    """Refuses an anneal window that ends after the run (its last evaluation would not
    see α = 0)."""
    schedule = anneal_schedule(config)
    if schedule is not None and schedule.mode == "window" and schedule.end > config.train.steps:
        checks.fail(
            "anneal.end",
            f"the window ends at step {schedule.end}, after the run's {config.train.steps} "
            "steps: its last evaluation would not see α = 0; end it by train.steps.",
        )


def _check_conv_taps(configs: dict[str, model_lib.ModelConfig], task: data.NoisyRecallTask) -> None:
    """Refuses a convolution reaching further back than a sequence is long."""
    taps = next(iter(configs.values())).cell.conv_kernel_size
    if taps > task.example_len:
        # Each tap is traced as its own operations: 10**5 taps take minutes to trace.
        checks.fail(
            "model.conv_kernel_size",
            f"must be <= the {task.example_len} positions of a sequence (task.seq_len - 1), "
            f"got {taps}: taps further back only ever see zeros (reference 4).",
        )


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
    need = _DeviceMemoryNeed.of(config, configs, devices)
    if available_memory is None:
        available_memory = multihost.agreed_minimum(
            footprint.per_device_available_memory(_local(devices))
        )
    if available_memory is None:  # The platform reports nothing: nothing to compare with.
        return 1
    where = (
        f"per device ({need.seeds_per_device} seed(s) x {len(need.reads)} read(s) on each of "
        f"{len(devices)} device(s))"
    )
    available = footprint.format_bytes(available_memory)
    _check_resident_memory(need, available_memory, where, available)
    divisors = [g for g in range(1, need.seeds_per_device + 1) if need.seeds_per_device % g == 0]
    for groups in divisors:
        if (
            need.train_bytes(groups) <= available_memory
            and need.eval_bytes(groups) <= available_memory
        ):
            return groups
    _refuse_one_seed_at_a_time(need, available_memory, where, available)


@dataclasses.dataclass(frozen=True)
class _DeviceMemoryNeed:
    """What one device holds for its seeds, from ``orthorecall.footprint``'s estimates:
    what stays resident (``state``, ``val_set``, ``host_copies``) and what a training
    step or an evaluation needs in ``groups`` groups of seeds."""

    reads: list[model_lib.ModelConfig]
    train_config: ml_collections.ConfigDict
    length: int
    seeds_per_device: int
    backend: str
    state: int
    val_set: int
    host_copies: int

    @classmethod
    def of(cls, config, configs, devices) -> _DeviceMemoryNeed:
        """The needs of ``config``'s seeds spread over ``devices``."""
        seeds_per_device = -(-config.seeds.num_seeds // len(devices))
        train, length = config.train, task_from_config(config).example_len
        reads = list(configs.values())
        backend = devices[0].platform
        state = footprint.state_bytes(reads, seeds_per_device=seeds_per_device)
        val_set = footprint.validation_set_bytes(
            num_sequences=seeds_per_device * train.val_batches * train.val_batch_size,
            seq_len=length,
        )
        # The trainer also keeps host copies of the validation set (every seed's, and
        # their stack), which on CPU come out of the devices' memory.
        host_copies = 2 * val_set if backend == "cpu" else 0
        return cls(reads, train, length, seeds_per_device, backend, state, val_set, host_copies)

    def train_bytes(self, groups: int) -> int:
        """Bytes for a training step; the validation set stays on the devices through
        training."""
        return (
            self.host_copies
            + self.val_set
            + footprint.train_step_memory_estimate(
                self.reads,
                batch_size=self.train_config.batch_size,
                seq_len=self.length,
                seeds_per_device=self.seeds_per_device,
                backend=self.backend,
                segment_length=self.train_config.get("segment_length"),
                seed_groups=groups,
            )
        )

    def eval_bytes(self, groups: int) -> int:
        """Bytes for an evaluation; the optimizer state stays on the devices through
        evaluation."""
        return (
            self.host_copies
            + self.state
            + footprint.eval_step_memory_estimate(
                self.reads,
                num_batches=self.train_config.val_batches,
                batch_size=self.train_config.val_batch_size,
                seq_len=self.length,
                seeds_per_device=self.seeds_per_device,
                backend=self.backend,
                seed_groups=groups,
            )
        )


def _check_resident_memory(
    need: _DeviceMemoryNeed, available_memory: int, where: str, available: str
) -> None:
    """Refuses parameters and optimizer state, or validation sets, that alone do not fit."""
    if need.state > available_memory:
        checks.fail(
            "model",
            f"the parameters and optimizer state alone need about "
            f"{footprint.format_bytes(need.state)} {where}, the device has {available} "
            "available; reduce model.embedding_dim, model.proj_factor, model.num_blocks or "
            "task.vocab_size, or seeds.num_seeds.",
        )
    if need.host_copies + need.val_set > available_memory:
        checks.fail(
            "train.val_batch_size",
            f"the validation sets alone need about "
            f"{footprint.format_bytes(need.host_copies + need.val_set)} {where}, the device "
            f"has {available} available; reduce train.val_batch_size or train.val_batches.",
        )


def _refuse_one_seed_at_a_time(
    need: _DeviceMemoryNeed, available_memory: int, where: str, available: str
) -> NoReturn:
    """The refusal when even one seed at a time does not fit: the training step's
    first, else the evaluation's."""
    one_at_a_time = need.seeds_per_device  # As many groups as seeds.
    if need.train_bytes(one_at_a_time) > available_memory:
        checks.fail(
            "train.batch_size",
            f"one training step needs about "
            f"{footprint.format_bytes(need.train_bytes(one_at_a_time))} {where} even with one "
            f"seed at a time, the device has {available} available; reduce "
            "train.batch_size or task.seq_len, "
            "set or lower train.segment_length (or model.chunk_size for a Newton-Schulz "
            "read, or the model's width).",
        )
    checks.fail(
        "train.val_batch_size",
        f"one evaluation needs about {footprint.format_bytes(need.eval_bytes(one_at_a_time))} "
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
        checks.fail(
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
            checks.fail(
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
