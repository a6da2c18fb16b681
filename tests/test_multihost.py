"""orthorecall.multihost: the identity in one process, collectives across two.

The two-process checks run a script in two processes on 127.0.0.1 (4 CPU devices each,
gloo); the whole study in two processes is tested end to end in tests/test_run.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import multihost
from tests.conftest import REPO_ROOT, run_module


def test_one_process_is_the_identity():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": [np.int32(4), jnp.ones(2, bool)]}
    copied = multihost.host_copy(tree)
    assert isinstance(copied["a"], np.ndarray)
    np.testing.assert_array_equal(copied["a"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(copied["b"][1], [True, True])
    assert multihost.is_primary()
    assert multihost.agreed_minimum(3 * 2**40) == 3 * 2**40
    assert multihost.agreed_minimum(None) is None
    assert multihost.any_process(True) and not multihost.any_process(False)
    multihost.sync("nothing to wait for")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("127.0.0.1:1234", 2, 2), "process_id must be below num_processes"),
        (("127.0.0.1:1234", 0, 0), "num_processes must be an int >= 1"),
        (("127.0.0.1:1234", 2, -1), "process_id must be an int >= 0"),
        (("127.0.0.1", 2, 0), "coordinator_address must be HOST:PORT"),
    ],
)
def test_initialize_refuses_inconsistent_arguments(arguments, message):
    # Refused before jax.distributed is touched (this process stays single).
    with pytest.raises(ValueError, match=message):
        multihost.initialize(*arguments)
    assert jax.process_count() == 1


def test_the_command_refuses_a_process_id_out_of_range():
    done = run_module(
        "experiments.run",
        "--config=configs/noisy_ar.py:smoke",
        "--coordinator_address=127.0.0.1:1234",
        "--num_processes=2",
        "--process_id=2",
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "process_id must be below num_processes (2)" in done.stderr
    assert "Traceback" not in done.stderr


_TWO_PROCESS_SCRIPT = """
import sys
import numpy as np
from orthorecall import multihost
multihost.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax, jax.numpy as jnp
from orthorecall import training
me = jax.process_index()
assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
mesh = training.seed_mesh()
host = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
# A host array and a process-local device array, the same value in both processes.
tree = training.shard_seeds({"host": host, "local": jnp.asarray(host) + 1}, mesh)
assert not tree["host"].is_fully_addressable
doubled = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: 2 * x, t))(tree)
copied = multihost.host_copy(doubled)
np.testing.assert_array_equal(copied["host"], 2 * host)
np.testing.assert_array_equal(copied["local"], 2 * host + 2)
# Byte counts above int32, different in each process.
assert multihost.agreed_minimum(2**33 + 7 * (1 - me)) == 2**33
assert multihost.agreed_minimum(None if me else 5) is None
assert multihost.any_process(me == 1) and not multihost.any_process(False)
assert multihost.is_primary() == (me == 0)
multihost.sync("done")
print("ok", me)
"""


def test_collectives_across_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _TWO_PROCESS_SCRIPT, address, str(i)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for i, process in enumerate(processes):
        try:
            out, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"process {i} timed out")
        assert process.returncode == 0 and out.strip().endswith(f"ok {i}"), err[-3000:]
