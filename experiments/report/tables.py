"""The report's text: ``results.md`` (:func:`format_markdown`) and the stdout summary
(:func:`format_summary`), both from the results dict of
:func:`~experiments.report.statistics.analyze`."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping

from experiments.report.hazard import BASELINE_DESCRIPTIONS

__all__ = [
    "format_hazard_ratio",
    "format_kaplan_meier",
    "format_markdown",
    "format_p",
    "format_ratio",
    "format_summary",
    "run_title",
]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def format_p(x: float | None) -> str:
    """A p-value to two significant digits, ``"n/a"`` when undefined."""
    return "n/a" if x is None else f"{x:.2g}"


def format_ratio(x: float) -> str:
    """A ratio to two significant digits, without an exponent below 10,000."""
    return f"{x:.2g}" if x < 100 else f"{x:.0f}"


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


def run_title(results: Mapping) -> str:
    """The run's label: its regime and name (once if equal), else ``"run"``."""
    parts = [p for p in (results.get("regime"), results.get("name")) if p]
    return " / ".join(dict.fromkeys(str(p) for p in parts)) or "run"


def _solved_note(summary: Mapping) -> str:
    n = summary["num_nonfinite"]
    return f" ({n} diverged)" if n else ""


def format_summary(results: Mapping) -> str:
    """A compact multi-line summary for stdout: one line per read and per comparison."""
    lines = [
        f"{run_title(results)}: solved = accuracy >= {results['threshold']:g} "
        f"by step {results['total_steps']}"
    ]
    for read, s in results["reads"].items():
        lines.append(
            f"  {read}: {s['solved']}/{s['num_seeds']} solved{_solved_note(s)}, "
            f"mean final acc {_mean_with_ci(s)}, "
            f"median escape step {_step(s['median_escape_step'])}"
        )
    for c in results["comparisons"].values():
        lines.append(
            f"  {c['treatment']} vs {c['baseline']}: Fisher p={format_p(c['fisher_p'])}, "
            f"log-rank p={format_p(c['logrank_p'])}, accuracy difference {_difference(c)}"
        )
    return "\n".join(lines)


def _seed_cell(summary: Mapping, i: int) -> str:
    acc = _pct(summary["final_accuracy"][i])
    if summary["nonfinite"][i]:
        return f"{acc} | diverged at {summary['diverged_step'][i]}"
    escape = summary["escape_step"][i]
    return f"{acc} | {'-' if escape is None else escape}"


def format_hazard_ratio(result: Mapping | None) -> str:
    """``"4.8x [1.2, 19]"`` (95% interval), ``"n/a (reason)"``, or ``"-"`` for None."""
    if result is None:
        return "-"
    if result["ratio"] is None:
        return f"n/a ({result['reason']})"
    low, high = result["ci"]
    return f"{format_ratio(result['ratio'])}x [{format_ratio(low)}, {format_ratio(high)}]"


def _hazard_and_mcnemar(comparison: Mapping) -> str:
    """'; hazard ratio ... ; McNemar p ...' when the comparison has them."""
    text = ""
    hazard = comparison.get("hazard_ratio")
    if hazard is not None:
        if hazard["ratio"] is None:
            text += f"; hazard ratio {format_hazard_ratio(hazard)}"
        else:
            model = BASELINE_DESCRIPTIONS.get(hazard["baseline_model"], hazard["baseline_model"])
            text += (
                f"; hazard ratio per evaluation interval {format_hazard_ratio(hazard)} "
                f"(discrete-time logistic, {model}; Wald p = {format_p(hazard['p'])})"
            )
    mcnemar = comparison.get("mcnemar")
    if mcnemar is not None and mcnemar["p"] is not None:
        text += f"; McNemar p = {format_p(mcnemar['p'])} ({mcnemar['num_pairs']} paired seeds)"
    return text


def _km_cell(curve: Mapping, step: int) -> str:
    """The Kaplan–Meier value holding at ``step`` with its band (none where it is exact)."""
    i = bisect.bisect_right(curve["steps"], step) - 1
    value, low, high = curve["solved"][i], curve["low"][i], curve["high"][i]
    if low == high == value:
        return _pct(value)
    return f"{_pct(value)} [{100 * low:.1f}, {100 * high:.1f}]"


def format_kaplan_meier(results: Mapping) -> str:
    """The Kaplan–Meier table of ``results["kaplan_meier"]``: one row per step where a
    read's curve has a point (an escape or a censoring), one column per read; empty
    when the results have none."""
    curves = results.get("kaplan_meier")
    if not curves:
        return ""
    steps = sorted({s for curve in curves.values() for s in curve["steps"] if s > 0})
    lines = [
        "## Kaplan–Meier: fraction of seeds solved by step",
        "",
        "With its pointwise 95% log-log band (Greenwood); the fraction not yet escaped is "
        "100% minus it. Each value holds from its step to the next row's.",
        "",
        "| step | " + " | ".join(curves) + " |",
        "|---|" + "---|" * len(curves),
    ]
    for step in steps:
        cells = [_km_cell(curve, step) for curve in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_markdown(results: Mapping) -> str:
    """``results.md``: the study's table, the tests, the Kaplan–Meier table and a per-seed
    table."""
    reads = results["reads"]
    lines = [
        f"# {run_title(results)}",
        "",
        f"Solved = validation accuracy >= {results['threshold']:g} at some evaluation "
        f"(every {results['eval_every']} steps, {results['total_steps']} steps). "
        "Mean final accuracy with a 95% Student t interval over seeds.",
        "",
        "| read | solved / N | mean final accuracy [95% CI] | median escape step |",
        "|---|---|---|---|",
    ]
    for read, s in reads.items():
        lines.append(
            f"| {read} | {s['solved']}/{s['num_seeds']}{_solved_note(s)} | "
            f"{_mean_with_ci(s)} | {_step(s['median_escape_step'])} |"
        )
    lines.append("")
    for c in results["comparisons"].values():
        ratio = c["escape_rate_ratio"]
        lines.append(
            f"**{c['treatment']} vs {c['baseline']}:** Fisher exact p = {format_p(c['fisher_p'])}; "
            f"log-rank p = {format_p(c['logrank_p'])}; accuracy difference {_difference(c)} "
            f"(95% Welch CI); escape-rate ratio "
            f"{'n/a' if ratio is None else f'{ratio:.2g}x'} (constant-hazard estimate)"
            f"{_hazard_and_mcnemar(c)}."
        )
        lines.append("")
    dated_from = results.get("escapes_dated_from_step")
    if dated_from is not None:
        lines += [
            f"Escapes before step {dated_from} are dated {dated_from}: the records hold the "
            f"evaluations from step {dated_from} on only. Solved counts, final accuracies, "
            "Fisher and McNemar stand; escape times before it, and the log-rank test and "
            "hazard ratio with them, are not known.",
            "",
        ]
    if any(s["num_nonfinite"] for s in reads.values()):
        lines += [f"Diverged seeds: {results['nonfinite_policy']}", ""]
    configured, end = results.get("num_seeds_configured"), results["total_steps"]
    for read, s in reads.items():
        if configured and s["num_seeds"] < configured:
            lines += [
                f"Incomplete: {read} has metrics for {s['num_seeds']} of {configured} "
                "configured seeds.",
                "",
            ]
        # Diverged seeds may stop early by design; other early stops are unfinished runs.
        unfinished = [
            str(seed)
            for seed, last, bad in zip(s["seeds"], s["last_step"], s["nonfinite"], strict=True)
            if last < end and not bad
        ]
        if unfinished:
            lines += [
                f"Unfinished: {read} seeds {', '.join(unfinished)} have no evaluation at "
                f"step {end} (censored at their last evaluation).",
                "",
            ]

    km = format_kaplan_meier(results)
    if km:
        lines += [km]
    # Per-seed table over the union of seeds; a read without that seed shows blanks.
    seeds = sorted({seed for s in reads.values() for seed in s["seeds"]})
    lines += [
        "## Per seed (final accuracy | escape step)",
        "",
        "| seed | " + " | ".join(f"{r} final acc | {r} escape step" for r in reads) + " |",
        "|---|" + "---|---|" * len(reads),
    ]
    for seed in seeds:
        cells = [
            _seed_cell(s, s["seeds"].index(seed)) if seed in s["seeds"] else " | "
            for s in reads.values()
        ]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
