"""Our raw chunkwise mLSTM against mlstm_kernels' JAX chunkwise form, in one process.

    python -m experiments.benchmarks.chunkwise [--rounds N] [--chunk_size L]
        [--shape B,H,T,d ...] [--smoke] [--json PATH]

Times ``orthorecall.mlstm.chunkwise_sequence`` with the raw read (the baseline's
memory, and all of a raw agent's) against ``mlstm_chunkwise_fw`` of mlstm_kernels'
``jax/chunkwise/native`` (its pure-JAX form; the package's Triton kernels are not
imported), forward and forward+backward (the gradient of Σh² with respect to q, k, v
and both gates), on the same random inputs, each in its own layout: ours takes
(B, T, H, d), theirs (B, H, T, d). Ours runs as it does for users on this backend (on
the CPU: the fused recurrence kernel, ``orthorecall.raw_memory``), and its pure-JAX
chunk form (``implementation="xla"``, what GPUs and TPUs run) is timed beside it. All
use their default chunk lengths unless --chunk_size is given, theirs 64, and XLA's
default compiler options. The outputs are compared first (they compute the same
function; ours also handles resets, NaN containment and any chunk length, which these
inputs do not exercise).

Each round visits every function in turn (after compilation and a warm-up): one
untimed call, then three timed calls, whose median is the round's figure. The untimed
call matters: the first call after another function pays for that function's cache and
allocator state (measured: our forward 4.8 ms right after mlstm_kernels' backward, 2.3
ms otherwise), which a loop calling one function does not. The figures are medians over
rounds, in tokens per second, and the ratio is ours over theirs. Install the pinned
package with ``pip install -e ".[compare]"``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

# The shapes: B16 H4 T512 d48 (the reference model's memory) and d64 T1024.
DEFAULT_SHAPES = ("16,4,512,48", "16,4,1024,64")
SMOKE_SHAPES = ("2,2,64,16",)
MLSTM_KERNELS_VERSION = "2.0.6"


def load_native_chunkwise():
    """mlstm_kernels' ``jax/chunkwise/native/fw.py`` module, loaded by path: importing the
    package's ``jax.chunkwise`` would import its Triton kernels too."""
    spec = importlib.util.find_spec("mlstm_kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "mlstm_kernels is not installed; install the pinned comparison extra: "
            'pip install -e ".[compare]"'
        )
    path = Path(spec.submodule_search_locations[0]) / "jax" / "chunkwise" / "native" / "fw.py"
    module_spec = importlib.util.spec_from_file_location("mlstm_kernels_native_fw", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shape must be four positive integers B,H,T,d; got {text!r}.")
    return tuple(int(p) for p in parts)


def make_functions(shape, chunk_size: int | None, native):
    """{name: (jitted function, its arguments)} for both forms, forward and backward,
    and the largest absolute difference between their outputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from orthorecall import mlstm, reads

    b, h, t, d = shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    input_gate = jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32)
    # Forget gates near 1, as trained models have them.
    forget_gate = jnp.asarray(rng.standard_normal((b, t, h)) + 3.0, jnp.float32)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    ours_args = (q, k, v, input_gate, forget_gate)
    theirs_args = tuple(map(heads_first, ours_args))

    def ours(q, k, v, i, f, implementation="auto"):
        return mlstm.chunkwise_sequence(
            q, k, v, i, f, read=reads.RAW, chunk_size=chunk_size, implementation=implementation
        )[0]

    chunk_form = functools.partial(ours, implementation="xla")

    def theirs(q, k, v, i, f):
        return native.mlstm_chunkwise_fw(q, k, v, i, f, chunk_size=chunk_size or 64)[0]

    def forward_backward(fn):
        loss = lambda *args: jnp.sum(jnp.square(fn(*args)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    functions = {
        "ours_forward": (jax.jit(ours), ours_args),
        "chunk_form_forward": (jax.jit(chunk_form), ours_args),
        "theirs_forward": (jax.jit(theirs), theirs_args),
        "ours_forward_backward": (forward_backward(ours), ours_args),
        "chunk_form_forward_backward": (forward_backward(chunk_form), ours_args),
        "theirs_forward_backward": (forward_backward(theirs), theirs_args),
    }
    theirs_h = heads_first(functions["theirs_forward"][0](*theirs_args))
    relative = lambda h: float(jnp.max(jnp.abs(h - theirs_h)) / jnp.max(jnp.abs(theirs_h)))
    difference = max(
        relative(functions[name][0](*ours_args)) for name in ("ours_forward", "chunk_form_forward")
    )
    return functions, difference


def time_alternated(functions: dict, rounds: int, calls: int = 3) -> dict[str, float]:
    """Median seconds per call of each function: every round visits the functions in
    turn, and each one, after an untimed call (the previous function's buffers and
    cache lines replaced by its own, as in a loop that calls it repeatedly), is timed
    over ``calls`` calls; the figure is the median over rounds of each round's median."""
    import jax

    for fn, args in functions.values():
        jax.block_until_ready(fn(*args))  # Compilation and warm-up.
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, (fn, args) in functions.items():
            jax.block_until_ready(fn(*args))
            within = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                within.append(time.perf_counter() - start)
            times[name].append(statistics.median(within))
    return {name: statistics.median(values) for name, values in times.items()}


def compare(shape, chunk_size, rounds, native) -> dict:
    functions, difference = make_functions(shape, chunk_size, native)
    seconds = time_alternated(functions, rounds)
    b, _, t, _ = shape
    from orthorecall import raw_memory, reads

    record = {"shape": dict(zip(("batch", "heads", "length", "head_dim"), shape, strict=True))}
    record["ours_runs"] = "cpu kernel" if raw_memory.applies(reads.RAW) else "chunk form"
    record["chunk_size"] = {"ours": chunk_size, "theirs": chunk_size or 64}
    record["relative_output_difference"] = difference
    for direction in ("forward", "forward_backward"):
        ours, theirs = seconds[f"ours_{direction}"], seconds[f"theirs_{direction}"]
        chunk_form = seconds[f"chunk_form_{direction}"]
        record[direction] = {
            "ours_tokens_per_s": b * t / ours,
            "theirs_tokens_per_s": b * t / theirs,
            "ratio": theirs / ours,
            "chunk_form_tokens_per_s": b * t / chunk_form,
            "chunk_form_ratio": theirs / chunk_form,
        }
    return record


def _format(record: dict) -> str:
    s = record["shape"]
    lines = [
        f"B{s['batch']} H{s['heads']} T{s['length']} d{s['head_dim']}  (ours: "
        f"{record['ours_runs']}; outputs agree to {record['relative_output_difference']:.1e} "
        "relative)"
    ]
    for direction in ("forward", "forward_backward"):
        r = record[direction]
        lines.append(
            f"  {direction:17s} ours {r['ours_tokens_per_s'] / 1e3:8.1f}k tok/s   mlstm_kernels "
            f"{r['theirs_tokens_per_s'] / 1e3:8.1f}k tok/s   ours / theirs {r['ratio']:.2f}x   "
            f"(our chunk form {r['chunk_form_tokens_per_s'] / 1e3:.1f}k, "
            f"{r['chunk_form_ratio']:.2f}x)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="B,H,T,d (repeatable).")
    parser.add_argument("--chunk_size", type=int, default=None, help="Both forms' chunk length.")
    parser.add_argument("--rounds", type=int, default=7, help="Timed rounds (median).")
    parser.add_argument("--smoke", action="store_true", help="One tiny shape, two rounds.")
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in (args.shape or ())] or [
            parse_shape(s) for s in (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
        ]
        if args.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {args.rounds}.")
        if args.chunk_size is not None and args.chunk_size < 1:
            raise ValueError(f"--chunk_size must be at least 1, got {args.chunk_size}.")
        for _, _, length, _ in shapes:
            if length % (args.chunk_size or 64):
                raise ValueError(
                    f"mlstm_kernels needs the length ({length}) to be a multiple of its chunk "
                    f"length ({args.chunk_size or 64})."
                )
        native = load_native_chunkwise()
    except (ValueError, ImportError) as e:
        print(f"mlstm_kernels comparison: {e}", file=sys.stderr)
        return 2
    from importlib.metadata import version

    import jax

    rounds = 2 if args.smoke else args.rounds
    print(f"mlstm_kernels {version('mlstm_kernels')}, jax {jax.__version__}, {jax.devices()[0]}")
    records = []
    for shape in shapes:
        records.append(compare(shape, args.chunk_size, rounds, native))
        print(_format(records[-1]), flush=True)
    if args.json:
        result = {
            "mlstm_kernels": version("mlstm_kernels"),
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "rounds": rounds,
            "records": records,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
