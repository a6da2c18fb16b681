"""The multi-seed, multi-read training loop with checkpoints and reports.

``train_and_evaluate(config, workdir)`` validates the configuration
(``experiments.study_config``), locks
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
import time
from typing import IO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.progress import Progress
from experiments.report.statistics import finite_or_none
from experiments.stopping import StopOnSignal
from experiments.study_config import (
    anneal_schedule,
    annealed_reads,
    load_initial_params,
    seed_groups,
    task_from_config,
    validate_config,
)
from experiments.summaries import RunSummaries, finite_mean
from experiments.workdir import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    WorkdirLock,
    check_workdir_without_checkpoint,
    checkpoint_config_check,
    config_fingerprint,
    restore_latest_or_refuse,
)
from orthorecall import (
    anneal,
    checkpointing,
    data,
    host_data,
    multihost,
    training,
)

TENSORBOARD_DIR = "tensorboard"
# Every train.log_every steps: one row per read and seed (loss, gradient norm, rate).
TRAIN_LOG_FILE = "train_log.jsonl"


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
        "processes": jax.process_count(),
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
    if not multihost.is_primary():
        # Process 0 holds the lock for all; the others write nothing and print nothing.
        with open(os.devnull, "w") as silent:
            return _train_in_workdir(config, configs, workdir, False, silent)
    with WorkdirLock(workdir):
        return _train_in_workdir(config, configs, workdir, tensorboard, console)


def _train_in_workdir(config, configs, workdir, tensorboard, console) -> dict:
    """train_and_evaluate, once the configuration is valid and the workdir locked."""
    from experiments import report  # Plotting stays out of library imports.

    names = list(configs)
    annealed = annealed_reads(names)
    schedule = anneal_schedule(config)
    primary = multihost.is_primary()  # The one process that writes files.
    config_dict = json.loads(config.to_json())
    fingerprint = config_fingerprint(config_dict)
    train = config.train
    checkpointer = checkpointing.RunCheckpointer(
        workdir / "checkpoints", save_every=train.checkpoint_every, keep=train.keep_checkpoints
    )
    streams = None  # The numpy data source's host streams (host_data.ParallelStreams).
    try:
        # Before any compute: the newest checkpoint must be of this configuration.
        check_config = checkpoint_config_check(workdir, config_dict)
        initial = None
        if checkpointer.newest_meta(check_config) is None:
            check_workdir_without_checkpoint(workdir, checkpointer, config_dict)
            # A fresh start: its config.init_from files are checked before any compute
            # (a resumed run never reads them again).
            num_seeds = config.seeds.num_seeds
            initial = load_initial_params(
                config, configs, range(config.seeds.first_seed, config.seeds.first_seed + num_seeds)
            )

        task = task_from_config(config)
        groups = seed_groups(config, configs)
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

        # Padding seeds (several devices) start from the initializer: they are dropped.
        padding = [None] * (len(seeds) - num_seeds)
        states = {
            name: training.init_seed_states(
                seeds,
                configs[name],
                optimizer,
                None if initial is None else initial[name] + padding,
            )
            for name in names
        }
        # Data keys differ from initialization keys but are fixed by the seed.
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 1))(
            jnp.asarray(seeds, jnp.uint32)
        )
        tree = training.shard_seeds({"states": states, "keys": keys}, mesh)

        step, records, resumed_from = 0, [], None
        # The step at which each seed's gated anneal was triggered (anneal.NOT_TRIGGERED
        # until then), kept in the checkpoint's metadata.
        triggers = {n: np.full(len(seeds), anneal.NOT_TRIGGERED, np.int32) for n in annealed}
        restored = restore_latest_or_refuse(checkpointer, tree, check_config)
        if restored is not None:
            step, tree, records = restored.step, restored.state, restored.meta["metrics"]
            tree = training.shard_seeds(tree, mesh)
            resumed_from = step
            for n in annealed:
                triggers[n] = np.asarray(restored.meta["triggers"][n], np.int32)
        if train.data_source == "numpy":
            # Drawn ahead, in worker processes, while the devices run a step.
            if restored is not None:
                streams = host_data.ParallelStreams.from_states(restored.meta["streams"])
            else:
                streams = host_data.ParallelStreams(task, seeds=seeds, batch_size=train.batch_size)
        description = _run_description(config, names) | {
            "config_fingerprint": fingerprint,
            "seed_groups": groups,
        }
        if primary:
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
        train_step = training.make_train_step(
            configs,
            optimizer,
            sample,
            segment_length=train.get("segment_length"),
            seed_groups=groups,
        )
        eval_step = training.make_eval_step(configs, seed_groups=groups)

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
                "streams": None if streams is None else streams.states(),
                "config": config_dict,
                "config_fingerprint": fingerprint,
                "triggers": {n: t.tolist() for n, t in triggers.items()},
            }

        def budgets():
            """Read -> each seed's step budget: train.steps, longer for a seed whose
            gated anneal ends after it (anneal.AnnealSchedule.budget)."""
            out = {n: np.full(len(seeds), train.steps, np.int64) for n in names}
            for n in annealed:
                out[n] = schedule.budget(triggers[n], train.steps)
            return out

        def total_steps() -> int:
            return int(max(b.max() for b in budgets().values()))

        learning_rate = training.learning_rate_schedule(
            train.schedule, train.learning_rate, train.steps, train.stretch_steps
        )
        if primary:
            _truncate_train_log(workdir / TRAIN_LOG_FILE, step)

        def write_metrics():
            if primary:
                _atomic_write(
                    workdir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records)
                )

        summaries = None
        if tensorboard:
            summaries = RunSummaries(
                workdir / TENSORBOARD_DIR, names, seeds[:num_seeds], purge_step=resumed_from
            )
        progress = Progress(total_steps(), step, train.log_every, stream=console)
        if resumed_from is not None:
            damaged = "".join(
                f"; checkpoint of step {r.step} failed verification, moved to {r.moved_to.name}"
                for r in checkpointer.rejected
            )
            progress.note(f"resuming {workdir} from step {resumed_from}{damaged}")
        if groups > 1:
            progress.note(
                f"the seeds of each device run in {groups} groups one after the other: all "
                "at once would not fit in its memory (same results, proportionally slower)"
            )
        # Ctrl-C / SIGTERM stop between steps, with a checkpoint (experiments.stopping).
        stop = StopOnSignal()
        timer = first_step = None

        try:
            with progress:
                while step < total_steps():
                    budget = budgets()
                    read_mix = active = None
                    if annealed:
                        read_mix = training.shard_seeds(
                            {n: schedule.alpha(step, triggers[n]) for n in annealed}, mesh
                        )
                        active = training.shard_seeds({n: step < budget[n] for n in names}, mesh)
                    batch = None
                    if streams is not None:
                        batch = training.shard_seeds(streams.next_batches(), mesh)
                        if timer is not None and step == first_step + THROTTLE_CHECK_STEPS:
                            _note_if_data_throttles(progress, streams, time.perf_counter() - timer)
                    # The anneal's arguments only when there is one: the step of a run
                    # without it is the program it always was.
                    anneal_args = (read_mix, active) if annealed else ()
                    new_states, new_keys, step_metrics = train_step(
                        tree["states"], tree["keys"], batch, *anneal_args
                    )
                    tree = {"states": new_states, "keys": new_keys}
                    if not stop.armed:
                        stop.arm()
                        # Compiled: from here the wait for data is compared with the steps.
                        timer, first_step = time.perf_counter(), step + 1
                        if streams is not None:
                            streams.wait_seconds = 0.0
                    step += 1
                    progress.advance(step)
                    ends = step == train.steps or any(np.any(step == b) for b in budget.values())
                    evaluate_now = step % train.eval_every == 0 or ends
                    log_now = step % train.log_every == 0 or ends
                    if evaluate_now or log_now:
                        # Padding seeds (several devices) are dropped here, once.
                        metrics, bad = multihost.host_copy(
                            (
                                step_metrics,
                                {n: tree["states"][n].nonfinite for n in names},
                            )
                        )
                        metrics = {
                            n: {k: v[:num_seeds] for k, v in m.items()} for n, m in metrics.items()
                        }
                        bad = {n: b[:num_seeds] for n, b in bad.items()}
                        for n in names if annealed else ():
                            # Seeds past their budget were not trained: no loss to show.
                            spent = step > budget[n][:num_seeds]
                            for key in ("loss", "grad_norm"):
                                metrics[n][key] = np.where(spent, np.nan, metrics[n][key])
                    if evaluate_now:
                        eval_mix = None
                        if annealed:
                            eval_mix = training.shard_seeds(
                                {n: schedule.alpha(step, triggers[n]) for n in annealed}, mesh
                            )
                        results = multihost.host_copy(
                            eval_step(
                                tree["states"],
                                val_inputs,
                                val_targets,
                                *((eval_mix,) if annealed else ()),
                            )
                        )
                        new_records = _evaluation_records(
                            step, names, seeds[:num_seeds], results, metrics, bad
                        )
                        if annealed:
                            new_records = _anneal_fields(
                                new_records, step, seeds[:num_seeds], schedule, triggers, budget
                            )
                            for n in annealed:
                                accuracy = np.where(
                                    step <= budget[n], results[n]["accuracy"], np.nan
                                )
                                triggers[n] = schedule.triggered(triggers[n], step, accuracy)
                            if total_steps() > progress.total:
                                progress.note(
                                    f"a seed triggered its anneal at step {step}: the run "
                                    f"goes on to step {total_steps()} so that its last "
                                    "evaluation is at alpha = 0"
                                )
                                progress.extend(total_steps())
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
                    if log_now and primary:
                        _append_train_log(
                            workdir / TRAIN_LOG_FILE,
                            _train_log_rows(
                                step,
                                names,
                                seeds[:num_seeds],
                                metrics,
                                bad,
                                learning_rate(step - 1),
                            ),
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
                    checkpointer.save(step, tree, meta(), force=step >= total_steps())
                    # All processes stop at the same step, whichever one was signalled.
                    if multihost.any_process(stop.requested):
                        break
        finally:
            stop.restore()
            if summaries is not None:
                summaries.close()
        if step < total_steps():  # Stopped by a signal, between two steps.
            print(f"\ninterrupted at step {step}: writing a checkpoint...", flush=True)
            checkpointer.save(step, tree, meta(), force=True)
            checkpointer.close()
            write_metrics()
            print(f"checkpoint of step {step} saved; run the same command to resume.", flush=True)
            raise KeyboardInterrupt
        checkpointer.close()
        write_metrics()
        if primary:
            results = report.build_report(workdir)
            print(report.format_summary(results), flush=True)
        multihost.sync("report")
        if not primary:
            results = json.loads((workdir / report.RESULTS_JSON).read_text())
        return results
    finally:
        checkpointer.close()
        if streams is not None:
            streams.close()


# After this many steps past the first (compiled) one, a run on numpy data says whether
# drawing it holds the devices up.
THROTTLE_CHECK_STEPS = 10
# ... which it does when the loop waited for batches this fraction of the time.
THROTTLE_FRACTION = 0.2


def _note_if_data_throttles(progress, streams, elapsed: float) -> None:
    if elapsed <= 0 or streams.wait_seconds < THROTTLE_FRACTION * elapsed:
        return
    progress.note(
        f"the numpy data source held the devices up: the loop waited "
        f"{100 * streams.wait_seconds / elapsed:.0f}% of the time for batches drawn on the "
        f"host ({streams.workers} worker process(es)). train.data_source='jax' draws the "
        "same distribution on the devices; numpy is the reference's exact stream."
    )


def _train_log_rows(step, names, seeds, metrics, bad, learning_rate) -> list[dict]:
    """The train_log.jsonl rows of one step: that step's training loss, the gradient's
    global norm before clipping and the learning rate the update used, per read and
    seed. A seed that was not updated (diverged, or past its anneal budget) has no rate."""
    rows = []
    for name in names:
        loss, grad_norm = metrics[name]["loss"], metrics[name]["grad_norm"]
        for i, seed in enumerate(seeds):
            updated = not bad[name][i] and np.isfinite(loss[i])
            rows.append(
                {
                    "read": name,
                    "seed": int(seed),
                    "step": step,
                    "loss": finite_or_none(loss[i]),
                    "grad_norm": finite_or_none(grad_norm[i]),
                    "learning_rate": float(learning_rate) if updated else None,
                }
            )
    return rows


def _append_train_log(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def _truncate_train_log(path: pathlib.Path, step: int) -> None:
    """Keeps the train log's rows up to ``step`` (the step the run resumes from; 0 for a
    fresh start), as metrics.jsonl is rewritten from the checkpoint: the steps after it
    are run again. A line cut short by a kill goes too."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    _atomic_write(path, "".join(kept))


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


def _anneal_fields(records, step, seeds, schedule, triggers, budget) -> list[dict]:
    """An annealed run's rows: those of seeds within their budget (a seed whose budget
    ended is no longer trained or reported), with ``alpha`` on the annealed reads'."""
    index = {int(seed): i for i, seed in enumerate(seeds)}
    kept = []
    for record in records:
        i = index[record["seed"]]
        if step > budget[record["read"]][i]:
            continue
        if record["read"] in triggers:
            trigger = triggers[record["read"]][i]
            record["alpha"] = float(schedule.alpha(step, trigger))
            record["anneal_trigger_step"] = (
                None if trigger == anneal.NOT_TRIGGERED else int(trigger)
            )
        kept.append(record)
    return kept


def _evaluation_line(step, names, records, solved, num_seeds) -> str:
    parts = []
    for name in names:
        accuracy = finite_mean(
            [r["accuracy"] for r in records if r["read"] == name and r["accuracy"] is not None]
        )
        mean = "n/a" if accuracy is None else f"{100 * accuracy:.1f}%"
        parts.append(f"{name}: mean accuracy {mean}, solved {len(solved[name])}/{num_seeds}")
    return f"evaluation at step {step}: " + " | ".join(parts)
