"""experiments.study.train.validate_config: every field is checked before any compute, and the
error names the field ("config.FIELD: what is wrong; what to do"); reads that alias each
other, seeds past the uint32 range, and configurations that cannot fit in memory or whose
validation set would take hours to draw are refused. No test here compiles or draws data.
"""

from __future__ import annotations

import math
import re
import time

import jax
import numpy as np
import pytest

from experiments.configs.noisy_ar import PRESETS, get_config
from experiments.study import study_config
from experiments.study.cli import ConfigError
from orthorecall import footprint, training
from tests.conftest import with_overrides

# Plenty, so that only the check under test can refuse; the memory tests set their own.
PLENTY = 2**50


def config_with(**overrides):
    """The smoke preset + TINY + overrides (``train__b1=2.0`` sets train.b1), any type:
    a value whose type the field does not have replaces the field (ConfigDict would
    refuse it, but configurations also come from JSON, code and unlocked dicts)."""
    config = get_config("smoke")
    with config.unlocked():
        for key, value in with_overrides(**overrides).items():
            node = config
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node[parent]
            del node[leaf]
            node[leaf] = value
    return config


def refusal(**overrides) -> str:
    with pytest.raises(ConfigError) as error:
        study_config.validate_config(config_with(**overrides), available_memory=PLENTY)
    return str(error.value)


def test_the_tiny_configuration_and_every_preset_field_set_pass():
    configs = study_config.validate_config(config_with(), available_memory=PLENTY)
    assert list(configs) == ["raw", "ns5"]
    for preset in PRESETS:
        study_config.validate_config(get_config(preset), available_memory=PLENTY)


@pytest.mark.parametrize(
    "field, value",
    [
        ("train.b1", 2.0),
        ("train.b1", 1.0),
        ("train.b1", -0.1),
        ("train.b1", math.nan),
        ("train.b1", "0.9"),
        ("train.b1", True),
        ("train.b1", None),
        ("train.b2", 1.0),
        ("train.b2", 1.5),
        ("train.eps", 0.0),
        ("train.eps", -1e-8),
        ("train.eps", math.inf),
        ("train.weight_decay", -0.01),
        ("train.weight_decay", math.inf),
        ("train.weight_decay", math.nan),
        ("train.learning_rate", math.inf),
        ("train.learning_rate", math.nan),
        ("train.learning_rate", -1e-3),
        ("train.learning_rate", "3e-3"),
        ("train.learning_rate", True),
        ("train.learning_rate", 10**400),  # beyond float range
        ("train.clip_norm", 0.0),
        ("train.clip_norm", math.inf),
        ("train.clip_norm", "1.0"),
        ("train.stretch_steps", 4000.5),
        ("train.stretch_steps", "4000"),
        ("train.stretch_steps", True),
        ("train.stretch_steps", None),
        ("train.steps", 2**31),
        ("train.steps", 24.0),
        ("train.batch_size", True),
        ("train.batch_size", "4"),
        ("train.batch_size", -3),
        ("train.val_batches", 1.0),
        ("train.log_every", None),
        ("train.schedule", 5),
        ("train.data_source", None),
        ("solved_threshold", "0.8"),
        ("solved_threshold", math.nan),
        ("solved_threshold", 1.5),
        ("solved_threshold", 0.0),
        ("seeds.num_seeds", True),
        ("seeds.num_seeds", 3.0),
        ("seeds.first_seed", -1),
        ("seeds.first_seed", "0"),
        ("name", ""),
        ("name", "   "),
        ("name", "runs/a"),
        ("name", ".."),
        ("name", "a\nb"),
        ("name", 5),
        ("name", None),
        ("reads", 5),
        ("reads", " , "),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(field, value):
    message = refusal(**{field.replace(".", "__"): value})
    assert message.startswith(f"config.{field}: "), message
    assert "Traceback" not in message


def test_a_clip_norm_of_none_disables_the_clip():
    study_config.validate_config(config_with(train__clip_norm=None), available_memory=PLENTY)


def test_messages_say_what_to_do():
    message = refusal(train__b1=2.0)
    assert message == (
        "config.train.b1: must lie in [0, 1), got 2.0; Adam's first-moment decay (reference 0.9)."
    )
    assert "reference 3e-3" in refusal(train__learning_rate=math.inf)


def test_a_missing_field_is_named():
    config = config_with()
    with config.unlocked():
        del config.train["eps"]
    with pytest.raises(ConfigError, match=r"^config\.train\.eps: is missing"):
        study_config.validate_config(config, available_memory=PLENTY)


# ---------------------------------------------------------------------------------------
# task.* (data.NoisyRecallTask) and model.* (cell.CellConfig): named fields, no traceback
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("task.seq_len", -2),
        ("task.seq_len", 0),
        ("task.seq_len", 63),
        ("task.seq_len", 64.0),
        ("task.seq_len", "64"),
        ("task.vocab_size", 0),
        ("task.vocab_size", 24.5),
        ("task.vocab_size", 2**40),
        ("task.noise_vocab_size", -1),
        ("task.frac_noise", 1.5),
        ("task.frac_noise", "0.5"),
        ("task.multi_query", "yes"),
        ("model.embedding_dim", 0),
        ("model.embedding_dim", -16),
        ("model.embedding_dim", 16.0),
        ("model.embedding_dim", "16"),
        ("model.num_heads", 0),
        ("model.num_blocks", True),
        ("model.inner_multiple", 0),
        ("model.conv_kernel_size", -1),
        ("model.qkv_block_size", 2.5),
        ("model.chunk_size", 0),
        ("model.chunk_size", 8.5),
        ("model.proj_factor", 0.0),
        ("model.proj_factor", math.inf),
        ("model.proj_factor", "2.0"),
        ("model.proj_factor", True),
        ("model.compute_dtype", "float16"),
    ],
)
def test_a_bad_task_or_model_value_is_refused_naming_its_field(field, value):
    message = refusal(**{field.replace(".", "__"): value})
    assert message.startswith(f"config.{field}: "), message


def test_a_conv_kernel_longer_than_the_sequence_is_refused():
    # TINY: sequences of 16 tokens, 15 positions.
    study_config.validate_config(config_with(model__conv_kernel_size=15), available_memory=PLENTY)
    started = time.perf_counter()
    message = refusal(model__conv_kernel_size=10**5)
    assert time.perf_counter() - started < 1.0
    assert message.startswith("config.model.conv_kernel_size: must be <= the 15 positions")


def test_an_ignore_index_the_trainer_does_not_score_with_is_refused():
    config = config_with()
    with config.unlocked():
        config.task.ignore_index = -1
    with pytest.raises(ConfigError, match=r"^config\.task\.ignore_index: the trainer"):
        study_config.validate_config(config, available_memory=PLENTY)
    config.task.ignore_index = -100
    study_config.validate_config(config, available_memory=PLENTY)


def test_a_width_the_heads_do_not_divide_names_the_heads():
    message = refusal(model__num_heads=3)
    assert message.startswith("config.model: ") and "num_heads=3" in message


def test_unknown_task_and_model_fields_are_refused():
    config = config_with()
    with config.unlocked():
        config.model.width = 3
    with pytest.raises(ConfigError, match=r"^config\.model: unknown field\(s\) \['width'\]"):
        study_config.validate_config(config, available_memory=PLENTY)


@pytest.mark.parametrize(
    "field, value",
    [
        ("model.embedding_dim", 10**9),
        ("model.num_blocks", 10**6),
        ("model.proj_factor", 1e12),
        ("task.vocab_size", 2**31 - 1),
        ("task.seq_len", 10**9),
    ],
)
def test_huge_sizes_are_refused_by_the_memory_estimate(field, value):
    with pytest.raises(ConfigError) as error:
        study_config.validate_config(
            config_with(**{field.replace(".", "__"): value}), available_memory=16 * 2**30
        )
    assert "16.0 GiB available" in str(error.value)


# ---------------------------------------------------------------------------------------
# make_optimizer, a public entry point, validates its own arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument, value",
    [
        ("learning_rate", math.inf),
        ("learning_rate", 0.0),
        ("learning_rate", "3e-3"),
        ("b1", 2.0),
        ("b2", 1.0),
        ("b1", True),
        ("eps", 0.0),
        ("eps", math.nan),
        ("weight_decay", -1.0),
        ("clip_norm", 0.0),
        ("clip_norm", math.inf),
        ("total_steps", 0),
        ("total_steps", 10.0),
        ("total_steps", 2**31),
        ("stretch_steps", 2.5),
        ("schedule", "linear"),
        ("schedule", None),
    ],
)
def test_make_optimizer_refuses_bad_arguments_naming_them(argument, value):
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        training.make_optimizer(**{argument: value})


def test_make_optimizer_accepts_integers_numpy_reals_and_no_clip():
    training.make_optimizer(learning_rate=1, b1=np.float32(0.5), b2=0, weight_decay=0)
    training.make_optimizer(clip_norm=None, schedule="stretched_cosine", stretch_steps=4000)


# ---------------------------------------------------------------------------------------
# Reads that alias each other
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reads, message",
    [
        ("raw,baseline", "'baseline' is the same read as 'raw'"),
        ("ns5,ns05", "'ns05' is the same read as 'ns5'"),
        ("raw,ns5,ns5_cubic", "'ns5_cubic' is the same read as 'ns5'"),
        ("raw,ns5,raw", "'raw' is listed twice"),
    ],
)
def test_reads_that_alias_each_other_are_refused(reads, message):
    error = refusal(reads=reads)
    assert error.startswith("config.reads: ") and message in error


def test_distinct_reads_pass():
    configs = study_config.validate_config(
        config_with(reads="raw,ns5,ns3,ns5_muon,polar"), available_memory=PLENTY
    )
    assert list(configs) == ["raw", "ns5", "ns3", "ns5_muon", "polar"]


# ---------------------------------------------------------------------------------------
# The seed range
# ---------------------------------------------------------------------------------------


def test_seeds_past_uint32_are_refused_since_they_would_repeat_seed_0():
    # Why: the trainer makes every seed's keys from a uint32, where 2**32 is 0.
    seeds = np.array([2**32, 2**32 + 1])
    np.testing.assert_array_equal(
        jax.numpy.asarray(seeds, jax.numpy.uint32), jax.numpy.asarray([0, 1], jax.numpy.uint32)
    )
    last_ok = study_config.SEED_LIMIT - 3
    study_config.validate_config(config_with(seeds__first_seed=last_ok), available_memory=PLENTY)
    message = refusal(seeds__first_seed=last_ok + 1)
    assert message.startswith("config.seeds.first_seed: ") and "2**32" in message
    assert refusal(seeds__first_seed=2**32).startswith("config.seeds.first_seed: ")


# ---------------------------------------------------------------------------------------
# Memory and data-generation time
# ---------------------------------------------------------------------------------------


def _train_need(config, seeds_per_device):
    """What a CPU device needs to train: the step and the validation set, which stays on
    the device, and the trainer's two host copies of it, in the same memory on CPU."""
    configs = study_config.model_configs(config)
    task = study_config.task_from_config(config)
    return footprint.train_step_memory_estimate(
        list(configs.values()),
        batch_size=config.train.batch_size,
        seq_len=task.example_len,
        seeds_per_device=seeds_per_device,
    ) + 3 * footprint.validation_set_bytes(
        num_sequences=seeds_per_device * config.train.val_batches * config.train.val_batch_size,
        seq_len=task.example_len,
    )


def test_a_batch_that_cannot_fit_is_refused_with_the_figures():
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        study_config.validate_config(
            config_with(train__batch_size=10_000_000), available_memory=2**34
        )
    message = str(error.value)
    assert message.startswith("config.train.batch_size: one training step needs about ")
    assert re.search(r"needs about [0-9.]+ [GT]iB per device", message)
    assert "the device has 16.0 GiB available" in message
    assert "reduce train.batch_size" in message
    assert time.perf_counter() - started < 1.0


def test_the_memory_of_this_machine_is_asked_by_default():
    # 10**7 sequences: hundreds of GiB, more than any host running the tests.
    with pytest.raises(ConfigError, match=r"^config\.train\.batch_size: one training"):
        study_config.validate_config(config_with(train__batch_size=10_000_000))
    study_config.validate_config(config_with())


def test_padded_seeds_count_per_device():
    """3 seeds on 2 devices are padded to 4: 2 per device; on 3 devices, 1. Where two
    seeds do not fit but one does, the trainer runs them in two groups; where not even
    one does, the configuration is refused."""
    config = config_with(seeds__num_seeds=3)
    one, two = _train_need(config, 1), _train_need(config, 2)
    between = (one + two) // 2
    device = jax.devices()[0]
    configs = study_config.validate_config(config, available_memory=between, devices=[device] * 3)
    assert (
        study_config.seed_groups(config, configs, available_memory=between, devices=[device] * 3)
        == 1
    )
    configs = study_config.validate_config(config, available_memory=between, devices=[device] * 2)
    assert (
        study_config.seed_groups(config, configs, available_memory=between, devices=[device] * 2)
        == 2
    )
    assert (
        study_config.seed_groups(config, configs, available_memory=2**34, devices=[device] * 2) == 1
    )
    with pytest.raises(ConfigError, match=r"2 seed\(s\) x 2 read\(s\) on each of 2"):
        study_config.validate_config(config, available_memory=one // 2, devices=[device] * 2)


def test_an_evaluation_that_cannot_fit_names_the_validation_batch():
    config = config_with(train__val_batch_size=200_000, train__val_batches=1, task__seq_len=16)
    need = _train_need(config, 3)
    with pytest.raises(ConfigError, match=r"^config\.train\.val_batch_size: one evaluation"):
        study_config.validate_config(config, available_memory=need * 2)


def test_a_validation_set_that_cannot_fit_names_the_validation_batch():
    config = config_with(train__val_batch_size=10**6)  # 3 x 10**6 x 15 x 2 int32: 360 MB
    with pytest.raises(ConfigError, match=r"^config\.train\.val_batch_size: the valid"):
        study_config.validate_config(config, available_memory=2**28)


def test_parameters_that_cannot_fit_name_the_model():
    with pytest.raises(ConfigError, match=r"^config\.model: the parameters"):
        study_config.validate_config(
            config_with(model__embedding_dim=10**9), available_memory=2**34
        )


def test_a_validation_set_that_takes_hours_to_draw_is_refused():
    started = time.perf_counter()
    message = refusal(train__val_batch_size=1_000_000, train__val_batches=16)
    assert time.perf_counter() - started < 1.0
    assert message.startswith("config.train.val_batch_size: the validation sets ")
    assert "to draw" in message and "reduce train.val_batches or train.val_batch_size" in message
    # The reference's 16 x 16 sequences per seed of the longest regime draw well in time.
    study_config.validate_config(get_config("v96_s1024"), available_memory=PLENTY)


def test_numpy_training_batches_that_take_minutes_per_step_are_refused():
    # 3 seeds x 200,000 x 16 tokens: about 100 s per step at the conservative rate.
    message = refusal(train__data_source="numpy", train__batch_size=200_000)
    assert message.startswith("config.train.batch_size: with train.data_source='numpy'")
    assert "data_source='jax'" in message
    on_device = config_with(train__data_source="jax", train__batch_size=200_000)
    study_config.validate_config(on_device, available_memory=PLENTY)


def test_validation_is_fast_on_the_largest_preset():
    config = get_config("v96_s1024")
    started = time.perf_counter()
    study_config.validate_config(config, available_memory=PLENTY)
    assert time.perf_counter() - started < 1.0
