"""The CPU kernels (XLA FFI): build, load, register, and the calls of each.

XLA:CPU runs batches of small (48 x 48) products far below the machine's
matrix-product speed and on a single thread, and the orthogonalized read is
nothing but such products. ``kernels/ns_read.cc`` carries each memory through
all iterations in cache, with a register-tiled product, over XLA's intra-op
threads, and returns only h = NS_k(C)ᵀ q (forward) or (C̄, q̄) (backward,
recomputing the iterates per matrix). ``orthorecall.newton_schulz`` uses it on
the CPU backend; GPU/TPU lower the pure-JAX formulation instead. A second pair of
entry points, the chunk read (``chunk_read_forward``/``chunk_read_backward``, used by
``orthorecall.chunk_read``), also forms each position's memory of a chunkwise-mLSTM
chunk inside the kernel. ``kernels/raw_memory.cc`` runs the raw read's whole recurrence
(``raw_memory_forward``/``raw_memory_backward``, used by ``orthorecall.raw_memory``).

The kernels are compiled on first use, into one library, with the system's C++ compiler
against the XLA FFI headers that ship with jaxlib, for this machine's instruction set,
and cached under ``$ORTHORECALL_CACHE_DIR`` (default ``~/.cache/orthorecall``), keyed
by source, JAX version, compiler and CPU. Without a compiler (or with
``ORTHORECALL_CPU_KERNEL=0``) the reads fall back to their pure-JAX formulations,
which compute the same functions, with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from orthorecall.validation import switched_on

FORWARD_TARGET = "orthorecall_ns_read_forward"
BACKWARD_TARGET = "orthorecall_ns_read_backward"
CHUNK_FORWARD_TARGET = "orthorecall_chunk_read_forward"
CHUNK_BACKWARD_TARGET = "orthorecall_chunk_read_backward"
RAW_FORWARD_TARGET = "orthorecall_raw_memory_forward"
RAW_BACKWARD_TARGET = "orthorecall_raw_memory_backward"
_KERNELS = pathlib.Path(__file__).with_name("kernels")
_SOURCES = (_KERNELS / "ns_read.cc", _KERNELS / "raw_memory.cc")
_HEADERS = (_KERNELS / "parallel_for.h",)
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelBuildError(RuntimeError):
    """The CPU kernel could not be compiled or loaded."""


def enabled_by_environment() -> bool:
    """False when ``ORTHORECALL_CPU_KERNEL`` is set to 0/false/no/off."""
    return switched_on("ORTHORECALL_CPU_KERNEL")


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        path = shutil.which(candidate) if candidate else None
        if path:
            return path
    return None


def _cpu_signature() -> str:
    # -march=native code must not be loaded on another CPU sharing the cache.
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("ORTHORECALL_CACHE_DIR")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "orthorecall"


def build(force: bool = False) -> pathlib.Path:
    """Compiles the kernel (if not cached) and returns the shared library path.

    Raises:
        KernelBuildError: no C++ compiler, or the compilation failed.
    """
    compiler = _compiler()
    if compiler is None:
        raise KernelBuildError(
            "no C++ compiler found (tried $CXX, c++, g++, clang++); install one or "
            "set ORTHORECALL_CPU_KERNEL=0 to use the pure-JAX read."
        )
    source = b"\0".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                jax.__version__.encode(),
                compiler.encode(),
                " ".join(_FLAGS).encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes never load
    # a half-written library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _SOURCES), "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise KernelBuildError(
                f"compiling {', '.join(p.name for p in _SOURCES)} failed "
                f"({' '.join(command)}):\n{done.stderr[-4000:]}"
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.cache
def available() -> bool:
    """Builds, loads and registers the kernel once per process.

    Returns True when the CPU read kernel can be used; False (after one
    warning saying why) when it is disabled or cannot be built.
    """
    if not enabled_by_environment():
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for name, symbol in (
            (FORWARD_TARGET, library.OrthorecallNsReadForward),
            (BACKWARD_TARGET, library.OrthorecallNsReadBackward),
            (CHUNK_FORWARD_TARGET, library.OrthorecallChunkReadForward),
            (CHUNK_BACKWARD_TARGET, library.OrthorecallChunkReadBackward),
            (RAW_FORWARD_TARGET, library.OrthorecallRawMemoryForward),
            (RAW_BACKWARD_TARGET, library.OrthorecallRawMemoryBackward),
        ):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    except (KernelBuildError, OSError, AttributeError) as error:
        warnings.warn(
            f"orthorecall: the fused CPU kernels are unavailable, using the pure-JAX "
            f"Newton–Schulz read and raw-read chunk form (the same function, several times "
            f"slower on CPU): {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


Steps = tuple[tuple[float, float, float], ...]


def ns_read_forward(memory: jax.Array, query: jax.Array, steps: Steps) -> jax.Array:
    """h = NS(C)ᵀ q by the kernel: memory (..., d, d), query (..., d) float32.

    ``steps`` are the (a, b, c) of each iteration. Requires ``available()``.
    Works under jit, vmap (any leading axes are batch) and sharding of the
    leading axes (each device reads its own shard).
    """
    return _operation("forward", steps)(memory, query)


def ns_read_backward(
    memory: jax.Array, query: jax.Array, h_bar: jax.Array, steps: Steps
) -> tuple[jax.Array, jax.Array]:
    """(C̄, q̄), the VJP of ``ns_read_forward`` at (memory, query) for h̄."""
    return _operation("backward", steps)(memory, query, h_bar)


def chunk_read_forward(
    memory: jax.Array,
    scale: jax.Array,
    decay: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    queries: jax.Array,
    steps: Steps,
) -> jax.Array:
    """h_t = NS(C_t)ᵀ q_t for every position t of a chunk, by the kernel, with
    C_t = scale_t C0 + Σ_s decay[t, s] k_s v_sᵀ formed inside it (never in memory).

    Shapes: memory C0 (..., d, d), scale (..., L), decay (..., L, L), keys, values
    and queries (..., L, d), float32; returns (..., L, d). Requires ``available()``;
    jit, vmap and sharding of the leading axes work as for ``ns_read_forward``.
    """
    return _operation("chunk_forward", steps)(memory, scale, decay, keys, values, queries)


def chunk_read_backward(
    memory, scale, decay, keys, values, queries, h_bar, steps: Steps
) -> tuple[jax.Array, ...]:
    """The VJP of ``chunk_read_forward`` for h̄: cotangents of its six operands."""
    return _operation("chunk_backward", steps)(memory, scale, decay, keys, values, queries, h_bar)


# Per operation: (target, ranks of the operands' matrix axes, the operands whose shapes
# the results take, Shardy rule: leading axes are batch, matrix axes stay whole).
_CHUNK_OPERANDS = "... i j, ... t, ... t s, ... t i, ... t j, ... t i"
_SIGNATURES = {
    "forward": (FORWARD_TARGET, (2, 1), (1,), "... i j, ... i -> ... j"),
    "backward": (BACKWARD_TARGET, (2, 1, 1), (0, 1), "... i j, ... i, ... j -> ... i j, ... i"),
    "chunk_forward": (
        CHUNK_FORWARD_TARGET,
        (2, 1, 2, 2, 2, 2),
        (5,),
        f"{_CHUNK_OPERANDS} -> ... t j",
    ),
    "chunk_backward": (
        CHUNK_BACKWARD_TARGET,
        (2, 1, 2, 2, 2, 2, 2),
        (0, 1, 2, 3, 4, 5),
        f"{_CHUNK_OPERANDS}, ... t j -> {_CHUNK_OPERANDS}",
    ),
}


def _matrix_factors(rule: str) -> tuple[str, ...]:
    """The named (non-batch) factors of a sharding rule in order of first appearance (the
    order Shardy wants them listed in): "... i j, ... i -> ... j" -> (i, j)."""
    names = [name for name in rule.replace(",", " ").split() if name not in ("...", "->")]
    return tuple(dict.fromkeys(names))


@functools.cache
def _operation(direction: str, steps: Steps):
    target, operand_ranks, result_operands, rule = _SIGNATURES[direction]

    def results(*operands):
        return tuple(jax.ShapeDtypeStruct(operands[i].shape, jnp.float32) for i in result_operands)

    coefficients = np.asarray(steps, np.float32).reshape(-1)
    return _batched_kernel_call(
        target,
        operand_ranks,
        tuple(operand_ranks[i] for i in result_operands),
        rule,
        results,
        coefficients=coefficients,
    )


def _batched_kernel_call(target, operand_ranks, result_ranks, rule, results, **attributes):
    """``jax.ffi.ffi_call(target)`` for a kernel that treats every leading axis as batch
    (the last ``operand_ranks[i]`` axes of operand i are its own): works under jit, vmap,
    and sharding of the leading axes (each device runs its own shard). ``results`` maps
    the operands to the results' ``ShapeDtypeStruct``s."""

    def call(*operands):
        # Registers the targets in this process (a direct call may come before any read
        # asked for them).
        if not available():
            raise KernelBuildError(
                f"{target}: the CPU kernels are disabled or failed to build (the warning "
                "says why); use the pure-JAX formulation instead."
            )
        shapes = results(*operands)
        return jax.ffi.ffi_call(target, shapes if len(shapes) > 1 else shapes[0])(
            *operands, **attributes
        )

    # Without a rule the SPMD partitioner would gather every shard onto every
    # device and read all of them there.
    def shardings(mesh, arg_shapes):
        first = arg_shapes[0]
        # An operand without a sharding (older JAX, some propagation paths) is
        # treated as replicated.
        spec = tuple(getattr(first.sharding, "spec", ())) + (None,) * first.ndim
        batch = spec[: first.ndim - operand_ranks[0]]
        sharding = lambda rank: NamedSharding(mesh, PartitionSpec(*batch, *(None,) * rank))
        out = tuple(sharding(rank) for rank in result_ranks)
        return (
            tuple(sharding(rank) for rank in operand_ranks),
            out if len(out) > 1 else out[0],
        )

    def partition(mesh, arg_shapes, result_shape):
        operands, out = shardings(mesh, arg_shapes)
        return mesh, call, out, operands

    partitioned = custom_partitioning(call)
    # JAX 0.6 lacks the replication hint; `partition` still keeps
    # the matrix axes whole there.
    hint = (
        {"need_replication_factors": _matrix_factors(rule)}
        if "need_replication_factors" in inspect.signature(partitioned.def_partition).parameters
        else {}
    )
    partitioned.def_partition(
        partition,
        infer_sharding_from_operands=lambda m, a, r: shardings(m, a)[1],
        sharding_rule=rule,
        **hint,
    )

    # custom_partitioning has no batching rule; the kernel treats every
    # leading axis as batch, so vmap only has to line the operands up.
    @jax.custom_batching.custom_vmap
    def operation(*operands):
        return partitioned(*operands)

    @operation.def_vmap
    def _batched(axis_size, in_batched, *operands):
        operands = [
            x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            for x, batched in zip(operands, in_batched, strict=True)
        ]
        out = operation(*operands)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return operation


# The raw memory's operands: q, k̂, v (..., T, H, d), log f, ĩ (..., T, H), reset (..., T),
# C0 (..., H, d, d), n0 (..., H, d), m0 (..., H); the saved states (..., J, H, ...).
_RAW_OPERANDS = (
    "... t h i, ... t h i, ... t h j, ... t h, ... t h, ... t, ... h i j, ... h i, ... h"
)
_RAW_OPERAND_RANKS = (3, 3, 3, 2, 2, 1, 3, 2, 1)
# The operands with a cotangent: all but the resets.
_RAW_DIFFERENTIABLE = (0, 1, 2, 3, 4, 6, 7, 8)
_RAW_OUTPUTS = "... t h j, ... h i j, ... h i, ... h"
_RAW_OUTPUT_RANKS = (3, 3, 2, 1)
_RAW_SAVED = "... s h i j, ... s h i, ... s h"
_RAW_SAVED_RANKS = (4, 3, 2)


def _saved_intervals(length: int, interval: int) -> int:
    """How many states ``raw_memory_forward`` saves: one per ``interval`` steps (0: none)."""
    return -(-length // interval) if interval else 0


@functools.cache
def _raw_operation(direction: str, interval: int):
    if direction == "forward":

        def results(q, k, v, log_f, i_pre, reset, c0, n0, m0):
            lead, (t, h, d) = q.shape[:-3], q.shape[-3:]
            saved = lead + (_saved_intervals(t, interval), h)
            return tuple(
                jax.ShapeDtypeStruct(shape, jnp.float32)
                for shape in (
                    v.shape,
                    c0.shape,
                    n0.shape,
                    m0.shape,
                    saved + (d, d),
                    saved + (d,),
                    saved,
                )
            )

        return _batched_kernel_call(
            RAW_FORWARD_TARGET,
            _RAW_OPERAND_RANKS,
            _RAW_OUTPUT_RANKS + _RAW_SAVED_RANKS,
            f"{_RAW_OPERANDS} -> {_RAW_OUTPUTS}, {_RAW_SAVED}",
            results,
            interval=np.int64(interval),
        )

    def gradients(*operands):
        return tuple(
            jax.ShapeDtypeStruct(operands[i].shape, jnp.float32) for i in _RAW_DIFFERENTIABLE
        )

    operand_factors = _RAW_OPERANDS.split(", ")
    return _batched_kernel_call(
        RAW_BACKWARD_TARGET,
        _RAW_OPERAND_RANKS + _RAW_SAVED_RANKS + _RAW_OUTPUT_RANKS * 2,
        tuple(_RAW_OPERAND_RANKS[i] for i in _RAW_DIFFERENTIABLE),
        f"{_RAW_OPERANDS}, {_RAW_SAVED}, {_RAW_OUTPUTS}, {_RAW_OUTPUTS} -> "
        + ", ".join(operand_factors[i] for i in _RAW_DIFFERENTIABLE),
        gradients,
        interval=np.int64(interval),
    )


def raw_memory_forward(q, k, v, log_f, i_pre, reset, c0, n0, m0, interval: int = 0):
    """The raw-read mLSTM over a whole sequence by the kernel (``kernels/raw_memory.cc``).

    q, k̂ (= k/√d), v (..., T, H, d); log f, ĩ (..., T, H) float32; reset (..., T) bool;
    the start state C0 (..., H, d, d), n0 (..., H, d), m0 (..., H). Returns h (..., T, H, d),
    the end state (C, n, m), and the sanitized state at every ``interval``-th step
    (for ``raw_memory_backward``; empty for ``interval=0``). Requires ``available()``.
    """
    return _raw_operation("forward", interval)(q, k, v, log_f, i_pre, reset, c0, n0, m0)


def raw_memory_backward(operands, saved, outputs, cotangents, interval: int):
    """The VJP of ``raw_memory_forward``: cotangents of q, k̂, v, log f, ĩ, C0, n0, m0, from
    its operands, the states it saved every ``interval`` steps, its outputs (h and the end
    state) and their cotangents."""
    return _raw_operation("backward", interval)(*operands, *saved, *outputs, *cotangents)
