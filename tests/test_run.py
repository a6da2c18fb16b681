"""End-to-end tests of the study's command, ``python -m experiments.run``, in
subprocesses: configuration errors, the report, Ctrl-C / kill and resume, re-running a
finished run, and 8 simulated devices against one.

Every run is the smoke preset shrunk further (``TINY`` of tests/conftest.py, as in
tests/test_training.py: identical configurations share compiled programs through a
persistent compilation cache in the pytest session's temporary folder). The
uninterrupted reference run and the 8-device run are started together, to use both
cores while they compile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TINY, with_overrides

# Every test here starts the command in a subprocess (and most train): `make test-fast`
# leaves them out.
pytestmark = pytest.mark.slow

STEPS = TINY["train.steps"]
READS = ("raw", "ns5")
TIMEOUT = 600  # Seconds; generous, the machine may be loaded.


def command(workdir, **overrides):
    """The README's command, run from the repository root, with TINY overrides."""
    flags = with_overrides(**overrides)
    return [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=configs/noisy_ar.py:smoke",
        f"--workdir={workdir}",
        *[f"--config.{k}={v}" for k, v in flags.items()],
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    cache.mkdir(exist_ok=True)
    environment = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")
    }
    environment.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
    )
    return environment


def start(cmd, log: Path, env) -> subprocess.Popen:
    # A child inherits an ignored SIGINT (pytest started in the background by a shell
    # without job control), and the run then keeps ignoring Ctrl-C: while the child is
    # started, SIGINT gets a handler, which exec resets to the default.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with log.open("w") as out:  # The child keeps its own copy of the descriptor.
            return subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def finish(process: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"timed out; output:\n{log.read_text()[-3000:]}")
    return process.returncode, log.read_text()


def run(cmd, log: Path, env) -> tuple[int, str]:
    return finish(start(cmd, log, env), log)


def complete_checkpoints(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
    )


def wait_for_checkpoint(workdir: Path, minimum: int, process: subprocess.Popen, log: Path) -> int:
    """Polls until a complete checkpoint of a step >= minimum exists; returns its step."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        steps = [s for s in complete_checkpoints(workdir) if s >= minimum]
        if steps:
            return steps[0]
        if process.poll() is not None:
            pytest.fail(
                f"the run ended (code {process.returncode}) before a checkpoint of "
                f"step >= {minimum}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no checkpoint of step >= {minimum}:\n{log.read_text()[-3000:]}")


def metrics_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def restore_final(workdir: Path):
    """(step, state tree, meta) of the newest checkpoint, restored without a template."""
    from orthorecall import checkpointing

    checkpointer = checkpointing.RunCheckpointer(workdir / "checkpoints", save_every=4)
    try:
        restored = checkpointer.restore_latest(None)
    finally:
        checkpointer.close()
    return restored.step, restored.state, restored.meta


def assert_trees_equal(a, b):
    import jax

    leaves_a, def_a = jax.tree_util.tree_flatten(a)
    leaves_b, def_b = jax.tree_util.tree_flatten(b)
    assert def_a == def_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------
# Configuration errors: fast, before any training
# ---------------------------------------------------------------------------------------


def test_unknown_override_fails(tmp_path, env):
    workdir = tmp_path / "run"
    code, out = run(command(workdir) + ["--config.train.nonexistent=1"], tmp_path / "log", env)
    assert code == 2, out
    assert "configuration error" in out and "nonexistent" in out
    assert "Traceback" not in out
    assert not workdir.exists()


def test_invalid_value_fails_with_code_2_naming_the_field(tmp_path, env):
    workdir = tmp_path / "run"
    code, out = run(command(workdir, task__seq_len=33), tmp_path / "log", env)
    assert code == 2, out
    assert "configuration error" in out and "config.task" in out and "seq_len" in out
    assert not workdir.exists()  # Refused before anything was written or computed.


# ---------------------------------------------------------------------------------------
# Full runs
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, env):
    """The README command run to completion, once on 1 CPU device and once on 8
    simulated ones (3 seeds, so the seed axis is padded to 8), concurrently."""
    base = tmp_path_factory.mktemp("reference_runs")
    eight = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_NUM_CPU_DEVICES="8")
    # The 8-device run checkpoints only at the start and the end (saves of 8 shards are
    # slow); checkpoints do not change the metrics, which are compared.
    runs = {
        "one": (base / "one_device", env, {}),
        "eight": (base / "eight_devices", eight, {"train__checkpoint_every": STEPS}),
    }
    processes = {
        name: start(command(workdir, **overrides), base / f"{name}.log", environment)
        for name, (workdir, environment, overrides) in runs.items()
    }
    out = {}
    for name, process in processes.items():
        code, text = finish(process, base / f"{name}.log")
        assert code == 0, text[-3000:]
        out[name] = (runs[name][0], text)
    return out


def test_readme_command_writes_the_report(reference_runs):
    """`python -m experiments.run --config=configs/noisy_ar.py:PRESET` from the repository
    root (where configs/ does not exist: it resolves to experiments/configs/) writes the
    report with the results.json contract."""
    assert not (REPO_ROOT / "configs" / "noisy_ar.py").exists()
    workdir, out = reference_runs["one"]
    assert "resuming" not in out
    for name in ("results.json", "results.md", "metrics.jsonl", "run_config.json"):
        assert (workdir / name).stat().st_size > 0, name
    for name in ("accuracy_curves.png", "escape_curves.png", "solved_counts.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(json.loads((workdir / "run_config.json").read_text())["devices"]) == 1

    results = json.loads((workdir / "results.json").read_text())
    final = {
        (r["read"], r["seed"]): r["accuracy"] for r in metrics_rows(workdir) if r["step"] == STEPS
    }
    for read in READS:
        summary = results["reads"][read]
        assert summary["num_seeds"] == 3
        assert len(summary["final_accuracy"]) == len(summary["escape_step"]) == 3
        assert summary["solved"] == sum(s is not None for s in summary["escape_step"])
        assert summary["final_accuracy"] == pytest.approx([final[read, s] for s in range(3)])
        assert summary["mean_final_accuracy"] == pytest.approx(np.mean(summary["final_accuracy"]))
    comparison = results["comparison"]
    assert 0 <= comparison["fisher_p"] <= 1
    assert "logrank_p" in comparison  # None when no seed escaped at all.
    assert (comparison["baseline"], comparison["treatment"]) == READS
    assert "raw" in (workdir / "results.md").read_text()


def test_console_is_readable(reference_runs):
    """Not a terminal here: plain progress lines, no library INFO logging (absl's
    "I1125 08:12:13.456 ..." lines, which Orbax writes dozens of per checkpoint)."""
    _, out = reference_runs["one"]
    assert not re.search(r"^I\d{4} ", out, re.M), out[:3000]
    assert f"] {STEPS}/{STEPS} | " in out
    assert "\x1b[" not in out  # no terminal control codes in a log file


def test_tensorboard_curves_equal_the_metrics(reference_runs):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    workdir, _ = reference_runs["one"]
    rows = metrics_rows(workdir)
    for read in READS:
        for seed in range(3):
            reader = accumulator.EventAccumulator(
                str(workdir / "tensorboard" / read / f"seed_{seed}")
            )
            reader.Reload()
            got = [(e.step, e.value) for e in reader.Scalars("val/accuracy")]
            want = [
                (r["step"], r["accuracy"]) for r in rows if r["read"] == read and r["seed"] == seed
            ]
            assert [s for s, _ in got] == [s for s, _ in want]
            np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
        reader = accumulator.EventAccumulator(str(workdir / "tensorboard" / read / "all_seeds"))
        reader.Reload()
        assert {"train/loss_mean", "val/accuracy_mean", "val/solved"} <= set(
            reader.Tags()["scalars"]
        )


def test_rerun_of_a_finished_run_does_not_start_over(reference_runs, env, tmp_path):
    workdir = tmp_path / "finished"
    shutil.copytree(reference_runs["one"][0], workdir)
    metrics = (workdir / "metrics.jsonl").read_bytes()
    checkpoints = complete_checkpoints(workdir)
    results = json.loads((workdir / "results.json").read_text())
    code, out = run(command(workdir), tmp_path / "log", env)
    assert code == 0, out
    assert f"resuming {workdir} from step {STEPS}" in out
    assert f"/{STEPS} |" not in out  # No training step (no progress line).
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
    assert complete_checkpoints(workdir) == checkpoints
    rerun = json.loads((workdir / "results.json").read_text())
    assert rerun.pop("workdir") == str(workdir)
    results.pop("workdir")
    assert rerun == results


def test_verbosity_brings_library_logging_back_and_tensorboard_can_be_off(
    reference_runs, env, tmp_path
):
    workdir = tmp_path / "finished"
    shutil.copytree(reference_runs["one"][0], workdir)
    shutil.rmtree(workdir / "tensorboard")
    code, out = run(command(workdir) + ["--verbosity=0", "--notensorboard"], tmp_path / "log", env)
    assert code == 0, out
    assert re.search(r"^I\d{4} ", out, re.M), out[:3000]  # e.g. Orbax restoring
    assert not (workdir / "tensorboard").exists()


def test_ctrl_c_kill_and_resume_match_an_uninterrupted_run(reference_runs, env, tmp_path):
    """Ctrl-C after the first checkpoint: exit code 130 with a checkpoint of the step it
    reached; resume, SIGKILL once a newer checkpoint is complete; resume to the end. The
    metrics (every field, byte for byte) and the final parameters, optimizer states and
    data keys equal those of the uninterrupted run."""
    workdir = tmp_path / "interrupted"
    cmd = command(workdir)
    reference, _ = reference_runs["one"]
    reference_rows = metrics_rows(reference)

    log = tmp_path / "ctrl_c.log"
    process = start(cmd, log, env)
    wait_for_checkpoint(workdir, 4, process, log)
    process.send_signal(signal.SIGINT)
    code, out = finish(process, log)
    assert code == 130, out[-3000:]
    interrupted = int(re.search(r"interrupted at step (\d+)", out).group(1))
    assert 4 <= interrupted < STEPS
    assert f"checkpoint of step {interrupted} saved" in out
    assert max(complete_checkpoints(workdir)) == interrupted
    assert metrics_rows(workdir) == [r for r in reference_rows if r["step"] <= interrupted]

    log = tmp_path / "kill.log"
    process = start(cmd, log, env)
    wait_for_checkpoint(workdir, interrupted + 1, process, log)
    process.send_signal(signal.SIGKILL)
    code, out = finish(process, log)
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert f"resuming {workdir} from step {interrupted}" in out

    code, out = run(cmd, tmp_path / "resume.log", env)
    assert code == 0, out[-3000:]
    resumed = int(re.search(rf"resuming {re.escape(str(workdir))} from step (\d+)", out).group(1))
    assert interrupted < resumed < STEPS
    assert (workdir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    step, state, meta = restore_final(workdir)
    ref_step, ref_state, ref_meta = restore_final(reference)
    assert step == ref_step == STEPS
    assert meta == ref_meta
    assert_trees_equal(state, ref_state)


def test_eight_devices_match_one(reference_runs):
    one, _ = reference_runs["one"]
    eight, _ = reference_runs["eight"]
    assert len(json.loads((eight / "run_config.json").read_text())["devices"]) == 8
    results = json.loads((eight / "results.json").read_text())
    for read in READS:  # The 5 padding seeds never leak into the results.
        summary = results["reads"][read]
        assert summary["num_seeds"] == 3 and summary["seeds"] == [0, 1, 2]
        assert len(summary["final_accuracy"]) == len(summary["escape_step"]) == 3
    rows_one, rows_eight = metrics_rows(one), metrics_rows(eight)
    assert [(r["read"], r["seed"], r["step"]) for r in rows_eight] == [
        (r["read"], r["seed"], r["step"]) for r in rows_one
    ]
    # Sharded over 8 devices each seed's step is a different XLA program than the
    # 3-seed batch on one device (other fusions and summation orders), so values may
    # differ by float rounding: a tolerance of 1e-5.
    for field in ("accuracy", "loss", "train_loss"):
        np.testing.assert_allclose(
            [r[field] for r in rows_eight],
            [r[field] for r in rows_one],
            rtol=1e-5,
            atol=1e-6,
            err_msg=field,
        )
    assert [r["nonfinite"] for r in rows_eight] == [r["nonfinite"] for r in rows_one]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_processes(workdir: Path, env, logs: list[Path]) -> list[subprocess.Popen]:
    """The README's multi-process command: 2 processes on this machine, 4 CPU devices
    each, collectives through gloo."""
    address = f"127.0.0.1:{_free_port()}"
    environment = dict(env, JAX_NUM_CPU_DEVICES="4")
    # Checkpoints every 8 steps (a save of 8 shards from 2 processes takes barriers).
    return [
        start(
            command(workdir, train__checkpoint_every=8)
            + [
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
                "--notensorboard",
            ],
            log,
            environment,
        )
        for i, log in enumerate(logs)
    ]


def test_two_processes_match_one_and_resume_after_one_is_killed(reference_runs, env, tmp_path):
    """Two processes of 4 CPU devices each (jax.distributed on 127.0.0.1): killed once a
    checkpoint exists (one, then the other, as a scheduler stops a job whose task died),
    restarted, they finish with the metrics of one process on 8 devices, byte for byte,
    and the same report; only process 0 prints and writes the run's files."""
    workdir = tmp_path / "two_processes"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    processes = _start_processes(workdir, env, logs)
    try:
        wait_for_checkpoint(workdir, 8, processes[0], logs[0])
    finally:
        for process in reversed(processes):
            process.kill()
            process.wait()
    assert processes[1].returncode == -signal.SIGKILL, "the run ended before it was killed"
    killed_at = max(complete_checkpoints(workdir))
    assert killed_at < STEPS

    processes = _start_processes(workdir, env, logs)
    outputs = [finish(process, log) for process, log in zip(processes, logs)]
    for code, out in outputs:
        assert code == 0, out[-3000:]
    first, second = (out for _, out in outputs)
    resumed = int(re.search(rf"resuming {re.escape(str(workdir))} from step (\d+)", first).group(1))
    assert 8 <= resumed < STEPS
    assert f"] {STEPS}/{STEPS} | " in first and "solved" in first
    assert "resuming" not in second and f"/{STEPS} |" not in second  # process 1 is silent

    eight, _ = reference_runs["eight"]
    assert (workdir / "metrics.jsonl").read_bytes() == (eight / "metrics.jsonl").read_bytes()
    description = json.loads((workdir / "run_config.json").read_text())
    assert description["processes"] == 2 and len(description["devices"]) == 8
    results = json.loads((workdir / "results.json").read_text())
    expected = json.loads((eight / "results.json").read_text())
    # The runs differ in the devices' names and the workdir, nothing else reported.
    for key in ("config", "workdir"):
        results.pop(key), expected.pop(key)
    assert results == expected
