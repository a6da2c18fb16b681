"""Read and write PyTorch ``torch.save`` zip checkpoints without torch.

A ``torch.save`` file is a zip archive whose entries share one folder prefix:
``<name>/data.pkl`` (a protocol-2 pickle of the saved object), ``<name>/data/<key>``
(the raw bytes of each tensor storage), ``<name>/byteorder``, ``<name>/version`` and a
few bookkeeping records. Inside the pickle a tensor is
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
and a storage is the persistent id ``('storage', torch.FloatStorage, key, device, numel)``.

The loader never runs pickled code: its unpickler resolves only an allow-list of globals
(tensor rebuild functions, storage classes and dtypes as markers, ``OrderedDict`` and a
few harmless builtins) and refuses everything else. Tensors come back as C-contiguous
host numpy arrays whatever device they were saved from. The writer emits the same
layout with tensors on ``cpu``, readable by ``torch.load(path, weights_only=True)``.

A file cannot make the loader allocate much more than its own size: every record must
be stored uncompressed (as torch.save writes them) within the file, each tensor view is
checked against the size of its storage before anything is read, views that address an
element twice (zero or overlapping strides) are refused, and all tensors together may
hold at most ``_MAX_TENSOR_BYTES_PER_FILE_BYTE`` times the file's size.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import struct
import sys
import uuid
import zipfile
from collections import OrderedDict
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

__all__ = [
    "TensorSpec",
    "TorchCheckpointError",
    "UnsafeCheckpointError",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
]

# Legacy storage classes (``torch.FloatStorage`` ...) name the element type of a storage.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_STORAGE_DTYPES = {k: np.dtype(v) for k, v in _STORAGE_DTYPES.items()}
_STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items()}
# Dtypes without a legacy storage class are saved by torch as an UntypedStorage (bytes)
# plus an explicit ``torch.<dtype>`` argument to ``_rebuild_tensor_v3``.
_V3_DTYPES = {
    n: np.dtype(t)
    for n, t in [
        ("uint16", np.uint16),
        ("uint32", np.uint32),
        ("uint64", np.uint64),
        ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
        ("float8_e5m2", ml_dtypes.float8_e5m2),
    ]
}
_V3_NAMES = {v: k for k, v in _V3_DTYPES.items()}
_SAFE_BUILTINS = {
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
}
_PLAIN_TYPES = (dict, OrderedDict, list, tuple, str, int, float, bool, type(None))
_ALIGNMENT = 64  # torch aligns storage bytes to 64 in the file so they can be mmapped
# Tensors may legitimately share a storage (a tensor and its transpose, slices of one
# buffer), so they can hold more bytes than the file; many whole-storage views of one
# storage are a memory bomb. No real checkpoint comes near this factor.
_MAX_TENSOR_BYTES_PER_FILE_BYTE = 4
_MAX_DIMS = 64  # numpy's limit
_BYTEORDER_RECORD_MAX = 16


class TorchCheckpointError(ValueError):
    """A file is not a readable torch checkpoint (wrong format, corrupt, or unsafe)."""


class UnsafeCheckpointError(TorchCheckpointError, pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the loader's allow-list."""


class TensorSpec(NamedTuple):
    """What ``load_torch_checkpoint(..., metadata_only=True)`` gives for a tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype


class _Marker(str):
    """A torch storage class or dtype global, resolved to its name only.

    An immutable str without an instance __dict__, so a crafted BUILD opcode cannot
    give it attributes."""

    __slots__ = ()


def load_torch_checkpoint(path: str | os.PathLike, *, metadata_only: bool = False) -> Any:
    """Load a ``torch.save`` zip checkpoint without torch and without running pickled code.

    Args:
        path: the checkpoint file.
        metadata_only: give each tensor as a ``TensorSpec`` (shape and dtype) and read no
            tensor data, e.g. to check shapes before committing memory to them. The
            file's layout is checked exactly as in a full load.
    Returns:
        The saved top-level object (typically a dict), with every tensor replaced by a
        C-contiguous numpy array of the same dtype (bfloat16 via ``ml_dtypes``) and
        shape, in native byte order. Device tags such as ``cuda:0`` are ignored.
    Raises:
        FileNotFoundError: ``path`` does not exist (other ``OSError``s as ``open``).
        UnsafeCheckpointError: the pickle references a global outside the allow-list
            (nothing from the file is executed).
        TorchCheckpointError: the file is not a zip torch checkpoint, or is corrupt
            (truncated or compressed records, bad pickle, a tensor view outside its
            storage or addressing an element twice, tensors far larger than the file).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        file_bytes = os.fstat(f.fileno()).st_size
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, ValueError, struct.error, OverflowError) as e:
            raise TorchCheckpointError(
                f"{path}: not a zip archive ({e}); expected a torch.save file written by "
                "torch>=1.6 (legacy non-zip checkpoints are not supported: re-save with "
                "a current torch)"
            ) from e
        with zf:
            pkl = next(
                (n for n in zf.namelist() if n.split("/")[-1] == "data.pkl" and n.count("/") <= 1),
                None,
            )
            if pkl is None:
                raise TorchCheckpointError(
                    f"{path}: zip archive has no '<name>/data.pkl'; this is not a torch.save "
                    "checkpoint (or it is damaged): check the file or re-save it"
                )
            try:
                prefix = pkl[: -len("data.pkl")]
                return _Unpickler(zf, prefix, path, file_bytes, metadata_only).load()
            except (TorchCheckpointError, OSError, MemoryError):
                raise
            except Exception as e:  # any other failure means a malformed pickle or zip
                raise TorchCheckpointError(
                    f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e}); "
                    "re-create or re-download the file"
                ) from e


class _Storage:
    """A storage record of the checkpoint: checked against the zip directory, not read.

    ``numel`` counts elements of ``dtype`` (bytes for an untyped storage)."""

    __slots__ = ("dtype", "key", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel

    def __setstate__(self, state):  # a crafted BUILD opcode must not resize a storage
        raise TypeError("storages cannot be modified")


class _Unpickler(pickle.Unpickler):
    """Unpickler that maps tensors to numpy arrays and refuses all other globals."""

    def __init__(
        self, zf: zipfile.ZipFile, prefix: str, path: str, file_bytes: int, metadata_only: bool
    ):
        self.zf, self.prefix, self.path, self.file_bytes = zf, prefix, path, file_bytes
        self.metadata_only = metadata_only
        self.infos = {info.filename: info for info in zf.infolist()}
        super().__init__(io.BytesIO(self._read(prefix + "data.pkl")))
        order = "little"  # torch's default
        if prefix + "byteorder" in self.infos:
            raw = self._read(prefix + "byteorder", limit=_BYTEORDER_RECORD_MAX)
            order = raw.decode("ascii", "replace")
        if order not in ("little", "big"):
            self._fail(f"unknown byteorder record {order!r}")
        self.swap = order != sys.byteorder
        self.storages: dict[str, _Storage] = {}
        self.storage_bytes: dict[str, np.ndarray] = {}
        self.tensor_bytes = 0

    def _fail(self, what: str):
        raise TorchCheckpointError(
            f"{self.path}: {what}; the checkpoint is corrupt or "
            "not written by torch.save: re-create it"
        )

    def _record(self, name: str, nbytes: int | None = None) -> zipfile.ZipInfo:
        """The zip entry ``name``, checked to be stored uncompressed within the file and,
        given ``nbytes``, to hold at least that many bytes."""
        info = self.infos.get(name)
        if info is None:
            self._fail(f"missing storage record '{name}'")
        if info.compress_type != zipfile.ZIP_STORED:
            self._fail(
                f"record '{name}' is compressed (zip method {info.compress_type}), but "
                "torch.save stores every record uncompressed"
            )
        # Stored data lies inside the file, so its size bounds what reading it allocates.
        if info.file_size != info.compress_size or (
            info.header_offset + info.compress_size > self.file_bytes
        ):
            self._fail(
                f"record '{name}' claims {info.file_size} bytes but the whole file has "
                f"{self.file_bytes} bytes"
            )
        if nbytes is not None and info.file_size < nbytes:
            self._fail(f"storage '{name}' is truncated: {info.file_size} bytes, expected {nbytes}")
        return info

    def _read(self, name: str, nbytes: int | None = None, limit: int | None = None) -> bytes:
        info = self._record(name, nbytes)
        if limit is not None and info.file_size > limit:
            self._fail(f"record '{name}' is {info.file_size} bytes long, expected <= {limit}")
        want = info.file_size if nbytes is None else nbytes
        with self.zf.open(info) as f:
            data = f.read(want)
        if len(data) != want:
            self._fail(f"record '{name}' is truncated: {len(data)} bytes, expected {want}")
        return data

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if module == "__builtin__":  # protocol 2 spells builtins the Python 2 way
            full = f"builtins.{name}"
        if full == "collections.OrderedDict":
            return OrderedDict
        if full in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[full]
        if full == "_codecs.encode":  # how protocol 2 spells a bytes object
            return self._latin1_encode  # bound method: a BUILD opcode cannot alter it
        if module == "torch._utils" and name in (
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
        ):
            return getattr(self, name)  # bound methods: a BUILD opcode cannot alter them
        if module in ("torch", "torch.cuda", "torch.storage") and (
            name in _STORAGE_DTYPES or name == "UntypedStorage"
        ):
            return _Marker(name)
        if module == "torch" and name in _V3_DTYPES:
            return _Marker(name)
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to load global '{module}.{name}': only tensors, "
            "OrderedDicts and plain containers are allowed. If you trust this file, load it "
            "with torch.load and re-save a plain state dict"
        )

    def _latin1_encode(self, obj, encoding="utf-8", errors="strict"):
        # Other codecs would let a few bytes of pickle expand without bound (each
        # nested 'hex' doubles its input).
        if not (type(obj) is str and encoding in ("latin1", "latin-1") and errors == "strict"):
            raise UnsafeCheckpointError(
                f"{self.path}: refusing _codecs.encode of a {type(obj).__name__} with "
                f"{encoding!r}: a checkpoint uses it only to spell bytes, as latin1 text"
            )
        return obj.encode("latin1")

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _Marker)
            and (pid[1] in _STORAGE_DTYPES or pid[1] == "UntypedStorage")
            and isinstance(pid[2], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            self._fail(f"unexpected persistent id {pid!r}")
        kind, key, numel = pid[1], pid[2], pid[4]  # pid[3] is the device: ignored
        dtype = _STORAGE_DTYPES.get(kind, np.dtype(np.uint8))  # untyped: raw bytes
        storage = self.storages.get(key)
        if storage is None:
            self._record(f"{self.prefix}data/{key}", numel * dtype.itemsize)
            storage = self.storages[key] = _Storage(key, dtype, numel)
        elif (storage.dtype, storage.numel) != (dtype, numel):
            self._fail(f"storage '{key}' is referenced with two different types or sizes")
        return storage

    def _storage_data(self, storage: _Storage) -> np.ndarray:
        """The storage's bytes, read once (their size was checked against the file)."""
        if storage.key not in self.storage_bytes:
            nbytes = storage.numel * storage.dtype.itemsize
            data = self._read(f"{self.prefix}data/{storage.key}", nbytes)
            self.storage_bytes[storage.key] = np.frombuffer(data, np.uint8)
        return self.storage_bytes[storage.key]

    def _tensor(self, storage, dtype: np.dtype, offset, size, stride):
        """The strided view (offset, size, stride in elements of ``dtype``) of a storage,
        copied out, or its ``TensorSpec``; its layout is checked before anything is read."""
        if not (
            isinstance(storage, _Storage)
            and isinstance(size, (tuple, list))
            and isinstance(stride, (tuple, list))
            and len(size) == len(stride) <= _MAX_DIMS
            and all(type(x) is int and x >= 0 for x in (offset, *size, *stride))
        ):
            self._fail(f"malformed tensor (offset={offset!r}, size={size!r}, stride={stride!r})")
        size, stride = tuple(size), tuple(stride)
        numel = storage.numel * storage.dtype.itemsize // dtype.itemsize
        count = math.prod(size)
        if count == 0:
            if math.prod(n for n in size if n) * dtype.itemsize >= 2**62:
                self._fail(f"empty tensor of impossible shape {size}")
        else:
            # Walking the dimensions from the smallest stride up, each stride must step
            # past every element the smaller ones reach: then no two indices share an
            # element, so the tensor holds at most as many elements as its storage. A
            # zero stride (expand()) or overlapping strides would let a 4-byte storage
            # declare a tensor of any size.
            reach = 0
            for step, n in sorted((s, n) for n, s in zip(size, stride, strict=True) if n > 1):
                if step <= reach:
                    self._fail(
                        f"tensor of size {size} with strides {stride} overlaps itself (a "
                        "zero or overlapping stride, e.g. from expand()); only views that "
                        "address each element once are supported: save tensor.contiguous()"
                    )
                reach += step * (n - 1)
            if offset + reach >= numel:
                self._fail(
                    f"tensor view reaches element {offset + reach} of a {numel}-element storage"
                )
        if self.metadata_only:
            return TensorSpec(size, dtype)
        self.tensor_bytes += count * dtype.itemsize
        if self.tensor_bytes > _MAX_TENSOR_BYTES_PER_FILE_BYTE * self.file_bytes:
            self._fail(
                f"its tensors would hold over {self.tensor_bytes} bytes, more than "
                f"{_MAX_TENSOR_BYTES_PER_FILE_BYTE} times the size of the file "
                f"({self.file_bytes} bytes): many tensors view the same storage"
            )
        if count == 0:
            return np.zeros(size, dtype)
        typed = self._storage_data(storage).view(dtype)
        view = np.lib.stride_tricks.as_strided(
            typed[offset:], size, [s * dtype.itemsize for s in stride], writeable=False
        )
        out = np.array(view, order="C")
        return out.byteswap(inplace=True) if self.swap else out

    def _rebuild_tensor_v2(
        self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
    ):
        dtype = storage.dtype if isinstance(storage, _Storage) else None
        return self._tensor(storage, dtype, offset, size, stride)

    def _rebuild_tensor_v3(
        self, storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
    ):
        if not (
            isinstance(storage, _Storage)
            and storage.dtype == np.uint8
            and isinstance(dtype, _Marker)
            and dtype in _V3_DTYPES
            and storage.numel % _V3_DTYPES[dtype].itemsize == 0
        ):
            self._fail(f"malformed tensor of dtype {dtype!r}")
        return self._tensor(storage, _V3_DTYPES[dtype], offset, size, stride)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data


class _Global:
    """A module-level name written as a GLOBAL opcode, without importing that module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires REDUCE callables to be callable
        raise TypeError("placeholder for a torch global; not callable")


class _StorageRef:
    def __init__(self, kind: _Global, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class _TorchPickler(pickle._Pickler):
    """Pure-python pickler that writes numpy arrays as torch tensors (protocol 2)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.arrays: list[np.ndarray] = []  # storage key i -> bytes of arrays[i]
        self.globals: dict[tuple[str, str], _Global] = {}

    def _global(self, module: str, name: str) -> _Global:
        # One object per name, so repeated uses are memoized (BINGET) as torch does.
        return self.globals.setdefault((module, name), _Global(module, name))

    def _save_global_ref(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_ref

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if hasattr(obj, "__array__") and hasattr(obj, "dtype") and not isinstance(obj, type):
            return self._reduce_array(np.asarray(obj))  # numpy, numpy scalars, jax arrays
        if isinstance(obj, (_PLAIN_TYPES, _Global)) or obj is OrderedDict:
            return NotImplemented  # pickled the ordinary way
        raise TypeError(
            f"cannot save a {type(obj).__name__} in a torch checkpoint: only "
            "dicts, lists, tuples, str, int, float, bool, None and arrays"
        )

    def _reduce_array(self, arr: np.ndarray):
        # Native byte order (the file says sys.byteorder) and C order, so strides are simple.
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")
        key, shape = str(len(self.arrays)), tuple(int(n) for n in arr.shape)
        stride, acc = [], 1
        for n in reversed(shape):  # torch's contiguous strides, also for empty dims
            stride.insert(0, acc)
            acc *= max(n, 1)
        self.arrays.append(arr)
        head = (0, shape, tuple(stride), False, OrderedDict())
        if arr.dtype in _STORAGE_NAMES:
            ref = _StorageRef(self._global("torch", _STORAGE_NAMES[arr.dtype]), key, arr.size)
            return self._global("torch._utils", "_rebuild_tensor_v2"), (ref, *head)
        if arr.dtype in _V3_NAMES:
            ref = _StorageRef(self._global("torch.storage", "UntypedStorage"), key, arr.nbytes)
            dtype = self._global("torch", _V3_NAMES[arr.dtype])
            return self._global("torch._utils", "_rebuild_tensor_v3"), (ref, *head, dtype)
        raise TypeError(f"cannot save arrays of dtype {arr.dtype} in a torch checkpoint")


class _NoSeek:
    """Write-only file view without seek(), so zipfile follows each record with a data
    descriptor exactly like torch's miniz writer (torch can compute offsets from that)."""

    def __init__(self, f):
        self.f = f
        self.write, self.tell, self.flush = f.write, f.tell, f.flush


def _write_record(zf: zipfile.ZipFile, f, name: str, data: bytes):
    """Add an uncompressed record whose data starts at a multiple of _ALIGNMENT.

    Like torch's writer, pad with a local 'FB' extra field; readers skip it."""
    # zipfile appends a 20-byte zip64 field to the local header past this size.
    zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -(f.tell() + header) % _ALIGNMENT
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def save_torch_checkpoint(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as a ``torch.save`` zip checkpoint, without torch.

    Arrays (numpy arrays and scalars, or anything ``np.asarray`` accepts that has a
    ``dtype``, e.g. jax arrays) become contiguous cpu tensors; ``torch.load(path,
    weights_only=True)`` reads the file back, with OrderedDicts kept as OrderedDicts.
    The file is written to a temporary name in the same folder and then renamed, so
    ``path`` never holds a partial file. Identical input gives identical bytes.

    Args:
        path: destination file; its name up to the first '.' names the archive folder.
        obj: nested dict / OrderedDict / list / tuple of str, int, float, bool, None and
            arrays of dtype float64/32/16, bfloat16, int64/32/16/8, uint8/16/32/64, bool,
            complex64/128 or float8_e4m3fn/e5m2.
    Raises:
        TypeError: ``obj`` holds an unsupported type or dtype (nothing is written).
        OSError: the file cannot be written.
    """
    path = os.fspath(path)
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(obj)  # before touching the disk, so unsupported types write nothing
    prefix = os.path.basename(path).split(".")[0] or "archive"  # as torch names it
    tmp = os.path.join(
        os.path.dirname(path) or ".", f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp"
    )
    try:
        with open(tmp, "xb") as f:
            with zipfile.ZipFile(_NoSeek(f), "w") as zf:
                digest = hashlib.sha1(buf.getvalue())
                _write_record(zf, f, f"{prefix}/data.pkl", buf.getvalue())
                _write_record(zf, f, f"{prefix}/.format_version", b"1")
                _write_record(zf, f, f"{prefix}/.storage_alignment", str(_ALIGNMENT).encode())
                _write_record(zf, f, f"{prefix}/byteorder", sys.byteorder.encode())
                for key, arr in enumerate(pickler.arrays):
                    data = arr.tobytes()
                    digest.update(data)
                    _write_record(zf, f, f"{prefix}/data/{key}", data)
                _write_record(zf, f, f"{prefix}/version", b"3\n")
                # torch writes a random 40-digit id; a content hash keeps output reproducible.
                sid = str(int.from_bytes(digest.digest()[:16], "big")).zfill(40)
                _write_record(zf, f, f"{prefix}/.data/serialization_id", sid.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
