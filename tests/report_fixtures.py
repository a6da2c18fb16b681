"""Hand-written training workdirs for the tests of experiments.report.

The synthetic study (:func:`study_rows`) is the replication's v80/s512 batch-16 cell
(REFERENCE.md section 5): 3/16 raw vs 9/16 ns5 seeds solved. tests/conftest.py builds its
report once per session (the ``report_study`` fixture).
"""

from __future__ import annotations

import json

from experiments.report import build, records, statistics

EVAL_EVERY, TOTAL_STEPS = 200, 2000
STEPS = list(range(EVAL_EVERY, TOTAL_STEPS + 1, EVAL_EVERY))
CHANCE, SOLVED_ACC = 0.03, 0.9

# seed -> escape step; every other seed stays at chance.
RAW_ESCAPES = {2: 1400, 5: 1800, 11: 2000}
NS5_ESCAPES = {0: 800, 1: 1000, 3: 1000, 4: 1200, 6: 1400, 8: 1400, 9: 1600, 12: 1800, 15: 2000}
NUM_SEEDS = 16


def row(read, seed, step, accuracy, nonfinite=False):
    return {
        "read": read,
        "seed": seed,
        "step": step,
        "accuracy": accuracy,
        "loss": 3.0,
        "train_loss": 3.0,
        "nonfinite": nonfinite,
    }


def final(seed, solved):
    """Distinct final accuracies per seed, so that the variances are not degenerate."""
    return SOLVED_ACC + 0.004 * seed if solved else CHANCE + 0.001 * seed


def seed_rows(read, seed, escape=None, steps=STEPS):
    """Chance until the evaluation before ``escape`` (0.5 there: close, not solved), then
    solved; the last evaluation holds the seed's distinct final accuracy."""
    rows = []
    for step in steps:
        if escape is None or step < escape - EVAL_EVERY:
            acc = CHANCE
        elif step < escape:
            acc = 0.5
        else:
            acc = SOLVED_ACC
        rows.append(row(read, seed, step, acc))
    rows[-1]["accuracy"] = final(seed, escape is not None)
    return rows


def make_config(**overrides):
    config = {
        "name": "unit",
        "regime": "v80_s512",
        "total_steps": TOTAL_STEPS,
        "eval_every": EVAL_EVERY,
        "reads": ["raw", "ns5"],
        "num_seeds": NUM_SEEDS,
        "solved_threshold": 0.8,
        "batch_size": 16,
        "vocab_size": 80,
        "seq_len": 512,
        "opaque_key": {"kept": True},
    }
    config.update(overrides)
    return config


def write_workdir(path, rows, config=None):
    path.mkdir(parents=True, exist_ok=True)
    # json.dumps writes float NaN as the NaN literal, as Python trainers do.
    (path / records.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / records.CONFIG_FILE).write_text(json.dumps(config))
    return path


def study_rows():
    rows = []
    for read, escapes in (("raw", RAW_ESCAPES), ("ns5", NS5_ESCAPES)):
        for seed in range(NUM_SEEDS):
            rows += seed_rows(read, seed, escapes.get(seed))
    # Accuracy exactly at the threshold counts: ns5 seed 4 reaches 0.8 at step 1200.
    next(r for r in rows if (r["read"], r["seed"], r["step"]) == ("ns5", 4, 1200))["accuracy"] = 0.8
    return rows


def build_study(workdir):
    """Writes the study into ``workdir`` and builds its report: ``(workdir, results)``."""
    write_workdir(workdir, study_rows(), make_config())
    return workdir, build.build_report(workdir)


def analyze_workdir(workdir, threshold=None):
    """The results of ``workdir`` as :func:`statistics.analyze` returns them (no outputs)."""
    return statistics.analyze(
        records.load_metrics(workdir), records.load_run_config(workdir), threshold
    )


def write_regime_workdirs(parent):
    """Two regime workdirs under ``parent`` (v80_s512: raw 1/2, v96_s1024: raw 0/2; ns5
    2/2 in both) and a sub-directory that is not a workdir."""
    for regime, raw_escapes in (("v80_s512", {0: 1600}), ("v96_s1024", {})):
        rows = [
            r
            for s in range(2)
            for read, escapes in (("raw", raw_escapes), ("ns5", {0: 800, 1: 1000}))
            for r in seed_rows(read, s, escapes.get(s))
        ]
        write_workdir(parent / regime, rows, make_config(regime=regime, num_seeds=2))
    (parent / "not_a_workdir").mkdir()
    return parent
