"""The multi-seed, multi-read training loop with checkpoints and reports.

``train_and_evaluate(config, workdir)`` validates the configuration, locks
``workdir``, checks that its checkpoints are of this configuration, builds
every seed's state for every read, resumes from the newest checkpoint that
verifies when there is one, trains with one jitted step for all seeds and reads,
evaluates every ``eval_every`` steps on each seed's reference validation set,
checkpoints asynchronously, and writes the report (``experiments.report``).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
from typing import IO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.progress import Progress
from experiments.report.statistics import finite_or_none
from experiments.summaries import RunSummaries, finite_mean
from experiments.workdir import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    WorkdirError,
    WorkdirLock,
    config_fingerprint,
    differing_fields,
    has_results,
    read_run_description,
)
from orthorecall import cell as cell_lib
from orthorecall import checkpointing, data, training
from orthorecall import model as model_lib
from orthorecall.reads import read_from_name
from orthorecall.validation import check_int

TENSORBOARD_DIR = "tensorboard"


class ConfigError(ValueError):
    """The configuration cannot run; the message names the field."""


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


def _check_int(field: str, value, minimum: int) -> None:
    try:
        check_int(field, value, minimum=minimum)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def model_configs(config: ml_collections.ConfigDict) -> dict[str, model_lib.ModelConfig]:
    """Read name -> ModelConfig, validating every model and read field.

    Raises:
        ConfigError: naming the offending field.
    """
    names = [name.strip() for name in str(config.reads).split(",") if name.strip()]
    if not names:
        _fail("reads", "no read given; use e.g. 'raw,ns5'.")
    if len(set(names)) != len(names):
        _fail("reads", f"a read is listed twice: {names}.")
    configs = {}
    for name in names:
        try:
            read = read_from_name(name)
        except ValueError as e:
            _fail("reads", str(e))
        try:
            configs[name] = model_lib.ModelConfig(
                vocab_size=config.task.vocab_size,
                cell=cell_lib.CellConfig(read=read, **config.model.to_dict()),
            )
        except (ValueError, TypeError) as e:
            _fail("model", str(e))
    return configs


def task_from_config(config: ml_collections.ConfigDict) -> data.NoisyRecallTask:
    """The task of ``config.task``.

    Raises:
        ConfigError: naming the offending field.
    """
    try:
        return data.NoisyRecallTask(**config.task.to_dict())
    except (ValueError, TypeError) as e:
        _fail("task", str(e))


def validate_config(config: ml_collections.ConfigDict) -> dict[str, model_lib.ModelConfig]:
    """Checks everything that can be checked before any compute.

    Returns:
        The model configuration of every read.

    Raises:
        ConfigError: naming the offending field and the constraint.
    """
    task = task_from_config(config)
    if not task.multi_query:
        _fail(
            "task.multi_query",
            "the study uses multi_query=True; single-query training "
            "targets are not supported by the trainer.",
        )
    train = config.train
    for field in (
        "steps",
        "batch_size",
        "eval_every",
        "val_batches",
        "val_batch_size",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
    ):
        _check_int(f"train.{field}", train[field], minimum=1)
    if not train.learning_rate > 0:
        _fail("train.learning_rate", f"must be > 0, got {train.learning_rate!r}.")
    if train.schedule not in training.SCHEDULES:
        _fail("train.schedule", f"{train.schedule!r} is not one of {training.SCHEDULES}.")
    if train.schedule == "stretched_cosine" and train.stretch_steps < train.steps:
        _fail(
            "train.stretch_steps",
            f"must be >= train.steps ({train.steps}) for "
            f"stretched_cosine, got {train.stretch_steps}.",
        )
    if train.data_source not in ("jax", "numpy"):
        _fail("train.data_source", f"{train.data_source!r} is neither 'jax' nor 'numpy'.")
    if train.clip_norm is not None and not train.clip_norm > 0:
        _fail("train.clip_norm", f"must be > 0 or None, got {train.clip_norm!r}.")
    _check_int("seeds.num_seeds", config.seeds.num_seeds, minimum=1)
    _check_int("seeds.first_seed", config.seeds.first_seed, minimum=0)
    if not 0.0 < config.solved_threshold <= 1.0:
        _fail("solved_threshold", f"must lie in (0, 1], got {config.solved_threshold!r}.")
    return model_configs(config)


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_description(config, names) -> dict:
    """What ``experiments.report`` needs to know about the run."""
    return {
        "name": config.name,
        "regime": f"v{config.task.vocab_size}_s{config.task.seq_len}",
        "total_steps": config.train.steps,
        "eval_every": config.train.eval_every,
        "reads": names,
        "num_seeds": config.seeds.num_seeds,
        "seeds": list(
            range(config.seeds.first_seed, config.seeds.first_seed + config.seeds.num_seeds)
        ),
        "solved_threshold": config.solved_threshold,
        "batch_size": config.train.batch_size,
        "vocab_size": config.task.vocab_size,
        "seq_len": config.task.seq_len,
        "noise_vocab_size": config.task.noise_vocab_size,
        "frac_noise": config.task.frac_noise,
        "multi_query": config.task.multi_query,
        "devices": [str(d) for d in jax.devices()],
        "config": json.loads(config.to_json()),
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    tensorboard: bool = True,
    console: IO[str] | None = None,
) -> dict:
    """Runs (or resumes) the study described by ``config`` in ``workdir``.

    Args:
        config: the study's configuration (``experiments/configs/noisy_ar.py``).
        workdir: where checkpoints, metrics, TensorBoard events and the report go.
        tensorboard: also write TensorBoard event files under ``workdir/tensorboard``
            (``experiments.summaries``).
        console: where progress goes (default stdout): a progress bar when it is a
            terminal, plain status lines otherwise (``experiments.progress``).

    Returns:
        The results dict written to ``workdir/results.json``.

    Raises:
        ConfigError: an invalid configuration, before anything is written.
        WorkdirError: a workdir in use by another process, of another configuration,
            or holding only damaged checkpoints; before any compute.
    """
    configs = validate_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir):
        return _train_in_workdir(config, configs, workdir, tensorboard, console)


def _check_stored_config(workdir: pathlib.Path, stored: dict, config_dict: dict) -> None:
    differences = differing_fields(stored, config_dict)
    if differences:
        raise WorkdirError(
            f"{workdir} holds a run with a different configuration ({differences}). Use "
            "another --workdir, or repeat the original configuration to resume it."
        )


def _checkpoint_config_check(workdir: pathlib.Path, config_dict: dict):
    """``check_meta`` for the checkpointer: refuses a checkpoint of another configuration."""

    def check(step: int, meta: dict) -> None:
        stored = meta.get("config")
        if stored is None:  # Written before checkpoints stored their configuration.
            description = read_run_description(workdir)
            if description is None:
                raise WorkdirError(
                    f"the checkpoint of step {step} in {workdir} does not record its "
                    f"configuration (an older orthorecall wrote it) and {RUN_CONFIG_FILE} is "
                    "missing, so resuming it under this command cannot be checked. Use "
                    "another --workdir."
                )
            stored = description["config"]
        _check_stored_config(workdir, stored, config_dict)

    return check


def _check_workdir_without_checkpoint(workdir: pathlib.Path, checkpointer, config_dict) -> None:
    """A workdir without a usable checkpoint: starting (over) must not lose results."""
    damaged = checkpointer.quarantined()
    if damaged:
        raise WorkdirError(
            f"{workdir} holds no checkpoint that passes verification, only damaged ones "
            f"moved aside: {', '.join(p.name for p in damaged)}. Starting over would "
            "discard that run: move the workdir's results away (or use another --workdir) "
            f"and delete the {checkpointing.QUARANTINE_PREFIX}* folders to start over."
        )
    if not has_results(workdir):
        return  # Nothing to lose: a new workdir, or a start that failed before results.
    try:
        description = read_run_description(workdir)
    except WorkdirError as e:
        raise WorkdirError(
            f"{e} {workdir} holds results of a run without checkpoints whose configuration "
            "cannot be told. Use another --workdir, or move the results away."
        ) from None
    if description is None:
        raise WorkdirError(
            f"{workdir} holds results ({METRICS_FILE}) but neither checkpoints nor "
            f"{RUN_CONFIG_FILE}: their configuration cannot be told. Use another "
            "--workdir, or move the results away."
        )
    _check_stored_config(workdir, description["config"], config_dict)


def _train_in_workdir(config, configs, workdir, tensorboard, console) -> dict:
    """train_and_evaluate, once the configuration is valid and the workdir locked."""
    from experiments import report  # Plotting stays out of library imports.

    names = list(configs)
    config_dict = json.loads(config.to_json())
    fingerprint = config_fingerprint(config_dict)
    train = config.train
    checkpointer = checkpointing.RunCheckpointer(
        workdir / "checkpoints", save_every=train.checkpoint_every, keep=train.keep_checkpoints
    )
    try:
        # Before any compute: the newest checkpoint must be of this configuration.
        check_config = _checkpoint_config_check(workdir, config_dict)
        if checkpointer.newest_meta(check_config) is None:
            _check_workdir_without_checkpoint(workdir, checkpointer, config_dict)

        task = task_from_config(config)
        mesh = training.seed_mesh()
        num_seeds = config.seeds.num_seeds
        seeds = config.seeds.first_seed + np.arange(training.padded_seed_count(num_seeds, mesh))
        optimizer = training.make_optimizer(
            learning_rate=train.learning_rate,
            total_steps=train.steps,
            schedule=train.schedule,
            stretch_steps=train.stretch_steps,
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            clip_norm=train.clip_norm,
        )

        states = {
            name: training.init_seed_states(seeds, configs[name], optimizer) for name in names
        }
        # Data keys differ from initialization keys but are fixed by the seed.
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 1))(
            jnp.asarray(seeds, jnp.uint32)
        )
        tree = training.shard_seeds({"states": states, "keys": keys}, mesh)
        streams = None
        if train.data_source == "numpy":
            streams = [
                data.ReferenceTrainingStream(task, seed=int(s), batch_size=train.batch_size)
                for s in seeds
            ]

        step, records, resumed_from = 0, [], None
        restored = checkpointer.restore_latest(tree, check_config)
        if restored is None and checkpointer.rejected:
            raise WorkdirError(
                f"no checkpoint in {checkpointer.directory} passes verification: "
                + "; ".join(r.describe() for r in checkpointer.rejected)
                + ". They are kept there; the run was not started over."
            )
        if restored is not None:
            step, tree, records = restored.step, restored.state, restored.meta["metrics"]
            tree = training.shard_seeds(tree, mesh)
            if streams is not None:
                streams = [
                    data.ReferenceTrainingStream.from_state(s) for s in restored.meta["streams"]
                ]
            resumed_from = step
        description = _run_description(config, names) | {"config_fingerprint": fingerprint}
        _atomic_write(workdir / RUN_CONFIG_FILE, json.dumps(description, indent=1))

        val_sets = [
            data.reference_validation_set(
                task, seed=int(s), num_batches=train.val_batches, batch_size=train.val_batch_size
            )
            for s in seeds
        ]
        val_inputs = training.shard_seeds(jnp.asarray(np.stack([v[0] for v in val_sets])), mesh)
        val_targets = training.shard_seeds(jnp.asarray(np.stack([v[1] for v in val_sets])), mesh)
        sample = None
        if streams is None:
            sample = lambda key: data.sample_noisy_recall(key, task, batch_size=train.batch_size)
        train_step = training.make_train_step(configs, optimizer, sample)
        eval_step = training.make_eval_step(configs)

        # As the report counts them: reached the threshold and never diverged.
        solved = {name: set() for name in names}

        def count_solved(record):
            if record["nonfinite"]:
                solved[record["read"]].discard(record["seed"])
            elif record["accuracy"] is not None and record["accuracy"] >= config.solved_threshold:
                solved[record["read"]].add(record["seed"])

        for r in records:
            count_solved(r)

        def meta():
            # A copy: Orbax writes the JSON item asynchronously, after more records are appended.
            return {
                "step": step,
                "metrics": list(records),
                "streams": None if streams is None else [s.state() for s in streams],
                "config": config_dict,
                "config_fingerprint": fingerprint,
            }

        def write_metrics():
            _atomic_write(workdir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))

        summaries = None
        if tensorboard:
            summaries = RunSummaries(
                workdir / TENSORBOARD_DIR, names, seeds[:num_seeds], purge_step=resumed_from
            )
        progress = Progress(train.steps, step, train.log_every, stream=console)
        if resumed_from is not None:
            damaged = "".join(
                f"; checkpoint of step {r.step} failed verification, moved to {r.moved_to.name}"
                for r in checkpointer.rejected
            )
            progress.note(f"resuming {workdir} from step {resumed_from}{damaged}")
        # Ctrl-C / SIGTERM only set a flag, acted on between steps: raised in the middle of a
        # step, the interruption could drop the step's result after its input states were
        # donated (deleted), or leave `step`, the states and the records out of step.
        # Armed once the first step has returned: until then (tracing, compiling) nothing
        # has been computed that a checkpoint would keep, and the default handlers stop
        # at once even inside XLA, where a Python handler would wait for it to return.
        stop_requested = []
        previous_handlers = {}

        def request_stop(signum, frame):
            if stop_requested:  # A second signal stops at once, without a checkpoint.
                raise KeyboardInterrupt
            stop_requested.append(signum)  # (No print here: a handler may interrupt a print.)

        def arm_stop_handlers():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signum != signal.SIGINT or signal.getsignal(signum) is not signal.SIG_IGN:
                    previous_handlers[signum] = signal.signal(signum, request_stop)

        try:
            with progress:
                while step < train.steps:
                    batch = None
                    if streams is not None:
                        batches = [s.next_batch() for s in streams]
                        batch = training.shard_seeds(
                            (
                                jnp.asarray(np.stack([b[0] for b in batches])),
                                jnp.asarray(np.stack([b[1] for b in batches])),
                            ),
                            mesh,
                        )
                    new_states, new_keys, step_metrics = train_step(
                        tree["states"], tree["keys"], batch
                    )
                    tree = {"states": new_states, "keys": new_keys}
                    if not previous_handlers:
                        arm_stop_handlers()
                    step += 1
                    progress.advance(step)
                    evaluate_now = step % train.eval_every == 0 or step == train.steps
                    log_now = step % train.log_every == 0 or step == train.steps
                    if evaluate_now or log_now:
                        # Padding seeds (several devices) are dropped here, once.
                        metrics, bad = jax.device_get(
                            (
                                step_metrics,
                                {n: tree["states"][n].nonfinite for n in names},
                            )
                        )
                        metrics = {
                            n: {k: v[:num_seeds] for k, v in m.items()} for n, m in metrics.items()
                        }
                        bad = {n: b[:num_seeds] for n, b in bad.items()}
                    if evaluate_now:
                        results = jax.device_get(eval_step(tree["states"], val_inputs, val_targets))
                        new_records = _evaluation_records(
                            step, names, seeds[:num_seeds], results, metrics, bad
                        )
                        for record in new_records:
                            records.append(record)
                            count_solved(record)
                        write_metrics()
                        if summaries is not None:
                            summaries.evaluation(
                                step, new_records, {n: len(s) for n, s in solved.items()}
                            )
                        if progress.is_bar:  # The bar keeps no history: one line per evaluation.
                            progress.note(
                                _evaluation_line(step, names, new_records, solved, num_seeds)
                            )
                    if log_now:
                        nonfinite = {n: int(np.sum(bad[n])) for n in names}
                        mean_loss = {n: finite_mean(metrics[n]["loss"]) for n in names}
                        progress.update(
                            step,
                            mean_loss,
                            {n: len(s) for n, s in solved.items()},
                            num_seeds,
                            nonfinite,
                        )
                        if summaries is not None:
                            summaries.train(step, metrics)
                    checkpointer.save(step, tree, meta(), force=step == train.steps)
                    if stop_requested:
                        break
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if summaries is not None:
                summaries.close()
        if step < train.steps:  # Stopped by a signal, between two steps.
            print(f"\ninterrupted at step {step}: writing a checkpoint...", flush=True)
            checkpointer.save(step, tree, meta(), force=True)
            checkpointer.close()
            write_metrics()
            print(f"checkpoint of step {step} saved; run the same command to resume.", flush=True)
            raise KeyboardInterrupt
        checkpointer.close()
        write_metrics()
        results = report.build_report(workdir)
        print(report.format_summary(results), flush=True)
        return results
    finally:
        checkpointer.close()


def _evaluation_records(step, names, seeds, results, metrics, bad) -> list[dict]:
    """The metrics.jsonl rows of one evaluation: one per read and seed."""
    records = []
    for name in names:
        for i, seed in enumerate(seeds):
            accuracy = float(results[name]["accuracy"][i])
            finite = np.isfinite(accuracy) and not bad[name][i]
            records.append(
                {
                    "read": name,
                    "seed": int(seed),
                    "step": step,
                    "accuracy": accuracy if finite else None,
                    "loss": float(results[name]["loss"][i]) if finite else None,
                    "train_loss": finite_or_none(metrics[name]["loss"][i]),
                    "nonfinite": bool(bad[name][i]),
                }
            )
    return records


def _evaluation_line(step, names, records, solved, num_seeds) -> str:
    parts = []
    for name in names:
        accuracy = finite_mean(
            [r["accuracy"] for r in records if r["read"] == name and r["accuracy"] is not None]
        )
        mean = "n/a" if accuracy is None else f"{100 * accuracy:.1f}%"
        parts.append(f"{name}: mean accuracy {mean}, solved {len(solved[name])}/{num_seeds}")
    return f"evaluation at step {step}: " + " | ".join(parts)
