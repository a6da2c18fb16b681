"""The study's statistics, from loaded metrics to the results dict: pure, no I/O, no plots.

Per seed: escape step (first evaluation at or above the solved threshold), solved and
nonfinite flags. Per read: solved count, mean final accuracy with a Student t interval,
median escape step, a constant-hazard escape rate, the Kaplan–Meier curve. Per
comparison of a read with the baseline (the first read): Fisher exact test on solved
counts, log-rank test on escape times, Welch interval on the difference in mean final
accuracy, the discrete-time hazard ratio and McNemar's test on paired seeds (the last
three from ``experiments.report.hazard``, which this module builds on and which does not
import it; ``escape_events`` and ``finite_or_none`` live there and are re-exported here).

Diverged seeds follow :data:`NONFINITE_POLICY`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.report import hazard
from experiments.report.hazard import escape_events, finite_or_none
from experiments.report.records import Metrics, SeedCurve

__all__ = [
    "CONFIDENCE",
    "DEFAULT_THRESHOLD",
    "NONFINITE_POLICY",
    "analyze",
    "chance_accuracy",
    "compare_reads",
    "escape_events",
    "finite_or_none",
    "mean_confidence_interval",
    "seed_outcome",
    "summarize_read",
    "welch_difference",
]

DEFAULT_THRESHOLD = 0.8
CONFIDENCE = 0.95
NONFINITE_POLICY = (
    "A seed whose training loss went NaN/Inf is unsolved (escape_step null, censored at the "
    "end of the run) and its final accuracy is excluded from mean_final_accuracy; "
    "num_nonfinite counts such seeds."
)


def mean_confidence_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
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


def welch_difference(
    baseline: Sequence[float], treatment: Sequence[float], confidence: float = CONFIDENCE
) -> dict:
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
    out.update(
        ci=[diff - half, diff + half], df=float(df), p=float(2 * stats.t.sf(abs(diff) / se, df=df))
    )
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
    return [
        acc
        for acc, bad in zip(read_summary["final_accuracy"], read_summary["nonfinite"], strict=True)
        if not bad and acc is not None and math.isfinite(acc)
    ]


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
    per_seed_keys = {
        "seeds": "seed",
        "final_accuracy": "final_accuracy",
        "best_accuracy": "best_accuracy",
        "escape_step": "escape_step",
        "is_solved": "solved",
        "nonfinite": "nonfinite",
        "diverged_step": "diverged_step",
        "last_step": "last_step",
        "censor_step": "censor_step",
    }
    summary: dict[str, Any] = {
        name: [o[key] for o in outcomes] for name, key in per_seed_keys.items()
    }
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
        res = stats.logrank(
            stats.CensoredData(uncensored=t_escaped, right=t_censored),
            stats.CensoredData(uncensored=b_escaped, right=b_censored),
        )
    return finite_or_none(res.statistic), finite_or_none(res.pvalue)


def compare_reads(
    baseline_name: str, baseline: Mapping, treatment_name: str, treatment: Mapping
) -> dict:
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

    table = [
        [treatment["solved"], treatment["num_seeds"] - treatment["solved"]],
        [baseline["solved"], baseline["num_seeds"] - baseline["solved"]],
    ]
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
    """Builds the results dict of a run without touching the disk.

    Args:
        metrics: as returned by :func:`~experiments.report.records.load_metrics`.
        config: run_config.json contents (``{}`` if absent); missing keys are inferred
            from ``metrics``.
        threshold: solved threshold; default ``config["solved_threshold"]``, else 0.8.

    Returns:
        ``reads.R`` per read (see :func:`summarize_read`), ``comparison`` (first read vs
        second, or None), ``comparisons`` (read -> comparison with the first read, see
        :func:`compare_reads`, plus ``hazard_ratio`` and ``mcnemar`` from
        :mod:`experiments.report.hazard`), ``kaplan_meier`` (read -> the fraction solved
        vs step with its 95% band, ``hazard.kaplan_meier``), ``threshold``,
        ``total_steps``, ``eval_every``, ``escapes_dated_from_step`` (the config's: when
        set, escapes before it are dated to it, and the log-rank test and hazard ratio
        are None), ``baseline``, ``chance_accuracy``, ``input`` (line counts), ``config``
        (echo).
        Values may be NaN; :func:`~experiments.report.build.build_report` writes them
        to ``results.json`` as null.

    Raises:
        ValueError: if the threshold is not in (0, 1].
    """
    threshold = _solved_threshold(config, threshold)
    curves = metrics.curves
    last_seen = max(int(c.steps[-1]) for by_seed in curves.values() for c in by_seed.values())
    final_step = int(config.get("total_steps") or last_seen)
    reads = _baseline_first(config, curves)
    summaries = {}
    for read in reads:
        outcomes = [seed_outcome(c, threshold, final_step) for c in curves[read].values()]
        summaries[read] = summarize_read(outcomes)
    # Records that begin late (the replication's headline files) date every earlier
    # escape to their first step: counts stand, times do not.
    dated_from = config.get("escapes_dated_from_step")
    comparisons = _compare_with_baseline(
        reads, summaries, config.get("eval_every") or _gcd_step(curves), dated_from
    )
    kaplan_meier = {read: hazard.kaplan_meier(s, final_step) for read, s in summaries.items()}
    return {
        "name": config.get("name"),
        "regime": config.get("regime"),
        "threshold": threshold,
        "total_steps": final_step,
        "eval_every": config.get("eval_every") or _gcd_step(curves),
        "escapes_dated_from_step": dated_from,
        "num_seeds_configured": config.get("num_seeds"),
        "reads_configured": list(config.get("reads", [])),
        "chance_accuracy": chance_accuracy(config),
        "baseline": reads[0],
        "reads": summaries,
        # `comparison` is the first (usually only) comparison with the baseline.
        "comparison": comparisons[reads[1]] if len(reads) > 1 else None,
        "comparisons": comparisons,
        "kaplan_meier": kaplan_meier,
        "nonfinite_policy": NONFINITE_POLICY,
        "input": {
            "metrics_lines": metrics.num_lines,
            "duplicate_lines": metrics.num_duplicates,
            "skipped_lines": metrics.num_skipped,
        },
        "config": dict(config),
    }


def _solved_threshold(config: Mapping, threshold: float | None) -> float:
    """``threshold``, default the config's (else 0.8), refused outside (0, 1]."""
    if threshold is None:
        threshold = float(config.get("solved_threshold", DEFAULT_THRESHOLD))
    if not 0 < threshold <= 1:
        raise ValueError(f"the solved threshold must be in (0, 1], got {threshold}")
    return threshold


def _baseline_first(config: Mapping, curves: Mapping) -> list[str]:
    """The reads of ``curves``, baseline first: the configured order, then reads only
    the metrics mention."""
    configured = [r for r in config.get("reads", []) if r in curves]
    return configured + [r for r in curves if r not in configured]


def _compare_with_baseline(
    reads: Sequence[str], summaries: Mapping, interval: int | None, dated_from: int | None
) -> dict:
    """Every read after the first compared with it (:func:`compare_reads`), with the
    hazard ratio (None without an evaluation interval or with escapes dated from a
    step, which also drops the log-rank test) and McNemar's test on paired seeds."""
    comparisons = {
        r: compare_reads(reads[0], summaries[reads[0]], r, summaries[r]) for r in reads[1:]
    }
    for r, comparison in comparisons.items():
        base, treat = summaries[reads[0]], summaries[r]
        timed = interval and dated_from is None
        comparison["hazard_ratio"] = (
            hazard.hazard_ratio([(base, treat, int(interval))]) if timed else None
        )
        if dated_from is not None:
            comparison["logrank_statistic"] = comparison["logrank_p"] = None
        comparison["mcnemar"] = hazard.mcnemar_paired(base, treat)
    return comparisons
