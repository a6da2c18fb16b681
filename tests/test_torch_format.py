"""Tests for orthorecall.torch_format: torch.save zip checkpoints without torch.

Covers the reference checkpoints shipped in tests/fixtures, save/load round trips,
refusal of pickled code, clear errors for broken files, and (when torch is installed) a
cross-check both ways against torch.save / torch.load.
"""

import io
import json
import os
import pickle
import struct
import sys
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from orthorecall.torch_format import (
    TorchCheckpointError,
    UnsafeCheckpointError,
    load_torch_checkpoint,
    save_torch_checkpoint,
)
from tests.conftest import REFERENCE_CHECKPOINTS

FIXTURES = REFERENCE_CHECKPOINTS

# The reference's parameter names and shapes (docs/specification.md).
EXPECTED_SHAPES = {
    "embedding.weight": (80, 94),
    "norm.weight": (94,),
    "post_norm.weight": (94,),
    "layer.proj_up.weight": (384, 94),
    "layer.conv1d.conv.weight": (192, 1, 4),
    "layer.conv1d.conv.bias": (192,),
    "layer.q_proj.weight": (48, 4, 4),
    "layer.k_proj.weight": (48, 4, 4),
    "layer.v_proj.weight": (48, 4, 4),
    "layer.mlstm_cell.igate.weight": (4, 576),
    "layer.mlstm_cell.igate.bias": (4,),
    "layer.mlstm_cell.fgate.weight": (4, 576),
    "layer.mlstm_cell.fgate.bias": (4,),
    "layer.mlstm_cell.outnorm.weight": (192,),
    "layer.learnable_skip": (192,),
    "layer.proj_down.weight": (94, 192),
    "head.weight": (80, 94),
    "head.bias": (80,),
}

_RNG = np.random.default_rng(0)
ARRAYS = {
    "float32": _RNG.standard_normal((3, 5)).astype(np.float32),
    "float32_specials": np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32),
    "float64_0d": np.array(3.25),
    "float16_empty": np.zeros((2, 0, 3), np.float16),
    "bfloat16": np.array([1.5, -2.0, 3e38, 1e-3], ml_dtypes.bfloat16),
    "int64": np.arange(-3, 7, dtype=np.int64).reshape(2, 5),
    "int32": np.array([-(2**31), 2**31 - 1], np.int32),
    "int16": np.array([-7, 300], np.int16),
    "int8": np.array([-128, 127], np.int8),
    "uint8": np.arange(250, 256, dtype=np.uint8),
    "bool": np.array([[True, False], [False, True]]),
    "complex64": np.array([1 + 2j, -3.5j], np.complex64),
    "complex128": np.array([[1 - 1j]], np.complex128),
    "uint16": np.array([0, 65535], np.uint16),  # no legacy storage class: v3 form
    "float8_e4m3fn": np.array([0.5, -448.0], ml_dtypes.float8_e4m3fn),
    "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
    "strided_slice": np.arange(20, dtype=np.int32)[1::3],
    "big_endian": np.arange(4, dtype=">f8"),
    "numpy_scalar": np.float32(2.5),
}


def _assert_identical(a, b):
    """Same structure, container types, key order, attributes and bitwise array data."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_identical(a[k], b[k])
        if isinstance(a, OrderedDict):  # e.g. a state dict's _metadata attribute
            _assert_identical(dict(vars(a)), dict(vars(b)))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    else:
        assert a == b


def _native_c_order(arr):
    """What a round trip should give back: native byte order, C-contiguous, same shape."""
    arr = np.asarray(arr)
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")


def _write_zip(path, records, prefix="ck/"):
    """A hand-made checkpoint zip: records maps names (without prefix) to bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(prefix + name, data)
    return path


def _bin(n):
    return b"J" + struct.pack("<i", n)  # BININT


def _tensor_expr(storage_class, numel, offset, size, stride):
    """Pickle opcodes that push one tensor on storage '0', written as torch.save does."""
    tup = lambda xs: b"(" + b"".join(_bin(x) for x in xs) + b"t"
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\n" + storage_class.encode() + b"\n"
        b"X\x01\x00\x00\x000X\x06\x00\x00\x00cuda:0"
        + _bin(numel)
        + b"tQ"
        + _bin(offset)
        + tup(size)
        + tup(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def _tensor_pickle(storage_class, numel, offset, size, stride):
    """Protocol-2 pickle of {'t': tensor}."""
    expr = _tensor_expr(storage_class, numel, offset, size, stride)
    return b"\x80\x02}X\x01\x00\x00\x00t" + expr + b"s."


def _tensors_pickle(storage_class, numel, views):
    """Protocol-2 pickle of {'t': [tensor, ...]}, one tensor per (offset, size, stride)."""
    exprs = b"".join(_tensor_expr(storage_class, numel, *view) for view in views)
    return b"\x80\x02}X\x01\x00\x00\x00t](" + exprs + b"es."


def _peak_bytes(fn):
    """(exception raised by fn or None, peak bytes traced while it ran, numpy's included)."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except Exception as e:
        error = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


def _set_declared_size(path, name, size):
    """Make the zip directory (and local header) claim ``size`` bytes for record ``name``."""
    data = bytearray(path.read_bytes())
    for sig, name_at, sizes_at in ((b"PK\x01\x02", 46, 20), (b"PK\x03\x04", 30, 18)):
        pos = data.find(sig)
        while pos >= 0:
            if data[pos + name_at :].startswith(name.encode()):
                struct.pack_into("<II", data, pos + sizes_at, size, size)
            pos = data.find(sig, pos + 1)
    path.write_bytes(bytes(data))


def _big_endian(arr):
    return arr.byteswap().tobytes() if sys.byteorder == "little" else arr.tobytes()


# ---------------------------------------------------------------- reference fixtures


@pytest.mark.parametrize("variant", ["baseline", "ns5"])
def test_reference_fixture_loads(variant):
    obj = load_torch_checkpoint(FIXTURES / f"v80_s512_{variant}_seed11_steps2000.pt")
    sd, cfg = obj["state_dict"], obj["cfg"]
    assert isinstance(sd, OrderedDict)
    assert {k: v.shape for k, v in sd.items()} == EXPECTED_SHAPES
    for name, arr in sd.items():
        assert arr.dtype == np.float32 and arr.flags.c_contiguous, name
        assert np.isfinite(arr).all() and np.any(arr != 0), name
    record = next(
        r for r in json.loads((FIXTURES / "records.json").read_text()) if r["variant"] == variant
    )
    for key in (
        "variant",
        "seed",
        "vocab_size",
        "seq_len",
        "noise_vocab_size",
        "frac_noise",
        "dim",
        "batch_size",
        "val_batches",
        "steps",
        "lr",
    ):
        assert cfg[key] == record[key], key


@pytest.mark.parametrize("variant", ["baseline", "ns5"])
def test_reference_fixture_round_trip_is_bitwise(variant, tmp_path):
    obj = load_torch_checkpoint(FIXTURES / f"v80_s512_{variant}_seed11_steps2000.pt")
    save_torch_checkpoint(tmp_path / "copy.pt", obj)
    again = load_torch_checkpoint(tmp_path / "copy.pt")
    _assert_identical(obj, again)  # includes the state dict's _metadata attribute
    assert again["state_dict"]._metadata[""] == {"version": 1}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(ARRAYS))
def test_array_round_trip(name, tmp_path):
    arr = ARRAYS[name]
    save_torch_checkpoint(tmp_path / "a.pt", {"x": arr})
    out = load_torch_checkpoint(tmp_path / "a.pt")["x"]
    assert out.flags.c_contiguous and out.flags.writeable
    _assert_identical(out, _native_c_order(arr))


def test_structure_round_trip(tmp_path):
    shared = np.arange(3.0)
    obj = {
        "sd": OrderedDict([("b", np.ones(2, np.float32)), ("a", shared)]),
        "cfg": {
            "name": "ns5",
            "big": 2**70,
            "neg": -1,
            "lr": 3e-3,
            "flag": True,
            "none": None,
            "nested": [1, (2, "x"), {"k": [shared]}],
        },
        "empty": [{}, [], (), OrderedDict()],
    }
    path = tmp_path / "s.pt"
    save_torch_checkpoint(path, obj)
    out = load_torch_checkpoint(path)
    _assert_identical(obj, out)
    assert out["sd"]["a"] is out["cfg"]["nested"][2]["k"][0]  # one tensor, pickled once


def test_saved_file_layout_is_torchs(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    obj = {"a": np.arange(3, dtype=np.uint8), "b": np.ones((2, 2), np.float32)}
    save_torch_checkpoint(tmp_path / "x" / "run.v1.pt", obj)
    save_torch_checkpoint(tmp_path / "y" / "run.v1.pt", obj)
    data = (tmp_path / "x" / "run.v1.pt").read_bytes()
    assert data == (tmp_path / "y" / "run.v1.pt").read_bytes()  # deterministic
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == [
            "run/data.pkl",
            "run/.format_version",
            "run/.storage_alignment",
            "run/byteorder",
            "run/data/0",
            "run/data/1",
            "run/version",
            "run/.data/serialization_id",
        ]
        assert zf.read("run/byteorder") == sys.byteorder.encode()
        for info in zf.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
            # Like torch's miniz writer: 64-byte aligned data, each followed by a data
            # descriptor (flag bit 3); torch's offset calculation relies on both.
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
            assert info.flag_bits & 0x08, info.filename
            assert info.compress_type == zipfile.ZIP_STORED


@pytest.mark.parametrize("bad", [object(), {1, 2}, np.array([None], dtype=object), b"\x00"])
def test_save_rejects_unsupported_values_and_writes_nothing(bad, tmp_path):
    with pytest.raises(TypeError, match="cannot save"):
        save_torch_checkpoint(tmp_path / "bad.pt", {"x": bad})
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    from orthorecall import torch_format

    path = tmp_path / "ck.pt"
    save_torch_checkpoint(path, {"v": np.zeros(2)})
    before = path.read_bytes()
    real = torch_format._write_record

    def crash_on_storage(zf, f, name, data):  # simulate a crash halfway through the file
        if "/data/" in name:
            raise OSError("disk full")
        real(zf, f, name, data)

    monkeypatch.setattr(torch_format, "_write_record", crash_on_storage)
    with pytest.raises(OSError, match="disk full"):
        save_torch_checkpoint(path, {"v": np.ones(2)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


# ---------------------------------------------------------------- reading details


def test_storage_offset_and_strides_are_honoured(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    path = _write_zip(
        tmp_path / "v.pt",
        {
            "data.pkl": _tensor_pickle("FloatStorage", 12, 1, (2, 3), (1, 4)),
            "byteorder": b"little",
            "data/0": storage.astype("<f4").tobytes(),
        },
    )
    out = load_torch_checkpoint(path)["t"]
    np.testing.assert_array_equal(out, [[1, 5, 9], [2, 6, 10]])
    assert out.flags.c_contiguous


@pytest.mark.parametrize(
    "storage_class, values",
    [
        ("FloatStorage", np.array([1.5, -2.0, 3.0], np.float32)),
        ("BFloat16Storage", np.array([1.5, -2.0, 3.0], ml_dtypes.bfloat16)),
        ("LongStorage", np.array([1, -2, 2**40], np.int64)),
        ("ComplexFloatStorage", np.array([1 + 2j, 3, -4j], np.complex64)),
    ],
)
def test_big_endian_checkpoint(storage_class, values, tmp_path):
    path = _write_zip(
        tmp_path / "be.pt",
        {
            "data.pkl": _tensor_pickle(storage_class, 3, 0, (3,), (1,)),
            "byteorder": b"big",
            "data/0": _big_endian(values),
        },
    )
    out = load_torch_checkpoint(path)["t"]
    assert out.dtype == values.dtype and out.tobytes() == values.tobytes()


def test_missing_byteorder_record_means_little_endian(tmp_path):
    path = _write_zip(
        tmp_path / "le.pt",
        {
            "data.pkl": _tensor_pickle("IntStorage", 2, 0, (2,), (1,)),
            "data/0": np.array([7, -8], "<i4").tobytes(),
        },
    )
    np.testing.assert_array_equal(load_torch_checkpoint(path)["t"], [7, -8])


# ---------------------------------------------------------------- security


def _marker_payload(marker: Path, via: str) -> object:
    class Payload:
        def __reduce__(self):
            if via == "eval":
                return eval, (f"open({str(marker)!r}, 'w').close()",)
            return os.system, (f"touch {marker}",)

    return Payload()


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("via", ["eval", "system"])
def test_pickled_code_is_refused_and_not_run(via, protocol, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": _marker_payload(marker, via)}, protocol=protocol)
    if via == "eval":  # control: the payload really does run under plain pickle
        control = tmp_path / "control"
        pickle.loads(pickle.dumps(_marker_payload(control, via), protocol=protocol))
        assert control.exists()
    path = _write_zip(tmp_path / "evil.pt", {"data.pkl": payload, "byteorder": b"little"})
    # Protocol 2 spells the builtins module '__builtin__'.
    refused = (
        r"(builtins|__builtin__)\.eval" if via == "eval" else rf"{os.system.__module__}\.system"
    )
    with pytest.raises(UnsafeCheckpointError, match=refused) as err:
        load_torch_checkpoint(path)
    assert isinstance(err.value, pickle.UnpicklingError)
    assert isinstance(err.value, TorchCheckpointError)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", [b"ctorch\nFloatStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n"]
)
def test_build_opcode_cannot_modify_allowed_globals(target, tmp_path):
    # BUILD with slot state (None, {'__defaults__': ...}) would setattr on the object.
    evil = b"\x80\x02" + target + b"N}X\x0c\x00\x00\x00__defaults__)s\x86b."
    path = _write_zip(tmp_path / "build.pt", {"data.pkl": evil})
    with pytest.raises(TorchCheckpointError, match="corrupt"):
        load_torch_checkpoint(path)


def test_build_opcode_cannot_resize_a_storage(tmp_path):
    # BUILD with slot state {'numel': 10**6} on the storage a persistent id returned.
    evil = (
        b"\x80\x02}X\x01\x00\x00\x00tctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00"
        b"storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
        + _bin(1)
        + b"tQN}X\x05\x00\x00\x00numel"
        + _bin(10**6)
        + b"s\x86b"
        + _bin(0)
        + b"("
        + _bin(1000)
        + b"t("
        + _bin(1)
        + b"t\x89ccollections\nOrderedDict\n)RtRs."
    )
    path = _write_zip(tmp_path / "b.pt", {"data.pkl": evil, "data/0": bytes(4)})
    with pytest.raises(TorchCheckpointError, match="storages cannot be modified"):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------- broken files


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "content", [b"", b"this is not a checkpoint\n" * 40, b"\x80\x02}q\x00."]
)  # a bare pickle: legacy format
def test_not_a_zip(content, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(TorchCheckpointError, match="not a zip archive") as err:
        load_torch_checkpoint(path)
    assert str(path) in str(err.value)


def test_zip_without_data_pkl(tmp_path):
    path = _write_zip(tmp_path / "other.zip", {"readme.txt": b"hello"})
    with pytest.raises(TorchCheckpointError, match=r"data\.pkl"):
        load_torch_checkpoint(path)


def test_truncated_storage(tmp_path):
    path = _write_zip(
        tmp_path / "short.pt",
        {
            "data.pkl": _tensor_pickle("FloatStorage", 12, 0, (12,), (1,)),
            "data/0": np.zeros(11, np.float32).tobytes(),
        },
    )
    with pytest.raises(TorchCheckpointError, match="truncated: 44 bytes, expected 48"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "numel, offset, size, stride, problem",
    [
        (12, 0, (4, 4), (4, 1), "reaches element 15"),  # view beyond the storage's end
        (12, 12, (1,), (1,), "reaches element 12"),
        (12, 0, (2, 2), (1,), "malformed tensor"),  # size/stride rank mismatch
    ],
)
def test_out_of_range_views_are_refused(numel, offset, size, stride, problem, tmp_path):
    path = _write_zip(
        tmp_path / "v.pt",
        {
            "data.pkl": _tensor_pickle("FloatStorage", numel, offset, size, stride),
            "data/0": np.zeros(numel, np.float32).tobytes(),
        },
    )
    with pytest.raises(TorchCheckpointError, match=problem):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "numel, size, stride",
    [
        (1, (2**16, 2**14), (0, 0)),  # 4 GiB of float32 from a 4-byte storage
        (16, (4, 4), (1, 1)),  # overlapping rows: 16 elements from 7
        (4, (2, 3), (2, 0)),  # an expand()ed tensor
    ],
)
def test_zero_stride_and_overlapping_views_are_refused_before_allocating(
    numel, size, stride, tmp_path
):
    path = _write_zip(
        tmp_path / "z.pt",
        {
            "data.pkl": _tensor_pickle("FloatStorage", numel, 0, size, stride),
            "data/0": np.zeros(numel, np.float32).tobytes(),
        },
    )
    assert path.stat().st_size < 1000
    error, peak = _peak_bytes(lambda: load_torch_checkpoint(path))
    assert isinstance(error, TorchCheckpointError), error
    assert "overlap" in str(error) and str(path) in str(error)
    assert peak < 100_000


def test_declared_record_size_is_bounded_by_the_file(tmp_path):
    # The zip directory claims a 4 GiB storage record in a file of a few hundred bytes.
    numel = (2**32 - 16) // 4
    path = _write_zip(
        tmp_path / "big.pt",
        {
            "data.pkl": _tensor_pickle("FloatStorage", numel, 0, (numel,), (1,)),
            "data/0": np.zeros(4, np.float32).tobytes(),
        },
    )
    _set_declared_size(path, "ck/data/0", numel * 4)
    error, peak = _peak_bytes(lambda: load_torch_checkpoint(path))
    assert isinstance(error, TorchCheckpointError), error
    assert "ck/data/0" in str(error) and f"{path.stat().st_size} bytes" in str(error)
    assert peak < 100_000


def test_compressed_records_are_refused(tmp_path):
    # torch.save never compresses; a deflated record could expand a thousandfold.
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ck/data.pkl", _tensor_pickle("FloatStorage", 2**18, 0, (2**18,), (1,)))
        zf.writestr("ck/data/0", bytes(2**20))
    assert path.stat().st_size < 5000
    error, peak = _peak_bytes(lambda: load_torch_checkpoint(path))
    assert isinstance(error, TorchCheckpointError), error
    assert "compressed" in str(error)
    assert peak < 100_000


def test_views_sharing_a_storage_cannot_multiply_it(tmp_path):
    # 200 whole-storage views of one 16 KiB storage would materialize 3.2 MiB.
    numel = 4096
    path = _write_zip(
        tmp_path / "many.pt",
        {
            "data.pkl": _tensors_pickle("FloatStorage", numel, [(0, (numel,), (1,))] * 200),
            "data/0": np.zeros(numel, np.float32).tobytes(),
        },
    )
    error, peak = _peak_bytes(lambda: load_torch_checkpoint(path))
    assert isinstance(error, TorchCheckpointError), error
    assert "times the size of the file" in str(error)
    assert peak < 8 * path.stat().st_size


def test_a_few_views_of_one_storage_are_fine(tmp_path):
    path = _write_zip(
        tmp_path / "few.pt",
        {
            "data.pkl": _tensors_pickle(
                "FloatStorage", 12, [(0, (12,), (1,)), (0, (4, 3), (1, 4)), (1, (2, 2), (6, 1))]
            ),
            "data/0": np.arange(12, dtype="<f4").tobytes(),
        },
    )
    full, transposed, corner = load_torch_checkpoint(path)["t"]
    np.testing.assert_array_equal(full, np.arange(12))
    np.testing.assert_array_equal(transposed, np.arange(12).reshape(3, 4).T)
    np.testing.assert_array_equal(corner, [[1, 2], [7, 8]])


def test_bytes_objects_decode_but_codecs_cannot_amplify(tmp_path):
    # Protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); other codecs (nested
    # 'hex' doubles the size per call) have no place in a checkpoint.
    latin = pickle.dumps({"t": b"\xffa"}, protocol=2)
    assert b"_codecs\nencode" in latin
    path = _write_zip(tmp_path / "latin.pt", {"data.pkl": latin})
    assert load_torch_checkpoint(path) == {"t": b"\xffa"}
    hexed = b"c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00latin1\x86R"
    for _ in range(3):
        hexed = b"c_codecs\nencode\n" + hexed + b"X\x03\x00\x00\x00hex\x86R"
    path = _write_zip(tmp_path / "hex.pt", {"data.pkl": b"\x80\x02" + hexed + b"."})
    with pytest.raises(UnsafeCheckpointError, match="latin1"):
        load_torch_checkpoint(path)


def test_metadata_only_reads_no_tensor_data(tmp_path, monkeypatch):
    from orthorecall import torch_format

    path = FIXTURES / "v80_s512_ns5_seed11_steps2000.pt"
    full = load_torch_checkpoint(path)
    real_open = zipfile.ZipFile.open

    def open_no_storage(self, name, *args, **kwargs):
        assert "/data/" not in getattr(name, "filename", name), name
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_no_storage)
    specs = load_torch_checkpoint(path, metadata_only=True)
    assert specs["cfg"] == full["cfg"] and list(specs["state_dict"]) == list(full["state_dict"])
    for name, spec in specs["state_dict"].items():
        assert isinstance(spec, torch_format.TensorSpec), name
        assert (spec.shape, spec.dtype) == (full["state_dict"][name].shape, np.dtype(np.float32))


def test_missing_storage_record_and_bad_pickle(tmp_path):
    path = _write_zip(
        tmp_path / "m.pt", {"data.pkl": _tensor_pickle("FloatStorage", 1, 0, (1,), (1,))}
    )
    with pytest.raises(TorchCheckpointError, match="missing storage record 'ck/data/0'"):
        load_torch_checkpoint(path)
    path = _write_zip(tmp_path / "p.pt", {"data.pkl": b"\x80\x02}X\x05\x00"})
    with pytest.raises(TorchCheckpointError, match="corrupt torch checkpoint"):
        load_torch_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pt"
    save_torch_checkpoint(path, {"w": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(TorchCheckpointError):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------- against real torch


def _torch_to_numpy(t):
    import torch

    t = t.detach().contiguous()
    special = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    }
    if t.dtype in special:
        raw, dtype = special[t.dtype]
        return t.view(raw).numpy().view(dtype)
    return t.numpy()


def test_torch_loads_our_checkpoints(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from torch.utils.serialization import config

    obj = {
        "state_dict": OrderedDict(ARRAYS),
        "cfg": {"variant": "ns5", "lr": 3e-3},
        "misc": [1, (2, None), "x"],
    }
    path = tmp_path / "ours.pt"
    save_torch_checkpoint(path, obj)
    # Also torch's mmap path that computes record offsets from the zip layout; the debug
    # variable makes torch assert those offsets against the zip directory.
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    default = config.load.calculate_storage_offsets
    for mmap in (False, True):
        config.load.calculate_storage_offsets = mmap
        try:
            loaded = torch.load(path, weights_only=True, mmap=mmap)
        finally:
            config.load.calculate_storage_offsets = default
        assert type(loaded["state_dict"]) is OrderedDict
        assert loaded["cfg"] == obj["cfg"] and loaded["misc"] == obj["misc"]
        for name, arr in ARRAYS.items():
            t = loaded["state_dict"][name]
            assert isinstance(t, torch.Tensor) and t.device.type == "cpu", name
            _assert_identical(_torch_to_numpy(t), _native_c_order(arr))


def test_we_load_torch_saves(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = OrderedDict(
        [
            ("plain", torch.randn(3, 4, generator=torch.Generator().manual_seed(0))),
            ("transposed", base.t()),
            ("offset_and_stride", base[1:, ::2]),  # shares base's storage at an offset
            ("base", base),
            ("bf16", torch.tensor([1.5, -2.25], dtype=torch.bfloat16)),
            ("f16", torch.tensor([[0.1]], dtype=torch.float16)),
            ("f64_0d", torch.tensor(2.5, dtype=torch.float64)),
            ("i64", torch.arange(5)),
            ("bool", torch.tensor([True, False])),
            ("u16", torch.tensor([1, 65535], dtype=torch.uint16)),
            ("empty", torch.zeros(0, 3)),
            ("param", torch.nn.Parameter(torch.ones(2))),
        ]
    )
    path = tmp_path / "theirs.pt"
    torch.save({"state_dict": sd, "cfg": {"seed": 11}}, path)
    ours = load_torch_checkpoint(path)
    assert ours["cfg"] == {"seed": 11} and list(ours["state_dict"]) == list(sd)
    for name, t in sd.items():
        _assert_identical(ours["state_dict"][name], _torch_to_numpy(t))


def test_reference_fixture_matches_torch_load():
    torch = pytest.importorskip("torch")
    path = FIXTURES / "v80_s512_ns5_seed11_steps2000.pt"
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    ours = load_torch_checkpoint(path)
    assert ours["cfg"] == theirs["cfg"]
    for name, t in theirs["state_dict"].items():
        _assert_identical(ours["state_dict"][name], _torch_to_numpy(t))
