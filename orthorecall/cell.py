"""The mLSTM cell as a layer: projections, causal conv, gates, memory, output.

This is the block of the reference model (REFERENCE §2, "mLSTMLayer") with its
parameters, as pure functions over explicit pytrees, with the API a
recurrent agent needs:

    state = initial_state(config, batch_size)
    y, state = step(params, state, x_t, reset_t, config)          # one step
    ys, state = scan(params, xs, config, reset=resets, state=state)  # sequence

``x`` has width ``config.embedding_dim``. ``reset`` (per batch element and
step) clears the memory (C, n, m) and the convolution window before the step.
``scan`` uses the chunkwise memory form unless ``config.sequence_form`` is
``"recurrent"``; both compute the same function.

Parameters (shapes with D = embedding_dim, I = inner_dim, H = num_heads,
K = conv_kernel_size, b = qkv_block_size):

    up_proj (D, 2I); conv: kernel (K, I), bias (I,); q_proj, k_proj, v_proj
    (I/b, b, b) as [block, out, in]; input_gate, forget_gate: kernel (3I, H),
    bias (H,); out_norm: scale (I,) applied as 1 + scale; skip (I,);
    down_proj (I, D).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from orthorecall import mlstm, precision
from orthorecall.reads import ReadConfig
from orthorecall.validation import check_int

Params = dict[str, Any]
NORM_EPS = 1e-5
SEQUENCE_FORMS = ("chunkwise", "recurrent", "gram")


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """Hyper-parameters of one mLSTM cell (hashable: a static jit argument).

    Attributes:
        embedding_dim: D, width of the cell's input and output (reference 94).
        num_heads: H (reference 4).
        proj_factor: inner width I = proj_factor * D rounded up to a multiple
            of ``inner_multiple`` (reference 2.0 -> 192).
        inner_multiple: the rounding of I (reference 64).
        conv_kernel_size: K of the causal depthwise conv (reference 4).
        qkv_block_size: b of the block-diagonal q/k/v maps (reference 4).
        read: the memory read (raw baseline, NS_k, polar).
        sequence_form: "chunkwise" (default, for training), "recurrent", or "gram"
            (the recurrence carrying CᵀC and reading through it, ``mlstm.gram_sequence``;
            cubic Newton–Schulz reads of 1 to 6 iterations only).
        chunk_size: positions per chunk of the chunkwise form (steps per checkpoint of
            the gram form); None (default) picks ``mlstm.default_chunk_size`` for the
            read and backend (64 for the gram form).
        num_blocks: blocks in the enclosing model; scales the down-projection
            initialization as the reference does (2 / (num_blocks sqrt(D))).
        compute_dtype: dtype of the projections ("float32" or "bfloat16");
            the memory recurrence and its state are always float32.
        matmul_precision: precision of the matrix products of the cell and of a model
            built from it (``orthorecall.precision``): "highest" (default: float32, as
            the reference), "tensorfloat32", "bfloat16" or "default" (the backend's:
            TF32 on NVIDIA GPUs, one bfloat16 pass on TPUs). CPUs always use float32.
    """

    embedding_dim: int = 94
    num_heads: int = 4
    proj_factor: float = 2.0
    inner_multiple: int = 64
    conv_kernel_size: int = 4
    qkv_block_size: int = 4
    read: ReadConfig = ReadConfig()
    sequence_form: str = "chunkwise"
    chunk_size: int | None = None
    num_blocks: int = 1
    compute_dtype: str = "float32"
    matmul_precision: str = "highest"

    def __post_init__(self):
        names = (
            "embedding_dim",
            "num_heads",
            "inner_multiple",
            "conv_kernel_size",
            "qkv_block_size",
            "num_blocks",
        ) + (() if self.chunk_size is None else ("chunk_size",))
        for name in names:  # Stored as Python ints: a static jit argument hashes them.
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if not self.proj_factor > 0:
            raise ValueError(f"proj_factor must be > 0, got {self.proj_factor!r}.")
        if not isinstance(self.read, ReadConfig):
            raise ValueError(f"read must be a ReadConfig, got {self.read!r}.")
        if self.sequence_form not in SEQUENCE_FORMS:
            raise ValueError(f"sequence_form={self.sequence_form!r}; use one of {SEQUENCE_FORMS}.")
        if self.sequence_form == "gram" and self.read.gram_steps() is None:
            raise ValueError(
                f"sequence_form='gram' reads through CᵀC, which only the cubic Newton-Schulz "
                f"reads of 1 to 6 iterations allow; read={self.read} needs 'chunkwise' or "
                "'recurrent'."
            )
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; use 'float32' or 'bfloat16'.")
        precision.check_matmul_precision(self.matmul_precision)
        if self.inner_dim % self.num_heads:
            raise ValueError(
                f"inner_dim={self.inner_dim} (from embedding_dim={self.embedding_dim}, "
                f"proj_factor={self.proj_factor}) is not divisible by "
                f"num_heads={self.num_heads}."
            )
        if self.inner_dim % self.qkv_block_size:
            raise ValueError(
                f"inner_dim={self.inner_dim} is not divisible by "
                f"qkv_block_size={self.qkv_block_size}."
            )

    def replace(self, **changes) -> CellConfig:
        """A copy with ``changes`` applied (validated like a new configuration)."""
        return dataclasses.replace(self, **changes)

    @property
    def inner_dim(self) -> int:
        m = self.inner_multiple
        return m * math.ceil(self.proj_factor * self.embedding_dim / m)

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.num_heads


class CellState(NamedTuple):
    """Recurrent state of one cell, float32.

    Attributes:
        conv: (B, K-1, I) the last K-1 conv inputs (zeros at episode start).
        memory: the ``mlstm.MemoryState``.
    """

    conv: jax.Array
    memory: mlstm.MemoryState


def init_params(key: jax.Array, config: CellConfig) -> Params:
    """Reference initialization (REFERENCE §2) of one cell's parameters.

    The conv uses PyTorch's Conv1d default (uniform ±1/sqrt(K)), which the
    reference keeps.

    Args:
        key: a JAX PRNG key.
        config: the cell configuration.

    Returns:
        A dict of float32 arrays (layout in the module docstring).
    """
    d, i, h, kk, b = (
        config.embedding_dim,
        config.inner_dim,
        config.num_heads,
        config.conv_kernel_size,
        config.qkv_block_size,
    )
    keys = jax.random.split(key, 8)
    small = math.sqrt(2.0 / (5.0 * d))
    normal = lambda k, shape, std: std * jax.random.normal(k, shape, jnp.float32)
    bound = 1.0 / math.sqrt(kk)
    uniform = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)
    return {
        "up_proj": normal(keys[0], (d, 2 * i), small),
        "conv": {"kernel": uniform(keys[1], (kk, i)), "bias": uniform(keys[2], (i,))},
        "q_proj": normal(keys[3], (i // b, b, b), small),
        "k_proj": normal(keys[4], (i // b, b, b), small),
        "v_proj": normal(keys[5], (i // b, b, b), small),
        "input_gate": {"kernel": jnp.zeros((3 * i, h)), "bias": normal(keys[6], (h,), 0.1)},
        "forget_gate": {
            "kernel": jnp.zeros((3 * i, h)),
            "bias": jnp.linspace(3.0, 6.0, h, dtype=jnp.float32),
        },
        "out_norm": {"scale": jnp.zeros((i,))},
        "skip": jnp.ones((i,)),
        "down_proj": normal(keys[7], (i, d), 2.0 / (config.num_blocks * math.sqrt(d))),
    }


def initial_state(
    config: CellConfig, batch_size: int | tuple[int, ...], dtype=jnp.float32
) -> CellState:
    """The state of a fresh episode (all zeros).

    Args:
        config: the cell configuration.
        batch_size: the number of sequences, or the batch shape (any number of axes;
            ``()`` for a single unbatched sequence).
        dtype: the state's dtype (``step``/``scan`` compute in float32 whatever it is,
            and return the state in the dtype it came in).
    """
    shapes = initial_state_shapes(config, _batch_shape(batch_size))
    zeros = lambda shape: None if shape is None else jnp.zeros(shape, dtype)
    return CellState(conv=zeros(shapes.conv), memory=mlstm.MemoryState(*map(zeros, shapes.memory)))


def _batch_shape(batch_size) -> tuple[int, ...]:
    if isinstance(batch_size, tuple):
        for size in batch_size:
            check_int("batch_size", size, minimum=1)
        return batch_size
    return (check_int("batch_size", batch_size, minimum=1),)


def layer_norm(x: jax.Array, scale: jax.Array, groups: int = 1) -> jax.Array:
    """Bias-free layer norm over the last axis (or over each of ``groups``
    equal slices of it), eps 1e-5, scale applied as (1 + scale)."""
    shape = x.shape
    x = x.astype(jnp.float32).reshape(shape[:-1] + (groups, shape[-1] // groups))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = ((x - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(shape)
    return x * (1.0 + scale)


def _block_products(blocks, weight):
    # Σ_i blocks[..., j, i] weight[j, :, i], one term per column of the (small) blocks.
    return sum(blocks[..., i, None] * weight[:, :, i] for i in range(weight.shape[2]))


def _block_diagonal(x, weight):
    """x (..., J·n) through the block-diagonal matrix of ``weight`` [block j, out, in]:
    output block j = W[j] @ input block j.

    The blocks are tiny (4 x 4), so the products run as n broadcast multiply-adds, and
    the backward is written out: as a dot over 48 block-batches, XLA:CPU transposed x, g
    and the output to put the blocks first, which took about a tenth of the raw model's
    training step (v80/s512, batch 16: 194 -> 180 ms with this form). The backward runs
    under the matrix-product precision in force when the forward was traced.
    """
    return _block_diagonal_product(x, weight, precision.current())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _block_diagonal_product(x, weight, jax_precision):
    del jax_precision  # The forward has no matrix products.
    blocks = x.reshape(x.shape[:-1] + (weight.shape[0], weight.shape[2]))
    return _block_products(blocks, weight.astype(x.dtype)).reshape(x.shape)


def _block_diagonal_forward(x, weight, jax_precision):
    return _block_diagonal_product(x, weight, jax_precision), (x, weight)


def _block_diagonal_backward(jax_precision, residuals, g):
    with precision.scope(jax_precision):
        return _block_diagonal_cotangents(*residuals, g)


def _block_diagonal_cotangents(x, weight, g):
    num_blocks, out, width = weight.shape
    g_blocks = g.reshape(g.shape[:-1] + (num_blocks, out))
    x_bar = _block_products(g_blocks, jnp.swapaxes(weight, 1, 2).astype(g.dtype))
    # W̄[j, o, i] = Σ over every position of g[j, o] x[j, i], in float32 whatever the
    # compute dtype. (In the training step this, a sum of broadcast products and the
    # diagonal blocks of one dense gᵀx took the same time.)
    x_blocks = x.reshape(x.shape[:-1] + (num_blocks, width))
    weight_bar = jnp.einsum(
        "...jo,...ji->joi", g_blocks.astype(jnp.float32), x_blocks.astype(jnp.float32)
    )
    return x_bar.reshape(x.shape).astype(x.dtype), weight_bar.astype(weight.dtype)


_block_diagonal_product.defvjp(_block_diagonal_forward, _block_diagonal_backward)


def _projections(params, x_m, x_c, config):
    """q, k, v (..., H, d) and gate pre-activations (..., H) from x_m, x_c."""
    q = _block_diagonal(x_c, params["q_proj"])
    k = _block_diagonal(x_c, params["k_proj"])
    v = _block_diagonal(x_m, params["v_proj"])
    # Both gates read [q, k, v]: one product per part with both gates' kernels side by
    # side, rather than concatenating q, k, v (and slicing the concatenation's cotangent).
    names = ("input_gate", "forget_gate")
    kernel = jnp.concatenate([params[name]["kernel"] for name in names], axis=1)
    kernel = kernel.astype(x_c.dtype)
    width = q.shape[-1]
    gates = sum(part @ kernel[j * width : (j + 1) * width] for j, part in enumerate((q, k, v)))
    gates = (gates + jnp.concatenate([params[name]["bias"] for name in names])).astype(jnp.float32)
    split = lambda t: t.reshape(t.shape[:-1] + (config.num_heads, config.head_dim))
    h = config.num_heads
    return split(q), split(k), split(v), gates[..., :h], gates[..., h:]


def _output(params, h, x_c, z, config):
    """Per-head norm of h̃, learnable skip, output gate, down-projection."""
    h = h.reshape(h.shape[:-2] + (config.inner_dim,))
    out = layer_norm(h, params["out_norm"]["scale"], groups=config.num_heads)
    dtype = jnp.dtype(config.compute_dtype)
    out = (out.astype(dtype) + params["skip"].astype(dtype) * x_c) * jax.nn.silu(z)
    return (out @ params["down_proj"].astype(dtype)).astype(jnp.float32)


def _check_input(x, config, time_axis) -> tuple[int, ...]:
    """The batch shape of ``x``: (*batch, [time,] embedding_dim), any number of batch axes."""
    minimum = 2 if time_axis else 1
    if not hasattr(x, "ndim") or x.ndim < minimum or x.shape[-1] != config.embedding_dim:
        layout = "(*batch, time, embedding_dim)" if time_axis else "(*batch, embedding_dim)"
        raise ValueError(
            f"x must have shape {layout} with embedding_dim={config.embedding_dim} (any "
            f"number of batch axes); got {getattr(x, 'shape', type(x).__name__)}."
        )
    return tuple(x.shape[: x.ndim - minimum])


def _check_state(state, batch, config):
    if not isinstance(state, CellState):
        raise ValueError(
            f"state must be a cell.CellState (initial_state(config, batch_size)); got "
            f"{type(state).__name__}."
        )
    expected = initial_state_shapes(config, batch)
    names = ("conv", "memory.c", "memory.n", "memory.m", "memory.p")
    if (state.memory.p is None) != (expected.memory.p is None):
        raise ValueError(
            f"state.memory.p (the rls read's inverse) is kept exactly when the read is rls; "
            f"read={config.read}. Make the state with initial_state(config, batch_size)."
        )
    for name, leaf, want in zip(
        names, (state.conv, *state.memory), (expected.conv, *expected.memory), strict=True
    ):
        if want is None:
            continue
        if tuple(leaf.shape) != tuple(want):
            count = lambda shape: shape[0] if len(shape) == 1 else shape
            have = tuple(leaf.shape[: len(leaf.shape) - len(want) + len(batch)])
            raise ValueError(
                f"state is for {count(have)} sequences, x for {count(batch)}: state.{name} "
                f"must have shape {tuple(want)}, got {tuple(leaf.shape)}. Make it with "
                f"initial_state(config, {batch[0] if len(batch) == 1 else batch})."
            )


def initial_state_shapes(config: CellConfig, batch: tuple[int, ...]) -> CellState:
    """The shapes of ``initial_state(config, batch)``'s leaves, as a ``CellState``."""
    h, d, i = config.num_heads, config.head_dim, config.inner_dim
    return CellState(
        conv=(*batch, config.conv_kernel_size - 1, i),
        memory=mlstm.MemoryState(
            c=(*batch, h, d, d),
            n=(*batch, h, d),
            m=(*batch, h),
            p=(*batch, h, d, d) if mlstm.needs_inverse(config.read) else None,
        ),
    )


def _check_mask(mask, shape, layout):
    if mask is None:
        return
    if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_ or tuple(mask.shape) != shape:
        raise ValueError(
            f"mask must be a bool array of shape {shape} {layout} (true: the step counts, "
            f"false: it leaves the state untouched); got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}{tuple(getattr(mask, 'shape', ()))}."
        )


def _flatten(tree, batch):
    """Leaves (*batch, ...) -> (B, ...), B = prod(batch) (1 for no batch axis)."""
    size = math.prod(batch)
    return jax.tree_util.tree_map(lambda a: a.reshape(size, *a.shape[len(batch) :]), tree)


def _unflatten(tree, batch):
    return jax.tree_util.tree_map(lambda a: a.reshape(*batch, *a.shape[1:]), tree)


def _float32(state: CellState) -> CellState:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(jnp.float32), state)


def _like(state: CellState, reference: CellState) -> CellState:
    """``state`` in the dtypes of ``reference`` (a carry keeps the dtype it came in)."""
    return jax.tree_util.tree_map(lambda a, r: a.astype(r.dtype), state, reference)


def select_state(flags: jax.Array, new: CellState, old: CellState) -> CellState:
    """Per sequence: ``new`` where ``flags`` (*batch) is true, ``old`` where it is false,
    in ``old``'s dtypes. ``new`` may lack the batch axes (one state for every sequence,
    e.g. a learned initial state)."""
    return jax.tree_util.tree_map(
        lambda n, o: jnp.where(
            flags.reshape(flags.shape + (1,) * (o.ndim - flags.ndim)), n.astype(o.dtype), o
        ),
        new,
        old,
    )


def step(
    params: Params,
    state: CellState,
    x: jax.Array,
    reset: jax.Array | None,
    config: CellConfig,
    *,
    mask: jax.Array | None = None,
    read_mix: jax.Array | float | None = None,
) -> tuple[jax.Array, CellState]:
    """One time step.

    Args:
        params: the cell parameters.
        state: ``CellState`` for the batch (leaves (*batch, ...), any dtype: computed in
            float32, returned in the dtype it came in).
        x: (*batch, D) input at this step: any number of batch axes, none included.
        reset: (*batch) bool or None; true clears the state before this step.
        config: the cell configuration.
        mask: (*batch) bool or None; false leaves that sequence's state untouched (and
            its output zero): a padded step.
        read_mix: None, or the scaffold anneal's α (a scalar, ``orthorecall.anneal``).

    Returns:
        (y (*batch, D) float32, new ``CellState``).

    Raises:
        ValueError: wrong input or state shape, or a reset or mask that is not (*batch)
            bool.
    """
    batch = _check_input(x, config, time_axis=False)
    _check_state(state, batch, config)
    mlstm.check_reset(reset, batch, "(batch,)")
    _check_mask(mask, batch, "(batch,)")
    mlstm.check_read_mix(config.read, read_mix)
    flat = lambda tree: None if tree is None else _flatten(tree, batch)
    old = _float32(flat(state))
    with precision.matmul_precision(config.matmul_precision):
        y, new = _step(params, old, flat(x), flat(reset), config, read_mix)
    if mask is not None:
        new = select_state(flat(mask), new, old)
        y = jnp.where(flat(mask)[:, None], y, 0.0)
    return _unflatten(y, batch), _like(_unflatten(new, batch), state)


def _step(params, state, x, reset, config, read_mix=None):
    dtype = jnp.dtype(config.compute_dtype)
    conv_window = state.conv
    if reset is not None:
        conv_window = jnp.where(reset[:, None, None], 0.0, conv_window)
    u = x.astype(dtype) @ params["up_proj"].astype(dtype)
    x_m, z = jnp.split(u, 2, axis=-1)
    window = jnp.concatenate([conv_window.astype(dtype), x_m[:, None]], axis=1)  # (B, K, I)
    conv = jnp.einsum("bki,ki->bi", window, params["conv"]["kernel"].astype(dtype))
    x_c = jax.nn.silu(conv + params["conv"]["bias"].astype(dtype))
    q, k, v, i_pre, f_pre = _projections(params, x_m, x_c, config)
    h, memory = mlstm.memory_step(state.memory, q, k, v, i_pre, f_pre, reset, config.read, read_mix)
    y = _output(params, h, x_c, z, config)
    return y, CellState(conv=window[:, 1:].astype(jnp.float32), memory=memory)


def _causal_conv(x_m, params, history, reset):
    """Depthwise causal conv over time that never looks across a reset.

    x_m (B, T, I); history (B, K-1, I) the inputs before x_m; reset (B, T).
    """
    kernel = params["conv"]["kernel"].astype(x_m.dtype)
    taps = kernel.shape[0]
    t = x_m.shape[1]
    padded = jnp.concatenate([history.astype(x_m.dtype), x_m], axis=1)  # (B, K-1+T, I)
    # Episode index of every padded position; history belongs to episode 0.
    episode = jnp.concatenate(
        [
            jnp.zeros((reset.shape[0], taps - 1), jnp.int32),
            jnp.cumsum(reset.astype(jnp.int32), axis=1),
        ],
        axis=1,
    )
    out = params["conv"]["bias"].astype(x_m.dtype)
    for j in range(taps):  # K taps (4), not time: a static, tiny loop.
        same_episode = episode[:, j : j + t] == episode[:, taps - 1 :]
        out = out + jnp.where(same_episode[..., None], padded[:, j : j + t], 0.0) * kernel[j]
    # The window carried to the next call holds only the current episode's inputs.
    in_last_episode = episode[:, t:] == episode[:, -1:]
    history = jnp.where(in_last_episode[..., None], padded[:, t:], 0.0)
    return out, history.astype(jnp.float32)


def scan(
    params: Params,
    x: jax.Array,
    config: CellConfig,
    *,
    reset: jax.Array | None = None,
    state: CellState | None = None,
    mask: jax.Array | None = None,
    return_states: bool = False,
    read_mix: jax.Array | float | None = None,
):
    """The cell over a sequence.

    Args:
        params: the cell parameters.
        x: (*batch, T, D) inputs: any number of batch axes, none included; T may be 0.
        config: the cell configuration (``sequence_form`` picks the form).
        reset: optional (*batch, T) bool; true at t starts a new episode at t.
        state: optional initial ``CellState`` (any dtype: computed in float32, returned
            in the dtype it came in); a fresh episode when None.
        mask: optional (*batch, T) bool; false steps leave the state untouched and
            output zeros (padding, e.g. after a sequence's end).
        return_states: also return the state after every step (leaves
            (*batch, T, ...)), e.g. for a replay buffer's burn-in starts.
        read_mix: None, or the scaffold anneal's α (a scalar, ``orthorecall.anneal``).

    With a mask or ``return_states`` the sequence runs step by step (``step`` in a
    ``lax.scan``), whatever ``sequence_form`` says: the parallel forms keep no per-step
    state, and a masked step must not move the causal convolution's window.

    Returns:
        (y (*batch, T, D) float32, final ``CellState``), and the per-step states last
        when ``return_states``.

    Raises:
        ValueError: wrong shapes, or a reset or mask that is not (*batch, T) bool.
    """
    batch = _check_input(x, config, time_axis=True)
    t = x.shape[-2]
    if state is None:
        state = initial_state(config, batch)
    _check_state(state, batch, config)
    mlstm.check_reset(reset, (*batch, t), "(batch, time)")
    _check_mask(mask, (*batch, t), "(batch, time)")
    mlstm.check_read_mix(config.read, read_mix)
    if t == 0:  # Nothing to read or write: the state as it came.
        y = jnp.zeros((*batch, 0, config.embedding_dim), jnp.float32)
        if return_states:
            states = jax.tree_util.tree_map(
                lambda a: jnp.zeros((*batch, 0, *a.shape[len(batch) :]), a.dtype), state
            )
            return y, state, states
        return y, state
    flat = lambda tree: None if tree is None else _flatten(tree, batch)
    x_flat, old = flat(x), _float32(flat(state))
    reset_flat = flat(reset)
    with precision.matmul_precision(config.matmul_precision):
        if mask is None and not return_states:
            if reset_flat is None:
                reset_flat = jnp.zeros(x_flat.shape[:2], bool)
            y, new = _scan(params, x_flat, config, reset_flat, old, read_mix)
            return _unflatten(y, batch), _like(_unflatten(new, batch), state)
        y, new, states = _step_by_step(
            params, x_flat, config, reset_flat, flat(mask), old, read_mix
        )
    y, new = _unflatten(y, batch), _like(_unflatten(new, batch), state)
    if not return_states:
        return y, new
    return y, new, _like(_unflatten(states, batch), state)


def _step_by_step(params, x, config, reset, mask, state, read_mix=None):
    """``_step`` over time in a ``lax.scan``: x (B, T, D); returns (y (B, T, D), final
    state, per-step states with a time axis after B)."""
    b, t = x.shape[:2]
    reset = jnp.zeros((b, t), bool) if reset is None else reset
    mask = jnp.ones((b, t), bool) if mask is None else mask

    def one(carry, inputs):
        x_t, reset_t, mask_t = inputs
        y, new = _step(params, carry, x_t, reset_t, config, read_mix)
        new = select_state(mask_t, new, carry)
        return new, (jnp.where(mask_t[:, None], y, 0.0), new)

    time_major = lambda a: jnp.swapaxes(a, 0, 1)
    final, (y, states) = jax.lax.scan(
        one, state, (time_major(x), time_major(reset), time_major(mask))
    )
    return time_major(y), final, jax.tree_util.tree_map(time_major, states)


class SequenceProjections(NamedTuple):
    """What the cell computes from a sequence before its memory: the convolved branch
    x_c and the output gate's input z (B, T, I), q, k, v (B, T, H, d), the gate
    pre-activations ĩ, f̃ (B, T, H)."""

    x_c: jax.Array
    z: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    input_gate: jax.Array
    forget_gate: jax.Array


def sequence_projections(params, x, config, reset, conv_history):
    """The cell's projections of a sequence x (B, T, D), and the conv window to carry on.

    The first half of ``scan``, on its own so that probes (``orthorecall.probes``) can
    look at or change q, k, v before the memory without restating the layer's math.
    ``reset`` (B, T) bool; ``conv_history`` (B, K-1, I) the conv inputs before x. One
    batch axis, no checks, and the caller's matrix-product precision: ``scan`` is the
    checked entry point (and sets ``config.matmul_precision``).
    """
    dtype = jnp.dtype(config.compute_dtype)
    u = x.astype(dtype) @ params["up_proj"].astype(dtype)
    x_m, z = jnp.split(u, 2, axis=-1)
    conv, conv_state = _causal_conv(x_m, params, conv_history, reset)
    x_c = jax.nn.silu(conv)
    q, k, v, i_pre, f_pre = _projections(params, x_m, x_c, config)
    return SequenceProjections(x_c, z, q, k, v, i_pre, f_pre), conv_state


def memory_sequence(projections, config, reset, state, read_mix=None):
    """h̃ (B, T, H, d) and the final ``mlstm.MemoryState`` of the sequence form that
    ``config.sequence_form`` names, from ``sequence_projections``' output."""
    forms = {
        "recurrent": mlstm.recurrent_sequence,
        "chunkwise": mlstm.chunkwise_sequence,
        "gram": mlstm.gram_sequence,
    }
    # The recurrence has no chunks; the other two forms take their length.
    chunks = {} if config.sequence_form == "recurrent" else {"chunk_size": config.chunk_size}
    p = projections
    return forms[config.sequence_form](
        p.q,
        p.k,
        p.v,
        p.input_gate,
        p.forget_gate,
        read=config.read,
        reset=reset,
        state=state,
        read_mix=read_mix,
        **chunks,
    )


def sequence_output(params, h, projections, config):
    """The layer's output y (B, T, D) from the memory's h̃ (B, T, H, d)."""
    return _output(params, h, projections.x_c, projections.z, config)


def _scan(params, x, config, reset, state, read_mix=None):
    projections, conv_state = sequence_projections(params, x, config, reset, state.conv)
    h, memory = memory_sequence(projections, config, reset, state.memory, read_mix)
    y = sequence_output(params, h, projections, config)
    return y, CellState(conv=conv_state, memory=memory)
