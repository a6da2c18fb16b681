"""The day-one check on a lent NVIDIA GPU: kernels, a training slice and the benchmark.

    python -m experiments.accelerators.check [--out results/accelerator] [--budget 480]
        [--dry_run]

(``make accelerator-check``.) Runs, each in its own process with its own time box, and
writes everything under ``--out``:

1. ``kernels``: the Pallas kernels compiled by XLA and run on the device, not in
   interpret mode (tests/test_pallas_device.py: the read's float32 faithfulness on the
   tensor cores against float64, the chunk read against the formed XLA read; and
   tests/test_pallas_fallback.py) -> kernels.log, kernels.xml.
2. ``train``: a 200-step slice of the v80_s512 preset, 24 seeds, both reads (raw and
   NS5): ``python -m experiments.run --config=experiments/configs/noisy_ar.py:v80_s512
   --config.train.steps=200 --workdir=OUT/v80_s512_200`` -> that workdir (metrics,
   report) and train.log.
3. ``benchmark``: ``python -m experiments.benchmarks.model --accelerator --json
   OUT/benchmark.json`` -> benchmark.log.

The boxes add up to ``--budget`` seconds (default 480: 8 minutes, the time a lent
device leaves after its start). A part that finishes early leaves its time to the next
ones; a part that overruns its box is stopped (its process group) and recorded as
timed out, so the whole check never runs longer than the budget. docs/accelerators.md
derives the boxes from the compile report and a roofline. summary.json records each
part's command, exit status, seconds and whether it was stopped, with the device and
the versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

# Each part's share of the budget (docs/accelerators.md, "The day-one check").
SHARES = (("kernels", 75), ("train", 270), ("benchmark", 135))
TRAIN_STEPS = 200


def commands(out: pathlib.Path) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "kernels": [
            python,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            f"--junitxml={out / 'kernels.xml'}",
            "tests/test_pallas_device.py",
            "tests/test_pallas_fallback.py",
        ],
        "train": [
            python,
            "-m",
            "experiments.run",
            "--config=experiments/configs/noisy_ar.py:v80_s512",
            f"--config.train.steps={TRAIN_STEPS}",
            f"--workdir={out / 'v80_s512_200'}",
            "--notensorboard",
        ],
        "benchmark": [
            python,
            "-m",
            "experiments.benchmarks.model",
            "--accelerator",
            f"--json={out / 'benchmark.json'}",
        ],
    }


def _run(name, command, box, out: pathlib.Path) -> dict:
    log = out / f"{name}.log"
    start = time.monotonic()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=max(box, 1))
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the run checkpoints on SIGTERM
            try:
                code = process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                code = process.wait()
            stopped = True
    return {
        "command": command,
        "box_seconds": round(box, 1),
        "seconds": round(time.monotonic() - start, 1),
        "exit_status": code,
        "stopped_at_box": stopped,
        "log": log.name,
    }


def _environment() -> dict:
    import jax

    info = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "python": sys.version.split()[0],
    }
    if shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["nvidia_smi"] = done.stdout.strip()
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/accelerator")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds in all")
    parser.add_argument("--dry_run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    plan = commands(out)
    total = sum(share for _, share in SHARES)
    boxes = {name: args.budget * share / total for name, share in SHARES}
    if args.dry_run:
        for name, _ in SHARES:
            print(f"{name:10s} {boxes[name]:5.0f} s  {' '.join(plan[name])}")
        return 0
    environment = _environment()
    if environment["backend"] != "gpu":
        print(
            f"the accelerator check needs an NVIDIA GPU; JAX's backend here is "
            f"{environment['backend']!r}. Nothing run.",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "v80_s512_200", ignore_errors=True)  # a fresh slice, not a resume
    deadline = time.monotonic() + args.budget
    summary = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_seconds": args.budget,
        "environment": environment,
        "parts": {},
    }
    remaining_shares = total
    for name, share in SHARES:
        # This part's share of what is left, so early finishes carry over.
        box = (deadline - time.monotonic()) * share / remaining_shares
        remaining_shares -= share
        result = _run(name, plan[name], box, out)
        summary["parts"][name] = result
        print(
            f"{name:10s} exit {result['exit_status']}  {result['seconds']:.0f} s of "
            f"{result['box_seconds']:.0f}{'  (stopped)' if result['stopped_at_box'] else ''}",
            flush=True,
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    ok = all(p["exit_status"] == 0 and not p["stopped_at_box"] for p in summary["parts"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
