"""What several test modules share: the fixture files, the tiny study, and the report
tests' synthetic study (``report_study``).

Test modules import these names (``from tests.conftest import TINY``); pytest has
already imported this module as ``tests.conftest``, so it is the same module object.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Shipped with the repository (tests/fixtures/*/NOTICE says where each comes from): a
# missing file is a broken checkout, so tests that need them fail rather than skip.
FIXTURES = REPO_ROOT / "tests" / "fixtures"
MAD_FIXTURES = FIXTURES / "mad_noisy_recall"
REFERENCE_CHECKPOINTS = FIXTURES / "reference_checkpoints"

# The tiny study of tests/test_training.py and tests/test_run.py: the smoke preset shrunk
# to D=16, 2 heads, V=24, length 16, 3 seeds, 24 steps. One definition, so that the
# in-process runs and the subprocess runs compile the same programs and share them
# through the session's persistent compilation cache.
TINY = {
    "model.embedding_dim": 16,
    "model.num_heads": 2,
    "model.inner_multiple": 8,
    "model.chunk_size": 8,
    "task.vocab_size": 24,
    "task.noise_vocab_size": 4,
    "task.seq_len": 16,
    "train.batch_size": 4,
    "train.val_batches": 1,
    "train.val_batch_size": 4,
    "train.steps": 24,
    "train.eval_every": 4,
    "train.checkpoint_every": 4,
    "train.log_every": 4,
    "seeds.num_seeds": 3,
    # Pinned, although they are the preset's today: the tests rely on them.
    "task.frac_noise": 0.5,
    "train.learning_rate": 3e-3,
    "reads": "raw,ns5",
    "train.keep_checkpoints": 3,
    "seeds.first_seed": 0,
}
TINY_TASK = {
    name.split(".", 1)[1]: value for name, value in TINY.items() if name.startswith("task.")
}


def run_module(
    module: str, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, output captured as text;
    ``env`` adds to (or overrides) this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def compilation_cache_env(directory) -> dict:
    """The environment of a JAX process that keeps every compiled program in
    ``directory`` (processes compiling the same programs share them)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def assert_script_passes_on_eight_cpu_devices(script: str) -> None:
    """Runs ``python -c script`` from the repository root with 8 simulated CPU devices
    (set before JAX starts, hence a subprocess) and checks that it ends printing "ok"."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def with_overrides(**overrides) -> dict:
    """TINY with overrides given as ``train__steps=5`` for ``train.steps``."""
    return {**TINY, **{name.replace("__", "."): value for name, value in overrides.items()}}


@pytest.fixture(scope="session")
def report_study(tmp_path_factory):
    """The synthetic raw/ns5 study of tests/report_fixtures.py with its report built, once
    for every report test module: ``(workdir, results)``. Tests only read it."""
    from tests import report_fixtures  # imports experiments.report, for its tests only

    return report_fixtures.build_study(tmp_path_factory.mktemp("study"))


# The tests `make test-fast` leaves out for their time alone, listed with how they were
# chosen in tests/slow_tests.txt; marked slow here, so that the list, not each module,
# is what a new measurement updates.
SLOW_TESTS = REPO_ROOT / "tests" / "slow_tests.txt"


def pytest_collection_modifyitems(config, items):
    lines = SLOW_TESTS.read_text().splitlines()
    slow = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for item in items:
        if item.nodeid.split("[")[0] in slow:
            item.add_marker(pytest.mark.slow)
