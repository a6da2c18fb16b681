"""experiments.study.workdir: the workdir lock (also across processes and after a holder is
killed), configuration fingerprints and run_config.json reading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.study import workdir as workdir_lib
from tests.conftest import REPO_ROOT

HOLD_LOCK = (
    "import sys, time\n"
    "from experiments.study.workdir import WorkdirLock\n"
    "with WorkdirLock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


def hold_lock_in_subprocess(path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with workdir_lib.WorkdirLock(tmp_path):
        with pytest.raises(workdir_lib.WorkdirError) as error, workdir_lib.WorkdirLock(tmp_path):
            pass
        message = str(error.value)
        assert f"process {os.getpid()}" in message and "another --workdir" in message
    with workdir_lib.WorkdirLock(tmp_path):  # Released on exit.
        pass


def test_lock_names_another_process_and_is_released_when_it_is_killed(tmp_path):
    holder = hold_lock_in_subprocess(tmp_path)
    try:
        busy = pytest.raises(workdir_lib.WorkdirError, match=f"process {holder.pid} on ")
        with busy, workdir_lib.WorkdirLock(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder left its lock file behind: a stale lock, which does not block.
    assert str(holder.pid) in (tmp_path / workdir_lib.LOCK_FILE).read_text()
    with workdir_lib.WorkdirLock(tmp_path):
        assert str(os.getpid()) in (tmp_path / workdir_lib.LOCK_FILE).read_text()


def test_run_command_refuses_a_locked_workdir_with_a_message(tmp_path):
    holder = hold_lock_in_subprocess(tmp_path)
    try:
        started = time.monotonic()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.run",
                "--config=configs/noisy_ar.py:smoke",
                f"--workdir={tmp_path}",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"run: workdir error: {tmp_path} is in use by process {holder.pid}" in result.stderr
    assert time.monotonic() - started < 120  # Refused before training, not after.
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lib.LOCK_FILE]


def test_fingerprint_ignores_resumable_fields_only():
    config = {"train": {"steps": 10, "log_every": 5}, "reads": "raw,ns5"}
    same = {"reads": "raw,ns5", "train": {"log_every": 1, "steps": 10}}
    other = {"train": {"steps": 11, "log_every": 5}, "reads": "raw,ns5"}
    assert workdir_lib.config_fingerprint(config) == workdir_lib.config_fingerprint(same)
    assert workdir_lib.config_fingerprint(config) != workdir_lib.config_fingerprint(other)
    assert workdir_lib.differing_fields(config, same) == ""
    assert workdir_lib.differing_fields(config, other) == "train.steps: workdir has 10, now 11"
    assert workdir_lib.differing_fields({"a": 1}, {"b": 2}) == (
        "a: workdir has 1, now None; b: workdir has None, now 2"
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"config": {"a": ', "is not valid JSON"),
        ("[1, 2]", "has no 'config' object"),
        ('{"config": 3}', "has no 'config' object"),
        (b"\xff\xfe\x00", "cannot be read"),
    ],
)
def test_unreadable_run_config_is_a_clear_error(tmp_path, content, expected):
    path = tmp_path / workdir_lib.RUN_CONFIG_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(workdir_lib.WorkdirError, match=expected):
        workdir_lib.read_run_description(tmp_path)


def test_missing_run_config_is_none(tmp_path):
    assert workdir_lib.read_run_description(tmp_path) is None
    assert not workdir_lib.has_results(tmp_path)
    (tmp_path / workdir_lib.METRICS_FILE).write_text("")
    assert not workdir_lib.has_results(tmp_path)  # An empty metrics file holds nothing.
    (tmp_path / workdir_lib.METRICS_FILE).write_text('{"read": "raw"}\n')
    assert workdir_lib.has_results(tmp_path)
