"""Speed and memory of the reference model, the reads and the seed vmap.

    python -m experiments.benchmarks.model [--quick | --smoke | --accelerator] [--json PATH]
        [--reference_json PATH]

Times (after compilation and a warm-up, medians over repeats):

* ``train_step``: forward, backward and AdamW of the reference model at
  v80/s512, batch 16 and 64, one seed, raw and NS5 reads; and 24 seeds
  vmapped against one seed at the same shape (length 128; batch 2 with
  --quick, 16 without);
* ``eval_forward``: the model's forward pass at v80/s512, batch 16 and 64;
* ``read``: the NS5 read alone (h = NS5(C)ᵀq over a batch of 48x48 memories,
  the model's read: the fused kernel on CPU), forward and forward+backward, and
  the pure-XLA formulation's forward, in GFLOP/s, next to ``gemm``: one large
  float32 matrix product in the same process (the machine's practical limit);
* ``train_step_memory``: peak resident memory of a process that runs one NS5
  training step at batch 64, length 1024 (measured in a child process);
* ``train_step_memory_estimate``: XLA's compiled-memory figure for the published
  study's step (24 seeds x batch 64 x length 1024, raw and NS5 side by side, segments
  of 128), from one seed at batches 4 and 8 extrapolated linearly; once with this
  backend's read, once with the XLA read that GPUs and TPUs run.

--quick repeats twice (five times without), and more for figures that take less than
1.5 s (until 3 s are timed, at most 50 repeats); --smoke runs everything once at
tiny shapes with a tiny model (to check the benchmark works, not to measure).
--accelerator times the published study on one GPU/TPU instead: training steps of
24 seeds vmapped at batch 64, lengths 512 and 1024 (segments of 128, as the presets),
one seed at batch 64, the forward at batch 64, and the read over 65,536 memories
(against the device's dense float32 peak where it is known: ``FLOAT32_PEAK_TFLOPS``).
Every training step's record carries XLA's compiled memory figure, and on devices
that keep allocator statistics the peak allocation so far. Prints a table and, with
--json, writes the figures with the device kind, its memory statistics
(``memory_stats()``), the JAX version and the configuration, so runs on other
machines compare.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

from experiments.study.cli import (
    ConfigError,
    config_flag_parser,
    exit_status_on_refusal,
    library_logging_at_warning,
)
from experiments.study.config_checks import FLAGS as FLAG_CHECKS

_QUICK = flags.DEFINE_bool("quick", False, "Fewer shapes and repeats (under 5 minutes on 2 cores).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny shapes, one repeat: checks the benchmark runs (figures meaningless)."
)
_REFERENCE_JSON = flags.DEFINE_string(
    "reference_json",
    None,
    "The --json output of experiments/benchmarks/reference.py, run on this machine in this "
    "session: adds the side-by-side ratios (ours / reference) to the table and the JSON.",
)
_ACCELERATOR = flags.DEFINE_bool(
    "accelerator",
    False,
    "The published shapes for one GPU/TPU: 24 seeds vmapped at batch 64, lengths 512 and "
    "1024, reads of 65,536 memories; reports device memory.",
)
_MODE_FLAGS = {"quick": _QUICK, "smoke": _SMOKE, "accelerator": _ACCELERATOR}
_MEMORY_CHILD = flags.DEFINE_bool("memory_child", False, "Internal: run one step, print peak RSS.")
_MEMORY_SHAPE = flags.DEFINE_list("memory_shape", ["64", "1024"], "Internal: batch,length.")

VOCAB, SEQ_LEN = 80, 512  # The reference task (noise vocabulary 16, p = 0.8) at v80/s512.


def read_flops(read_name: str, dim: int, *, train: bool, algorithm: str | None = None) -> int:
    """Flops of one read h = R(C)ᵀq of a d x d memory, for the algorithm that runs it:
    ``"gram"`` (G = X0ᵀX0, then (3^k - 1) / 2 products of G with a vector; the CPU
    kernel's forward of k >= 5 forms G_1 first, see kernels/ns_read.cc), ``"explicit"``
    (per iteration XᵀX and X P: 4 d³, 6 d³ with the quintic term) or ``"raw"`` (qᵀC).
    Training adds the backward pass as the CPU kernel and the custom VJPs run it
    (recomputation included). Counts multiply-adds as two flops; O(d²) terms besides
    the products are left out."""
    from orthorecall import gram_read
    from orthorecall.reads import read_from_name

    read = read_from_name(read_name)
    if read.kind == "raw":
        return 2 * dim**2 * (2 if train else 1)
    if algorithm is None:
        algorithm = "gram" if read.gram_steps() is not None else "explicit"
    k = read.num_iterations
    if algorithm == "gram":
        products = gram_read.matvec_count(k) * 2 * dim**2
        plain_forward = 2 * dim**3 + products + 2 * dim**2
        # The kernel's forward forms G_{j+1} = G_j M_j² (two products of matrices) for the
        # first k - 4 levels of k >= 5 and runs the rest of the schedule on it.
        lifts = max(0, k - 4)
        forward = (
            2 * dim**3
            + lifts * (4 * dim**3 + 2 * dim**2)
            + gram_read.matvec_count(k - lifts) * 2 * dim**2
            + 2 * dim**2
        )
        # Recompute (the plain program), reverse sweep (products again), Ḡ = W̄ᵀU (as
        # many flops), X0 Ḡ.
        backward = plain_forward + 2 * products + 2 * dim**3
    else:
        per_iteration = (4 if read.coefficients == "cubic" else 6) * dim**3
        forward = k * per_iteration
        backward = forward + k * (per_iteration + 2 * dim**3)
    return forward + (backward if train else 0)


def _model_read_flops(read_name: str, *, train: bool) -> int:
    """The reference model's read flops per token (every head), as run on this backend."""
    from orthorecall import cell
    from orthorecall.reads import read_from_name

    config = cell.CellConfig()
    read = read_from_name(read_name)
    # The CPU kernel reads cubic NS_k (k <= 6, d > 16) through the Gram matrix; XLA
    # explicitly.
    kernel_gram = read.implementation() == "cpu_kernel" and read.gram_steps() is not None
    algorithm = "gram" if kernel_gram and config.head_dim > 16 else None
    if read.kind == "newton_schulz" and algorithm is None:
        algorithm = "explicit"
    return config.num_heads * read_flops(
        read_name, config.head_dim, train=train, algorithm=algorithm
    )


# A figure's repeats continue until they add up to this many seconds (at most
# _MAX_REPEATS): two repeats of a 0.1 s forward pass say little on a shared machine
# (10-20% run to run). benchmark_reference.py times the reference the same way.
MIN_TIMED_SECONDS = 3.0
_MAX_REPEATS = 50


def _median_seconds(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # Compilation and warm-up.
    times = []
    # One repeat (--smoke) means exactly one.
    while len(times) < repeats or (
        repeats > 1 and sum(times) < MIN_TIMED_SECONDS and len(times) < _MAX_REPEATS
    ):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_config(read_name: str, cell_fields: dict | None = None):
    """The reference model with ``read_name``'s read (``cell_fields`` override the
    cell's, e.g. a tiny width for --smoke)."""
    from orthorecall import cell, model
    from orthorecall.reads import read_from_name

    return model.ModelConfig(
        vocab_size=VOCAB,
        cell=cell.CellConfig(read=read_from_name(read_name), **(cell_fields or {})),
    )


def _train_step_runner(
    read_name: str,
    batch: int,
    seq_len: int,
    seeds: int,
    *,
    cell_fields: dict | None = None,
    segment_length: int | None = None,
):
    """A closure running one training step of ``seeds`` seeds (compiled ahead of time),
    and XLA's memory figure for that step."""
    import jax
    import numpy as np

    from orthorecall import data, footprint, training

    config = _model_config(read_name, cell_fields)
    optimizer = training.make_optimizer()
    seed_ids = np.arange(seeds)
    states = {read_name: training.init_seed_states(seed_ids, config, optimizer)}
    keys = jax.vmap(jax.random.PRNGKey)(jax.numpy.asarray(seed_ids, jax.numpy.uint32))
    task = data.NoisyRecallTask(vocab_size=VOCAB, seq_len=seq_len)
    sample = lambda key: data.sample_noisy_recall(key, task, batch_size=batch)
    step = training.make_train_step(
        {read_name: config}, optimizer, sample, segment_length=segment_length
    )
    step = step.lower(states, keys, None).compile()
    carry = {"states": states, "keys": keys}

    def run():
        carry["states"], carry["keys"], metrics = step(carry["states"], carry["keys"], None)
        return metrics

    return run, footprint.compiled_memory_bytes(step)


def bench_train_step(
    read_name, batch, seq_len, seeds, repeats, *, cell_fields=None, segment_length=None
):
    run, compiled_bytes = _train_step_runner(
        read_name,
        batch,
        seq_len,
        seeds,
        cell_fields=cell_fields,
        segment_length=segment_length,
    )
    seconds = _median_seconds(run, repeats)
    tokens = seeds * batch * (seq_len - 1)
    return {
        "name": "train_step",
        "read": read_name,
        "batch": batch,
        "seq_len": seq_len,
        "seeds": seeds,
        "segment_length": segment_length,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_seed": tokens / seconds / seeds,
        "read_flops_per_token": _model_read_flops(read_name, train=True),
        "compiled_bytes": compiled_bytes,
        **_device_peak(),
    }


def _device_peak() -> dict:
    """The device's peak allocation so far, where its backend keeps statistics (GPU,
    TPU): ``{"device_peak_bytes_in_use": N}``; ``{}`` elsewhere (CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return {}
    if not stats or "peak_bytes_in_use" not in stats:
        return {}
    return {"device_peak_bytes_in_use": int(stats["peak_bytes_in_use"])}


def bench_eval_forward(read_name, batch, repeats, seq_len=SEQ_LEN, *, cell_fields=None):
    import jax

    from orthorecall import data, model

    config = _model_config(read_name, cell_fields)
    params = model.init_params(jax.random.PRNGKey(0), config)
    tokens, _ = data.sample_noisy_recall(
        jax.random.PRNGKey(1),
        data.NoisyRecallTask(vocab_size=VOCAB, seq_len=seq_len),
        batch_size=batch,
        is_training=False,
    )
    forward = jax.jit(model.apply, static_argnames="config")
    seconds = _median_seconds(lambda: forward(params, tokens, config=config), repeats)
    count = batch * (seq_len - 1)
    return {
        "name": "eval_forward",
        "read": read_name,
        "batch": batch,
        "seq_len": seq_len,
        "seeds": 1,
        "seconds": seconds,
        "tokens_per_s": count / seconds,
        "read_flops_per_token": _model_read_flops(read_name, train=False),
        **_device_peak(),
    }


def bench_read_and_gemm(repeats, num_matrices=8192, dim=48, gemm_dim=2048):
    """NS5 read GFLOP/s (what the model runs, and the pure-XLA formulation for
    comparison) next to one large matrix product's in the same process."""
    import jax

    from orthorecall import newton_schulz as ns

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    memory = jax.random.normal(keys[0], (num_matrices, dim, dim))
    query = jax.random.normal(keys[1], (num_matrices, dim))
    h_bar = jax.random.normal(keys[2], (num_matrices, dim))
    model_read = jax.jit(lambda c, q: ns.newton_schulz_read(c, q, 5))
    model_read_vjp = jax.jit(lambda c, q, g: jax.vjp(ns.newton_schulz_read, c, q)[1](g))
    xla_read = jax.jit(lambda c, q: ns.newton_schulz_read(c, q, 5, implementation="xla"))
    implementation = ns.read_implementation(5, "cubic")
    # Nominal flops of the explicit iteration, whatever runs (so that figures compare
    # across versions): two d x d products per iteration forward; backward adds three
    # per iteration (its recomputation of the iterates is not counted). Each record
    # also gives the flops of the algorithm that ran and the time.
    forward_flops = 5 * 2 * 2 * dim**3 * num_matrices
    backward_flops = 5 * 3 * 2 * dim**3 * num_matrices
    algorithm = "gram" if implementation == "cpu_kernel" else "explicit"
    a = jax.random.normal(jax.random.PRNGKey(1), (gemm_dim, gemm_dim))
    gemm = jax.jit(lambda m: m @ m)
    gemm_gflops = 2 * gemm_dim**3 / _median_seconds(lambda: gemm(a), repeats) / 1e9

    def record(implementation, passes, flops, fn):
        seconds = _median_seconds(fn, repeats)
        gflops = flops / seconds / 1e9
        run = algorithm if implementation == "cpu_kernel" else "explicit"
        return {
            "name": "read",
            "read": "ns5",
            "batch": num_matrices,
            "seq_len": None,
            "seeds": None,
            "matrix_dim": dim,
            "implementation": implementation,
            "pass": passes,
            "gflops": gflops,
            "fraction_of_gemm": gflops / gemm_gflops,
            "seconds": seconds,
            "algorithm": run,
            "flops_per_read": read_flops(
                "ns5", dim, train=passes == "forward_backward", algorithm=run
            ),
        }

    records = [
        record(implementation, "forward", forward_flops, lambda: model_read(memory, query)),
        record(
            implementation,
            "forward_backward",
            forward_flops + backward_flops,
            lambda: (model_read(memory, query), model_read_vjp(memory, query, h_bar)),
        ),
    ]
    if implementation != "xla":
        records.append(record("xla", "forward", forward_flops, lambda: xla_read(memory, query)))
    records.append(
        {
            "name": "gemm",
            "read": None,
            "batch": None,
            "seq_len": None,
            "seeds": None,
            "matrix_dim": gemm_dim,
            "gflops": gemm_gflops,
        }
    )
    return records


def bench_memory(batch=64, seq_len=1024, *, smoke=False):
    """Peak RSS of a fresh process running one NS5 training step (``smoke``: the
    --smoke model)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.benchmarks.model",
            "--memory_child",
            f"--memory_shape={batch},{seq_len}",
            *(["--smoke"] if smoke else []),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{done.stderr[-3000:]}")
    peak = int(done.stdout.strip().splitlines()[-1])
    return {
        "name": "train_step_memory",
        "read": "ns5",
        "batch": batch,
        "seq_len": seq_len,
        "seeds": 1,
        "peak_rss_bytes": peak,
    }


def _compiled_step_bytes(read_names, seeds, batch, seq_len, segment_length, cell_fields=None):
    """XLA's memory figure for the trainer's step (arguments + outputs - aliased +
    temporaries), compiled, never run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from orthorecall import footprint, training

    configs = {name: _model_config(name, cell_fields) for name in read_names}
    optimizer = training.make_optimizer()
    states = {
        name: jax.eval_shape(
            lambda c=config: training.init_seed_states(np.arange(seeds), c, optimizer)
        )
        for name, config in configs.items()
    }
    keys = jax.ShapeDtypeStruct((seeds, 2), jnp.uint32)
    batch_shape = (jax.ShapeDtypeStruct((seeds, batch, seq_len), jnp.int32),) * 2
    step = training.make_train_step(configs, optimizer, None, segment_length=segment_length)
    return footprint.compiled_memory_bytes(step.lower(states, keys, batch_shape).compile())


def bench_step_memory_estimate(
    seeds=24,
    batch=64,
    seq_len=1024,
    measured_batches=(4, 8),
    segment_length=128,
    xla_read=False,
    cell_fields=None,
):
    """The published study's training step (raw and NS5 side by side, the presets'
    segment length), from XLA's figure at one seed and two small batches, extrapolated
    linearly to ``seeds`` x ``batch``: everything but a per-seed constant (parameters,
    optimizer state) grows with the sequences, and seeds are independent copies.
    ``xla_read``: the Newton-Schulz read as GPUs and TPUs run it (XLA arrays), compiled
    for the CPU."""
    import jax

    from orthorecall import cpu_kernel
    from orthorecall.reads import read_from_name

    reads = ("raw", "ns5")
    length = seq_len - 1  # the positions the model sees, as the trainer counts them
    low, high = measured_batches
    kernel_available = cpu_kernel.available
    if xla_read:  # What ORTHORECALL_CPU_KERNEL=0 does, once the kernel is loaded.
        cpu_kernel.available = lambda: False
    try:
        small = _compiled_step_bytes(reads, 1, low, length, segment_length, cell_fields)
        large = _compiled_step_bytes(reads, 1, high, length, segment_length, cell_fields)
        implementation = read_from_name("ns5").implementation()
    finally:
        cpu_kernel.available = kernel_available
    per_sequence = (large - small) / (high - low)
    per_seed = small - low * per_sequence
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return {
        "name": "train_step_memory_estimate",
        "read": "raw+ns5",
        "reads": list(reads),
        "batch": batch,
        "seq_len": seq_len,
        "seeds": seeds,
        "segment_length": segment_length,
        "bytes": int(seeds * (per_seed + batch * per_sequence)),
        "measured_bytes": {f"1x{low}": small, f"1x{high}": large},
        "backend": device.platform,
        "ns_read_implementation": implementation,
        "method": (
            f"memory_analysis() of the compiled step at 1 seed x batch {low} and {high} "
            f"(length {length}), extrapolated linearly to {seeds} seeds x batch {batch}"
        ),
        "device_memory_stats": stats,
    }


def _memory_child(batch, seq_len, cell_fields):
    import jax

    run, _ = _train_step_runner("ns5", batch, seq_len, 1, cell_fields=cell_fields)
    jax.block_until_ready(run())
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if platform.system() == "Darwin" else 1024
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _format(records) -> str:
    lines = [f"{'name':<28}{'read':<8}{'batch':>7}{'len':>6}{'seeds':>6}  figure"]
    for r in records:
        if "tokens_per_s" in r:
            figure = f"{r['tokens_per_s']:,.0f} tokens/s ({r['seconds']:.3f} s)"
        elif "gflops" in r:
            figure = f"{r['gflops']:.1f} GFLOP/s"
            if "fraction_of_gemm" in r:
                figure += (
                    f" = {100 * r['fraction_of_gemm']:.0f}% of gemm"
                    f" ({r['implementation']}, {r['pass']})"
                )
        elif "peak_rss_bytes" in r:
            figure = f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
        else:
            figure = f"compiled step {r['bytes'] / 2**30:.1f} GiB (extrapolated, {r['backend']})"
        cells = [r["name"], r["read"] or "", r["batch"] or "", r["seq_len"] or "", r["seeds"] or ""]
        lines.append(
            f"{cells[0]:<28}{cells[1]:<8}{cells[2]!s:>7}{cells[3]!s:>6}{cells[4]!s:>6}  {figure}"
        )
    return "\n".join(lines)


def side_by_side(records: list[dict], reference_records: list[dict]) -> list[dict]:
    """Our ``train_step`` / ``eval_forward`` figures next to the reference's at the same
    read, batch and length (``benchmark_reference.py``'s ``reference_*`` records), with
    ``ratio`` = ours / reference in tokens per second."""
    ours = {}
    for r in records:  # The first figure of a shape (--smoke times one shape twice).
        if r["name"] in ("train_step", "eval_forward") and r.get("seeds") == 1:
            ours.setdefault((r["name"], r["read"], r["batch"], r["seq_len"]), r)
    rows = []
    for ref in reference_records:
        figure = ref["name"].removeprefix("reference_")
        mine = ours.get((figure, ref["read"], ref["batch"], ref["seq_len"]))
        if mine is None:
            continue
        rows.append(
            {
                "figure": figure,
                "read": ref["read"],
                "batch": ref["batch"],
                "seq_len": ref["seq_len"],
                "orthorecall_tokens_per_s": mine["tokens_per_s"],
                "reference_tokens_per_s": ref["tokens_per_s"],
                "ratio": mine["tokens_per_s"] / ref["tokens_per_s"],
                "read_flops_per_token": mine["read_flops_per_token"],
            }
        )
    return rows


def _format_side_by_side(rows: list[dict]) -> str:
    lines = [f"{'figure':<14}{'read':<6}{'batch':>6}{'len':>6}{'ours':>12}{'reference':>12}  ratio"]
    for r in rows:
        lines.append(
            f"{r['figure']:<14}{r['read']:<6}{r['batch']:>6}{r['seq_len']:>6}"
            f"{r['orthorecall_tokens_per_s']:>12,.0f}{r['reference_tokens_per_s']:>12,.0f}"
            f"  {r['ratio']:.1f}x"
        )
    return "\n".join(lines)


# Per mode: cell overrides (the model's size), the train_step figures as (batch,
# length, seeds, segment length) for each read, the eval_forward figures as (batch,
# length), the seed-vmap pair's (batch, length) (NS5 at 1 and vmapped_seeds seeds), the read's
# batch of matrices, the gemm size, the peak-RSS measurement's shape and the compiled
# memory estimate's arguments (None: not measured), and the repeats.
_REFERENCE_SHAPES = dict(
    cell={},
    train=((16, SEQ_LEN, 1, None), (64, SEQ_LEN, 1, None)),
    eval=((16, SEQ_LEN), (64, SEQ_LEN)),
    seed_vmap=(16, 128),
    vmapped_seeds=24,
    read_matrices=8192,
    gemm_dim=2048,
    memory=(64, 1024),
    memory_estimate=dict(seeds=24, batch=64, seq_len=1024, measured_batches=(4, 8)),
    repeats=5,
)
_MODES = {
    "full": _REFERENCE_SHAPES,
    "quick": _REFERENCE_SHAPES | dict(seed_vmap=(2, 128), repeats=2),
    "smoke": dict(
        cell=dict(embedding_dim=16, num_heads=2, inner_multiple=8),
        train=((2, 24, 1, None),),
        eval=((2, 24),),
        # The memory child and the one-seed figure compile the ns5 train figure's
        # program again: a persistent compilation cache serves them.
        seed_vmap=(2, 24),
        vmapped_seeds=4,
        read_matrices=32,
        gemm_dim=128,
        memory=(2, 24),
        memory_estimate=dict(
            seeds=2, batch=4, seq_len=64, measured_batches=(1, 2), segment_length=16
        ),
        repeats=1,
    ),
    # The published study on one accelerator: 24 seeds vmapped at batch 64, lengths 512
    # and 1024, segments of 128 as the presets; its compiled memory is measured directly
    # (each train_step record's compiled_bytes), and host RSS says nothing there.
    "accelerator": dict(
        cell={},
        train=((64, 512, 1, None), (64, 512, 24, 128), (64, 1024, 24, 128)),
        eval=((64, 512), (64, 1024)),
        seed_vmap=None,
        vmapped_seeds=None,
        read_matrices=65536,
        gemm_dim=8192,
        memory=None,
        memory_estimate=None,
        repeats=5,
    ),
}

# Dense float32 peaks (TFLOP/s, no tensor cores) from NVIDIA's datasheets, by a
# substring of JAX's device_kind; the read's GFLOP/s are reported against them.
FLOAT32_PEAK_TFLOPS = (
    ("H100 PCIe", 51.2),
    ("H100", 66.9),
    ("H200", 66.9),
    ("A100", 19.5),
)


def float32_peak_tflops(device_kind: str) -> float | None:
    """The device's dense float32 peak in TFLOP/s when known (NVIDIA GPUs listed in
    ``FLOAT32_PEAK_TFLOPS``), else None."""
    for name, tflops in FLOAT32_PEAK_TFLOPS:
        if name in device_kind:
            return tflops
    return None


def _memory_stats(device) -> dict | None:
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return {k: int(v) for k, v in stats.items()} if stats else None


def run_benchmark(mode: str) -> dict:
    """Runs every measurement of ``mode`` (``_MODES``); returns the JSON-able result."""
    import jax

    from orthorecall import data, mlstm
    from orthorecall.reads import read_from_name

    shapes = _MODES[mode]
    repeats, cell_fields = shapes["repeats"], shapes["cell"]
    device = jax.devices()[0]
    memory_at_start = _memory_stats(device)
    records = []
    for read in ("raw", "ns5"):
        for batch, seq_len, seeds, segment_length in shapes["train"]:
            records.append(
                bench_train_step(
                    read,
                    batch,
                    seq_len,
                    seeds,
                    repeats,
                    cell_fields=cell_fields,
                    segment_length=segment_length,
                )
            )
        for batch, seq_len in shapes["eval"]:
            records.append(
                bench_eval_forward(read, batch, repeats, seq_len=seq_len, cell_fields=cell_fields)
            )
    if shapes["seed_vmap"] is not None:
        for seeds in (1, shapes["vmapped_seeds"]):
            records.append(
                bench_train_step(
                    "ns5", *shapes["seed_vmap"], seeds, repeats, cell_fields=cell_fields
                )
            )
    peak = float32_peak_tflops(device.device_kind)
    reads = bench_read_and_gemm(
        repeats, num_matrices=shapes["read_matrices"], gemm_dim=shapes["gemm_dim"]
    )
    for r in reads:
        if peak is not None and r["name"] == "read":
            r["fraction_of_float32_peak"] = r["gflops"] / (1e3 * peak)
    records.extend(reads)
    if shapes["memory"] is not None:
        records.append(bench_memory(*shapes["memory"], smoke=mode == "smoke"))
    if shapes["memory_estimate"] is not None:
        for xla_read in (False, True):
            records.append(
                bench_step_memory_estimate(
                    **shapes["memory_estimate"], xla_read=xla_read, cell_fields=cell_fields
                )
            )
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "device_memory_stats": {"start": memory_at_start, "end": _memory_stats(device)},
        "float32_peak_tflops": peak,
        "jax_version": jax.__version__,
        "mode": mode,
        "quick": mode == "quick",
        "machine": platform.machine(),
        "ns_read_implementation": read_from_name("ns5").implementation(),
        "config": {
            **data.NoisyRecallTask(vocab_size=VOCAB, seq_len=SEQ_LEN).to_dict(),
            "model": "reference (ModelConfig defaults)"
            + (f" with cell {cell_fields}" if cell_fields else ""),
            "chunk_size": {
                name: mlstm.default_chunk_size(read_from_name(name)) for name in ("raw", "ns5")
            },
            "shapes": shapes,
        },
        "records": records,
    }


def _memory_shape() -> tuple[int, int]:
    """--memory_shape as (batch, length), each an integer in [1, 2**31 - 1]."""
    if len(_MEMORY_SHAPE.value) != 2:
        FLAG_CHECKS.fail("memory_shape", f"must be BATCH,LENGTH, got {_MEMORY_SHAPE.value}.")
    try:
        batch, seq_len = (int(x) for x in _MEMORY_SHAPE.value)
    except ValueError:
        FLAG_CHECKS.fail("memory_shape", f"must be two integers, got {_MEMORY_SHAPE.value}.")
    FLAG_CHECKS.int("memory_shape", batch, minimum=1)
    FLAG_CHECKS.int("memory_shape", seq_len, minimum=1)
    return batch, seq_len


def _check_flags():
    """The flags, before anything is measured; returns (mode, reference records)."""
    chosen = [name for name, flag in _MODE_FLAGS.items() if flag.value]
    if len(chosen) > 1:
        raise ConfigError(
            f"--{' and --'.join(chosen)} are exclusive; pick one of --quick, --smoke, "
            "--accelerator (none: the full benchmark)."
        )
    if _JSON.value:
        FLAG_CHECKS.output_file("json", _JSON.value)
    reference = None
    if _REFERENCE_JSON.value:
        try:
            with open(_REFERENCE_JSON.value) as f:
                reference = json.load(f)["records"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"--reference_json={_REFERENCE_JSON.value} is not the --json output of "
                f"experiments/benchmarks/reference.py: {error}"
            ) from None
    return (chosen[0] if chosen else "full"), reference


def main(argv):
    library_logging_at_warning()
    with exit_status_on_refusal("benchmark"):
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments: {argv[1:]}")
        if _MEMORY_CHILD.value:
            batch, seq_len = _memory_shape()
        else:
            mode, reference = _check_flags()
    if _MEMORY_CHILD.value:
        _memory_child(batch, seq_len, _MODES["smoke"]["cell"] if _SMOKE.value else None)
        return
    out = run_benchmark(mode)
    stats = out["device_memory_stats"]["end"] or {}
    memory = (
        f", device memory peak {stats['peak_bytes_in_use'] / 2**30:.1f} of "
        f"{stats['bytes_limit'] / 2**30:.1f} GiB"
        if "peak_bytes_in_use" in stats and "bytes_limit" in stats
        else ""
    )
    print(
        f"{out['device']} x{out['num_devices']}, jax {out['jax_version']}, "
        f"NS read: {out['ns_read_implementation']}{memory}"
    )
    print(_format(out["records"]))
    if reference is not None:
        out["reference"] = {"records": reference}
        out["side_by_side"] = side_by_side(out["records"], reference)
        print("\nSide by side with the reference (tokens/s, this machine):")
        print(_format_side_by_side(out["side_by_side"]))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=config_flag_parser("benchmark"))
