"""What a recurrent core costs an agent: time per acting step, per training unroll, and
the state each actor carries, for the GRU and the mLSTM cell's reads.

    python -m experiments.benchmarks.agents [--cores=gru,raw,ns5] [--batch=256]
        [--width=64] [--unroll=128] [--json=results/agents/step_cost.json]

* ``step``: one jitted ``ActorCritic.step`` (encoder, core, heads) for ``batch``
  environments, as a rollout acts (median of repeated calls, after compiling);
* ``unroll``: value and gradient of a loss through ``ActorCritic.unroll`` over
  ``unroll`` steps of ``batch`` environments, as a PPO minibatch step computes;
* ``carry floats``: the per-environment recurrent state; ``parameters``: the network's.

Prints a markdown table (times also relative to the GRU's) and optionally writes JSON.
Figures are of this machine only: compare cores measured in the same run.
"""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.agents.networks import ActorCritic, CoreConfig, carry_size, initial_carry
from experiments.study.cli import (
    ConfigError,
    avoid_xla_cpu_scheduler_deadlock,
    config_flag_parser,
    exit_status_on_refusal,
    library_logging_at_warning,
)
from experiments.study.config_checks import FLAGS as FLAG_CHECKS

_CORES = flags.DEFINE_string("cores", "gru,raw,ns5", "Comma-separated cores.")
_BATCH = flags.DEFINE_integer("batch", 256, "Environments stepped together.", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", 64, "Core width.", lower_bound=1)
_UNROLL = flags.DEFINE_integer("unroll", 128, "Steps of the training unroll.", lower_bound=1)
_OBS = flags.DEFINE_integer("observation_size", 4, "Observation features.", lower_bound=1)
_ACTIONS = flags.DEFINE_integer("num_actions", 4, "Actions.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per figure.", lower_bound=3)
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def _median_seconds(function, *args, repeats: int) -> float:
    jax.block_until_ready(function(*args))  # Compile (and warm up) outside the timing.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(core: CoreConfig, batch: int, unroll: int, obs_size: int, actions: int, repeats):
    """{step_us, unroll_ms, carry_floats, parameters} of one core."""
    network = ActorCritic(num_actions=actions, core=core)
    key = jax.random.PRNGKey(0)
    carry = initial_carry(core, (batch,))
    obs = jax.random.normal(key, (batch, obs_size))
    reset = jnp.zeros((batch,), bool)
    params = network.init(key, carry, obs, reset)
    step = jax.jit(lambda p, c, o, r: network.apply(p, c, o, r, method=ActorCritic.step))
    step_seconds = _median_seconds(step, params, carry, obs, reset, repeats=repeats)

    obs_seq = jax.random.normal(key, (unroll, batch, obs_size))
    reset_seq = jax.random.bernoulli(key, 1 / 50, (unroll, batch))

    def loss(p):
        _, logits, value = network.apply(p, carry, obs_seq, reset_seq, method=ActorCritic.unroll)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + jnp.mean(value**2)

    grad = jax.jit(jax.value_and_grad(loss))
    unroll_seconds = _median_seconds(grad, params, repeats=max(3, repeats // 4))
    leaves = jax.tree_util.tree_leaves(params)
    return {
        "step_us": step_seconds * 1e6,
        "unroll_ms": unroll_seconds * 1e3,
        "carry_floats": carry_size(core),
        "parameters": int(sum(np.prod(leaf.shape) for leaf in leaves)),
    }


def format_table(figures: dict, batch: int, unroll: int) -> str:
    base = figures.get("gru")
    lines = [
        f"| core | step, batch {batch} (µs) | unroll+grad, {unroll} x {batch} (ms) "
        "| carry floats / env | parameters |",
        "|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        step = f"{f['step_us']:.0f}"
        unroll_ = f"{f['unroll_ms']:.1f}"
        carry = f"{f['carry_floats']:,}"
        if base is not None and name != "gru":
            step += f" ({f['step_us'] / base['step_us']:.1f}x)"
            unroll_ += f" ({f['unroll_ms'] / base['unroll_ms']:.1f}x)"
            carry += f" ({f['carry_floats'] / base['carry_floats']:.0f}x)"
        lines.append(f"| {name} | {step} | {unroll_} | {carry} | {f['parameters']:,} |")
    return "\n".join(lines)


# Floats one environment step of the training unroll keeps for the backward pass
# besides the carry (encoder, gates, heads: about 16 x width), as the agent's estimate.
_ACTIVATION_FLOATS_PER_WIDTH = 16


def check_flags() -> list[CoreConfig]:
    """Every flag (``experiments.study.config_checks``' rules) and an analytic memory estimate
    of the training unroll (per step and environment: the carry, the observation and
    about 16 x width activations, float32), before anything is compiled; the cores."""
    for flag in (_BATCH, _WIDTH, _UNROLL, _OBS, _ACTIONS):
        FLAG_CHECKS.int(flag.name, flag.value, minimum=1)
    FLAG_CHECKS.int(_REPEATS.name, _REPEATS.value, minimum=3)
    if _JSON.value:
        FLAG_CHECKS.output_file("json", _JSON.value)
    names = [n.strip() for n in _CORES.value.split(",") if n.strip()]
    if not names:
        FLAG_CHECKS.fail("cores", "names no core; use e.g. gru,raw,ns5.")
    cores = []
    for name in names:
        try:
            cores.append(CoreConfig(name=name, width=_WIDTH.value))
        except (TypeError, ValueError, ZeroDivisionError) as e:
            FLAG_CHECKS.fail("cores", f"{name}: {e}")
    from orthorecall import footprint

    for core in cores:
        per_step = carry_size(core) + _OBS.value + _ACTIVATION_FLOATS_PER_WIDTH * _WIDTH.value
        need = 4 * _BATCH.value * _UNROLL.value * per_step
        available = footprint.per_device_available_memory(jax.devices()[:1])
        if available is not None and need > available:
            FLAG_CHECKS.fail(
                "batch",
                f"the {core.name} unroll needs about {footprint.format_bytes(need)} (an "
                f"analytic estimate), more than the {footprint.format_bytes(available)} the "
                "device can use; lower --batch, --unroll or --width.",
            )
    return cores


def main(argv: Sequence[str]) -> None:
    library_logging_at_warning()
    avoid_xla_cpu_scheduler_deadlock()
    with exit_status_on_refusal("benchmark_agents"):
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments: {list(argv[1:])}")
        cores = check_flags()
    figures = {}
    for core in cores:
        name = core.name
        figures[name] = measure(
            core, _BATCH.value, _UNROLL.value, _OBS.value, _ACTIONS.value, _REPEATS.value
        )
        print(f"{name}: {figures[name]}", flush=True)
    print(format_table(figures, _BATCH.value, _UNROLL.value))
    if _JSON.value:
        out = {
            "machine": {
                "processor": platform.processor() or platform.machine(),
                "devices": [str(d) for d in jax.devices()],
                "jax": jax.__version__,
            },
            "batch": _BATCH.value,
            "width": _WIDTH.value,
            "unroll": _UNROLL.value,
            "cores": figures,
        }
        path = pathlib.Path(_JSON.value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=config_flag_parser("benchmark_agents"))
