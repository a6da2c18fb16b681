"""Reference checkpoints: import, export, and the acceptance test that the
imported models reproduce the accuracy and loss the reference recorded."""

import json
import re

import jax
import numpy as np
import pytest

from experiments.evaluate_reference import evaluate_checkpoint
from orthorecall import model as model_lib
from orthorecall import reads, torch_format
from orthorecall import reference_checkpoint as rc
from orthorecall.cell import CellConfig
from tests.conftest import REFERENCE_CHECKPOINTS, run_module

FIXTURES = REFERENCE_CHECKPOINTS


def _records():
    return {r["variant"]: r for r in json.loads((FIXTURES / "records.json").read_text())}


def _path(variant):
    return FIXTURES / _records()[variant]["ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["baseline", "ns5"])
def test_reproduces_recorded_validation_accuracy_and_loss(variant):
    # Generator, model, read and import together: 256 validation sequences
    # from default_rng(10011), 16 batches of 16, as the reference evaluated.
    record = _records()[variant]
    result = evaluate_checkpoint(_path(variant))
    assert result["num_sequences"] == 256
    assert abs(result["accuracy"] - record["final_val_acc"]) < 1e-3, result
    assert abs(result["loss"] - record["final_val_loss"]) < 1e-3, result


def test_import_maps_variant_to_read_and_shapes():
    baseline = rc.load_reference_checkpoint(_path("baseline"))
    ns5 = rc.load_reference_checkpoint(_path("ns5"))
    assert baseline.config.cell.read == reads.RAW and ns5.config.cell.read == reads.NS5
    assert baseline.config == model_lib.ModelConfig(cell=CellConfig(read=reads.RAW))
    assert ns5.cfg["seed"] == 11 and ns5.cfg["vocab_size"] == 80
    template = model_lib.init_params(jax.random.PRNGKey(0), ns5.config)
    shapes = jax.tree_util.tree_map(np.shape, template)
    assert jax.tree_util.tree_map(np.shape, ns5.params) == shapes


def test_export_round_trips_bit_exactly(tmp_path):
    original = torch_format.load_torch_checkpoint(_path("ns5"))
    checkpoint = rc.load_reference_checkpoint(_path("ns5"))
    out = tmp_path / "exported.pt"
    rc.save_reference_checkpoint(out, checkpoint.params, checkpoint.cfg)
    again = torch_format.load_torch_checkpoint(out)
    assert list(again["state_dict"]) == list(original["state_dict"])
    for name, value in original["state_dict"].items():
        np.testing.assert_array_equal(again["state_dict"][name], value, err_msg=name)
    assert again["cfg"] == original["cfg"]
    reloaded = rc.load_reference_checkpoint(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, checkpoint.params)


def test_export_is_readable_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    params = model_lib.init_params(jax.random.PRNGKey(3), model_lib.ModelConfig())
    out = tmp_path / "ours.pt"
    rc.save_reference_checkpoint(out, params, {"variant": "ns5", "seed": 3})
    loaded = torch.load(out, weights_only=True)
    state_dict = rc.state_dict_from_params(params)
    assert list(loaded["state_dict"]) == list(state_dict)
    for name, value in state_dict.items():
        np.testing.assert_array_equal(loaded["state_dict"][name].numpy(), value, err_msg=name)
    # The reference's layout, e.g. torch Linear weights stored (out, in).
    assert tuple(loaded["state_dict"]["layer.proj_up.weight"].shape) == (384, 94)
    assert tuple(loaded["state_dict"]["layer.conv1d.conv.weight"].shape) == (192, 1, 4)


def test_foreign_and_inconsistent_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch_format.save_torch_checkpoint(foreign, {"weights": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="not a reference one"):
        rc.load_reference_checkpoint(foreign)
    partial = torch_format.load_torch_checkpoint(_path("baseline"))
    del partial["state_dict"]["head.bias"]
    torch_format.save_torch_checkpoint(tmp_path / "partial.pt", partial)
    with pytest.raises(ValueError, match=r"missing \['head\.bias'\]"):
        rc.load_reference_checkpoint(tmp_path / "partial.pt")
    odd = torch_format.load_torch_checkpoint(_path("baseline"))
    odd["cfg"]["variant"] = "transformer"
    torch_format.save_torch_checkpoint(tmp_path / "odd.pt", odd)
    with pytest.raises(ValueError, match="variant 'transformer'"):
        rc.load_reference_checkpoint(tmp_path / "odd.pt")
    two_blocks = model_lib.init_params(
        jax.random.PRNGKey(0), model_lib.ModelConfig(cell=CellConfig(num_blocks=2))
    )
    with pytest.raises(ValueError, match="one block"):
        rc.save_reference_checkpoint(tmp_path / "two.pt", two_blocks, {"variant": "ns5"})


def _cli(*args):
    return run_module("experiments.evaluate_reference", *args)


@pytest.mark.slow
def test_cli_prints_json_and_reports_bad_files(tmp_path):
    done = _cli(f"--checkpoint={_path('ns5')}", "--num_batches=1", "--batch_size=2")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["variant"] == "ns5" and result["seed"] == 11 and result["num_sequences"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0
    # Library INFO logging (absl's "I1125 08:12:13 ..." lines) stays off.
    assert not re.search(r"^I\d{4} ", done.stderr, re.M), done.stderr
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path in (garbage, tmp_path / "missing.pt"):
        done = _cli(f"--checkpoint={path}")
        assert done.returncode == 2
        assert "evaluate_reference: error:" in done.stderr and str(path.name) in done.stderr
        assert done.stdout == ""
