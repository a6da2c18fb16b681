"""The study command's argument handling, without running it (the end-to-end runs are in
tests/test_run.py)."""

from pathlib import Path

import pytest

from experiments import run
from tests.conftest import REPO_ROOT


def test_config_path_resolves_from_the_current_directory_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = str(REPO_ROOT / "experiments" / "configs" / "noisy_ar.py")
    assert run.resolve_config_path("configs/noisy_ar.py") == want
    assert run.resolve_config_path("configs/noisy_ar.py:smoke") == want + ":smoke"
    local = tmp_path / "configs" / "noisy_ar.py"
    local.parent.mkdir()
    local.write_text("")
    assert run.resolve_config_path("configs/noisy_ar.py:cpu") == "configs/noisy_ar.py:cpu"
    assert run.resolve_config_path("elsewhere/x.py") == "elsewhere/x.py"


def test_load_config_and_its_errors():
    path = run.resolve_config_path("configs/noisy_ar.py")
    assert run.load_config(path + ":smoke").name == "smoke"
    assert run.load_config(path).name == "cpu"  # no preset: cpu
    with pytest.raises(run.UsageError, match="unknown preset 'nope'"):
        run.load_config(path + ":nope")
    with pytest.raises(run.UsageError, match="no such file"):
        run.load_config(str(Path("configs") / "missing.py"))


def test_overrides_must_name_existing_fields():
    config = run.load_config(run.resolve_config_path("configs/noisy_ar.py:smoke"))
    run.check_overrides(
        config,
        [
            "run",
            "--config.train.steps=5",
            "--workdir=x",
            "--config.reads=raw",
            "--noconfig.task.multi_query",
        ],
    )
    with pytest.raises(run.UsageError) as error:
        run.check_overrides(
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
