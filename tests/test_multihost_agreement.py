"""Several processes agree or stop: two real processes on 127.0.0.1 (gloo) started with
different configurations both refuse with exit code 2 before writing anything, and a
process whose peer never comes gives up within --peer_timeout with exit code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from orthorecall import multihost
from tests.conftest import REPO_ROOT


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _start(workdir, address, process_id, *overrides, timeout=10):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=configs/noisy_ar.py:smoke",
            f"--workdir={workdir}",
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={process_id}",
            f"--peer_timeout={timeout}",
            "--notensorboard",
            *overrides,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(processes, timeout=120):
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


def test_differences_name_the_fields_and_the_process():
    base = {"fingerprint": "a", "preset": "smoke", "config": {"train": {"lr": 0.01, "steps": 5}}}
    other = {"fingerprint": "b", "preset": "smoke", "config": {"train": {"lr": 0.05, "steps": 5}}}
    lines = multihost.differences([base, base, other])
    assert lines == ["process 2 differs from process 0: config.train.lr = 0.05 (process 0: 0.01)"]
    assert multihost.differences([base, dict(base)]) == []
    # The process count each was given, and the preset, count as much as the fields.
    counted = dict(base, num_processes=3, preset="cpu")
    [line] = multihost.differences([dict(base, num_processes=2), counted])
    assert "num_processes = 3 (process 0: 2)" in line and 'preset = "cpu"' in line


def test_a_timeout_outside_its_range_is_refused():
    for bad in (0, -1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="peer_timeout"):
            multihost.check_timeout(bad)


@pytest.mark.slow
def test_processes_with_different_configurations_both_refuse(tmp_path):
    workdir = tmp_path / "study"
    address = _free_address()
    processes = [
        _start(workdir, address, 0),
        _start(workdir, address, 1, "--config.train.learning_rate=0.05"),
    ]
    for i, (code, _, err) in enumerate(_finish(processes)):
        assert code == 2, f"process {i}: {err[-3000:]}"
        assert "process 1 differs from process 0" in err, err[-3000:]
        assert "config.train.learning_rate = 0.05" in err, err[-3000:]
        assert "Traceback" not in err
    # Nothing written: no workdir at all.
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.slow
def test_a_process_whose_peer_never_comes_gives_up_in_time(tmp_path):
    workdir = tmp_path / "study"
    address = _free_address()
    started = time.monotonic()
    [(code, _, err)] = _finish([_start(workdir, address, 1, timeout=5)], timeout=90)
    elapsed = time.monotonic() - started
    assert code == 2, err[-3000:]
    assert f"coordinator at {address}" in err and "2 processes" in err, err[-3000:]
    assert "--peer_timeout" in err
    assert elapsed < 60  # 5 s of waiting, plus JAX's start
    assert not workdir.exists()


_VANISHING_PEER_SCRIPT = """
import os, sys, time
from orthorecall import multihost
multihost.initialize(sys.argv[1], 2, int(sys.argv[2]), timeout_seconds=20)
if sys.argv[2] == "1":
    os._exit(0)  # gone before the exchange
started = time.monotonic()
try:
    multihost.agree({"fingerprint": "x"}, timeout_seconds=3)
except multihost.PeersMissing as e:
    print("missing", round(time.monotonic() - started), str(e).splitlines()[0][:200], flush=True)
    os._exit(0)
print("agreed", flush=True)
os._exit(1)
"""


@pytest.mark.slow
def test_agreement_gives_up_when_a_peer_vanishes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
    address = _free_address()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _VANISHING_PEER_SCRIPT, address, str(i)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    (code, out, err), _ = _finish(processes, timeout=120)
    assert code == 0 and out.startswith("missing"), (out, err[-3000:])
    assert int(out.split()[1]) < 30
    assert "waiting for the 2 processes to exchange their configurations" in out
