"""How much memory and time a training configuration needs, estimated before any compile.

The trainer (``experiments.study.train``) refuses a configuration that cannot fit from these
figures, in well under a second, instead of compiling for seconds and then failing with
RESOURCE_EXHAUSTED (or swapping), and refuses a validation set whose generation would take
hours. Every figure is analytic: a sum over the arrays the program keeps, from the shapes.

* :func:`train_step_memory_estimate`: bytes one device needs for one training step of
  ``training.make_train_step`` (parameters, AdamW moments, gradients, the activations the
  backward pass keeps, the batch) for the seeds it holds.
* :func:`eval_step_memory_estimate`: the same for ``training.make_eval_step``.
* :func:`validation_set_bytes`, :func:`numpy_generation_seconds`: the reference
  validation set's size and the time ``data.reference_validation_set`` takes to draw it.
* :func:`available_memory_bytes`, :func:`per_device_available_memory`: what a device can
  use (its allocator's limit on GPU/TPU, the host's available memory on CPU).

The estimates bound XLA's own figure for the compiled step from above
(``jax.jit(step).lower(...).compile().memory_analysis()``: arguments + outputs - aliased
+ temporaries). The coefficients come from comparing the two on XLA:CPU over 42
configurations (batch 4-32, lengths 15-63, chunks 8-64, widths 16-94 with head widths
8-48, vocabularies 24-96, 1-3 seeds; raw, NS1/5/10 cubic and muon, polar; float32 and
bfloat16; the Newton-Schulz read both as the CPU kernel and as the XLA formulation that
GPUs and TPUs run): the training-step estimate came out 1.15-1.69x XLA's figure, the
evaluation's 1.24-2.4x (most over-estimated with several seeds), including the 10%
margin of ``_with_margin``. tests/test_footprint.py repeats the comparison on a few of
them, asserting a factor within [1, 2.5]. Since the CPU kernel forms each C_t itself
(``orthorecall.chunk_read``) its Newton-Schulz cases no longer hold the chunk's memories;
re-measured on eight of them (NS1/NS5 cubic and muon, 1-3 seeds, lengths 15-1023, with
and without segments, d = 8-48): 1.12-1.64x for training, 1.30-1.44x for evaluation.
The raw read on the CPU runs its recurrence in a kernel (``orthorecall.raw_memory``),
without the chunk's L x L matrices; re-measured on eight raw and raw + ns5 cases (1-3
seeds, batch 4-16, lengths 15-1023, chunks 16-64, with and without segments): 1.32-2.43x
for training. The terms follow what the code keeps
(``mlstm.chunkwise_sequence``'s checkpointed chunk, the Newton-Schulz read's custom
VJPs): a change there may need a change here, which that test would show. Not measured on
a GPU or TPU, whose compilers fuse differently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from orthorecall import model as model_lib
from orthorecall import newton_schulz, raw_memory
from orthorecall.mlstm import default_chunk_size
from orthorecall.reads import ReadConfig

GIB = 2**30
_F32 = 4
_INT32 = 4

# Tokens per second that data.reference_validation_set / ReferenceTrainingStream draw
# (one Python loop over the slots of every example, on one core). Measured on this
# repository's 2-core CPU: 2.2e5-2.8e5 tokens/s at seq_len 64 and 1.2e5-2.2e5 at
# seq_len 512-1024 with the reference's 0.8 noise fraction (noise slots cost more than
# key slots; 7.7e5 with no noise), lower when the machine is loaded. The low end, so
# that the time is not under-estimated on a slower machine.
NUMPY_TOKENS_PER_SECOND = 1.0e5


def parameter_count(config: model_lib.ModelConfig) -> int:
    """Scalar parameters of ``model.init_params(key, config)``, from the shapes alone."""
    cell = config.cell
    d, i, h = cell.embedding_dim, cell.inner_dim, cell.num_heads
    per_cell = (
        d * 2 * i  # up_proj
        + (cell.conv_kernel_size + 1) * i  # conv kernel and bias
        + 3 * i * cell.qkv_block_size  # block-diagonal q, k, v
        + 2 * (3 * i * h + h)  # input and forget gates
        + 2 * i  # out_norm, skip
        + i * d  # down_proj
    )
    v = config.vocab_size
    return v * d + cell.num_blocks * (d + per_cell) + d + d * v + v


def _as_list(model_configs) -> list[model_lib.ModelConfig]:
    if isinstance(model_configs, model_lib.ModelConfig):
        return [model_configs]
    return list(model_configs)


def _chunk_size(config: model_lib.ModelConfig, seq_len: int, backend: str | None) -> int:
    if config.cell.sequence_form == "recurrent":
        # A scan over single steps keeps every step's state for backward, as chunks of
        # one position would (not compared with XLA: the trainer uses chunks).
        return 1
    chunk = config.cell.chunk_size
    if chunk is None:
        chunk = default_chunk_size(config.cell.read, backend)
    return min(chunk, seq_len)


def _forms_memories(read: ReadConfig, backend: str | None) -> bool:
    """Whether the chunkwise form holds C_t of every position of a chunk as XLA arrays:
    a non-raw read, except the Newton-Schulz read on the CPU kernel, which forms each C_t
    inside the kernel (``orthorecall.chunk_read``). Variants without a chunk-parallel
    form (delta write, rls read) run their recurrence there, whose backward holds every
    step's state of a chunk: as many d x d arrays."""
    if not read.has_chunkwise_form:
        return True
    if read.is_raw:
        return False
    if read.kind == "newton_schulz":
        implementation = newton_schulz.read_implementation(
            read.num_iterations, read.coefficients, backend
        )
        return implementation != "cpu_kernel"
    return True


def _read_arrays(read: ReadConfig, backend: str | None, *, train: bool) -> int:
    """d x d arrays per position of a chunk that a read forming the memories holds at
    its peak, besides the memories C_t themselves (measured against XLA:CPU, see the
    module docstring)."""
    if read.kind == "newton_schulz":
        k = read.num_iterations
        if train:
            # _iterations_bwd recomputes every step's X and XᵀX and keeps them through the
            # reversed loop next to each step's cotangent products: 4 arrays per iteration
            # (measured for k = 1, 5, 10), 5 with the quintic term of muon/polar_express.
            return (4 if read.coefficients == "cubic" else 5) * k + 2
        return k + 2  # forward only: about one array per iteration stays alive
    if read.kind == "polar":
        return 8 if train else 2  # the SVD's U, Vᵀ, workspace, and their cotangents
    return 0


def _activation_bytes(config: model_lib.ModelConfig, batch_size, seq_len, backend, *, train):
    """Bytes that one seed of one read keeps alive at the step's peak besides its
    parameters and optimizer state."""
    cell = config.cell
    d, i, h, hd = cell.embedding_dim, cell.inner_dim, cell.num_heads, cell.head_dim
    v = config.vocab_size
    compute = 2 if cell.compute_dtype == "bfloat16" else _F32  # the projections' dtype
    chunk = _chunk_size(config, seq_len, backend)
    num_chunks = -(-seq_len // chunk)
    tokens = batch_size * seq_len
    padded_tokens = batch_size * num_chunks * chunk
    non_raw = not cell.read.is_raw
    # The raw read's recurrence kernel (CPU) keeps no L x L matrices, only its output and
    # the states it saves every chunk for backward.
    recurrence = raw_memory.applies(cell.read, backend)
    # What one chunk's body holds (the scan runs one chunk at a time, and backward
    # recomputes one chunk at a time under its jax.checkpoint), in float32 elements.
    carry = batch_size * h * (hd * hd + hd + 1)  # (C, n, m)
    square = batch_size * h * chunk * chunk  # the L x L decay matrices
    memories = batch_size * h * chunk * hd * hd  # C_t of every position (non-raw reads)
    weighted = batch_size * h * chunk * chunk * hd  # the keys weighted for every C_t
    formed = _forms_memories(cell.read, backend)
    reads = _read_arrays(cell.read, backend, train=train) if formed else 0
    if train:
        # The forward pass's residuals and the cotangents alive with them: projections,
        # gates, the chunked q, k, v and the output path per token; a non-raw read also
        # keeps its output (B, T, I) through the chunk's checkpoint.
        keeps_output = non_raw or recurrence
        per_token_block = compute * 26 * i + _F32 * (8 * i + 8 * h + 8 * d + keeps_output * i)
        per_token = _F32 * (6 * d + 3 * v)  # embedding, norms, residual; logits, softmax
        states = (num_chunks + 2) * carry  # every chunk-start state is kept for backward
        chunk_work = (
            0 if recurrence else 5 * square + formed * (4 * weighted + (3 + reads) * memories)
        )
    else:
        # Forward only: a few token-wide buffers at a time, the chunk's work, the logits.
        per_token_block = compute * 6 * i + _F32 * (4 * i + 2 * h + 4 * d)
        per_token = _F32 * (3 * d + 3 * v)
        states = 3 * carry
        chunk_work = 0 if recurrence else 4 * square + formed * (weighted + (2 + reads) * memories)
    block = per_token_block * padded_tokens + _F32 * (states + chunk_work)
    return cell.num_blocks * block + per_token * tokens


def _state_floats(config: model_lib.ModelConfig) -> int:
    """float32 numbers in one sequence's recurrent state (every block)."""
    cell = config.cell
    memory = cell.num_heads * (cell.head_dim**2 + cell.head_dim + 1)
    conv = (cell.conv_kernel_size - 1) * cell.inner_dim
    return cell.num_blocks * (memory + conv)


def _with_margin(total: int) -> int:
    # The coefficients were measured on XLA:CPU (the training step 5-54% above its
    # figure before this margin); other backends fuse differently and GPUs add library
    # workspaces.
    return total * 11 // 10


def _group_size(seeds_per_device: int, seed_groups: int) -> int:
    if seed_groups < 1 or seeds_per_device % seed_groups:
        raise ValueError(
            f"seed_groups={seed_groups} must be a divisor of seeds_per_device={seeds_per_device}."
        )
    return seeds_per_device // seed_groups


def train_step_memory_estimate(
    model_configs: model_lib.ModelConfig | Iterable[model_lib.ModelConfig],
    *,
    batch_size: int,
    seq_len: int,
    seeds_per_device: int = 1,
    backend: str | None = None,
    segment_length: int | None = None,
    seed_groups: int = 1,
) -> int:
    """Bytes one device needs for one step of ``training.make_train_step``.

    Args:
        model_configs: the model of every read trained side by side (or one model).
        batch_size: sequences per seed and step.
        seq_len: positions the model sees (``task.example_len``, seq_len - 1).
        seeds_per_device: seeds this device holds (padded seed count / device count).
        backend: "cpu", "gpu", "tpu" (default: JAX's), which picks the default chunk
            size and whether the Newton-Schulz read runs as the fused CPU kernel.
        segment_length: the step's ``segment_length`` (None: the whole sequence).
        seed_groups: the step's ``seed_groups`` (a divisor of ``seeds_per_device``).

    Returns:
        An upper bound of XLA's figure for the compiled step, in bytes.
    """
    group = _group_size(seeds_per_device, seed_groups)
    # Parameters and both AdamW moments: the step's donated arguments and outputs (with
    # groups also the stacked outputs of the loop and their reordering).
    held = 0
    # Per seed updated at once: gradients, the clipped update and the moments' new
    # values before the select that freezes a diverged seed, and the activations.
    per_seed = []
    for config in _as_list(model_configs):
        params = _F32 * parameter_count(config)
        held += (3 if seed_groups == 1 else 9) * params
        if segment_length is None or segment_length >= seq_len:
            activations = _activation_bytes(config, batch_size, seq_len, backend, train=True)
        else:
            # Backward recomputes one segment at a time; the scan over segments keeps
            # each segment's starting state (C, n, m and the conv window per block).
            segments = -(-seq_len // segment_length)
            activations = _activation_bytes(config, batch_size, segment_length, backend, train=True)
            activations += segments * _F32 * batch_size * _state_floats(config)
        per_seed.append(4 * params + activations)
    # Without groups the reads sit side by side in one program whose temporaries XLA:CPU
    # keeps apart (raw + ns5 measured at about the sum of the two alone); with groups
    # each read is a loop of its own, and the loops run one after the other.
    working = sum(per_seed) if seed_groups == 1 else max(per_seed)
    # The batch (inputs, targets) and the on-device sampler's draws, for every seed.
    batch = _INT32 * 8 * batch_size * (seq_len + 1)
    return _with_margin(seeds_per_device * (held + batch) + group * working)


def eval_step_memory_estimate(
    model_configs: model_lib.ModelConfig | Iterable[model_lib.ModelConfig],
    *,
    num_batches: int,
    batch_size: int,
    seq_len: int,
    seeds_per_device: int = 1,
    backend: str | None = None,
    seed_groups: int = 1,
) -> int:
    """Bytes one device needs for one call of ``training.make_eval_step``: parameters, the
    validation set (its arguments) and one batch's forward pass (``lax.map`` over batches).

    Args: as :func:`train_step_memory_estimate`, with ``num_batches`` x ``batch_size``
    validation sequences per seed.
    """
    group = _group_size(seeds_per_device, seed_groups)
    configs = _as_list(model_configs)
    activations = [
        _activation_bytes(config, batch_size, seq_len, backend, train=False) for config in configs
    ]
    # Each read's lax.map over batches (or groups) is a loop of its own, and the loops run
    # one after the other, reusing the same temporaries; a single batch of a single group
    # needs no loop, and then the reads' forward passes may overlap.
    looped = num_batches > 1 or seed_groups > 1
    working = max(activations) if looped else sum(activations)
    held = _F32 * sum(parameter_count(config) for config in configs)
    held += validation_set_bytes(num_sequences=num_batches * batch_size, seq_len=seq_len)
    return _with_margin(seeds_per_device * held + group * working)


def state_bytes(
    model_configs: model_lib.ModelConfig | Iterable[model_lib.ModelConfig],
    *,
    seeds_per_device: int = 1,
) -> int:
    """Bytes of the parameters and AdamW moments a device holds for the whole run."""
    params = sum(parameter_count(c) for c in _as_list(model_configs))
    return int(seeds_per_device * 3 * _F32 * params)


def validation_set_bytes(*, num_sequences: int, seq_len: int) -> int:
    """Bytes of a validation set's int32 inputs and targets."""
    return 2 * _INT32 * num_sequences * seq_len


def numpy_generation_seconds(*, num_sequences: int, seq_len: int) -> float:
    """Seconds the numpy generator (``data.reference_validation_set``,
    ``data.ReferenceTrainingStream``) takes for ``num_sequences`` of ``seq_len`` tokens,
    at the conservative rate ``NUMPY_TOKENS_PER_SECOND``."""
    return num_sequences * seq_len / NUMPY_TOKENS_PER_SECOND


# Where Linux reports the host's memory (module constants, so that tests can swap them).
MEMINFO = "/proc/meminfo"
CGROUP_MEMORY = "/sys/fs/cgroup"


def host_available_memory_bytes() -> int | None:
    """Memory the host can still give this process: ``MemAvailable`` of /proc/meminfo
    (Linux), else free physical pages from ``sysconf``, capped by the headroom under a
    cgroup v2 memory limit (containers, where /proc/meminfo shows the whole host's); None
    when the platform says nothing."""
    available = _meminfo_available()
    if available is None:
        available = _sysconf_available()
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def _meminfo_available() -> int | None:
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not every platform names these
        return None


def _cgroup_headroom() -> int | None:
    try:
        with open(os.path.join(CGROUP_MEMORY, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(CGROUP_MEMORY, "memory.current")) as f:
            current = int(f.read().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def _allocator_headroom(device) -> int | None:
    """``bytes_limit - bytes_in_use`` of the device's allocator (GPU, TPU), None where
    the backend keeps no such statistics (CPU)."""
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def available_memory_bytes(device) -> int | None:
    """Bytes ``device`` can still allocate: what its allocator has left where the backend
    reports it (GPU, TPU: ``memory_stats()['bytes_limit']``, e.g. 75% of a GPU's memory
    under JAX's default preallocation, minus ``bytes_in_use``), otherwise the host's
    available memory (CPU); None when unknown."""
    headroom = _allocator_headroom(device)
    return headroom if headroom is not None else host_available_memory_bytes()


def per_device_available_memory(devices: Sequence) -> int | None:
    """The least memory any of ``devices`` can use, where devices without memory of their
    own (CPU devices, e.g. under ``--xla_force_host_platform_device_count=8``) split the
    host's between them; None when no figure is known."""
    own = [_allocator_headroom(device) for device in devices]
    figures = [figure for figure in own if figure is not None]
    sharing = own.count(None)
    if sharing:
        host = host_available_memory_bytes()
        if host is not None:
            figures.append(host // sharing)
    return min(figures) if figures else None


def compiled_memory_bytes(compiled) -> int:
    """What a compiled program (``jax.jit(f).lower(...).compile()``) needs at its peak,
    by XLA's own analysis: arguments, outputs that do not reuse a donated argument, and
    temporaries. The figure the estimates here are checked against."""
    stats = compiled.memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


def format_bytes(count: float) -> str:
    """``count`` bytes as a short human figure (MiB, GiB or TiB)."""
    if count >= 2**40:
        return f"{count / 2**40:.3g} TiB"
    if count >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / 2**20:.1f} MiB"
