"""experiments.study.evaluate_reference on hostile checkpoints: every failure the file or the
command line can cause is one message on stderr and a non-zero exit, never a traceback
and never invalid JSON (NaN) on stdout.

A tiny model (V = 24, D = 16, 2 heads, length 16) keeps the evaluations fast; the
reference checkpoints' own evaluation is in tests/test_reference_checkpoint.py.
"""

import json

import numpy as np
import pytest

from experiments.study.evaluate_reference import evaluate_checkpoint
from orthorecall import reference_checkpoint as rc
from orthorecall import torch_format
from tests.conftest import run_module

TINY_CFG = {
    "variant": "ns5",
    "seed": 3,
    "vocab_size": 24,
    "dim": 16,
    "num_heads": 2,
    "inner_dim": 32,
    "seq_len": 16,
    "noise_vocab_size": 4,
    "frac_noise": 0.5,
    "val_batches": 2,
    "val_batch_size": 4,
    "batch_size": 4,
}


def _tiny_state_dict():
    dims = rc.reference_dims(TINY_CFG)
    rng = np.random.default_rng(0)
    return {
        name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in rc.expected_shapes(dims).items()
    }


def _checkpoint(tmp_path, state_dict=None, **cfg_changes):
    """A tiny reference-layout checkpoint; cfg_changes set (or, as None, delete) cfg fields."""
    cfg = {**TINY_CFG, **cfg_changes}
    cfg = {key: value for key, value in cfg.items() if value is not None}
    path = tmp_path / "tiny.pt"
    sd = _tiny_state_dict() if state_dict is None else state_dict
    torch_format.save_torch_checkpoint(path, {"state_dict": sd, "cfg": cfg})
    return path


def _overflowing_state_dict():
    # Finite weights whose logits overflow float32: the loss comes out NaN.
    sd = _tiny_state_dict()
    sd["head.weight"][:] = 3e38
    sd["head.bias"][:] = 3e38
    return sd


def test_tiny_checkpoint_evaluates(tmp_path):
    result = evaluate_checkpoint(_checkpoint(tmp_path))
    assert result["num_sequences"] == 8 and result["seed"] == 3
    assert 0 <= result["accuracy"] <= 1 and np.isfinite(result["loss"])


def test_non_finite_results_are_an_error(tmp_path):
    path = _checkpoint(tmp_path, _overflowing_state_dict())
    with pytest.raises(ValueError, match=r"non-finite (accuracy and )?loss") as err:
        evaluate_checkpoint(path)
    assert str(path) in str(err.value) and "batches [0, 1]" in str(err.value)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"seed": "3"}, "cfg['seed']"),
        ({"seed": 3.5}, "cfg['seed']"),
        ({"seed": -1}, "cfg['seed']"),
        ({"seed": None}, "'seed'"),
        ({"val_batches": "2"}, "cfg['val_batches']"),
        ({"val_batches": 0}, "cfg['val_batches']"),
        ({"val_batch_size": 2.0}, "cfg['val_batch_size']"),
        ({"seq_len": "16"}, "seq_len"),
        ({"frac_noise": float("nan")}, "frac_noise"),
    ],
)
def test_cfg_fields_of_the_task_are_named(changes, field, tmp_path):
    path = _checkpoint(tmp_path, **changes)
    with pytest.raises(ValueError) as err:
        evaluate_checkpoint(path)
    assert field in str(err.value) and str(path) in str(err.value)


def test_a_validation_set_that_cannot_be_drawn_is_an_error(tmp_path):
    # Length 4 with 99% noise: the probe often finds no key presented, where MAD fails.
    path = _checkpoint(tmp_path, seq_len=4, frac_noise=0.99, val_batches=8)
    with pytest.raises(ValueError, match="validation set") as err:
        evaluate_checkpoint(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- the command line


def _cli(*args):
    return run_module("experiments.study.evaluate_reference", *args)


def _assert_clean_error(done, *fragments, code=2):
    """Exit ``code``, nothing on stdout, one error message on stderr holding
    ``fragments``, and no traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    assert "evaluate_reference: " in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


def test_cli_refuses_non_finite_weights_naming_them(tmp_path):
    sd = _tiny_state_dict()
    sd["head.bias"][0] = np.nan
    sd["layer.proj_up.weight"][1, 2] = np.inf
    path = _checkpoint(tmp_path, sd)
    _assert_clean_error(_cli(f"--checkpoint={path}"), "non-finite", "'head.bias'", "proj_up")


@pytest.mark.slow  # a fresh process compiles the model
def test_cli_reports_non_finite_results_instead_of_printing_nan(tmp_path):
    path = _checkpoint(tmp_path, _overflowing_state_dict())
    _assert_clean_error(_cli(f"--checkpoint={path}"), "non-finite", str(path))


def test_cli_names_a_cfg_field_of_the_wrong_type(tmp_path):
    path = _checkpoint(tmp_path, variant=5)
    _assert_clean_error(_cli(f"--checkpoint={path}"), "cfg['variant']", str(path))


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "--checkpoint"),
        (["--checkpoint=x.pt", "extra"], "extra"),
        (["--checkpoint=x.pt", "--num_batches=0"], "--num_batches"),
        (["--checkpoint=x.pt", "--num_batches=many"], "--num_batches"),
        (["--checkpoint=x.pt", "--chunk_size=-4"], "--chunk_size"),
        (["--checkpoint=x.pt", "--sequence_form=sideways"], "--sequence_form"),
        (["--checkpoint=x.pt", "--no_such_flag=1"], "no_such_flag"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_message(args, fragment):
    done = _cli(*args)
    _assert_clean_error(done, fragment)
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr


@pytest.mark.slow  # a fresh process compiles the model
def test_cli_output_is_strict_json(tmp_path):
    done = _cli(f"--checkpoint={_checkpoint(tmp_path)}")
    assert done.returncode == 0, done.stderr
    # parse_constant rejects NaN and Infinity, which json.loads would otherwise accept.
    result = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(name))
    assert result["num_sequences"] == 8 and result["variant"] == "ns5"
