"""Reference checkpoints: import, export, and the acceptance test that the
imported models reproduce the accuracy and loss the reference recorded."""

import json
import re
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest

from experiments.study.evaluate_reference import evaluate_checkpoint
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
    return run_module("experiments.study.evaluate_reference", *args)


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


# ---------------------------------------------------------------- hostile files


def _fixture(variant="ns5"):
    """A fresh, editable copy of a reference checkpoint's contents."""
    return torch_format.load_torch_checkpoint(_path(variant))


def _saved(tmp_path, obj, name="ck.pt"):
    path = tmp_path / name
    torch_format.save_torch_checkpoint(path, obj)
    return path


def _refusal(path, **overrides) -> str:
    """The message of the ValueError that loading ``path`` raises (nothing else may)."""
    with pytest.raises(ValueError) as err:
        rc.load_reference_checkpoint(path, **overrides)
    assert str(path) in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("head.bias", (81,), (80,)),
        ("embedding.weight", (80, 95), (80, 94)),  # the cfg says dim=94
        ("layer.proj_up.weight", (94, 384), (384, 94)),  # transposed
        ("layer.q_proj.weight", (48, 4, 5), (48, 4, 4)),
        ("layer.mlstm_cell.igate.bias", (4, 1), (4,)),
        ("layer.conv1d.conv.weight", (192, 4), (192, 1, 4)),
        ("layer.learnable_skip", (), (192,)),
    ],
)
def test_wrong_shapes_name_the_tensor_and_both_shapes(name, shape, expected, tmp_path):
    obj = _fixture()
    obj["state_dict"][name] = np.zeros(shape, np.float32)
    message = _refusal(_saved(tmp_path, obj))
    assert f"'{name}' has shape {shape}, expected {expected}" in message


def test_shapes_follow_the_checkpoints_cfg(tmp_path):
    obj = _fixture()
    obj["cfg"]["vocab_size"] = 96  # the tensors are for 80
    message = _refusal(_saved(tmp_path, obj))
    assert "'embedding.weight' has shape (80, 94), expected (96, 94)" in message
    assert "'head.weight' has shape (80, 94), expected (96, 94)" in message
    assert "'head.bias' has shape (80,), expected (96,)" in message
    assert "vocab_size=96" in message


def test_shapes_are_checked_before_tensor_data_is_read(tmp_path):
    obj = _fixture()
    obj["state_dict"]["head.weight"] = np.zeros((8000, 94), np.float32)  # 3 MB
    path = _saved(tmp_path, obj)
    tracemalloc.start()
    try:
        message = _refusal(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "'head.weight' has shape (8000, 94), expected (80, 94)" in message
    assert peak < 1_000_000


@pytest.mark.parametrize("dtype", [np.int64, np.complex64, np.bool_, ml_dtypes.float8_e4m3fn])
def test_non_float_tensors_are_refused(dtype, tmp_path):
    obj = _fixture()
    obj["state_dict"]["layer.learnable_skip"] = np.ones(192, dtype)
    message = _refusal(_saved(tmp_path, obj))
    assert f"'layer.learnable_skip' has dtype {np.dtype(dtype)}, expected float32" in message


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16])
def test_other_float_dtypes_are_read_as_float32(dtype, tmp_path):
    obj = _fixture()
    skip = np.linspace(-2, 2, 192).astype(dtype)
    obj["state_dict"]["layer.learnable_skip"] = skip
    loaded = rc.load_reference_checkpoint(_saved(tmp_path, obj))
    np.testing.assert_array_equal(
        loaded.params["blocks"][0]["mlstm"]["skip"], skip.astype(np.float32)
    )


def test_non_finite_weights_are_named(tmp_path):
    obj = _fixture()
    obj["state_dict"]["head.bias"][[3, 5]] = np.nan
    obj["state_dict"]["layer.proj_down.weight"][0, 0] = -np.inf
    message = _refusal(_saved(tmp_path, obj))
    assert "non-finite" in message
    assert "'head.bias' (2 of 80 entries)" in message
    assert "'layer.proj_down.weight' (1 of 18048 entries)" in message


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda o: o["cfg"].update(variant=5), "cfg['variant']"),
        (lambda o: o["cfg"].update(variant=["ns5"]), "cfg['variant']"),
        (lambda o: o["cfg"].update(variant=None), "cfg['variant']"),
        (lambda o: o["cfg"].pop("variant"), "cfg['variant']"),
        (lambda o: o["cfg"].update(vocab_size="80"), "cfg['vocab_size']"),
        (lambda o: o["cfg"].update(vocab_size=1), "cfg['vocab_size']"),
        (lambda o: o["cfg"].update(dim=94.0), "cfg['dim']"),
        (lambda o: o["cfg"].update(dim=-94), "cfg['dim']"),
        (lambda o: o["cfg"].update(num_heads=5), "cfg['num_heads']"),
        (lambda o: o.update(cfg="ns5"), "cfg"),
        (lambda o: o.update(cfg=None), "cfg"),
        (lambda o: o.update(state_dict=[np.zeros(3, np.float32)]), "state_dict"),
        (lambda o: o["state_dict"].update({"head.bias": [0.0] * 80}), "'head.bias' is a list"),
        (lambda o: o["state_dict"].update({5: np.zeros(1, np.float32)}), "unexpected [5]"),
    ],
)
def test_malformed_cfg_and_state_dict_give_messages_naming_the_field(edit, field, tmp_path):
    obj = _fixture()
    edit(obj)
    assert field in _refusal(_saved(tmp_path, obj))


def test_cell_overrides_cannot_contradict_the_checkpoint():
    assert "num_heads" in _refusal(_path("ns5"), num_heads=2)
    assert "chunk_size" in _refusal(_path("ns5"), chunk_size=0)


def test_non_reference_widths_round_trip(tmp_path):
    # Inner width 60 at D = 29 is where 60 / 29 * 29 rounds up to 61 in floating point.
    rng = np.random.default_rng(0)
    for cell in (
        CellConfig(embedding_dim=29, num_heads=4, inner_multiple=4, read=reads.NS5),
        CellConfig(embedding_dim=16, num_heads=2, inner_multiple=8, read=reads.RAW),
    ):
        dims = {
            "vocab_size": 24,
            "embedding_dim": cell.embedding_dim,
            "num_heads": cell.num_heads,
            "inner_dim": cell.inner_dim,
            "conv_kernel_size": cell.conv_kernel_size,
            "qkv_block_size": cell.qkv_block_size,
        }
        state_dict = {
            name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in rc.expected_shapes(dims).items()
        }
        params, _ = rc.params_from_state_dict(state_dict, {**dims, "dim": cell.embedding_dim})
        path = tmp_path / "ours.pt"
        variant = "ns5" if cell.read == reads.NS5 else "baseline"
        rc.save_reference_checkpoint(path, params, {"variant": variant, "seed": 1})
        loaded = rc.load_reference_checkpoint(path)
        widths = lambda c: (c.embedding_dim, c.num_heads, c.inner_dim, c.head_dim, c.read)
        assert loaded.config.vocab_size == 24 and widths(loaded.config.cell) == widths(cell)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, params)


def test_export_refuses_a_cfg_that_contradicts_the_parameters(tmp_path):
    params = rc.load_reference_checkpoint(_path("ns5")).params
    for cfg, field in [
        ({"variant": "ns5", "vocab_size": 96}, "cfg['vocab_size']"),
        ({"variant": "ns5", "dim": 64}, "cfg['dim']"),
        ({"variant": 5}, "cfg['variant']"),
        ({"variant": "transformer"}, "variant 'transformer'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(field)):
            rc.save_reference_checkpoint(tmp_path / "x.pt", params, cfg)
    assert not (tmp_path / "x.pt").exists()
