"""The study command's argument handling, without running it (the end-to-end runs are in
tests/test_run.py)."""

from pathlib import Path

import pytest

from experiments.study import cli
from tests.conftest import REPO_ROOT


def test_config_path_resolves_from_the_current_directory_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = str(REPO_ROOT / "experiments" / "configs" / "noisy_ar.py")
    assert cli.resolve_config_path("configs/noisy_ar.py") == want
    assert cli.resolve_config_path("configs/noisy_ar.py:smoke") == want + ":smoke"
    local = tmp_path / "configs" / "noisy_ar.py"
    local.parent.mkdir()
    local.write_text("")
    assert cli.resolve_config_path("configs/noisy_ar.py:cpu") == "configs/noisy_ar.py:cpu"
    assert cli.resolve_config_path("elsewhere/x.py") == "elsewhere/x.py"


def test_load_config_and_its_errors():
    path = cli.resolve_config_path("configs/noisy_ar.py")
    assert cli.load_config(path + ":smoke").name == "smoke"
    assert cli.load_config(path).name == "cpu"  # no preset: cpu
    with pytest.raises(cli.UsageError, match="unknown preset 'nope'"):
        cli.load_config(path + ":nope")
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.load_config(str(Path("configs") / "missing.py"))


def test_overrides_must_name_existing_fields():
    config = cli.load_config(cli.resolve_config_path("configs/noisy_ar.py:smoke"))
    cli.check_overrides(
        config,
        [
            "run",
            "--config.train.steps=5",
            "--workdir=x",
            "--config.reads=raw",
            "--noconfig.task.multi_query",
        ],
    )
    with pytest.raises(cli.UsageError) as error:
        cli.check_overrides(
            config,
            [
                "run",
                "--config.train.stepz=5",
                "--config.trian.steps=1",
                "--config.train.steps.value=2",
            ],
        )
    message = str(error.value)
    assert "--config.train.stepz: config.train has no field 'stepz'" in message
    assert "(its fields: b1, b2, batch_size," in message
    assert "--config.trian.steps: config has no field 'trian'" in message
    assert "--config.train.steps.value: config.train.steps has no field 'value'" in message


def test_unknown_fields_name_the_configuration_file_they_came_from():
    config = cli.load_config(cli.resolve_config_path("configs/noisy_ar.py:smoke"))
    with pytest.raises(cli.UsageError, match=r"defined in configs/noisy_ar\.py\.$"):
        cli.check_overrides(config, ["--config.nope=1"], source="configs/noisy_ar.py:smoke")


def test_only_the_config_value_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/ does not exist here
    home = str(REPO_ROOT / "experiments" / "configs" / "noisy_ar.py")
    argv = ["run", "--config=configs/noisy_ar.py:smoke", "--config.train.steps=3", "--workdir=w"]
    assert cli.with_resolved_config(argv) == [
        "run",
        f"--config={home}:smoke",
        "--config.train.steps=3",
        "--workdir=w",
    ]
    assert argv[1] == "--config=configs/noisy_ar.py:smoke"  # the caller's list is untouched
    assert cli.with_resolved_config(["run", "--config", "configs/noisy_ar.py"]) == [
        "run",
        "--config",
        home,
    ]
    # A path that exists from the current directory is kept as given.
    (tmp_path / "c").write_text("")
    assert cli.with_resolved_config(["run", "--config=c"]) == ["run", "--config=c"]
    assert cli.with_resolved_config(["run", "--workdir=x"]) == ["run", "--workdir=x"]
