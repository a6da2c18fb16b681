"""Static compile report of the Pallas (Triton) kernels for NVIDIA GPUs, without a GPU.

    python -m experiments.accelerators.compile_report --json results/gpu_compile_report.json

For every Pallas kernel the model can select (the Newton–Schulz read's forward and
backward, ``orthorecall.pallas_read``, and the chunk read's, ``orthorecall.
pallas_chunk_read``), at the widths and matmul precisions they take, this exports the
kernel for CUDA from this (CPU) process (``jax.jit(...).trace(...).lower(
lowering_platforms=("cuda",))``, as ``jax.export`` does), takes the Triton IR that
pallas_call's lowering puts in its custom call, and compiles it for sm_80 and sm_90 with
the ``triton`` package (the ``gpu-report`` extra pins it): every stage of Triton's NVIDIA
pipeline, then the ptxas it ships, with its ``-v`` log. No driver and no GPU are needed.

Per kernel and target the JSON records: registers per thread, spill stores and loads,
stack frame (bytes per thread), shared memory per block (Triton's dynamic allocation),
warps, which products the PTX holds (``wgmma``/``mma.sync`` tensor-core instructions,
``fma.rn.f32`` counts), the occupancy those figures allow (resident warps per SM of the
target's 64, from the register file, the shared memory and the block limit), and the
Triton-stage and ptxas seconds. A kernel whose shared memory exceeds the target's
per-block limit is flagged (``fits: false``): it would fail to launch.

Caveat: XLA compiles the kernel with the Triton pinned inside jaxlib and the ptxas of the
CUDA installation, so the figures are indicative of, not identical to, what runs.

Each compile runs in a child process (``--worker``): Triton's MLIR and jaxlib's must not
share a process. ``--widths``, ``--precisions``, ``--kernels`` and ``--targets`` select
a subset (ptxas takes up to a minute per kernel on a busy machine).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

# Per target: registers per SM, warps per SM, resident blocks per SM, shared memory
# per SM and the most one block may use (bytes; CUDA's figures for A100 and H100), and
# the reserve the driver takes per block.
TARGETS = {
    80: {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 164 * 1024, "smem_block": 163 * 1024},
    90: {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 228 * 1024, "smem_block": 227 * 1024},
}
_SMEM_RESERVED = 1024
_REG_UNIT = 256  # registers are allocated per warp in units of 256
DEFAULT_WIDTHS = (16, 32, 48, 64)
DEFAULT_PRECISIONS = ("highest", "tensorfloat32", "bfloat16")
DEFAULT_KERNELS = ("ns_read", "chunk_read")
# The chunk length the chunk read's kernels are compiled at (the model's default for
# v80_s512: mlstm.default_chunk_size).
CHUNK = 64


def occupancy(regs: int, shared: int, warps: int, cap: int) -> dict:
    """Resident blocks and warps per SM for a kernel's registers per thread, shared
    memory per block and warps per block, and which resource limits them."""
    t = TARGETS[cap]
    per_warp = -(-max(regs, 1) * 32 // _REG_UNIT) * _REG_UNIT
    limits = {
        "registers": (t["regs"] // per_warp) // warps,
        "warps": t["warps"] // warps,
        "blocks": t["blocks"],
    }
    if shared:
        limits["shared_memory"] = t["smem_sm"] // (shared + _SMEM_RESERVED)
    blocks = min(limits.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": round(blocks * warps / t["warps"], 4),
        "limited_by": sorted(k for k, v in limits.items() if v == blocks),
    }


def products(ptx: str) -> dict:
    """What the PTX multiplies with."""
    counts = {
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "fma_f32": ptx.count("fma.rn.f32"),
    }
    counts["tensor_cores"] = bool(counts["wgmma"] or counts["mma_sync"])
    return counts


# ----------------------------------------------------------------------------------
# The exporting side (this process: JAX on the CPU).


def _kernel_calls(d: int, jax_precision: str, kernel: str, steps):
    """(function, argument shapes) whose CUDA lowering holds the kernel's forward and
    backward Triton calls."""
    import jax
    import jax.numpy as jnp

    from orthorecall import pallas_read

    f32 = jnp.float32
    if kernel == "ns_read":

        def read_and_vjp(c, q, h_bar):
            kwargs = {"steps": steps, "jax_precision": jax_precision}
            return (
                pallas_read.ns_read_forward(c, q, **kwargs),
                pallas_read.ns_read_backward(c, q, h_bar, **kwargs),
            )

        shapes = [(2, d, d), (2, d), (2, d)]
        return read_and_vjp, [jax.ShapeDtypeStruct(s, f32) for s in shapes]
    if kernel == "chunk_read":
        from orthorecall import pallas_chunk_read

        def chunk_and_vjp(c0, scale, decay, keys, values, queries, h_bar):
            kwargs = {"steps": steps, "jax_precision": jax_precision}
            operands = (c0, scale, decay, keys, values, queries)
            return (
                pallas_chunk_read.chunk_read_forward(*operands, **kwargs),
                pallas_chunk_read.chunk_read_backward(*operands, h_bar, **kwargs),
            )

        n, length = 2, CHUNK
        shapes = [
            (n, d, d),
            (n, length),
            (n, length, length),
            (n, length, d),
            (n, length, d),
            (n, length, d),
            (n, length, d),
        ]
        return chunk_and_vjp, [jax.ShapeDtypeStruct(s, f32) for s in shapes]
    raise ValueError(f"unknown kernel {kernel!r}; use one of {DEFAULT_KERNELS}")


def triton_kernels(module_text: str):
    """(name, Triton IR text, {num_warps, num_stages}) of every Triton call in a lowered
    module (jaxlib <= 0.10.2 carries each kernel's IR in its custom call's
    backend_config)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    from orthorecall import pallas_read

    context = mlir.make_ir_context()
    tt_dialect.register_dialect(context)
    found = []

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if op.operation.name == "stablehlo.custom_call":
                        target = ir.StringAttr(op.attributes["call_target_name"]).value
                        if target != pallas_read.TRITON_CUSTOM_CALL:
                            raise RuntimeError(
                                f"custom call {target!r} is not the Triton call this report "
                                "reads (jaxlib > 0.10.2 compiles kernels at lowering)"
                            )
                        config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                        module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
                        params = {
                            key: int(str(config[key]).split()[0])
                            for key in ("num_warps", "num_stages")
                        }
                        found.append(
                            (
                                ir.StringAttr(config["name"]).value,
                                module.operation.get_asm(print_generic_op_form=True),
                                params,
                            )
                        )
                    walk(op.operation)

    with context:
        walk(ir.Module.parse(module_text).operation)
    return found


def export_kernels(d: int, jax_precision: str, kernel: str, steps):
    import jax

    fn, shapes = _kernel_calls(d, jax_precision, kernel, steps)
    lowered = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))
    return triton_kernels(lowered.as_text(debug_info=False))


# ----------------------------------------------------------------------------------
# The compiling side (a child process with the triton package).


def compile_ir(path: str, cap: int, num_warps: int, num_stages: int, keep: str | None) -> dict:
    """Runs Triton's NVIDIA pipeline on a Triton IR file for sm_<cap> (its make_ttir
    passes too, which XLA runs as well), then its ptxas with ``-v``."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - older triton
        knobs = None
    result = {"triton": triton.__version__}
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    options = backend.parse_options(
        {"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1}
    )
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    stages: dict = {}
    try:
        from triton.compiler.compiler import Language

        backend.add_stages(stages, options, Language.TRITON)
    except (ImportError, TypeError):  # pragma: no cover - older triton
        backend.add_stages(stages, options)
    metadata = {"target": target, **options.__dict__}
    stage = "parse"
    start = time.perf_counter()
    try:
        module = ir.parse_mlir_module(path, context)
        module.context = context
        ptx = None
        for ext, fn in stages.items():
            stage = ext
            if ext == "cubin":
                break
            module = fn(module, metadata)
            if keep:
                pathlib.Path(f"{keep}.{ext}").write_text(str(module))
            if ext == "ptx":
                ptx = module
        result["triton_seconds"] = round(time.perf_counter() - start, 2)
        result["shared_memory"] = int(metadata.get("shared") or 0)
        result["num_warps"] = int(metadata.get("num_warps"))
        result["products"] = products(ptx)
        stage = "ptxas"
        start = time.perf_counter()
        log = io.StringIO()
        with contextlib.ExitStack() as stack:
            if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
                stack.enter_context(knobs.nvidia.scope())
                knobs.nvidia.dump_ptxas_log = True
            stack.enter_context(contextlib.redirect_stdout(log))
            stages["cubin"](ptx, metadata)
        result["ptxas_seconds"] = round(time.perf_counter() - start, 2)
        text = log.getvalue()
        found = re.search(r"Used (\d+) registers", text)
        result["registers"] = int(found[1]) if found else None
        found = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text
        )
        if found:
            stack_bytes, stores, loads = map(int, found.groups())
            result.update(stack=stack_bytes, spill_stores=stores, spill_loads=loads)
        result["ok"] = result["registers"] is not None
        if not result["ok"]:
            result["error"] = "no register count in the ptxas log: " + text[-500:]
    except Exception as error:  # a failed compile is a result here
        result.update(ok=False, failed_stage=stage, error=f"{type(error).__name__}: {error}"[:2000])
    return result


def _worker(argv) -> None:
    path, cap, warps, stages_, keep = argv
    result = compile_ir(path, int(cap), int(warps), int(stages_), keep or None)
    print("RESULT " + json.dumps(result), flush=True)


def _compile_in_child(path, cap, params, keep, timeout) -> dict:
    command = [
        sys.executable,
        "-m",
        "experiments.accelerators.compile_report",
        "--worker",
        path,
        str(cap),
        str(params["num_warps"]),
        str(params["num_stages"]),
        keep or "",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"compile took over {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"ok": False, "error": (done.stderr or done.stdout)[-2000:]}


def _summary_line(entry: dict) -> str:
    if not entry.get("ok"):
        return f"{entry['name']:44s} FAILED {entry.get('error', '')[:100]}"
    p = entry["products"]
    kind = "wgmma" if p["wgmma"] else "mma.sync" if p["mma_sync"] else "FMA"
    return (
        f"{entry['name']:44s} regs {entry['registers']:3d}  spills "
        f"{entry['spill_stores']}/{entry['spill_loads']} B  stack {entry['stack']} B  "
        f"smem {entry['shared_memory'] // 1024} KiB  {kind:8s} occ "
        f"{entry['occupancy']['occupancy']:.3f}  {entry['ptxas_seconds']:.0f} s"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        _worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="results/gpu_compile_report.json")
    parser.add_argument("--widths", default=",".join(map(str, DEFAULT_WIDTHS)))
    parser.add_argument("--precisions", default=",".join(DEFAULT_PRECISIONS))
    parser.add_argument("--kernels", default=",".join(DEFAULT_KERNELS))
    parser.add_argument("--targets", default="80,90")
    parser.add_argument("--read", default="cubic:5", help="coefficients:iterations")
    parser.add_argument("--keep", default=None, help="folder for each kernel's IR at every stage")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per compile")
    args = parser.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from orthorecall import newton_schulz

    coefficients, iterations = args.read.split(":")
    steps = newton_schulz.iteration_coefficients(coefficients, int(iterations))
    entries = []
    with tempfile.TemporaryDirectory() as scratch:
        for kernel in args.kernels.split(","):
            for d in map(int, args.widths.split(",")):
                for jax_precision in args.precisions.split(","):
                    for name, text, params in export_kernels(d, jax_precision, kernel, steps):
                        path = os.path.join(scratch, f"{name}.ttir")
                        pathlib.Path(path).write_text(text)
                        for cap in map(int, args.targets.split(",")):
                            label = f"{name}_d{d}_{jax_precision}_sm{cap}"
                            keep = None
                            if args.keep:
                                os.makedirs(args.keep, exist_ok=True)
                                keep = os.path.join(args.keep, label)
                            entry = {
                                "name": label,
                                "kernel": kernel,
                                "function": name,
                                "d": d,
                                "precision": jax_precision,
                                "target": f"sm_{cap}",
                                **params,
                            }
                            entry.update(_compile_in_child(path, cap, params, keep, args.timeout))
                            if entry.get("ok"):
                                limit = TARGETS[cap]["smem_block"]
                                entry["shared_memory_limit"] = limit
                                entry["fits"] = entry["shared_memory"] <= limit
                                entry["occupancy"] = occupancy(
                                    entry["registers"],
                                    entry["shared_memory"],
                                    entry["num_warps"],
                                    cap,
                                )
                            entries.append(entry)
                            print(_summary_line(entry), flush=True)
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "read": args.read,
        "chunk_length": CHUNK,
        "targets": {f"sm_{cap}": limits for cap, limits in TARGETS.items()},
        "kernels": entries,
    }
    if args.json:
        path = pathlib.Path(args.json)
        if path.exists():  # a subset run updates the entries it compiled
            old = json.loads(path.read_text())
            names = {e["name"] for e in entries}
            report["kernels"] = [e for e in old.get("kernels", []) if e["name"] not in names]
            report["kernels"] += entries
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    failed = [e["name"] for e in entries if not e.get("ok") or not e.get("fits", True)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
