"""Running one study over several processes (hosts) with JAX's distributed runtime.

JAX's multi-controller model runs the same program in every process; arrays sharded
over all processes' devices are not fully held by any one of them. What the library
does differently with more than one process lives here, so that the single-process
path stays exactly what it was:

* ``initialize`` starts ``jax.distributed`` (CPU collectives through gloo, so the
  multi-process path can be tested on one machine), giving up with ``PeersMissing``
  (or, where JAX blocks in C++, a message and exit code 2) when the other processes do
  not all arrive within ``timeout_seconds`` (``DEFAULT_TIMEOUT_SECONDS`` by default);
* ``agree`` exchanges a description of each process's run (its configuration's
  fingerprint and fields, the process count, the preset) before anything is computed
  or written, and raises ``Disagreement`` in every process, naming the differing
  fields and processes, when any two differ;
* ``host_copy`` brings arrays sharded over all processes to every process's host
  (``process_allgather``), where ``jax.device_get`` alone would refuse them;
* ``is_primary``, ``sync``, ``agreed_minimum`` and ``any_process`` let the processes
  write files once and take the same decisions (a decision taken differently by two
  processes means two different programs, and a hang in their first collective).

Every function is a no-op (or the identity) in a single process; those that talk to
the other processes are collectives: every process must call them, in the same order.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# The gloo implementation of CPU collectives works between processes on any machine
# (the default, none, refuses programs that communicate across processes).
_CPU_COLLECTIVES = "gloo"
# How long a process waits for the others (to start, and to agree) before giving up.
DEFAULT_TIMEOUT_SECONDS = 120
# JAX's own initialization timeout sits this long after ours: its expiry is a C++ check
# failure (exit 134), so ours must come first.
_JAX_TIMEOUT_MARGIN_SECONDS = 30
# The key-value store's keys of ``agree``.
_AGREE_KEY = "orthorecall/agree"


class PeersMissing(RuntimeError):
    """The other processes did not all arrive in time; the message names the
    coordinator and how many processes were waited for."""


class Disagreement(RuntimeError):
    """The processes were started with different runs; the message names the differing
    fields and processes."""


def _waiting_message(coordinator_address, num_processes, process_id, seconds) -> str:
    coordinator = coordinator_address or "(the address the cluster's environment gives)"
    expected = (
        f"{num_processes} processes"
        if num_processes is not None
        else "the processes the cluster's environment names"
    )
    me = f"process {process_id}" if process_id is not None else "this process"
    return (
        f"gave up after {seconds} s waiting for {expected} to join the coordinator at "
        f"{coordinator} ({me}); start the same command in every process, check that "
        "process 0 runs and that the address and port are reachable, or allow more time "
        "with --peer_timeout=SECONDS."
    )


class _Watchdog:
    """Prints ``message`` and ends the process with exit code 2 unless cancelled within
    ``seconds``: JAX's distributed client blocks in C++ (where Python exceptions cannot
    reach) and ends its own wait with an abort."""

    def __init__(self, seconds: float, message: str, program: str):
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._message = message
        self._program = program

    def _expire(self) -> None:
        print(f"{self._program}: distributed setup error: {self._message}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc_info):
        self._timer.cancel()
        return False


def check_timeout(timeout_seconds) -> int:
    """``timeout_seconds`` as an int in [1, 86400], or a ValueError naming it."""
    if (
        isinstance(timeout_seconds, bool)
        or not isinstance(timeout_seconds, (int, np.integer))
        or not 1 <= timeout_seconds <= 86_400
    ):
        raise ValueError(
            f"peer_timeout must be a whole number of seconds in [1, 86400], got "
            f"{timeout_seconds!r}."
        )
    return int(timeout_seconds)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
    program: str = "orthorecall",
) -> None:
    """Starts JAX's distributed runtime; must run before any JAX computation.

    Arguments left as None are detected from the environment where JAX knows how
    (Slurm, Open MPI, Cloud TPU); elsewhere all three are needed. When the other
    processes have not all joined within ``timeout_seconds``, the process prints a
    message naming the coordinator and the number of processes it waited for
    (prefixed with ``program``) and ends with exit code 2.

    Args:
        coordinator_address: ``host:port`` of process 0's coordinator.
        num_processes: how many processes take part.
        process_id: this process's index, 0 to ``num_processes - 1``.
        local_device_ids: restricts the devices this process uses (JAX's argument).

    Raises:
        ValueError: ``num_processes`` < 1 or ``process_id`` outside its range, a
            coordinator address without a port, or a timeout outside [1, 86400] s.
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
    timeout_seconds = check_timeout(timeout_seconds)
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES)
    message = _waiting_message(coordinator_address, num_processes, process_id, timeout_seconds)
    with _Watchdog(timeout_seconds, message, program):
        try:
            jax.distributed.initialize(
                coordinator_address=coordinator_address,
                num_processes=num_processes,
                process_id=process_id,
                local_device_ids=local_device_ids,
                initialization_timeout=timeout_seconds + _JAX_TIMEOUT_MARGIN_SECONDS,
            )
        except Exception as e:  # JAX's errors carry no common type
            if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                raise PeersMissing(message) from None
            raise


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def differences(descriptions: Sequence[Mapping[str, Any]]) -> list[str]:
    """What sets each process's description apart from process 0's: one line per
    differing process, naming the process and each differing field with both values.
    Descriptions are flattened to dotted fields (``config.train.learning_rate``)."""
    flat = [_flatten(d) for d in descriptions]
    lines = []
    for process, mine in enumerate(flat[1:], start=1):
        fields = sorted(set(mine) | set(flat[0]))
        differing = [f for f in fields if mine.get(f, "(absent)") != flat[0].get(f, "(absent)")]
        # The fingerprint differs whenever a field does; name it only when alone.
        named = [f for f in differing if f != "fingerprint"] or differing
        if named:
            shown = "; ".join(
                f"{f} = {json.dumps(mine.get(f, '(absent)'))} "
                f"(process 0: {json.dumps(flat[0].get(f, '(absent)'))})"
                for f in named[:20]
            )
            more = f"; and {len(named) - 20} more" if len(named) > 20 else ""
            lines.append(f"process {process} differs from process 0: {shown}{more}")
    return lines


def agree(description: Mapping[str, Any], *, timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS):
    """Checks that every process was started with the same run, before any compute.

    Every process publishes ``description`` (JSON-serializable: e.g. the configuration's
    fingerprint, the configuration, the process count it was given and the preset) in
    JAX's distributed key-value store, reads every other's, and waits until all have read
    (process 0 holds the store). The same comparison runs everywhere, so either every
    process returns or every process raises. Call it right after ``initialize``, before
    anything starts JAX's backend (which waits for every process, without a timeout). A
    no-op in a single process.

    Raises:
        Disagreement: naming, for each process that differs from process 0, the fields
            and both values.
        PeersMissing: a process did not publish (or read) within ``timeout_seconds``.
    """
    # The runtime's own figures, not jax.process_count(): that starts the backend, whose
    # start waits for every process's backend, without a timeout.
    from jax._src import distributed  # the runtime's client: the only key-value store

    state = distributed.global_state
    if state.client is None or not state.num_processes or state.num_processes == 1:
        return
    client = state.client
    count, me = state.num_processes, state.process_id
    timeout_ms = check_timeout(timeout_seconds) * 1000
    client.key_value_set(f"{_AGREE_KEY}/{me}", json.dumps(description, sort_keys=True))
    try:
        descriptions = [
            json.loads(client.blocking_key_value_get(f"{_AGREE_KEY}/{p}", timeout_ms))
            for p in range(count)
        ]
        # Nobody leaves (process 0 takes the store with it) before everyone has read.
        client.wait_at_barrier(f"{_AGREE_KEY}/read", timeout_ms)
    except Exception as e:  # JAX's errors carry no common type
        raise PeersMissing(
            f"gave up after {timeout_ms // 1000} s waiting for the {count} processes to "
            f"exchange their configurations (this is process {me}): {str(e).splitlines()[0]}"
        ) from None
    lines = differences(descriptions)
    if lines:
        raise Disagreement(
            "the processes were started with different runs, so none of them runs: "
            + " | ".join(lines)
            + ". Start every process with the same command line (and the same "
            "--num_processes)."
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
