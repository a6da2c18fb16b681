"""The benchmark's public contract, end to end at tiny shapes (--smoke)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, compilation_cache_env, run_module

NAMES = {
    "train_step",
    "eval_forward",
    "read",
    "gemm",
    "train_step_memory",
    "train_step_memory_estimate",
}


# Both start the benchmark in a subprocess (the smoke run compiles every step).
pytestmark = pytest.mark.slow


def test_smoke_run_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    # What benchmark_reference.py --smoke writes (figures made up: only the pairing and
    # the ratios are checked here).
    reference = tmp_path / "reference.json"
    made_up = {("train_step", "raw"): 100.0, ("train_step", "ns5"): 10.0}
    made_up |= {("eval_forward", "raw"): 400.0, ("eval_forward", "ns5"): 40.0}
    reference.write_text(
        json.dumps(
            {
                "records": [
                    {"name": f"reference_{figure}", "read": read, "batch": 2, "seq_len": 24}
                    | {"tokens_per_s": tokens_per_s}
                    for (figure, read), tokens_per_s in made_up.items()
                ]
            }
        )
    )
    done = run_module(
        "experiments.benchmarks.model",
        "--smoke",
        f"--json={path}",
        f"--reference_json={reference}",
        timeout=900,
        # The contract, not the figures: XLA's cheapest code generation (O0 halves the
        # compile times that make up most of this run).
        env=compilation_cache_env(tmp_path / "jax-cache")
        | {"XLA_FLAGS": "--xla_backend_optimization_level=0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(path.read_text())
    assert isinstance(out["device"], str) and out["device"].startswith("cpu")
    assert isinstance(out["jax_version"], str)
    assert out["platform"] == "cpu" and out["float32_peak_tflops"] is None
    assert set(out["device_memory_stats"]) == {"start", "end"}
    assert "with cell" in out["config"]["model"]  # --smoke's tiny model
    assert out["ns_read_implementation"] in ("cpu_kernel", "xla")
    assert out["config"]["chunk_size"] == {"raw": 64, "ns5": 16}
    records = out["records"]
    assert {r["name"] for r in records} == NAMES
    for r in records:
        assert {"name", "read", "batch", "seq_len", "seeds"} <= r.keys(), r
        assert r["name"] in NAMES
        assert r["read"] in ("raw", "ns5", "raw+ns5", None)
    by_name = lambda name: [r for r in records if r["name"] == name]
    assert {(r["read"], r["seeds"]) for r in by_name("train_step")} >= {
        ("raw", 1),
        ("ns5", 1),
        ("ns5", 4),  # --smoke vmaps 4 seeds (the others 24)
    }
    assert {r["read"] for r in by_name("eval_forward")} == {"raw", "ns5"}
    for r in by_name("train_step") + by_name("eval_forward"):
        assert r["tokens_per_s"] > 0
    for r in by_name("train_step"):
        assert r["compiled_bytes"] > 0
    vmapped = next(r for r in by_name("train_step") if r["seeds"] == 4)
    assert (
        abs(vmapped["tokens_per_s"] - 4 * vmapped["tokens_per_s_per_seed"])
        < 1e-6 * vmapped["tokens_per_s"]
    )
    reads = by_name("read")
    assert {r["pass"] for r in reads} >= {"forward", "forward_backward"}
    gemm = by_name("gemm")[0]["gflops"]
    for r in reads:
        assert r["gflops"] > 0 and abs(r["fraction_of_gemm"] - r["gflops"] / gemm) < 1e-9
    memory = by_name("train_step_memory")[0]
    assert memory["read"] == "ns5" and memory["peak_rss_bytes"] > 50 * 2**20
    # The work each read does per token, as run: NS5 through the Gram matrix on CPU.
    for r in by_name("train_step") + by_name("eval_forward"):
        assert r["read_flops_per_token"] > 0
    for r in reads:
        assert r["seconds"] > 0 and r["flops_per_read"] > 0
        assert r["algorithm"] == ("gram" if r["implementation"] == "cpu_kernel" else "explicit")
    # The published step's compiled memory, with this backend's read and with XLA's.
    estimates = by_name("train_step_memory_estimate")
    assert {r["ns_read_implementation"] for r in estimates} == {
        out["ns_read_implementation"],
        "xla",
    }
    for r in estimates:
        assert r["reads"] == ["raw", "ns5"] and r["backend"] == "cpu"
        assert {"seeds", "batch", "seq_len", "method", "segment_length"} <= r.keys()
        small, large = r["measured_bytes"].values()
        assert 0 < small < large < r["bytes"]
    # The table is printed too.
    assert "train_step_memory" in done.stdout and "GFLOP/s" in done.stdout
    # Side by side with the reference: each of its figures next to ours at the same shape.
    rows = out["side_by_side"]
    assert {(r["figure"], r["read"]) for r in rows} == set(made_up)
    for r in rows:
        ours = next(
            x
            for x in records
            if (x["name"], x["read"], x["batch"], x["seq_len"], x["seeds"])
            == (r["figure"], r["read"], 2, 24, 1)
        )
        assert r["orthorecall_tokens_per_s"] == ours["tokens_per_s"]
        assert r["reference_tokens_per_s"] == made_up[r["figure"], r["read"]]
        assert r["ratio"] == pytest.approx(ours["tokens_per_s"] / r["reference_tokens_per_s"])
    assert out["reference"]["records"] == json.loads(reference.read_text())["records"]
    assert "Side by side with the reference" in done.stdout


def test_a_reference_file_that_is_not_the_reference_benchmark_is_refused(tmp_path):
    bad = tmp_path / "reference.json"
    bad.write_text('{"figures": []}')
    done = run_module("experiments.benchmarks.model", "--smoke", f"--reference_json={bad}")
    assert done.returncode != 0
    assert "is not the --json output of experiments/benchmarks/reference.py" in done.stderr


def test_quick_and_smoke_are_exclusive():
    done = run_module("experiments.benchmarks.model", "--smoke", "--quick")
    assert done.returncode != 0 and "exclusive" in done.stderr


def test_reference_benchmark_refuses_a_directory_that_is_not_the_reference(tmp_path):
    script = REPO_ROOT / "experiments" / "benchmarks" / "reference.py"
    done = subprocess.run(
        [sys.executable, str(script), f"--reference_dir={tmp_path}", "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "is not a checkout of no-way-labs/recurrent-memory-scaffold" in done.stderr
    assert "Traceback" not in done.stderr


def test_read_flops_count_the_algorithm_that_runs():
    from experiments.benchmarks.model import read_flops

    d = 48
    # Forward of NS5 through the Gram matrix: G, one lift (a product with a vector and two
    # of matrices), 40 products with G_1, the projection.
    lift = 4 * d**3 + 2 * d**2
    assert read_flops("ns5", d, train=False) == 2 * d**3 + lift + 40 * 2 * d**2 + 2 * d**2
    # NS3 does not lift: 13 products with G.
    assert read_flops("ns3", d, train=False) == 2 * d**3 + 13 * 2 * d**2 + 2 * d**2
    # The explicit iteration: XᵀX and X P per step, and the backward's recomputation.
    assert read_flops("ns5", d, train=False, algorithm="explicit") == 5 * 4 * d**3
    assert read_flops("raw", d, train=True) == 4 * d**2


def test_accelerator_preset_is_exclusive_and_float32_peaks_are_known():
    from experiments.benchmarks.model import _MODES, float32_peak_tflops

    done = run_module("experiments.benchmarks.model", "--accelerator", "--quick")
    assert done.returncode != 0 and "exclusive" in done.stderr
    assert float32_peak_tflops("NVIDIA H200") == 66.9
    assert float32_peak_tflops("NVIDIA H100 PCIe") == 51.2
    assert float32_peak_tflops("NVIDIA H100 80GB HBM3") == 66.9
    assert float32_peak_tflops("cpu") is None
    # The published shapes: 24 seeds vmapped at batch 64, lengths 512 and 1024.
    assert {(b, n, s) for b, n, s, _ in _MODES["accelerator"]["train"]} >= {
        (64, 512, 24),
        (64, 1024, 24),
    }
