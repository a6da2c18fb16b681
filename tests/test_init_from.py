"""``config.init_from``: every seed's parameters from a reference checkpoint, its
``{seed}`` / ``{read}`` placeholders, its refusals, and the per-step training log
(``train_log.jsonl``) that shows what each seed started from.

The end-to-end tests run the study's command on the tiny study (``TINY``) with the
numpy data stream, from checkpoints written by ``save_reference_checkpoint``, and check
each seed's first logged loss against the loss of its own file's parameters on its own
first batch, computed here independently of the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.configs import noisy_ar
from experiments.study import study_config, train
from experiments.study.cli import ConfigError
from orthorecall import data, reference_checkpoint, training
from orthorecall import model as model_lib
from tests.conftest import TINY, TINY_TASK, run_module, with_overrides

SEEDS = (0, 1, 2)
TIMEOUT = 900  # Seconds, per command: generous, the machine may be loaded.


def tiny_config(**overrides):
    config = noisy_ar.get_config("smoke")
    config.unlock()
    flags = with_overrides(**overrides)
    for field, value in flags.items():
        node = config
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def write_checkpoint(path: Path, key: int, config: model_lib.ModelConfig, **cfg) -> dict:
    """A reference-format checkpoint of our initializer's parameters for PRNGKey(key)."""
    params = jax.tree.map(np.asarray, model_lib.init_params(jax.random.PRNGKey(key), config))
    # The variant does not matter: a run's read is its configuration's.
    reference_checkpoint.save_reference_checkpoint(
        path,
        params,
        {"variant": "baseline", "vocab_size": config.vocab_size, "dim": config.cell.embedding_dim}
        | cfg,
    )
    return params


def model_config(read="raw") -> model_lib.ModelConfig:
    return study_config.model_configs(tiny_config(reads=read))[read]


def first_step_loss(params, seed: int, config: model_lib.ModelConfig) -> float:
    """The loss of seed ``seed``'s first training batch (the reference's numpy stream)."""
    task = data.NoisyRecallTask(**TINY_TASK)
    inputs, targets = data.ReferenceTrainingStream(
        task, seed=seed, batch_size=TINY["train.batch_size"]
    ).next_batch()
    return float(training.next_token_loss(params, inputs, targets, config))


# ---------------------------------------------------------------------------------------
# The path template
# ---------------------------------------------------------------------------------------


def test_placeholders_name_each_seed_and_read():
    config = tiny_config(init_from="/ckpt/{read}/seed{seed:03d}.pt")
    paths = study_config.init_from_paths(config, ["raw", "ns5"], [7, 12])
    assert paths == {
        "raw": [Path("/ckpt/raw/seed007.pt"), Path("/ckpt/raw/seed012.pt")],
        "ns5": [Path("/ckpt/ns5/seed007.pt"), Path("/ckpt/ns5/seed012.pt")],
    }
    single = study_config.init_from_paths(tiny_config(init_from="/one.pt"), ["raw", "ns5"], [7, 12])
    assert single == {"raw": [Path("/one.pt")] * 2, "ns5": [Path("/one.pt")] * 2}
    assert study_config.init_from_paths(tiny_config(), ["raw"], [0]) is None


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("/ckpt/{step}.pt", ["['step']", "only placeholders"]),
        ("/ckpt/{}.pt", ["['']", "only placeholders"]),
        ("/ckpt/{seed.real}.pt", ["['seed.real']"]),
        ("/ckpt/{seed", ["not a path template"]),
        ("/ckpt/{read:d}.pt", ["cannot be filled in"]),
        ("  ", ["must be None or a path"]),
    ],
)
def test_bad_templates_are_refused_naming_the_field(template, words):
    config = tiny_config(init_from=template)
    with pytest.raises(ConfigError) as error:
        study_config.validate_config(config)
    message = str(error.value)
    assert message.startswith("config.init_from:"), message
    for word in words:
        assert word in message, message


def test_a_fingerprint_field_that_older_runs_lack():
    from experiments.study import workdir

    # A stored configuration without init_from is one that started from our initializer.
    with_field = {"init_from": None, "name": "x"}
    assert workdir.differing_fields({"name": "x"}, with_field) == ""
    assert "init_from" in workdir.differing_fields({"name": "x"}, {"init_from": "/a.pt"})
    assert workdir.config_fingerprint(with_field) != workdir.config_fingerprint(
        {"init_from": "/a.pt", "name": "x"}
    )


# ---------------------------------------------------------------------------------------
# Loading: checked before any data is read
# ---------------------------------------------------------------------------------------


def test_initial_params_equal_the_files(tmp_path):
    config = model_config()
    saved = write_checkpoint(tmp_path / "a.pt", 5, config)
    loaded = reference_checkpoint.initial_params(tmp_path / "a.pt", config)
    jax.tree.map(np.testing.assert_array_equal, loaded, saved)


def test_a_width_that_differs_is_named(tmp_path):
    wider = model_config().cell.replace(embedding_dim=24)
    write_checkpoint(tmp_path / "wide.pt", 0, model_lib.ModelConfig(vocab_size=24, cell=wider))
    with pytest.raises(ValueError, match=r"model\.embedding_dim: the checkpoint has "):
        reference_checkpoint.check_initial_checkpoint(tmp_path / "wide.pt", model_config())
    write_checkpoint(tmp_path / "vocab.pt", 0, model_lib.ModelConfig(vocab_size=30, cell=wider))
    with pytest.raises(ValueError, match=r"task\.vocab_size.*vocab_size=30"):
        reference_checkpoint.check_initial_checkpoint(tmp_path / "vocab.pt", model_config())


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    config = model_config()
    params = jax.tree.map(np.asarray, model_lib.init_params(jax.random.PRNGKey(0), config))
    state = reference_checkpoint.state_dict_from_params(params)
    state["layer.learnable_skip"] = state["layer.learnable_skip"][:-1]
    from orthorecall import torch_format

    torch_format.save_torch_checkpoint(
        tmp_path / "bad.pt", {"state_dict": state, "cfg": {"variant": "baseline"}}
    )
    with pytest.raises(ValueError, match=r"'layer\.learnable_skip' has shape"):
        reference_checkpoint.check_initial_checkpoint(tmp_path / "bad.pt", config)


def test_refusals_name_seed_read_and_file(tmp_path):
    config = tiny_config(init_from=str(tmp_path / "{read}_{seed}.pt"))
    configs = study_config.validate_config(config)
    write_checkpoint(tmp_path / "raw_0.pt", 0, configs["raw"])
    with pytest.raises(ConfigError, match=r"ns5_0\.pt does not exist \(seed 0, read 'ns5'\)"):
        study_config.load_initial_params(config, configs, [0])
    wide = configs["raw"].cell.replace(embedding_dim=24)
    write_checkpoint(tmp_path / "ns5_0.pt", 0, model_lib.ModelConfig(24, wide))
    with pytest.raises(ConfigError, match=r"seed 0, read 'ns5'.*model\.embedding_dim"):
        study_config.load_initial_params(config, configs, [0])


# ---------------------------------------------------------------------------------------
# The study's command
# ---------------------------------------------------------------------------------------


def cli(workdir: Path, init_from: str, steps: int = 1, extra=()) -> list[str]:
    flags = with_overrides(
        **{
            "train.steps": steps,
            "train.log_every": 1,
            "train.eval_every": steps,
            "train.checkpoint_every": steps,
            "train.data_source": "numpy",
            "init_from": init_from,
        }
    )
    return [
        "--config=configs/noisy_ar.py:smoke",
        f"--workdir={workdir}",
        "--notensorboard",
        *[f"--config.{k}={v}" for k, v in flags.items()],
        *extra,
    ]


def train_log(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / train.TRAIN_LOG_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_each_seed_and_read_starts_from_its_own_file(tmp_path):
    configs = study_config.model_configs(tiny_config())
    files = {}
    for i, read in enumerate(configs):
        for seed in SEEDS:
            path = tmp_path / "init" / f"{read}_seed{seed}.pt"
            path.parent.mkdir(exist_ok=True)
            files[read, seed] = write_checkpoint(path, 100 + 10 * i + seed, configs[read])
    workdir = tmp_path / "run"
    result = run_module(
        "experiments.run",
        *cli(workdir, str(tmp_path / "init" / "{read}_seed{seed}.pt")),
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = train_log(workdir)
    assert {(r["read"], r["seed"], r["step"]) for r in rows} == {
        (read, seed, 1) for read in configs for seed in SEEDS
    }
    for row in rows:
        expected = first_step_loss(
            files[row["read"], row["seed"]], row["seed"], configs[row["read"]]
        )
        np.testing.assert_allclose(row["loss"], expected, rtol=2e-6)
        assert row["grad_norm"] > 0
        # The first update's rate is the schedule's peak.
        assert row["learning_rate"] == pytest.approx(TINY["train.learning_rate"], rel=1e-6)
    stored = json.loads((workdir / "run_config.json").read_text())["config"]
    assert stored["init_from"].endswith("{read}_seed{seed}.pt")


@pytest.mark.slow
def test_one_file_starts_every_seed_and_read_and_a_resume_ignores_it(tmp_path):
    configs = study_config.model_configs(tiny_config())
    params = write_checkpoint(tmp_path / "one.pt", 42, configs["raw"])
    workdir = tmp_path / "run"
    result = run_module(
        "experiments.run", *cli(workdir, str(tmp_path / "one.pt"), steps=2), timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = train_log(workdir)
    for row in (r for r in rows if r["step"] == 1):
        expected = first_step_loss(params, row["seed"], configs[row["read"]])
        np.testing.assert_allclose(row["loss"], expected, rtol=2e-6)
    # Finished: a rerun resumes the last checkpoint and never opens the file again.
    (tmp_path / "one.pt").unlink()
    again = run_module(
        "experiments.run", *cli(workdir, str(tmp_path / "one.pt"), steps=2), timeout=TIMEOUT
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert train_log(workdir) == rows


@pytest.mark.slow
def test_the_command_refuses_a_missing_file_with_code_2(tmp_path):
    workdir = tmp_path / "run"
    result = run_module(
        "experiments.run", *cli(workdir, str(tmp_path / "nowhere_{seed}.pt")), timeout=TIMEOUT
    )
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "config.init_from" in out and "nowhere_0.pt does not exist" in out
    assert "Traceback" not in out
    assert not (workdir / "run_config.json").exists()
    assert not (workdir / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------
# The training log
# ---------------------------------------------------------------------------------------


def test_train_log_rows_and_truncation(tmp_path):
    metrics = {"raw": {"loss": np.array([1.5, np.nan]), "grad_norm": np.array([0.5, np.inf])}}
    bad = {"raw": np.array([False, True])}
    rows = train._train_log_rows(3, ["raw"], [11, 12], metrics, bad, np.float32(0.25))
    assert rows == [
        {
            "read": "raw",
            "seed": 11,
            "step": 3,
            "loss": 1.5,
            "grad_norm": 0.5,
            "learning_rate": 0.25,
        },
        {
            "read": "raw",
            "seed": 12,
            "step": 3,
            "loss": None,
            "grad_norm": None,
            "learning_rate": None,
        },
    ]
    path = tmp_path / train.TRAIN_LOG_FILE
    for step in (1, 2, 3):
        train._append_train_log(path, [{"read": "raw", "seed": 0, "step": step}])
    with open(path, "a") as f:
        f.write('{"read": "raw", "se')  # A line cut short by a kill.
    train._truncate_train_log(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    train._truncate_train_log(path, 0)
    assert path.read_text() == ""


def test_the_learning_rate_is_the_one_optax_applies():
    # Adam's first update moves every parameter by about the rate: with the gradient's
    # sign known, the applied rate of update n is the schedule's value at count n - 1.
    schedule = training.learning_rate_schedule("cosine", 3e-3, 10)
    optimizer = training.make_optimizer(learning_rate=3e-3, total_steps=10, weight_decay=0.0)
    params = {"w": np.zeros(3, np.float32)}
    state = optimizer.init(params)
    grads = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    for count in range(3):
        updates, state = optimizer.update(grads, state, params)
        if count == 0:  # Adam's float32 bias correction: about 1e-5 relative.
            np.testing.assert_allclose(
                -np.sign(grads["w"]) * float(schedule(0)), updates["w"], rtol=2e-5
            )
    assert float(schedule(0)) == pytest.approx(3e-3)
    assert float(schedule(5)) == pytest.approx(1.5e-3, rel=1e-6)
