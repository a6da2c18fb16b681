"""Running one study over several processes (hosts) with JAX's distributed runtime.

JAX's multi-controller model runs the same program in every process; arrays sharded
over all processes' devices are not fully held by any one of them. What the library
does differently with more than one process lives here, so that the single-process
path stays exactly what it was:

* ``initialize`` starts ``jax.distributed`` (CPU collectives through gloo, so the
  multi-process path can be tested on one machine);
* ``host_copy`` brings arrays sharded over all processes to every process's host
  (``process_allgather``), where ``jax.device_get`` alone would refuse them;
* ``is_primary``, ``sync``, ``agreed_minimum`` and ``any_process`` let the processes
  write files once and take the same decisions (a decision taken differently by two
  processes means two different programs, and a hang in their first collective).

Every function is a no-op (or the identity) in a single process; those that talk to
the other processes are collectives: every process must call them, in the same order.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# The gloo implementation of CPU collectives works between processes on any machine
# (the default, none, refuses programs that communicate across processes).
_CPU_COLLECTIVES = "gloo"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
) -> None:
    """Starts JAX's distributed runtime; must run before any JAX computation.

    Arguments left as None are detected from the environment where JAX knows how
    (Slurm, Open MPI, Cloud TPU); elsewhere all three are needed.

    Args:
        coordinator_address: ``host:port`` of process 0's coordinator.
        num_processes: how many processes take part.
        process_id: this process's index, 0 to ``num_processes - 1``.
        local_device_ids: restricts the devices this process uses (JAX's argument).

    Raises:
        ValueError: ``num_processes`` < 1 or ``process_id`` outside its range, or a
            coordinator address without a port.
        RuntimeError: JAX has already computed something, or the runtime cannot start.
    """
    if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}.")
    if process_id is not None:
        if not isinstance(process_id, int) or process_id < 0:
            raise ValueError(f"process_id must be an int >= 0, got {process_id!r}.")
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(
                f"process_id must be below num_processes ({num_processes}): processes are "
                f"numbered 0 to {num_processes - 1}, got {process_id}."
            )
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(
            f"coordinator_address must be HOST:PORT (process 0's address and a free "
            f"port every process agrees on), got {coordinator_address!r}."
        )
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def host_copy(tree: Any) -> Any:
    """Every leaf as a numpy array of its global value, on every process.

    ``jax.device_get`` for arrays this process holds entirely; an all-gather for arrays
    sharded over several processes' devices (a collective: every process must call it).
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.device_get(tree)
    return jax.tree_util.tree_map(
        lambda x: (
            np.asarray(multihost_utils.process_allgather(x, tiled=True))
            if isinstance(x, jax.Array) and not x.is_fully_addressable
            else np.asarray(jax.device_get(x))
        ),
        tree,
    )


def sync(name: str) -> None:
    """Waits until every process has reached the barrier ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agreed_minimum(value: int | None) -> int | None:
    """The smallest of every process's ``value`` (None if any is None), so that
    decisions taken from local measurements (free memory) come out the same everywhere."""
    if jax.process_count() == 1:
        return value
    known = value is not None
    # Without jax_enable_x64 an all-gather carries int32: a byte count travels as
    # its high and low 30 bits, exactly.
    low = (1 << 30) - 1
    local = np.array([int(known), value >> 30, value & low] if known else [0, 0, 0], np.int32)
    rows = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 3)
    if not rows[:, 0].all():
        return None
    return min((int(high) << 30) | int(low_bits) for _, high, low_bits in rows)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in at least one process (e.g. a stop request that a
    signal delivered to one of them)."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.array(int(bool(flag)), np.int32))
    return bool(np.asarray(flags).any())
