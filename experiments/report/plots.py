"""The report's figures: per-seed accuracy curves, Kaplan-Meier escape curves, solved
counts grouped by regime.

matplotlib's object API (``Figure``, no pyplot): no global figure state and no backend
switch in the caller; matplotlib is imported when a figure is drawn, not with this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from experiments.report.hazard import kaplan_meier
from experiments.report.records import SeedCurve
from experiments.report.statistics import DEFAULT_THRESHOLD, escape_events
from experiments.report.tables import format_p, run_title

__all__ = ["plot_accuracy_curves", "plot_escape_curves", "plot_solved_counts", "solved_counts"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _reference_lines(ax, threshold: float, chance: float | None) -> None:
    ax.axhline(
        threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}"
    )
    if chance is not None:
        ax.axhline(
            chance, color="0.4", linestyle=":", linewidth=1.2, label=f"chance {100 * chance:.1f}%"
        )


def _right_edge(results: Mapping) -> float:
    # A margin past the last step, so that what happens at the last evaluation (an escape,
    # a final point) is not drawn on the frame.
    return 1.04 * results["total_steps"]


def plot_accuracy_curves(
    curves: Mapping[str, Mapping[int, SeedCurve]], results: Mapping, path: str | Path
) -> None:
    """Validation accuracy vs step for every seed, one panel per read (shared y in [0, 1]).

    Solved seeds are drawn in the read's colour, unsolved ones in grey, diverged ones
    in red; the threshold and chance levels are dashed and dotted lines.
    """
    reads = list(results["reads"])
    fig = _figure(5.2 * len(reads) + 0.6, 4.4)
    axes = fig.subplots(1, len(reads), sharey=True, squeeze=False)[0]
    for i, (ax, read) in enumerate(zip(axes, reads, strict=True)):
        summary = results["reads"][read]
        # Diverged seeds are drawn last, or the chance plateau's grey would hide them.
        styles = {
            "solved": dict(color=f"C{i}", alpha=0.8, linewidth=1.3, zorder=2),
            "unsolved": dict(color="0.55", alpha=0.6, linewidth=1.0, zorder=2),
            "diverged": dict(color="tab:red", alpha=0.9, linewidth=1.2, linestyle="--", zorder=3),
        }
        counts = dict.fromkeys(styles, 0)
        for seed, solved, bad in zip(
            summary["seeds"], summary["is_solved"], summary["nonfinite"], strict=True
        ):
            kind = "diverged" if bad else "solved" if solved else "unsolved"
            counts[kind] += 1
            curve = curves[read][seed]
            ax.plot(curve.steps, curve.accuracy, marker=".", markersize=3, **styles[kind])
            finite = np.flatnonzero(np.isfinite(curve.accuracy))
            if bad and finite.size:  # an x where the curve ends: its last finite evaluation
                ax.plot(
                    curve.steps[finite[-1]],
                    curve.accuracy[finite[-1]],
                    marker="x",
                    markersize=8,
                    color="tab:red",
                    zorder=4,
                )
        for kind, style in styles.items():  # one legend entry per kind, not per seed
            if counts[kind]:
                ax.plot([], [], label=f"{kind} ({counts[kind]})", **style)
        _reference_lines(ax, results["threshold"], results["chance_accuracy"])
        ax.set(
            title=f"{read}: {summary['solved']}/{summary['num_seeds']} seeds solved",
            xlabel="training step",
            ylim=(0, 1.02),
            xlim=(0, _right_edge(results)),
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", fontsize=8)
    axes[0].set_ylabel("validation accuracy")
    fig.suptitle(f"{run_title(results)}: validation accuracy per seed")
    fig.savefig(path, dpi=130)


def plot_escape_curves(results: Mapping, path: str | Path) -> None:
    """Kaplan-Meier estimate of the fraction of seeds solved vs step, one line per read,
    with its pointwise 95% band (``hazard.kaplan_meier``)."""
    fig = _figure(6.8, 4.6)
    ax = fig.subplots()
    end, right = results["total_steps"], _right_edge(results)
    for i, (read, summary) in enumerate(results["reads"].items()):
        censored = escape_events(summary)[1]
        curve = kaplan_meier(summary, max(right, end))
        steps, solved = curve["steps"], curve["solved"]
        ax.fill_between(
            steps, curve["low"], curve["high"], step="post", color=f"C{i}", alpha=0.15, linewidth=0
        )
        ax.step(
            steps,
            solved,
            where="post",
            color=f"C{i}",
            linewidth=2,
            label=f"{read} ({summary['solved']}/{summary['num_seeds']} solved)",
        )
        # Censoring ticks only where a seed left observation early (unfinished runs).
        early = sorted(c for c in censored if c < end)
        if early:
            # The level of the step function at each censoring step (held from the left).
            at = [solved[np.searchsorted(steps, c, side="right") - 1] for c in early]
            ax.plot(
                early,
                at,
                linestyle="none",
                marker="|",
                markersize=14,
                markeredgewidth=2,
                color=f"C{i}",
                label=f"{read}: unfinished seed censored",
            )
    title = f"Time to escape (accuracy >= {results['threshold']:g}), Kaplan-Meier"
    tests = [
        f"{c['treatment']} vs {c['baseline']}: log-rank p = {format_p(c['logrank_p'])}"
        for c in results["comparisons"].values()
    ]
    ax.set(
        title="\n".join([title] + tests),
        xlabel="training step",
        ylabel="fraction of seeds solved",
        ylim=(-0.02, 1.02),
        xlim=(0, right),
    )
    ax.axvline(end, color="0.4", linestyle=":", linewidth=1, label=f"end of training ({end})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=130)


def solved_counts(results: Mapping) -> dict[str, tuple[int, int]]:
    """read -> (solved, num_seeds), the per-regime argument of :func:`plot_solved_counts`."""
    return {r: (s["solved"], s["num_seeds"]) for r, s in results["reads"].items()}


def plot_solved_counts(
    regime_to_counts: Mapping[str, Mapping[str, tuple[int, int]]],
    path: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> None:
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
        xs = [
            j + (i - (len(reads) - 1) / 2) * width
            for j, regime in enumerate(regimes)
            if read in regime_to_counts[regime]
        ]
        pairs = [
            regime_to_counts[regime][read] for regime in regimes if read in regime_to_counts[regime]
        ]
        bars = ax.bar(xs, [s for s, _ in pairs], width=width * 0.92, color=f"C{i}", label=read)
        ax.bar_label(bars, labels=[f"{s}/{n}" for s, n in pairs], padding=2, fontsize=9)
        top = max([top] + [n for _, n in pairs])
        sizes.update(n for _, n in pairs)
    if len(sizes) == 1:  # one seed count everywhere: mark it, it is the scale of every bar
        ax.axhline(top, color="0.4", linestyle="--", linewidth=1, label=f"all seeds ({top})")
    ax.set_xticks(range(len(regimes)), regimes)
    ax.set_xlim(-0.7, len(regimes) - 0.3)
    ax.set(
        title=f"Seeds solved (validation accuracy >= {threshold:g})",
        xlabel="regime",
        ylabel="seeds solved",
        ylim=(0, top * 1.12),
    )
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes: bars may reach any height in any group.
    ax.legend(title="read", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=130)
