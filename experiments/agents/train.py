"""The agent study's driver: PPO for several recurrent cores and seeds in one workdir.

``train_agents(config, workdir)`` runs (or resumes) ``experiments/configs/popgym_ppo.py``
with the conventions of ``experiments.study.train``: a locked workdir, ``run_config.json``,
Orbax checkpoints that store the configuration (a workdir of another configuration is
refused; damaged checkpoints are moved aside), resumption from the newest checkpoint,
Ctrl-C / SIGTERM stopping with a checkpoint, a progress line, ``metrics.jsonl`` (one
line per update, core and seed) and, at the end, ``results.json``, ``results.md`` and
``curves.png``.

Every core's seeds train together (vmapped) in one compiled call of ``run.log_every``
updates (``ppo.make_train_chunk``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import IO, Any

import jax
import ml_collections
import numpy as np

from experiments.agents import envs as envs_lib
from experiments.agents import ppo
from experiments.agents.networks import CoreConfig, carry_size
from experiments.study import config_checks as checks
from experiments.study.cli import ConfigError
from experiments.study.progress import Progress
from experiments.study.stopping import StopOnSignal
from experiments.study.workdir import (
    METRICS_FILE,
    RESULTS_JSON,
    RUN_CONFIG_FILE,
    WorkdirLock,
    check_workdir_without_checkpoint,
    checkpoint_config_check,
    config_fingerprint,
    restore_latest_or_refuse,
)
from orthorecall import checkpointing, footprint

RESULTS_MARKDOWN = "results.md"
CURVES_FILE = "curves.png"
# A seed's final return: its mean episode return over this last fraction of updates.
FINAL_FRACTION = 0.1


# The mLSTM cell traces each conv tap as its own operations; far more taps than any
# episode needs only make compiling slow.
MAX_CONV_KERNEL_SIZE = 1024
# Floats one environment step keeps for the update besides its carry: the transition
# (observation, reset, action, log-probability, value, reward, done), GAE's advantage
# and target, and the network's activations (encoder, gates, heads: about 16 x width).
_TRANSITION_FLOATS = 9
_ACTIVATION_FLOATS_PER_WIDTH = 16


def core_names(config: ml_collections.ConfigDict) -> list[str]:
    """The names of ``config.cores``, in order (validated)."""
    if not isinstance(config.cores, str):
        raise ConfigError(
            f"config.cores: must be a comma-separated string such as 'gru,ns5', got "
            f"{config.cores!r}."
        )
    names = [name.strip() for name in config.cores.split(",") if name.strip()]
    if not names:
        raise ConfigError("config.cores: names no core; use e.g. 'gru,raw,ns5'.")
    if len(set(names)) != len(names):
        raise ConfigError(f"config.cores: lists a core twice: {config.cores!r}.")
    return names


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Every field's type and range (``experiments.study.config_checks``, the rules of every
    command): integers at least 1 and at most 2**31 - 1, seeds below 2**32, finite
    reals in their ranges.

    Raises:
        ConfigError: naming the offending field.
    """
    checks.check_name(checks.get(config, "name"))
    checks.check_seeds(
        "seeds.first_seed",
        checks.get(config, "seeds.first_seed"),
        checks.get(config, "seeds.num_seeds"),
        count_field="seeds.num_seeds",
    )
    for field in ("width", "num_heads"):
        checks.check_int(f"model.{field}", checks.get(config, f"model.{field}"), minimum=1)
    checks.check_int(
        "model.conv_kernel_size",
        checks.get(config, "model.conv_kernel_size"),
        minimum=1,
        maximum=MAX_CONV_KERNEL_SIZE,
        hint=" (each tap is traced as its own operations; reference 4)",
    )
    for field in ("num_envs", "num_steps", "num_updates", "update_epochs", "num_minibatches"):
        checks.check_int(f"ppo.{field}", checks.get(config, f"ppo.{field}"), minimum=1)
    for field in ("gamma", "gae_lambda"):
        checks.check_real(f"ppo.{field}", checks.get(config, f"ppo.{field}"), minimum=0, maximum=1)
    for field in ("clip_eps", "learning_rate", "max_grad_norm"):
        checks.check_real(
            f"ppo.{field}",
            checks.get(config, f"ppo.{field}"),
            minimum=0,
            minimum_inclusive=False,
        )
    for field in ("ent_coef", "vf_coef"):
        checks.check_real(f"ppo.{field}", checks.get(config, f"ppo.{field}"), minimum=0)
    checks.CONFIG.boolean("ppo.anneal_lr", checks.get(config, "ppo.anneal_lr"))
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
        checks.check_int(f"run.{field}", checks.get(config, f"run.{field}"), minimum=1)
    if not isinstance(checks.get(config, "env"), str):
        checks.fail("env", f"must be an environment name, got {config.env!r}.")
    # Any integer field the checks above do not name (one added later) stays in int32.
    checks.bound_integers(config, exempt=("seeds.first_seed",))


def agents_from_config(config: ml_collections.ConfigDict) -> dict[str, ppo.Agent]:
    """Core name -> ``ppo.Agent``, validating every field first (``check_fields``).

    Raises:
        ConfigError: naming the offending field.
    """
    check_fields(config)
    try:
        env = envs_lib.make(config.env)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"config.env: {e}") from None
    try:
        hyper = ppo.PPOConfig(**config.ppo.to_dict())
    except (TypeError, ValueError) as e:
        checks.section_error("ppo", e, config.ppo.keys())
    if hyper.num_updates % config.run.log_every:
        raise ConfigError(
            f"config.ppo.num_updates={hyper.num_updates} must be a multiple of "
            f"run.log_every={config.run.log_every} (updates per compiled call)."
        )
    if config.run.checkpoint_every % config.run.log_every:
        raise ConfigError(
            f"config.run.checkpoint_every={config.run.checkpoint_every} must be a multiple of "
            f"run.log_every={config.run.log_every}: checkpoints are written between calls."
        )
    agents = {}
    for name in core_names(config):
        try:
            core = CoreConfig(
                name=name,
                width=config.model.width,
                num_heads=config.model.num_heads,
                conv_kernel_size=config.model.conv_kernel_size,
            )
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ConfigError(f"config.cores: {name}: {e}") from None
        agents[name] = ppo.Agent(env=env, core=core, ppo=hyper)
    return agents


def memory_estimate_bytes(agents: dict[str, ppo.Agent], num_seeds: int) -> int:
    """An analytic estimate of the memory one compiled call of every core needs (all
    cores run in that call, their seeds vmapped), in bytes.

    Per core and seed: the runner state (``jax.eval_shape`` of ``ppo.init_runner``:
    parameters, Adam's two moments, environment states, carries), twice (the call's
    input and output); the rollout's ``num_steps x num_envs`` transitions, with the
    carry of every step; and the update's backward pass over one minibatch, which keeps
    per step and environment the carry and about 16 x width activations. Nothing is
    compiled or allocated. It errs high: XLA reuses buffers this counts separately (2-3x
    XLA's compiled figure for the smoke preset's GRU and ns5 cores; tests/test_agent.py
    checks that it stays above it).
    """
    total = 0
    for agent in agents.values():
        state = jax.eval_shape(
            lambda key, agent=agent: ppo.init_runner(agent, key), jax.random.PRNGKey(0)
        )
        state_bytes = sum(
            int(np.prod(leaf.shape)) * leaf.dtype.itemsize
            for leaf in jax.tree_util.tree_leaves(state)
        )
        hyper, carry = agent.ppo, carry_size(agent.core)
        steps = hyper.num_steps * hyper.num_envs
        rollout = steps * (agent.env.observation_size + _TRANSITION_FLOATS + carry)
        minibatch = hyper.num_steps * (hyper.num_envs // hyper.num_minibatches)
        backward = minibatch * (carry + _ACTIVATION_FLOATS_PER_WIDTH * agent.core.width)
        total += num_seeds * (2 * state_bytes + 4 * (rollout + 2 * backward))
    return total


def check_memory(
    agents: dict[str, ppo.Agent], num_seeds: int, available_memory: int | None = None
) -> int:
    """Refuses a configuration whose ``memory_estimate_bytes`` exceeds the memory the
    device can use (``available_memory``; default: asked from the first device, on CPU
    the host's available memory). Returns the estimate.

    Raises:
        ConfigError: naming the fields that size it, with both figures.
    """
    need = memory_estimate_bytes(agents, num_seeds)
    if available_memory is None:
        available_memory = footprint.per_device_available_memory(jax.devices()[:1])
    if available_memory is not None and need > available_memory:
        raise ConfigError(
            f"config.ppo.num_envs: one call of the {len(agents)} core(s) x {num_seeds} "
            f"seed(s) needs about {footprint.format_bytes(need)} (an analytic estimate: "
            "state, rollout and one minibatch's backward pass), more than the "
            f"{footprint.format_bytes(available_memory)} the device can use; lower "
            "ppo.num_envs, ppo.num_steps, model.width or seeds.num_seeds (or raise "
            "ppo.num_minibatches)."
        )
    return need


def _seeds(config) -> np.ndarray:
    return config.seeds.first_seed + np.arange(config.seeds.num_seeds)


def _atomic_write(path: pathlib.Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _records(first_update: int, agents, seeds, metrics) -> list[dict]:
    """metrics.jsonl lines of one call: (update, core, seed) with every metric."""
    records = []
    steps_per_update = next(iter(agents.values())).ppo.steps_per_update
    for name in agents:
        values = jax.tree_util.tree_map(np.asarray, metrics[name])
        num_updates = len(values["loss"])
        for u in range(num_updates):
            update = first_update + u + 1
            for s, seed in enumerate(seeds):
                record = {
                    "update": update,
                    "env_steps": update * steps_per_update,
                    "core": name,
                    "seed": int(seed),
                }
                for key, value in values.items():
                    record[key] = int(value[u, s]) if key == "episodes" else _finite(value[u, s])
                records.append(record)
    return records


def _status(update: int, total: int, agents, records) -> str:
    latest = [r for r in records if r["update"] == update]
    parts = [f"update {update}/{total}"]
    for name in agents:
        returns = [r["episode_return"] for r in latest if r["core"] == name]
        returns = [r for r in returns if r is not None]
        shown = f"{np.mean(returns):+.3f}" if returns else "n/a"
        parts.append(f"{name}: return {shown}")
    return " | ".join(parts)


def train_agents(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    console: IO[str] | None = None,
    available_memory: int | None = None,
) -> dict:
    """Runs (or resumes) the agent study of ``config`` in ``workdir``.

    Every field is checked (``agents_from_config``) and the memory one call needs is
    compared with ``available_memory`` (default: the device's; ``check_memory``) before
    the workdir is created or touched.

    Returns:
        The results dict written to ``workdir/results.json``.

    Raises:
        ConfigError: an invalid configuration, before anything is written.
        WorkdirError: a workdir in use, of another configuration, or holding only
            damaged checkpoints; before any compute.
        KeyboardInterrupt: stopped by a signal, after writing a checkpoint.
    """
    agents = agents_from_config(config)
    check_memory(agents, config.seeds.num_seeds, available_memory)
    workdir = checks.FLAGS.output_folder("workdir", workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir):
        return _train_in_workdir(config, agents, workdir, console)


def _train_in_workdir(config, agents, workdir, console) -> dict:
    """:func:`train_agents` in its locked ``workdir``: starts or resumes the run, trains
    it to the end (or to a stop, checkpointed) and writes its results."""
    config_dict = json.loads(config.to_json())
    fingerprint = config_fingerprint(config_dict)
    total = next(iter(agents.values())).ppo.num_updates
    checkpointer = checkpointing.RunCheckpointer(
        workdir / "checkpoints",
        save_every=config.run.checkpoint_every,
        keep=config.run.keep_checkpoints,
    )
    try:
        run, restored = _start_or_resume(
            config, agents, workdir, checkpointer, config_dict, fingerprint
        )
        _atomic_write(
            workdir / RUN_CONFIG_FILE, json.dumps(run.description(config, agents), indent=1)
        )
        train_chunk = ppo.make_train_chunk(agents, config.run.log_every)
        progress = Progress(total, run.update, config.run.log_every, stream=console)
        if restored is not None:
            damaged = "".join(
                f"; checkpoint of update {r.step} failed verification, moved to {r.moved_to.name}"
                for r in checkpointer.rejected
            )
            progress.note(f"resuming {workdir} from update {run.update}{damaged}")
        _train_until_done_or_stopped(
            run, train_chunk, agents, config.run.log_every, total, progress
        )
        if run.update < total:
            print(f"\ninterrupted at update {run.update}: writing a checkpoint...", flush=True)
            checkpointer.save(run.update, run.runners, run.meta(), force=True)
            checkpointer.close()
            run.write_metrics()
            print(f"checkpoint of update {run.update} saved; run the same command to resume.")
            raise KeyboardInterrupt
        checkpointer.close()
        run.write_metrics()
        results = summarize(agents, run.seeds, run.records, run.elapsed)
        _atomic_write(workdir / RESULTS_JSON, json.dumps(results, indent=1))
        _atomic_write(workdir / RESULTS_MARKDOWN, format_table(config.env, results))
        plot_curves(config.env, agents, run.records, workdir / CURVES_FILE)
        print(format_table(config.env, results), flush=True)
        return results
    finally:
        checkpointer.close()


@dataclasses.dataclass
class _Run:
    """A run in its workdir: its seeds, where it stands (the runners after ``update``
    updates, the metrics records and training seconds so far) and what its checkpoints
    store besides the runners."""

    workdir: pathlib.Path
    checkpointer: checkpointing.RunCheckpointer
    config_dict: dict
    fingerprint: str
    seeds: Any
    runners: Any
    update: int = 0
    records: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0

    def description(self, config, agents) -> dict:
        """The contents of ``run_config.json``."""
        return {
            "config": self.config_dict,
            "config_fingerprint": self.fingerprint,
            "cores": list(agents),
            "seeds": [int(s) for s in self.seeds],
            "environment": config.env,
        }

    def meta(self) -> dict:
        """What a checkpoint stores besides the runners (``checkpoint_config_check``
        compares the configuration; a resumed run reads the records and seconds)."""
        return {
            "metrics": list(self.records),
            "train_seconds": self.elapsed,
            "config": self.config_dict,
            "config_fingerprint": self.fingerprint,
        }

    def write_metrics(self) -> None:
        _atomic_write(
            self.workdir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.records)
        )


def _start_or_resume(config, agents, workdir, checkpointer, config_dict, fingerprint):
    """The run at its start, or at its newest checkpoint (``(run, the restored
    checkpoint or None)``), after refusing a workdir of another configuration."""
    check_config = checkpoint_config_check(workdir, config_dict)
    if checkpointer.newest_meta(check_config) is None:
        check_workdir_without_checkpoint(workdir, checkpointer, config_dict)
    seeds = _seeds(config)
    runners = {name: ppo.init_runners(agent, seeds) for name, agent in agents.items()}
    run = _Run(workdir, checkpointer, config_dict, fingerprint, seeds, runners)
    restored = restore_latest_or_refuse(checkpointer, runners, check_config)
    if restored is not None:
        run.update, run.runners = restored.step, restored.state
        run.records, run.elapsed = restored.meta["metrics"], restored.meta["train_seconds"]
    return run, restored


def _train_until_done_or_stopped(run, train_chunk, agents, log_every, total, progress) -> None:
    """Trains ``log_every`` updates at a time, logging and checkpointing after each call,
    until ``total`` updates or a signal (Ctrl-C, SIGTERM) stops it."""
    stop = StopOnSignal()
    with stop, progress:
        while run.update < total:
            started = time.perf_counter()
            run.runners, metrics = train_chunk(run.runners)
            metrics = jax.device_get(metrics)  # Waits for the call to finish.
            run.elapsed += time.perf_counter() - started
            stop.arm()
            run.records.extend(_records(run.update, agents, run.seeds, metrics))
            run.update += log_every
            progress.advance(run.update)
            progress.note(_status(run.update, total, agents, run.records))
            run.write_metrics()
            run.checkpointer.save(run.update, run.runners, run.meta(), force=run.update == total)
            if stop.requested:
                break


def summarize(agents, seeds, records, train_seconds: float) -> dict:
    """Per core: each seed's final return (mean over the last ``FINAL_FRACTION`` of
    updates), their mean, standard deviation, min and max; the core's state size."""
    total = next(iter(agents.values())).ppo.num_updates
    last = max(1, math.ceil(FINAL_FRACTION * total))
    cores = {}
    for name, agent in agents.items():
        finals = []
        for seed in seeds:
            returns = [
                r["episode_return"]
                for r in records
                if r["core"] == name
                and r["seed"] == int(seed)
                and r["update"] > total - last
                and r["episode_return"] is not None
            ]
            finals.append(float(np.mean(returns)) if returns else None)
        finite = [f for f in finals if f is not None]
        cores[name] = {
            "final_returns": finals,
            "mean": float(np.mean(finite)) if finite else None,
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "min": min(finite) if finite else None,
            "max": max(finite) if finite else None,
            "carry_floats": carry_size(agent.core),
        }
    agent = next(iter(agents.values()))
    return {
        "environment": agent.env.name,
        "updates": total,
        "env_steps_per_seed": total * agent.ppo.steps_per_update,
        "final_window_updates": last,
        "seeds": [int(s) for s in seeds],
        "train_seconds": train_seconds,
        "cores": cores,
    }


def format_table(environment: str, results: dict) -> str:
    """A markdown table of the final returns."""
    lines = [
        f"{environment}: mean episode return over the last {results['final_window_updates']} "
        f"of {results['updates']} updates ({results['env_steps_per_seed']:,} env steps a seed)",
        "",
        "| core | mean | std | min | max | per seed | carry floats |",
        "|---|---|---|---|---|---|---|",
    ]
    show = lambda v: "n/a" if v is None else f"{v:+.3f}"
    for name, c in results["cores"].items():
        per_seed = ", ".join(show(v) for v in c["final_returns"])
        spread = "n/a" if c["std"] is None else f"{c['std']:.3f}"
        lines.append(
            f"| {name} | {show(c['mean'])} | {spread} "
            f"| {show(c['min'])} | {show(c['max'])} | {per_seed} | {c['carry_floats']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(environment: str, agents, records, path: pathlib.Path) -> None:
    """Episode return against environment steps: each core's mean over seeds, with
    the range of its seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name in agents:
        by_update = {}
        for r in records:
            if r["core"] == name and r["episode_return"] is not None:
                by_update.setdefault(r["env_steps"], []).append(r["episode_return"])
        steps = np.array(sorted(by_update))
        if not len(steps):
            continue
        per_seed = [by_update[s] for s in steps]
        mean = np.array([np.mean(v) for v in per_seed])
        low = np.array([np.min(v) for v in per_seed])
        high = np.array([np.max(v) for v in per_seed])
        (line,) = axis.plot(steps, mean, label=name)
        axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axis.set_xlabel("environment steps per seed")
    axis.set_ylabel("episode return")
    axis.set_title(f"PPO on {environment}: mean over seeds, range shaded")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
