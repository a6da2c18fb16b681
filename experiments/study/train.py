"""The multi-seed, multi-read training loop with checkpoints and reports.

``train_and_evaluate(config, workdir)`` validates the configuration
(``experiments.study.study_config``), locks
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

from experiments.report.statistics import finite_or_none
from experiments.study.progress import Progress
from experiments.study.stopping import StopOnSignal
from experiments.study.study_config import (
    anneal_schedule,
    annealed_reads,
    load_initial_params,
    seed_groups,
    task_from_config,
    validate_config,
)
from experiments.study.summaries import RunSummaries, finite_mean
from experiments.study.workdir import (
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
            (``experiments.study.summaries``).
        console: where progress goes (default stdout): a progress bar when it is a
            terminal, plain status lines otherwise (``experiments.study.progress``).

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
    run = _StudyRun(config, configs, workdir)
    try:
        run.start()
        run.train(tensorboard, console)
        return run.finish()
    finally:
        run.close()


class _StudyRun:
    """One study in its workdir, in named steps: ``start`` (check the workdir, build or
    restore every seed's state, the data and the compiled steps), ``train`` (step,
    evaluate and record, log, checkpoint, until done or signalled), ``finish`` (the
    report). The attributes are the run's state; the methods read as the loop's parts."""

    def __init__(self, config, configs, workdir):
        self.config, self.configs, self.workdir = config, configs, workdir
        self.train_config = config.train
        self.names = list(configs)
        self.annealed = annealed_reads(self.names)
        self.schedule = anneal_schedule(config)
        self.primary = multihost.is_primary()  # The one process that writes files.
        self.config_dict = json.loads(config.to_json())
        self.fingerprint = config_fingerprint(self.config_dict)
        self.checkpointer = checkpointing.RunCheckpointer(
            workdir / "checkpoints",
            save_every=self.train_config.checkpoint_every,
            keep=self.train_config.keep_checkpoints,
        )
        self.streams = None  # The numpy data source's host streams (host_data.ParallelStreams).
        self.num_seeds = config.seeds.num_seeds
        self.step, self.records, self.resumed_from = 0, [], None
        # As the report counts them: reached the threshold and never diverged.
        self.solved = {name: set() for name in self.names}

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        """Everything before the first step, the workdir's checks first."""
        config, train = self.config, self.train_config
        # Before any compute: the newest checkpoint must be of this configuration.
        self.check_config = checkpoint_config_check(self.workdir, self.config_dict)
        initial = None
        if self.checkpointer.newest_meta(self.check_config) is None:
            check_workdir_without_checkpoint(self.workdir, self.checkpointer, self.config_dict)
            # A fresh start: its config.init_from files are checked before any compute
            # (a resumed run never reads them again).
            first = config.seeds.first_seed
            initial = load_initial_params(
                config, self.configs, range(first, first + self.num_seeds)
            )
        self.task = task_from_config(config)
        self.groups = seed_groups(config, self.configs)
        self.mesh = training.seed_mesh()
        self.seeds = config.seeds.first_seed + np.arange(
            training.padded_seed_count(self.num_seeds, self.mesh)
        )
        self.optimizer = training.make_optimizer(
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
        self.learning_rate = training.learning_rate_schedule(
            train.schedule, train.learning_rate, train.steps, train.stretch_steps
        )
        self._restore(self._initial_tree(initial))
        self._write_run_description()
        self._build_steps()
        for record in self.records:
            self._count_solved(record)
        if self.primary:
            _truncate_train_log(self.workdir / TRAIN_LOG_FILE, self.step)

    def _initial_tree(self, initial) -> dict:
        # Padding seeds (several devices) start from the initializer: they are dropped.
        padding = [None] * (len(self.seeds) - self.num_seeds)
        states = {
            name: training.init_seed_states(
                self.seeds,
                self.configs[name],
                self.optimizer,
                None if initial is None else initial[name] + padding,
            )
            for name in self.names
        }
        # Data keys differ from initialization keys but are fixed by the seed.
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 1))(
            jnp.asarray(self.seeds, jnp.uint32)
        )
        return training.shard_seeds({"states": states, "keys": keys}, self.mesh)

    def _restore(self, tree) -> None:
        """The newest checkpoint that verifies, else the initial state; and the numpy
        data streams where they are."""
        # The step at which each seed's gated anneal was triggered (anneal.NOT_TRIGGERED
        # until then), kept in the checkpoint's metadata.
        self.triggers = {
            n: np.full(len(self.seeds), anneal.NOT_TRIGGERED, np.int32) for n in self.annealed
        }
        restored = restore_latest_or_refuse(self.checkpointer, tree, self.check_config)
        if restored is not None:
            self.step, tree, self.records = restored.step, restored.state, restored.meta["metrics"]
            tree = training.shard_seeds(tree, self.mesh)
            self.resumed_from = self.step
            for n in self.annealed:
                self.triggers[n] = np.asarray(restored.meta["triggers"][n], np.int32)
        self.tree = tree
        if self.train_config.data_source == "numpy":
            # Drawn ahead, in worker processes, while the devices run a step.
            if restored is not None:
                self.streams = host_data.ParallelStreams.from_states(restored.meta["streams"])
            else:
                self.streams = host_data.ParallelStreams(
                    self.task, seeds=self.seeds, batch_size=self.train_config.batch_size
                )

    def _write_run_description(self) -> None:
        description = _run_description(self.config, self.names) | {
            "config_fingerprint": self.fingerprint,
            "seed_groups": self.groups,
        }
        if self.primary:
            _atomic_write(self.workdir / RUN_CONFIG_FILE, json.dumps(description, indent=1))

    def _build_steps(self) -> None:
        """The validation sets on the devices, and the jitted training and evaluation
        steps."""
        train, task = self.train_config, self.task
        val_sets = [
            data.reference_validation_set(
                task, seed=int(s), num_batches=train.val_batches, batch_size=train.val_batch_size
            )
            for s in self.seeds
        ]
        stack = lambda i: jnp.asarray(np.stack([v[i] for v in val_sets]))
        self.val_inputs = training.shard_seeds(stack(0), self.mesh)
        self.val_targets = training.shard_seeds(stack(1), self.mesh)
        sample = None
        if self.streams is None:
            sample = lambda key: data.sample_noisy_recall(key, task, batch_size=train.batch_size)
        self.train_step = training.make_train_step(
            self.configs,
            self.optimizer,
            sample,
            segment_length=train.get("segment_length"),
            seed_groups=self.groups,
        )
        self.eval_step = training.make_eval_step(self.configs, seed_groups=self.groups)

    # -- bookkeeping ------------------------------------------------------------------

    def _count_solved(self, record) -> None:
        if record["nonfinite"]:
            self.solved[record["read"]].discard(record["seed"])
        elif record["accuracy"] is not None and record["accuracy"] >= self.config.solved_threshold:
            self.solved[record["read"]].add(record["seed"])

    def _solved_counts(self) -> dict[str, int]:
        return {n: len(s) for n, s in self.solved.items()}

    def _meta(self) -> dict:
        # A copy: Orbax writes the JSON item asynchronously, after more records are appended.
        return {
            "step": self.step,
            "metrics": list(self.records),
            "streams": None if self.streams is None else self.streams.states(),
            "config": self.config_dict,
            "config_fingerprint": self.fingerprint,
            "triggers": {n: t.tolist() for n, t in self.triggers.items()},
        }

    def _budgets(self) -> dict:
        """Read -> each seed's step budget: train.steps, longer for a seed whose gated
        anneal ends after it (anneal.AnnealSchedule.budget)."""
        steps = self.train_config.steps
        out = {n: np.full(len(self.seeds), steps, np.int64) for n in self.names}
        for n in self.annealed:
            out[n] = self.schedule.budget(self.triggers[n], steps)
        return out

    def total_steps(self) -> int:
        return int(max(b.max() for b in self._budgets().values()))

    def _write_metrics(self) -> None:
        if self.primary:
            _atomic_write(
                self.workdir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.records)
            )

    def _shard(self, tree):
        return training.shard_seeds(tree, self.mesh)

    # -- train ------------------------------------------------------------------------

    def train(self, tensorboard: bool, console) -> None:
        """Steps until the budget is spent or a signal asks to stop (then a checkpoint
        is written and KeyboardInterrupt raised)."""
        train = self.train_config
        self.summaries = None
        if tensorboard:
            self.summaries = RunSummaries(
                self.workdir / TENSORBOARD_DIR,
                self.names,
                self.seeds[: self.num_seeds],
                purge_step=self.resumed_from,
            )
        self.progress = Progress(self.total_steps(), self.step, train.log_every, stream=console)
        self._note_start()
        # Ctrl-C / SIGTERM stop between steps, with a checkpoint (experiments.study.stopping).
        self.stop = StopOnSignal()
        self.timer = self.first_step = None
        try:
            with self.progress:
                while self.step < self.total_steps():
                    self._one_step()
                    # All processes stop at the same step, whichever one was signalled.
                    if multihost.any_process(self.stop.requested):
                        break
        finally:
            self.stop.restore()
            if self.summaries is not None:
                self.summaries.close()
        if self.step < self.total_steps():  # Stopped by a signal, between two steps.
            self._checkpoint_and_interrupt()

    def _note_start(self) -> None:
        if self.resumed_from is not None:
            damaged = "".join(
                f"; checkpoint of step {r.step} failed verification, moved to {r.moved_to.name}"
                for r in self.checkpointer.rejected
            )
            self.progress.note(f"resuming {self.workdir} from step {self.resumed_from}{damaged}")
        if self.groups > 1:
            self.progress.note(
                f"the seeds of each device run in {self.groups} groups one after the other: "
                "all at once would not fit in its memory (same results, proportionally slower)"
            )

    def _one_step(self) -> None:
        """One training step of every read and seed, then its evaluation, log and
        checkpoint where they are due."""
        train = self.train_config
        budget = self._budgets()
        step_metrics = self._advance(budget)
        step = self.step
        ends = step == train.steps or any(np.any(step == b) for b in budget.values())
        evaluate_now = step % train.eval_every == 0 or ends
        log_now = step % train.log_every == 0 or ends
        if evaluate_now or log_now:
            metrics, bad = self._host_metrics(step_metrics, budget)
        if evaluate_now:
            self._evaluate_and_record(metrics, bad, budget)
        if log_now:
            self._log(metrics, bad)
        self.checkpointer.save(step, self.tree, self._meta(), force=step >= self.total_steps())

    def _advance(self, budget) -> dict:
        """The jitted step on the next batch; the step counter moves on."""
        read_mix = active = None
        if self.annealed:
            read_mix = self._shard(
                {n: self.schedule.alpha(self.step, self.triggers[n]) for n in self.annealed}
            )
            active = self._shard({n: self.step < budget[n] for n in self.names})
        batch = None
        if self.streams is not None:
            batch = self._shard(self.streams.next_batches())
            if self.timer is not None and self.step == self.first_step + THROTTLE_CHECK_STEPS:
                elapsed = time.perf_counter() - self.timer
                _note_if_data_throttles(self.progress, self.streams, elapsed)
        # The anneal's arguments only when there is one: the step of a run without it is
        # the program it always was.
        anneal_args = (read_mix, active) if self.annealed else ()
        new_states, new_keys, step_metrics = self.train_step(
            self.tree["states"], self.tree["keys"], batch, *anneal_args
        )
        self.tree = {"states": new_states, "keys": new_keys}
        if not self.stop.armed:
            self.stop.arm()
            # Compiled: from here the wait for data is compared with the steps.
            self.timer, self.first_step = time.perf_counter(), self.step + 1
            if self.streams is not None:
                self.streams.wait_seconds = 0.0
        self.step += 1
        self.progress.advance(self.step)
        return step_metrics

    def _host_metrics(self, step_metrics, budget):
        """The step's loss and gradient norm and the seeds' divergence flags on the host,
        padding seeds (several devices) dropped."""
        n_seeds = self.num_seeds
        metrics, bad = multihost.host_copy(
            (step_metrics, {n: self.tree["states"][n].nonfinite for n in self.names})
        )
        metrics = {n: {k: v[:n_seeds] for k, v in m.items()} for n, m in metrics.items()}
        bad = {n: b[:n_seeds] for n, b in bad.items()}
        for n in self.names if self.annealed else ():
            # Seeds past their budget were not trained: no loss to show.
            spent = self.step > budget[n][:n_seeds]
            for key in ("loss", "grad_norm"):
                metrics[n][key] = np.where(spent, np.nan, metrics[n][key])
        return metrics, bad

    def _evaluate_and_record(self, metrics, bad, budget) -> None:
        """Every seed's validation accuracy and loss: metrics.jsonl, TensorBoard, the
        console, and (gated anneals) the seeds whose anneal it triggers."""
        step, seeds = self.step, self.seeds[: self.num_seeds]
        eval_mix = ()
        if self.annealed:
            eval_mix = (
                self._shard(
                    {n: self.schedule.alpha(step, self.triggers[n]) for n in self.annealed}
                ),
            )
        results = multihost.host_copy(
            self.eval_step(self.tree["states"], self.val_inputs, self.val_targets, *eval_mix)
        )
        new_records = _evaluation_records(step, self.names, seeds, results, metrics, bad)
        if self.annealed:
            new_records = self._note_anneal(new_records, results, budget)
        for record in new_records:
            self.records.append(record)
            self._count_solved(record)
        self._write_metrics()
        if self.summaries is not None:
            self.summaries.evaluation(step, new_records, self._solved_counts())
        if self.progress.is_bar:  # The bar keeps no history: one line per evaluation.
            self.progress.note(
                _evaluation_line(step, self.names, new_records, self.solved, self.num_seeds)
            )

    def _note_anneal(self, new_records, results, budget) -> list[dict]:
        """An annealed run's rows (``_anneal_fields``), with the triggers this
        evaluation sets and the run extended where a late trigger needs it."""
        step = self.step
        new_records = _anneal_fields(
            new_records, step, self.seeds[: self.num_seeds], self.schedule, self.triggers, budget
        )
        for n in self.annealed:
            accuracy = np.where(step <= budget[n], results[n]["accuracy"], np.nan)
            self.triggers[n] = self.schedule.triggered(self.triggers[n], step, accuracy)
        if self.total_steps() > self.progress.total:
            self.progress.note(
                f"a seed triggered its anneal at step {step}: the run goes on to step "
                f"{self.total_steps()} so that its last evaluation is at alpha = 0"
            )
            self.progress.extend(self.total_steps())
        return new_records

    def _log(self, metrics, bad) -> None:
        """train_log.jsonl, the console's status and TensorBoard's training curves."""
        step = self.step
        if self.primary:
            rows = _train_log_rows(
                step,
                self.names,
                self.seeds[: self.num_seeds],
                metrics,
                bad,
                self.learning_rate(step - 1),
            )
            _append_train_log(self.workdir / TRAIN_LOG_FILE, rows)
        nonfinite = {n: int(np.sum(bad[n])) for n in self.names}
        mean_loss = {n: finite_mean(metrics[n]["loss"]) for n in self.names}
        self.progress.update(step, mean_loss, self._solved_counts(), self.num_seeds, nonfinite)
        if self.summaries is not None:
            self.summaries.train(step, metrics)

    def _checkpoint_and_interrupt(self) -> None:
        step = self.step
        print(f"\ninterrupted at step {step}: writing a checkpoint...", flush=True)
        self.checkpointer.save(step, self.tree, self._meta(), force=True)
        self.checkpointer.close()
        self._write_metrics()
        print(f"checkpoint of step {step} saved; run the same command to resume.", flush=True)
        raise KeyboardInterrupt

    # -- finish -----------------------------------------------------------------------

    def finish(self) -> dict:
        """The last metrics and checkpoint, then the report (process 0 writes it, the
        others read it)."""
        from experiments import report  # Plotting stays out of library imports.

        self.checkpointer.close()
        self._write_metrics()
        if self.primary:
            results = report.build_report(self.workdir)
            print(report.format_summary(results), flush=True)
        multihost.sync("report")
        if not self.primary:
            results = json.loads((self.workdir / report.RESULTS_JSON).read_text())
        return results

    def close(self) -> None:
        self.checkpointer.close()
        if self.streams is not None:
            self.streams.close()


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
