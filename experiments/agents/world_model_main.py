"""Train the mLSTM Dreamer-style world model and its actor on a memory environment.

    python -m experiments.agents.world_model_main --env=RepeatPreviousEasy --steps=2500 --seed=0 \\
        --read=ns5 --out=DIR

Each update collects ``num_envs x collect_steps`` real environment steps with the current
actor, takes one world-model step on ``batch_size`` replayed chunks of ``seq_len`` steps
and one actor-critic step in imagination (``experiments.agents.world_model``). Every
``log_every`` updates the run evaluates on fresh environments, data no update has seen:
the actor's mean episode return (sampled and greedy actions) and the world model's
held-out losses on the sampled-action episodes, next to a uniform-random policy's return
and the predict-the-mean reward baseline. It writes:

* ``DIR/metrics.jsonl``: one JSON line per log (step, wall seconds, environment steps,
  training losses averaged over the updates since the previous line, evaluation);
* ``DIR/summary.json``: the settings, the first and last logged figures, the random
  policy's return;
* ``DIR/curves.png``: the world model's losses, reward prediction against the baseline,
  and the real-environment return against the random policy.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence

from absl import app, flags

from experiments.study.cli import (
    ConfigError,
    avoid_xla_cpu_scheduler_deadlock,
    config_flag_parser,
    exit_status_on_refusal,
    library_logging_at_warning,
)
from experiments.study.config_checks import FLAGS as FLAG_CHECKS

_ENV = flags.DEFINE_string("env", "RepeatPreviousEasy", "Environment name (envs.make).")
_STEPS = flags.DEFINE_integer("steps", 2500, "Updates (each collects, trains the model and actor).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_READ = flags.DEFINE_string("read", "ns5", "The cell's memory read (ns5, raw, polar, ...).")
_OUT = flags.DEFINE_string("out", None, "Output folder (required).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Updates between metrics lines.")
_REWARD_SCALE = flags.DEFINE_float(
    "reward_scale",
    None,
    "Multiplies environment rewards for the model (default: the episode length, which "
    "brings POPGym's ±1/length rewards to ±1).",
)
_NUM_ENVS = flags.DEFINE_integer("num_envs", 16, "Environments collecting data.")
_COLLECT_STEPS = flags.DEFINE_integer("collect_steps", 16, "Steps per environment per update.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Replayed chunks per update.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Chunk length T (above the episode length).")
_HORIZON = flags.DEFINE_integer("horizon", 15, "Imagination horizon.")
_EVAL_ENVS = flags.DEFINE_integer("eval_envs", 32, "Fresh environments per evaluation.")

CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# The figures summary.json reports at the first and the last log.
SUMMARY_KEYS = (
    "eval_return",
    "eval_return_greedy",
    "train_episode_return",
    "wm_loss",
    "obs_loss",
    "reward_loss",
    "kl",
    "heldout_obs_loss",
    "heldout_reward_loss",
    "heldout_kl",
    "heldout_reward_mse",
    "heldout_reward_mse_mean_baseline",
    "heldout_reward_sign_accuracy",
    "heldout_reward_sign_majority_baseline",
    "actor_entropy",
    "imagined_return",
)


# Floats one step of a replayed chunk, an imagined step or an evaluation step keeps
# through the update, besides the cell's memory: the world model's hidden layers
# (several x hidden), the latents' logits and samples (latents x classes, a few times),
# and the reward and value heads' two-hot bins (twice). See world_model_memory_bytes.
_PER_STEP_HIDDEN = 8
_PER_STEP_LATENT = 4
_PER_STEP_BINS = 2


def world_model_memory_bytes(env, config, loop, horizon: int) -> int:
    """A simple analytic estimate, in bytes, of what a run holds at its peak: the replay
    buffer (``num_envs x capacity`` steps of observation, action, reward, done) and the
    activations of one update's model step (``batch_size x seq_len`` steps), its
    imagination (``num_envs x horizon``) and an evaluation (``eval_envs x`` the
    episode length), each step keeping the cell's memory (num_heads x (2 E / num_heads)^2)
    and the layers above. It errs high; it exists to refuse sizes that cannot run."""
    head = 2 * config.embedding_dim // max(1, config.num_heads)
    memory = config.num_heads * head * head
    per_step = (
        memory
        + _PER_STEP_HIDDEN * config.hidden
        + _PER_STEP_LATENT * config.latents * config.classes
        + _PER_STEP_BINS * config.bins
        + env.observation_size
    )
    replay = loop.num_envs * loop.capacity * (env.observation_size + 4)
    steps = (
        loop.batch_size * loop.seq_len
        + loop.num_envs * (horizon + loop.collect_steps)
        + loop.eval_envs * env.max_episode_length
    )
    return 4 * (replay + 2 * steps * per_step)


def check_arguments(
    *,
    env_name,
    steps,
    seed,
    read,
    out,
    log_every,
    reward_scale,
    num_envs,
    collect_steps,
    batch_size,
    seq_len,
    horizon,
    eval_envs,
) -> None:
    """Every argument of ``run`` checked before anything is written or computed (the
    rules of every command: ``experiments.study.config_checks``): integers in range, the seed
    below 2**32, a finite reward scale > 0, a known read, and an --out folder that can
    be created.

    Raises:
        ConfigError: naming the flag.
    """
    FLAG_CHECKS.int("steps", steps, minimum=0)
    FLAG_CHECKS.seeds("seed", seed)
    for name, value in (
        ("log_every", log_every),
        ("num_envs", num_envs),
        ("collect_steps", collect_steps),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("horizon", horizon),
        ("eval_envs", eval_envs),
    ):
        FLAG_CHECKS.int(name, value, minimum=1)
    FLAG_CHECKS.optional_real("reward_scale", reward_scale, minimum=0, minimum_inclusive=False)
    if not isinstance(read, str):
        FLAG_CHECKS.fail("read", f"must be a read name, got {read!r}.")
    from orthorecall.reads import read_from_name

    try:
        read_from_name(read)
    except ValueError as e:
        FLAG_CHECKS.fail("read", str(e))
    FLAG_CHECKS.output_folder("out", out)


def run(
    *,
    env_name: str,
    steps: int,
    seed: int,
    read: str,
    out: str | pathlib.Path,
    log_every: int = 100,
    reward_scale: float | None = None,
    num_envs: int = 16,
    collect_steps: int = 16,
    batch_size: int = 8,
    seq_len: int = 64,
    horizon: int = 15,
    eval_envs: int = 32,
    model_overrides: dict | None = None,
    echo=print,
) -> dict:
    """Trains, logs and writes the three output files into ``out``; returns the summary.

    ``model_overrides`` replaces fields of ``world_model_rssm.Config`` (tests use it to
    shrink the model).
    """
    sizes = {
        "num_envs": num_envs,
        "collect_steps": collect_steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "horizon": horizon,
        "eval_envs": eval_envs,
    }
    check_arguments(
        env_name=env_name,
        steps=steps,
        seed=seed,
        read=read,
        out=out,
        log_every=log_every,
        reward_scale=reward_scale,
        **sizes,
    )
    out = pathlib.Path(out)
    _refuse_earlier_run(out)
    env, config, loop = _model_and_loop(env_name, read, reward_scale, model_overrides, **sizes)
    out.mkdir(parents=True, exist_ok=True)
    if seq_len <= env.max_episode_length:
        echo(
            f"warning: seq_len={seq_len} <= episode length {env.max_episode_length}: "
            "chunks start at episode starts, so the steps past seq_len are never trained on."
        )
    records, random_return = _train_and_log(
        env,
        config,
        loop,
        seed=seed,
        steps=steps,
        log_every=log_every,
        metrics_path=out / METRICS_FILE,
        echo=echo,
    )
    command = {
        "env": env_name,
        "steps": steps,
        "seed": seed,
        "read": read,
        "log_every": log_every,
        "reward_scale": config.reward_scale,
        **sizes,
    }
    summary = _summary(command, env, config, records, random_return)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(records, out / CURVES_FILE, title=f"{env_name}, read={read}, seed={seed}")
    return summary


def _refuse_earlier_run(out: pathlib.Path) -> None:
    """Refuses an ``out`` that already holds a run's files: the command does not resume."""
    earlier = [name for name in (METRICS_FILE, SUMMARY_FILE, CURVES_FILE) if (out / name).exists()]
    if earlier:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(earlier)}); this command does not resume "
            "and will not overwrite it: choose another --out, or delete those files."
        )


def _model_and_loop(
    env_name,
    read,
    reward_scale,
    model_overrides,
    *,
    num_envs,
    collect_steps,
    batch_size,
    seq_len,
    horizon,
    eval_envs,
):
    """The environment, the world model's configuration and the loop's sizes; refuses an
    unknown environment, or a run that would not fit in the device's memory."""
    import jax

    from experiments.agents import envs as envs_lib
    from experiments.agents import world_model as wm
    from experiments.agents.world_model_rssm import Config
    from orthorecall import footprint

    try:
        env = envs_lib.make(env_name)
    except (ValueError, ImportError) as e:
        FLAG_CHECKS.fail("env", str(e))
    scale = float(env.max_episode_length) if reward_scale is None else float(reward_scale)
    config = Config(
        num_actions=env.num_actions,
        obs_size=env.observation_size,
        read=read,
        reward_scale=scale,
        horizon=horizon,
        **(model_overrides or {}),
    )
    loop = wm.LoopConfig(
        num_envs=num_envs,
        collect_steps=collect_steps,
        batch_size=batch_size,
        seq_len=seq_len,
        capacity=max(4096, 2 * (seq_len + env.max_episode_length)),
        eval_envs=eval_envs,
    )
    need = world_model_memory_bytes(env, config, loop, horizon)
    available = footprint.per_device_available_memory(jax.devices()[:1])
    if available is not None and need > available:
        FLAG_CHECKS.fail(
            "num_envs",
            f"the run needs about {footprint.format_bytes(need)} (an analytic estimate: "
            "replay buffer and one update's activations), more than the "
            f"{footprint.format_bytes(available)} the device can use; lower --num_envs, "
            "--seq_len, --batch_size, --horizon or --eval_envs.",
        )
    return env, config, loop


def _train_and_log(env, config, loop, *, seed, steps, log_every, metrics_path, echo):
    """Prefills the replay with random actions, then runs ``steps`` updates, evaluating
    every ``log_every`` (and after the last) into ``metrics_path``.

    Returns:
        (the logged records, the random policy's mean episode return).
    """
    import jax

    from experiments.agents import world_model as wm

    fns = wm.make_functions(env, config, loop)
    key = jax.random.PRNGKey(seed)
    init_key, prefill_key, random_key, key = jax.random.split(key, 4)
    start = time.perf_counter()
    state, actor, replay = fns.init(init_key)
    # Every environment's first episode starts at step 0: seq_len steps make a valid chunk.
    actor, replay = fns.prefill(state, actor, replay, prefill_key, loop.seq_len)
    random_return, _ = fns.evaluate(state, random_key, "random")
    random_return = float(random_return)
    echo(f"random policy: mean episode return {random_return:+.3f}")

    records = []
    window, window_count = None, 0
    with metrics_path.open("w") as metrics_file:
        for step in range(steps + 1):
            if step > 0:
                state, actor, replay, metrics = fns.update(
                    state, actor, replay, jax.random.fold_in(key, step)
                )
                window = (
                    metrics
                    if window is None
                    else jax.tree_util.tree_map(lambda a, b: a + b, window, metrics)
                )
                window_count += 1
            if step % log_every and step != steps:
                continue
            record, actor = _evaluation_record(
                fns,
                state,
                actor,
                replay,
                step,
                jax.random.fold_in(random_key, step),
                start,
                loop.num_envs,
                random_return,
            )
            if window is not None:
                record.update({name: float(value) / window_count for name, value in window.items()})
                window, window_count = None, 0
            records.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            echo(_progress_line(record))
    return records, random_return


def _evaluation_record(fns, state, actor, replay, step, eval_key, start, num_envs, random_return):
    """The log of ``step``: the actor's return on fresh environments (sampled and
    greedy actions), the world model's held-out losses, and the mean return of the
    training episodes finished since the previous log, whose tally it clears.

    Returns:
        (the record, the actor with its finished-episode tally cleared).
    """
    import jax

    eval_return, heldout = fns.evaluate(state, eval_key, "sample")
    greedy_return, _ = fns.evaluate(state, jax.random.fold_in(eval_key, 1), "greedy")
    record = {
        "step": step,
        "wall_s": round(time.perf_counter() - start, 2),
        "env_steps": int(replay.written) * num_envs,
        "eval_return": float(eval_return),
        "eval_return_greedy": float(greedy_return),
        "random_return": random_return,
        **{name: float(value) for name, value in heldout.items()},
    }
    finished = int(actor.finished_count)
    if finished:
        record["train_episode_return"] = float(actor.finished_return) / finished
    actor = actor._replace(
        finished_return=actor.finished_return * 0, finished_count=actor.finished_count * 0
    )
    return record, actor


def _summary(command, env, config, records, random_return) -> dict:
    """The contents of ``summary.json``: the settings, the first and last logged
    figures, the random policy's return, the software."""
    import jax
    import numpy as np

    return {
        "command": command,
        "model": {name: getattr(config, name) for name in config.__dataclass_fields__},
        "environment": {
            "num_actions": env.num_actions,
            "observation_size": env.observation_size,
            "max_episode_length": env.max_episode_length,
        },
        "wall_s": records[-1]["wall_s"],
        "env_steps": records[-1]["env_steps"],
        "random_return": random_return,
        "best_eval_return": max(r["eval_return"] for r in records),
        "first": _pick(records[0] if command["steps"] == 0 else records[1]),
        "last": _pick(records[-1]),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }


def _pick(record: dict) -> dict:
    return {"step": record["step"], **{k: record[k] for k in SUMMARY_KEYS if k in record}}


def _progress_line(record: dict) -> str:
    parts = [f"step {record['step']:5d}", f"{record['wall_s']:7.1f}s"]
    for name, label in (
        ("eval_return", "return"),
        ("eval_return_greedy", "greedy"),
        ("obs_loss", "obs"),
        ("reward_loss", "reward"),
        ("kl", "kl"),
        ("heldout_reward_mse", "held-out reward mse"),
        ("heldout_reward_mse_mean_baseline", "(mean baseline"),
        ("actor_entropy", "entropy"),
    ):
        if name in record:
            suffix = ")" if label.startswith("(") else ""
            parts.append(f"{label} {record[name]:.4g}{suffix}")
    return "  ".join(parts)


def plot_curves(records: Sequence[dict], path: pathlib.Path, title: str = "") -> None:
    """Four panels: world-model losses, held-out reward prediction (error, sign of the
    nonzero rewards), real-environment return."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(name):
        points = [(r["step"], r[name]) for r in records if name in r]
        return [p[0] for p in points], [p[1] for p in points]

    figure = Figure(figsize=(19, 4.2))
    FigureCanvasAgg(figure)
    losses, reward, sign, returns = figure.subplots(1, 4)
    for name, label in (
        ("obs_loss", "observation (train)"),
        ("reward_loss", "reward two-hot CE (train)"),
        ("kl", "KL[q || p] (train)"),
        ("heldout_obs_loss", "observation (held-out)"),
        ("heldout_reward_loss", "reward two-hot CE (held-out)"),
    ):
        x, y = series(name)
        if x:
            style = "--" if name.startswith("heldout") else "-"
            losses.plot(x, y, style, label=label)
    losses.set(title="world-model losses", xlabel="update", yscale="log")
    losses.legend(fontsize=8)
    for name, label in (
        ("heldout_reward_mse", "model"),
        ("heldout_reward_mse_mean_baseline", "predict-the-mean baseline"),
    ):
        x, y = series(name)
        style = "k--" if "baseline" in name else "-"
        reward.plot(x, [max(v, 1e-12) for v in y], style, label=label)
    reward.set(title="held-out reward MSE (environment units)", xlabel="update", yscale="log")
    reward.legend(fontsize=8)
    for name, label in (
        ("heldout_reward_sign_accuracy", "model"),
        ("heldout_reward_sign_majority_baseline", "always the commoner sign"),
    ):
        x, y = series(name)
        sign.plot(x, y, "k--" if "baseline" in name else "-", label=label)
    sign.set(title="held-out sign of nonzero rewards: accuracy", xlabel="update")
    sign.legend(fontsize=8)
    for name, label in (
        ("eval_return", "actor (sampled actions)"),
        ("eval_return_greedy", "actor (greedy)"),
        ("train_episode_return", "actor while collecting"),
    ):
        x, y = series(name)
        if x:
            returns.plot(x, y, label=label)
    x, _ = series("eval_return")
    returns.plot(x, [records[0]["random_return"]] * len(x), "k:", label="random policy")
    returns.set(title="real-environment episode return", xlabel="update")
    returns.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Sequence[str]) -> None:
    library_logging_at_warning()
    avoid_xla_cpu_scheduler_deadlock()
    with exit_status_on_refusal("world_model"):
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {list(argv[1:])}; pass flags only.")
        if not _OUT.value:
            raise ConfigError("--out=DIR is required.")
        try:
            summary = run(
                env_name=_ENV.value,
                steps=_STEPS.value,
                seed=_SEED.value,
                read=_READ.value,
                out=_OUT.value,
                log_every=_LOG_EVERY.value,
                reward_scale=_REWARD_SCALE.value,
                num_envs=_NUM_ENVS.value,
                collect_steps=_COLLECT_STEPS.value,
                batch_size=_BATCH_SIZE.value,
                seq_len=_SEQ_LEN.value,
                horizon=_HORIZON.value,
                eval_envs=_EVAL_ENVS.value,
            )
        except ConfigError:
            raise
        except (ValueError, FileExistsError) as e:  # a bad size for the model; an earlier run
            raise ConfigError(str(e)) from None
    print(
        f"done: {summary['env_steps']} environment steps in {summary['wall_s']:.0f}s; "
        f"final return {summary['last']['eval_return']:+.3f} "
        f"(random {summary['random_return']:+.3f})"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=config_flag_parser("world_model"))
