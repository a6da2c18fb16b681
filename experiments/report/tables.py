"""The report's text: ``results.md`` (:func:`format_markdown`) and the stdout summary
(:func:`format_summary`), both from the results dict of
:func:`~experiments.report.statistics.analyze`."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["format_markdown", "format_p", "format_summary", "run_title"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def format_p(x: float | None) -> str:
    """A p-value to two significant digits, ``"n/a"`` when undefined."""
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


def _hazard_and_mcnemar(comparison: Mapping) -> str:
    """'; hazard ratio ... ; McNemar p ...' when the comparison has them."""
    text = ""
    hazard = comparison.get("hazard_ratio")
    if hazard is not None:
        if hazard["ratio"] is None:
            text += f"; hazard ratio n/a ({hazard['reason']})"
        else:
            low, high = hazard["ci"]
            text += (
                f"; hazard ratio per evaluation interval {hazard['ratio']:.2g}x "
                f"[{low:.2g}, {high:.2g}] (discrete-time logistic, Wald p = "
                f"{format_p(hazard['p'])})"
            )
    mcnemar = comparison.get("mcnemar")
    if mcnemar is not None and mcnemar["p"] is not None:
        text += f"; McNemar p = {format_p(mcnemar['p'])} ({mcnemar['num_pairs']} paired seeds)"
    return text


def format_markdown(results: Mapping) -> str:
    """``results.md``: the study's table, the tests, and a per-seed table."""
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
