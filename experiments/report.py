"""Rebuild the study's tables, tests and plots from a training workdir.

    python -m experiments.report --workdir=DIR [--threshold=0.8]

Reads only ``DIR/metrics.jsonl`` (one evaluation per line per read and seed) and
``DIR/run_config.json`` (optional; missing keys are inferred from the metrics) and writes
into ``DIR``:

* ``results.json`` -- per read and seed: final and best accuracy, escape step, solved and
  nonfinite flags; per read: solved count, mean final accuracy with a 95% Student t
  interval, median escape step; per comparison of a read with the baseline (the first
  read): Fisher exact p on solved counts, log-rank p on escape times, the difference in
  mean final accuracy with a 95% Welch interval and a crude escape-rate ratio;
* ``results.md`` -- the study's table (rows = reads) plus a per-seed table;
* ``accuracy_curves.png``, ``escape_curves.png`` (Kaplan-Meier), ``solved_counts.png``.

If ``DIR`` has no ``metrics.jsonl`` but sub-directories that do (one per regime), the CLI
reports each of them and draws one ``DIR/solved_counts.png`` grouped by regime.

Diverged seeds (``nonfinite``: the training loss went NaN/Inf) are counted as unsolved
(divergence is a terminal failure, so for the log-rank test and the Kaplan-Meier curves
they are censored at the end of the run, not at the divergence), and their final accuracy
is left out of the mean final accuracy (after divergence it measures nothing) -- each
read reports ``num_nonfinite`` so that the exclusion is visible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_THRESHOLD",
    "SeedCurve",
    "Metrics",
    "load_metrics",
    "load_run_config",
    "analyze",
    "seed_outcome",
    "summarize_read",
    "compare_reads",
    "mean_confidence_interval",
    "welch_difference",
    "escape_events",
    "chance_accuracy",
    "format_markdown",
    "format_summary",
    "plot_accuracy_curves",
    "plot_escape_curves",
    "plot_solved_counts",
    "solved_counts",
    "build_report",
    "find_regime_workdirs",
    "build_regime_reports",
]

DEFAULT_THRESHOLD = 0.8
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "run_config.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ACCURACY_PNG = "accuracy_curves.png"
ESCAPE_PNG = "escape_curves.png"
SOLVED_PNG = "solved_counts.png"
CONFIDENCE = 0.95
NONFINITE_POLICY = (
    "A seed whose training loss went NaN/Inf is unsolved (escape_step null, censored at the "
    "end of the run) and its final accuracy is excluded from mean_final_accuracy; "
    "num_nonfinite counts such seeds.")

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeedCurve:
    """The evaluations of one (read, seed), sorted by step, duplicates resolved.

    Attributes:
        read: read name, e.g. ``"raw"`` or ``"ns5"``.
        seed: training seed.
        steps: int array of evaluation steps, strictly increasing.
        accuracy: float array, NaN where the trainer logged NaN or null.
        nonfinite: bool array, the trainer's per-evaluation ``nonfinite`` flag.
    """

    read: str
    seed: int
    steps: np.ndarray
    accuracy: np.ndarray
    nonfinite: np.ndarray


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Everything read from ``metrics.jsonl``.

    Attributes:
        curves: read -> seed -> :class:`SeedCurve`; reads in order of first appearance,
            seeds ascending.
        num_lines: evaluation lines read (including duplicates).
        num_duplicates: lines superseded by a later line for the same (read, seed, step),
            as a resumed run writes them.
        num_skipped: lines that were not valid JSON (e.g. a line cut short by a crash)
            and were skipped.
    """

    curves: dict[str, dict[int, SeedCurve]]
    num_lines: int
    num_duplicates: int
    num_skipped: int


def _as_accuracy(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: accuracy must be a number or null, got {value!r}")
    return float(value)


def load_metrics(workdir: str | Path) -> Metrics:
    """Reads ``workdir/metrics.jsonl``; the last line for a (read, seed, step) wins.

    Raises:
        ValueError: naming the file, when it is missing, holds no evaluation, or a line
            is a JSON value without the ``read``, ``seed``, ``step`` and ``accuracy``
            fields.
    """
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found (is --workdir a training workdir?)")
    # (read, seed, step) -> (accuracy, nonfinite); dict order = first appearance, which
    # fixes the read order when run_config.json does not list the reads.
    records: dict[tuple[str, int, int], tuple[float, bool]] = {}
    num_lines = num_skipped = 0
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A crash mid-write leaves a partial line that a resumed run appends to;
                # its evaluations are rewritten after the resume, so skipping loses nothing.
                _log.warning("%s: not valid JSON, skipped", where)
                num_skipped += 1
                continue
            if not isinstance(row, dict) or not {"read", "seed", "step", "accuracy"} <= row.keys():
                raise ValueError(f"{where}: expected an object with read, seed, step, accuracy")
            try:
                key = (str(row["read"]), int(row["seed"]), int(row["step"]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: seed and step must be integers ({e})") from e
            records[key] = (_as_accuracy(row["accuracy"], where), bool(row.get("nonfinite", False)))
            num_lines += 1
    if not records:
        raise ValueError(f"{path}: empty, no evaluation has been written yet")

    grouped: dict[str, dict[int, list[tuple[int, float, bool]]]] = {}
    for (read, seed, step), (accuracy, nonfinite) in records.items():
        grouped.setdefault(read, {}).setdefault(seed, []).append((step, accuracy, nonfinite))
    curves = {}
    for read, by_seed in grouped.items():
        curves[read] = {}
        for seed in sorted(by_seed):
            rows = sorted(by_seed[seed])
            curves[read][seed] = SeedCurve(
                read=read, seed=seed,
                steps=np.array([r[0] for r in rows], dtype=np.int64),
                accuracy=np.array([r[1] for r in rows], dtype=np.float64),
                nonfinite=np.array([r[2] for r in rows], dtype=bool))
    return Metrics(curves=curves, num_lines=num_lines,
                   num_duplicates=num_lines - len(records), num_skipped=num_skipped)


def load_run_config(workdir: str | Path) -> dict:
    """Returns ``workdir/run_config.json`` as a dict, or ``{}`` when the file is absent.

    Raises:
        ValueError: naming the file, when it is not a JSON object.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


def _finite_or_none(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def mean_confidence_interval(values: Sequence[float], confidence: float = CONFIDENCE
                             ) -> tuple[float | None, float | None, float | None]:
    """Mean of ``values`` with a Student t interval over them (sample std, ddof=1).

    Returns:
        ``(mean, low, high)``; the bounds are None with fewer than two values, all three
        are None with none.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None, None, None
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    half = stats.t.ppf(0.5 + confidence / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def welch_difference(baseline: Sequence[float], treatment: Sequence[float],
                     confidence: float = CONFIDENCE) -> dict:
    """``mean(treatment) - mean(baseline)`` with a Welch (unequal variances) t interval.

    Returns:
        dict with ``difference``, ``ci`` ([low, high]), ``df`` and ``p`` (two-sided);
        entries that are undefined (fewer than two values in a group, or both groups
        constant) are None.
    """
    from scipy import stats

    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(treatment, dtype=np.float64)
    out = {"difference": None, "ci": [None, None], "df": None, "p": None}
    if a.size == 0 or b.size == 0:
        return out
    diff = float(b.mean() - a.mean())
    out["difference"] = diff
    if a.size < 2 or b.size < 2:
        return out
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return out
    # Welch-Satterthwaite degrees of freedom.
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df=df) * se
    out.update(ci=[diff - half, diff + half], df=float(df),
               p=float(2 * stats.t.sf(abs(diff) / se, df=df)))
    return out


def seed_outcome(curve: SeedCurve, threshold: float, final_step: int) -> dict:
    """Summarizes one seed's evaluations.

    Args:
        curve: the seed's evaluations.
        threshold: accuracy at or above which the seed counts as escaped.
        final_step: the run's last step; diverged seeds are censored there.

    Returns:
        dict with ``seed``, ``final_accuracy`` (accuracy at the last evaluation, NaN if
        not finite), ``best_accuracy`` (NaN if no finite evaluation), ``escape_step``
        (first evaluation step with accuracy >= threshold, None if never or if the seed
        diverged), ``solved``, ``nonfinite``, ``diverged_step`` (first evaluation flagged
        nonfinite, else None), ``last_step`` and ``censor_step`` (None when solved, else
        the step up to which the seed is known not to have escaped).
    """
    accuracy = curve.accuracy
    finite = np.isfinite(accuracy)
    flagged = np.flatnonzero(curve.nonfinite)
    diverged_step = int(curve.steps[flagged[0]]) if flagged.size else None
    nonfinite = diverged_step is not None
    crossings = curve.steps[finite & (accuracy >= threshold)]
    escape_step = int(crossings[0]) if crossings.size and not nonfinite else None
    last_step = int(curve.steps[-1])
    if escape_step is not None:
        censor_step = None
    else:
        # A diverged run can never escape, so it is known unsolved to the end of the run;
        # a run that is merely unfinished is only known unsolved up to its last evaluation.
        censor_step = max(final_step, last_step) if nonfinite else last_step
    return {
        "seed": curve.seed,
        "final_accuracy": float(accuracy[-1]),
        "best_accuracy": float(accuracy[finite].max()) if finite.any() else math.nan,
        "escape_step": escape_step,
        "solved": escape_step is not None,
        "nonfinite": nonfinite,
        "diverged_step": diverged_step,
        "last_step": last_step,
        "censor_step": censor_step,
    }


def _mean_sample(read_summary: Mapping) -> list[float]:
    """The final accuracies that enter the mean: finite, of seeds that did not diverge."""
    return [acc for acc, bad in zip(read_summary["final_accuracy"], read_summary["nonfinite"])
            if not bad and acc is not None and math.isfinite(acc)]


def escape_events(read_summary: Mapping) -> tuple[list[int], list[int]]:
    """``(escape steps of solved seeds, censoring steps of unsolved seeds)`` of one read."""
    escaped = [s for s in read_summary["escape_step"] if s is not None]
    censored = [c for c in read_summary["censor_step"] if c is not None]
    return escaped, censored


def summarize_read(outcomes: Sequence[Mapping]) -> dict:
    """Per-read summary of :func:`seed_outcome` dicts (in seed order).

    Returns:
        dict with per-seed lists (``seeds``, ``final_accuracy``, ``best_accuracy``,
        ``escape_step``, ``is_solved``, ``nonfinite``, ``diverged_step``, ``last_step``,
        ``censor_step``) and ``num_seeds``, ``solved``, ``solved_fraction``,
        ``num_nonfinite``, ``num_in_mean``, ``mean_final_accuracy``,
        ``mean_final_accuracy_ci``, ``std_final_accuracy``, ``median_escape_step``
        (None if no seed solved) and ``escape_rate_per_1k_steps`` (escapes per 1,000
        seed-steps at risk: a constant-hazard estimate).
    """
    per_seed_keys = {"seeds": "seed", "final_accuracy": "final_accuracy",
                     "best_accuracy": "best_accuracy", "escape_step": "escape_step",
                     "is_solved": "solved", "nonfinite": "nonfinite",
                     "diverged_step": "diverged_step", "last_step": "last_step",
                     "censor_step": "censor_step"}
    summary: dict[str, Any] = {name: [o[key] for o in outcomes] for name, key in per_seed_keys.items()}
    sample = _mean_sample(summary)
    mean, low, high = mean_confidence_interval(sample)
    escaped, censored = escape_events(summary)
    exposure = sum(escaped) + sum(censored)
    summary.update(
        num_seeds=len(outcomes),
        solved=len(escaped),
        solved_fraction=len(escaped) / len(outcomes) if outcomes else None,
        num_nonfinite=int(sum(summary["nonfinite"])),
        num_in_mean=len(sample),
        mean_final_accuracy=mean,
        mean_final_accuracy_ci=[low, high],
        std_final_accuracy=float(np.std(sample, ddof=1)) if len(sample) > 1 else None,
        median_escape_step=float(np.median(escaped)) if escaped else None,
        escape_rate_per_1k_steps=1000 * len(escaped) / exposure if exposure else None,
    )
    return summary


def _logrank(baseline: Mapping, treatment: Mapping) -> tuple[float | None, float | None]:
    """Two-sided log-rank test of escape times; ``(Z, p)`` with Z > 0 when the treatment
    escapes more than expected under the null. None when undefined (no escape at all)."""
    from scipy import stats

    t_escaped, t_censored = escape_events(treatment)
    b_escaped, b_censored = escape_events(baseline)
    if not t_escaped and not b_escaped:
        return None, None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # A zero variance (e.g. every seed escaping at one step) gives NaN, reported as None.
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.logrank(stats.CensoredData(uncensored=t_escaped, right=t_censored),
                            stats.CensoredData(uncensored=b_escaped, right=b_censored))
    return _finite_or_none(res.statistic), _finite_or_none(res.pvalue)


def compare_reads(baseline_name: str, baseline: Mapping, treatment_name: str,
                  treatment: Mapping) -> dict:
    """Compares a read with the baseline, both as returned by :func:`summarize_read`.

    Returns:
        dict with ``baseline``, ``treatment`` (names), ``fisher_table``
        ([[treatment solved, unsolved], [baseline solved, unsolved]]), ``fisher_p``
        (two-sided exact), ``logrank_statistic`` (signed Z, > 0 = treatment escapes
        faster), ``logrank_p``, ``accuracy_difference`` (treatment minus baseline mean
        final accuracy) with ``accuracy_difference_ci``, ``welch_df``, ``welch_p``, and
        ``escape_rate_ratio`` (treatment over baseline escape rate; None if the baseline
        never escaped).
    """
    from scipy import stats

    table = [[treatment["solved"], treatment["num_seeds"] - treatment["solved"]],
             [baseline["solved"], baseline["num_seeds"] - baseline["solved"]]]
    fisher_p = float(stats.fisher_exact(table, alternative="two-sided").pvalue)
    z, logrank_p = _logrank(baseline, treatment)
    welch = welch_difference(_mean_sample(baseline), _mean_sample(treatment))
    b_rate, t_rate = baseline["escape_rate_per_1k_steps"], treatment["escape_rate_per_1k_steps"]
    return {
        "baseline": baseline_name,
        "treatment": treatment_name,
        "fisher_table": table,
        "fisher_p": fisher_p,
        "logrank_statistic": z,
        "logrank_p": logrank_p,
        "accuracy_difference": welch["difference"],
        "accuracy_difference_ci": welch["ci"],
        "welch_df": welch["df"],
        "welch_p": welch["p"],
        "escape_rate_ratio": t_rate / b_rate if b_rate and t_rate is not None else None,
    }


def chance_accuracy(config: Mapping) -> float | None:
    """Chance recall accuracy, 1 / number of value tokens, from the task in ``config``.

    None when ``config`` lacks ``vocab_size`` or ``seq_len`` or describes no valid task.
    """
    from orthorecall import data  # the token layout lives there; imports jax, hence lazy

    try:  # Task fields the config does not record take the reference task's values.
        task = data.NoisyRecallTask.from_mapping(config)
    except (TypeError, ValueError):
        return None
    return 1.0 / task.num_values


def _gcd_step(curves: Mapping[str, Mapping[int, SeedCurve]]) -> int | None:
    steps = np.concatenate([c.steps for by_seed in curves.values() for c in by_seed.values()])
    steps = steps[steps > 0]
    return int(np.gcd.reduce(steps)) if steps.size else None


def analyze(metrics: Metrics, config: Mapping, threshold: float | None = None) -> dict:
    """Builds the results dict (see :func:`build_report`) without touching the disk.

    Args:
        metrics: as returned by :func:`load_metrics`.
        config: run_config.json contents (``{}`` if absent); missing keys are inferred
            from ``metrics``.
        threshold: solved threshold; default ``config["solved_threshold"]``, else 0.8.

    Raises:
        ValueError: if the threshold is not in (0, 1].
    """
    if threshold is None:
        threshold = float(config.get("solved_threshold", DEFAULT_THRESHOLD))
    if not 0 < threshold <= 1:
        raise ValueError(f"the solved threshold must be in (0, 1], got {threshold}")
    curves = metrics.curves
    last_seen = max(int(c.steps[-1]) for by_seed in curves.values() for c in by_seed.values())
    final_step = int(config.get("total_steps") or last_seen)
    # Baseline first: the configured order, then reads only the metrics mention.
    configured = [r for r in config.get("reads", []) if r in curves]
    reads = configured + [r for r in curves if r not in configured]

    summaries = {}
    for read in reads:
        outcomes = [seed_outcome(c, threshold, final_step) for c in curves[read].values()]
        summaries[read] = summarize_read(outcomes)
    comparisons = {r: compare_reads(reads[0], summaries[reads[0]], r, summaries[r])
                   for r in reads[1:]}
    return {
        "name": config.get("name"),
        "regime": config.get("regime"),
        "threshold": threshold,
        "total_steps": final_step,
        "eval_every": config.get("eval_every") or _gcd_step(curves),
        "num_seeds_configured": config.get("num_seeds"),
        "reads_configured": list(config.get("reads", [])),
        "chance_accuracy": chance_accuracy(config),
        "baseline": reads[0],
        "reads": summaries,
        # `comparison` is the first (usually only) comparison with the baseline.
        "comparison": comparisons[reads[1]] if len(reads) > 1 else None,
        "comparisons": comparisons,
        "nonfinite_policy": NONFINITE_POLICY,
        "input": {"metrics_lines": metrics.num_lines, "duplicate_lines": metrics.num_duplicates,
                  "skipped_lines": metrics.num_skipped},
        "config": dict(config),
    }


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _step(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _mean_with_ci(summary: Mapping) -> str:
    mean, (low, high) = summary["mean_final_accuracy"], summary["mean_final_accuracy_ci"]
    if low is None:
        return _pct(mean)
    return f"{100 * mean:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _difference(comparison: Mapping) -> str:
    diff, (low, high) = comparison["accuracy_difference"], comparison["accuracy_difference_ci"]
    if diff is None:
        return "n/a"
    text = f"{100 * diff:+.1f} points"
    return text if low is None else f"{text} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _title(results: Mapping) -> str:
    parts = [p for p in (results.get("regime"), results.get("name")) if p]
    return " / ".join(dict.fromkeys(str(p) for p in parts)) or "run"


def _solved_note(summary: Mapping) -> str:
    n = summary["num_nonfinite"]
    return f" ({n} diverged)" if n else ""


def format_summary(results: Mapping) -> str:
    """A compact multi-line summary for stdout: one line per read and per comparison."""
    lines = [f"{_title(results)}: solved = accuracy >= {results['threshold']:g} "
             f"by step {results['total_steps']}"]
    for read, s in results["reads"].items():
        lines.append(
            f"  {read}: {s['solved']}/{s['num_seeds']} solved{_solved_note(s)}, "
            f"mean final acc {_mean_with_ci(s)}, median escape step {_step(s['median_escape_step'])}")
    for c in results["comparisons"].values():
        lines.append(
            f"  {c['treatment']} vs {c['baseline']}: Fisher p={_p(c['fisher_p'])}, "
            f"log-rank p={_p(c['logrank_p'])}, accuracy difference {_difference(c)}")
    return "\n".join(lines)


def _seed_cell(summary: Mapping, i: int) -> str:
    acc = _pct(summary["final_accuracy"][i])
    if summary["nonfinite"][i]:
        return f"{acc} | diverged at {summary['diverged_step'][i]}"
    escape = summary["escape_step"][i]
    return f"{acc} | {'-' if escape is None else escape}"


def format_markdown(results: Mapping) -> str:
    """``results.md``: the study's table, the tests, and a per-seed table."""
    reads = results["reads"]
    lines = [f"# {_title(results)}", "",
             f"Solved = validation accuracy >= {results['threshold']:g} at some evaluation "
             f"(every {results['eval_every']} steps, {results['total_steps']} steps). "
             "Mean final accuracy with a 95% Student t interval over seeds.", "",
             "| read | solved / N | mean final accuracy [95% CI] | median escape step |",
             "|---|---|---|---|"]
    for read, s in reads.items():
        lines.append(f"| {read} | {s['solved']}/{s['num_seeds']}{_solved_note(s)} | "
                     f"{_mean_with_ci(s)} | {_step(s['median_escape_step'])} |")
    lines.append("")
    for c in results["comparisons"].values():
        ratio = c["escape_rate_ratio"]
        lines.append(
            f"**{c['treatment']} vs {c['baseline']}:** Fisher exact p = {_p(c['fisher_p'])}; "
            f"log-rank p = {_p(c['logrank_p'])}; accuracy difference {_difference(c)} "
            f"(95% Welch CI); escape-rate ratio "
            f"{'n/a' if ratio is None else f'{ratio:.2g}x'} (constant-hazard estimate).")
        lines.append("")
    if any(s["num_nonfinite"] for s in reads.values()):
        lines += [f"Diverged seeds: {results['nonfinite_policy']}", ""]
    configured, end = results.get("num_seeds_configured"), results["total_steps"]
    for read, s in reads.items():
        if configured and s["num_seeds"] < configured:
            lines += [f"Incomplete: {read} has metrics for {s['num_seeds']} of {configured} "
                      "configured seeds.", ""]
        # Diverged seeds may stop early by design; other early stops are unfinished runs.
        unfinished = [str(seed) for seed, last, bad in zip(s["seeds"], s["last_step"], s["nonfinite"])
                      if last < end and not bad]
        if unfinished:
            lines += [f"Unfinished: {read} seeds {', '.join(unfinished)} have no evaluation at "
                      f"step {end} (censored at their last evaluation).", ""]

    # Per-seed table over the union of seeds; a read without that seed shows blanks.
    seeds = sorted({seed for s in reads.values() for seed in s["seeds"]})
    lines += ["## Per seed (final accuracy | escape step)", "",
              "| seed | " + " | ".join(f"{r} final acc | {r} escape step" for r in reads) + " |",
              "|---|" + "---|---|" * len(reads)]
    for seed in seeds:
        cells = [_seed_cell(s, s["seeds"].index(seed)) if seed in s["seeds"] else " | "
                 for s in reads.values()]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, no backend switch in the caller)
# ---------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _reference_lines(ax, threshold: float, chance: float | None) -> None:
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
               label=f"threshold {threshold:g}")
    if chance is not None:
        ax.axhline(chance, color="0.4", linestyle=":", linewidth=1.2,
                   label=f"chance {100 * chance:.1f}%")


def _right_edge(results: Mapping) -> float:
    # A margin past the last step, so that what happens at the last evaluation (an escape,
    # a final point) is not drawn on the frame.
    return 1.04 * results["total_steps"]


def plot_accuracy_curves(curves: Mapping[str, Mapping[int, SeedCurve]], results: Mapping,
                         path: str | Path) -> None:
    """Validation accuracy vs step for every seed, one panel per read (shared y in [0, 1]).

    Solved seeds are drawn in the read's colour, unsolved ones in grey, diverged ones
    in red; the threshold and chance levels are dashed and dotted lines.
    """
    reads = list(results["reads"])
    fig = _figure(5.2 * len(reads) + 0.6, 4.4)
    axes = fig.subplots(1, len(reads), sharey=True, squeeze=False)[0]
    for i, (ax, read) in enumerate(zip(axes, reads)):
        summary = results["reads"][read]
        # Diverged seeds are drawn last, or the chance plateau's grey would hide them.
        styles = {"solved": dict(color=f"C{i}", alpha=0.8, linewidth=1.3, zorder=2),
                  "unsolved": dict(color="0.55", alpha=0.6, linewidth=1.0, zorder=2),
                  "diverged": dict(color="tab:red", alpha=0.9, linewidth=1.2, linestyle="--",
                                   zorder=3)}
        counts = dict.fromkeys(styles, 0)
        for seed, solved, bad in zip(summary["seeds"], summary["is_solved"], summary["nonfinite"]):
            kind = "diverged" if bad else "solved" if solved else "unsolved"
            counts[kind] += 1
            curve = curves[read][seed]
            ax.plot(curve.steps, curve.accuracy, marker=".", markersize=3, **styles[kind])
            finite = np.flatnonzero(np.isfinite(curve.accuracy))
            if bad and finite.size:  # an x where the curve ends: its last finite evaluation
                ax.plot(curve.steps[finite[-1]], curve.accuracy[finite[-1]], marker="x",
                        markersize=8, color="tab:red", zorder=4)
        for kind, style in styles.items():  # one legend entry per kind, not per seed
            if counts[kind]:
                ax.plot([], [], label=f"{kind} ({counts[kind]})", **style)
        _reference_lines(ax, results["threshold"], results["chance_accuracy"])
        ax.set(title=f"{read}: {summary['solved']}/{summary['num_seeds']} seeds solved",
               xlabel="training step", ylim=(0, 1.02), xlim=(0, _right_edge(results)))
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", fontsize=8)
    axes[0].set_ylabel("validation accuracy")
    fig.suptitle(f"{_title(results)}: validation accuracy per seed")
    fig.savefig(path, dpi=130)


def plot_escape_curves(results: Mapping, path: str | Path) -> None:
    """Kaplan-Meier estimate of the fraction of seeds solved vs step, one line per read."""
    from scipy import stats

    fig = _figure(6.8, 4.6)
    ax = fig.subplots()
    end, right = results["total_steps"], _right_edge(results)
    for i, (read, summary) in enumerate(results["reads"].items()):
        escaped, censored = escape_events(summary)
        steps, solved = [0.0], [0.0]
        if escaped:
            cdf = stats.ecdf(stats.CensoredData(uncensored=escaped, right=censored)).cdf
            steps += list(cdf.quantiles)
            solved += list(cdf.probabilities)
        steps.append(max(right, steps[-1]))
        solved.append(solved[-1])
        ax.step(steps, solved, where="post", color=f"C{i}", linewidth=2,
                label=f"{read} ({summary['solved']}/{summary['num_seeds']} solved)")
        # Censoring ticks only where a seed left observation early (unfinished runs).
        early = sorted(c for c in censored if c < end)
        if early:
            # The level of the step function at each censoring step (held from the left).
            at = [solved[np.searchsorted(steps, c, side="right") - 1] for c in early]
            ax.plot(early, at, linestyle="none", marker="|", markersize=14, markeredgewidth=2,
                    color=f"C{i}", label=f"{read}: unfinished seed censored")
    title = f"Time to escape (accuracy >= {results['threshold']:g}), Kaplan-Meier"
    tests = [f"{c['treatment']} vs {c['baseline']}: log-rank p = {_p(c['logrank_p'])}"
             for c in results["comparisons"].values()]
    ax.set(title="\n".join([title] + tests), xlabel="training step",
           ylabel="fraction of seeds solved", ylim=(-0.02, 1.02), xlim=(0, right))
    ax.axvline(end, color="0.4", linestyle=":", linewidth=1, label=f"end of training ({end})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=130)


def solved_counts(results: Mapping) -> dict[str, tuple[int, int]]:
    """read -> (solved, num_seeds), the per-regime argument of :func:`plot_solved_counts`."""
    return {r: (s["solved"], s["num_seeds"]) for r, s in results["reads"].items()}


def plot_solved_counts(regime_to_counts: Mapping[str, Mapping[str, tuple[int, int]]],
                       path: str | Path, *, threshold: float = DEFAULT_THRESHOLD) -> None:
    """Bar chart of solved seeds per read, bars grouped by regime.

    Args:
        regime_to_counts: regime label -> read -> ``(solved, num_seeds)``; reads keep
            their colour across regimes (first-appearance order).
        path: output PNG.
        threshold: the solved threshold, for the title.
    """
    regimes = list(regime_to_counts)
    reads = list(dict.fromkeys(r for counts in regime_to_counts.values() for r in counts))
    width = 0.8 / len(reads)
    # Room for the legend outside the axes plus about half an inch per bar.
    fig = _figure(max(6.0, 3.0 + 0.5 * len(regimes) * len(reads) + 0.4 * len(regimes)), 4.4)
    ax = fig.subplots()
    top, sizes = 1, set()
    for i, read in enumerate(reads):
        xs = [j + (i - (len(reads) - 1) / 2) * width for j, regime in enumerate(regimes)
              if read in regime_to_counts[regime]]
        pairs = [regime_to_counts[regime][read] for regime in regimes
                 if read in regime_to_counts[regime]]
        bars = ax.bar(xs, [s for s, _ in pairs], width=width * 0.92, color=f"C{i}", label=read)
        ax.bar_label(bars, labels=[f"{s}/{n}" for s, n in pairs], padding=2, fontsize=9)
        top = max([top] + [n for _, n in pairs])
        sizes.update(n for _, n in pairs)
    if len(sizes) == 1:  # one seed count everywhere: mark it, it is the scale of every bar
        ax.axhline(top, color="0.4", linestyle="--", linewidth=1, label=f"all seeds ({top})")
    ax.set_xticks(range(len(regimes)), regimes)
    ax.set_xlim(-0.7, len(regimes) - 0.3)
    ax.set(title=f"Seeds solved (validation accuracy >= {threshold:g})", xlabel="regime",
           ylabel="seeds solved", ylim=(0, top * 1.12))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes: bars may reach any height in any group.
    ax.legend(title="read", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=130)


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """NaN/Inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _finite_or_none(float(x))
    return x


def build_report(workdir: str | Path, threshold: float | None = None) -> dict:
    """Reads ``workdir``'s metrics and config, writes every output, returns the results.

    Outputs in ``workdir``: ``results.json``, ``results.md``, ``accuracy_curves.png``,
    ``escape_curves.png``, ``solved_counts.png`` (one group).

    Args:
        workdir: a training workdir holding ``metrics.jsonl`` (and ``run_config.json``).
        threshold: solved threshold; default ``run_config.json``'s ``solved_threshold``,
            else 0.8.

    Returns:
        The results dict as written to ``results.json`` (NaN as None): ``reads.R`` per read
        (see :func:`summarize_read`), ``comparison`` (first read vs second, or None),
        ``comparisons`` (read -> comparison with the first read, see
        :func:`compare_reads`), ``threshold``, ``total_steps``, ``eval_every``,
        ``baseline``, ``chance_accuracy``, ``input`` (line counts), ``config`` (echo).

    Raises:
        ValueError: naming the file when ``metrics.jsonl`` is missing or empty, or
            ``run_config.json`` is malformed; or a threshold outside (0, 1].
    """
    workdir = Path(workdir)
    metrics = load_metrics(workdir)
    results = _jsonable(analyze(metrics, load_run_config(workdir), threshold))
    results["workdir"] = str(workdir)
    (workdir / RESULTS_JSON).write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    (workdir / RESULTS_MD).write_text(format_markdown(results))
    plot_accuracy_curves(metrics.curves, results, workdir / ACCURACY_PNG)
    plot_escape_curves(results, workdir / ESCAPE_PNG)
    plot_solved_counts({_title(results): solved_counts(results)}, workdir / SOLVED_PNG,
                       threshold=results["threshold"])
    return results


def find_regime_workdirs(parent: str | Path) -> list[Path]:
    """Immediate sub-directories of ``parent`` holding a ``metrics.jsonl``, sorted."""
    return sorted(p for p in Path(parent).iterdir() if (p / METRICS_FILE).is_file())


def build_regime_reports(parent: str | Path, threshold: float | None = None) -> dict[str, dict]:
    """Runs :func:`build_report` on each regime workdir under ``parent`` and draws
    ``parent/solved_counts.png`` with one group of bars per regime.

    Returns:
        regime label (``run_config.json``'s regime, else the directory name) -> results.

    Raises:
        ValueError: as :func:`build_report`, if ``parent`` holds no regime workdir, or if
            the regimes use different thresholds (their bars would not be comparable).
    """
    parent = Path(parent)
    subs = find_regime_workdirs(parent)
    if not subs:
        raise ValueError(f"{parent}: no sub-directory holds a {METRICS_FILE}")
    reports: dict[str, dict] = {}
    for sub in subs:
        results = build_report(sub, threshold)
        label = results.get("regime") or sub.name
        reports[sub.name if label in reports else label] = results
    thresholds = {r["threshold"] for r in reports.values()}
    if len(thresholds) > 1:
        raise ValueError(f"{parent}: the regimes use different solved thresholds "
                         f"{sorted(thresholds)}; pass --threshold to compare them")
    plot_solved_counts({label: solved_counts(r) for label, r in reports.items()},
                       parent / SOLVED_PNG, threshold=thresholds.pop())
    return reports


def _define_flags():
    # Defined only when run as a script: the trainer imports this module and has its own
    # --workdir flag, which a module-level definition here would collide with.
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training workdir with metrics.jsonl, or a directory "
                        "of such workdirs (one per regime).")
    flags.DEFINE_float("threshold", None, "Solved threshold (default: run_config.json's "
                       "solved_threshold, else 0.8).")


def main(argv: Sequence[str]) -> None:
    """CLI: builds the report(s) and prints the summary; errors go to stderr, exit 2."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    workdir, threshold = flags.FLAGS.workdir, flags.FLAGS.threshold
    if not workdir:
        raise app.UsageError("--workdir=DIR is required.")
    workdir = Path(workdir)
    try:
        if workdir.is_dir() and not (workdir / METRICS_FILE).exists() and find_regime_workdirs(workdir):
            reports = build_regime_reports(workdir, threshold)
            print("\n".join(format_summary(r) for r in reports.values()))
            print(f"grouped solved counts: {workdir / SOLVED_PNG}")
        else:
            print(format_summary(build_report(workdir, threshold)))
    except ValueError as e:
        print(f"report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
