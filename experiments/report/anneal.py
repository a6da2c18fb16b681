"""The scaffold anneal's outcome: accuracy once the read is gone (α = 0).

A read trained under the anneal (``<read>_anneal``, ``orthorecall.anneal``) writes
``alpha`` and ``anneal_trigger_step`` on its ``metrics.jsonl`` rows. The question the
replication asked of it is whether a model whose read was annealed away still recalls:
for every seed whose anneal ran, its accuracy when triggered and at its last
evaluation, at α = 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments.report.records import METRICS_FILE


def _rows(workdir: Path) -> list[dict]:
    rows = []
    with (workdir / METRICS_FILE).open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # A partial last line; records.load_metrics says so.
            if isinstance(row, dict) and "alpha" in row:
                rows.append(row)
    return rows


def summarize_anneal(rows: Sequence[Mapping], threshold: float) -> dict:
    """Per annealed read: seeds, how many triggered, and for those the accuracy at the
    trigger and at the final evaluation (α = 0), how many stay at or above
    ``threshold`` there, and the lowest accuracy seen while α fell.

    Args:
        rows: metrics.jsonl rows carrying ``alpha`` (other rows are ignored).
        threshold: the solved threshold.

    Returns:
        read -> {"num_seeds", "triggered", "solved_at_alpha_0", "mean_accuracy_at_trigger",
        "mean_accuracy_at_alpha_0", "lowest_accuracy_while_annealing", "seeds": [per seed:
        seed, trigger_step, accuracy_at_trigger, final_step, final_alpha,
        final_accuracy]}; means None when no seed triggered.
    """
    by_seed: dict[str, dict[int, dict[int, Mapping]]] = {}
    for row in rows:
        if "alpha" in row:
            by_seed.setdefault(row["read"], {}).setdefault(row["seed"], {})[row["step"]] = row
    summary = {}
    for read, seeds in by_seed.items():
        per_seed = []
        for seed in sorted(seeds):
            evaluations = seeds[seed]
            final_step = max(evaluations)
            final = evaluations[final_step]
            trigger = final.get("anneal_trigger_step")
            at_trigger = evaluations.get(trigger, {}).get("accuracy") if trigger else None
            during = [
                r["accuracy"]
                for step, r in evaluations.items()
                if trigger is not None and step > trigger and r["accuracy"] is not None
            ]
            per_seed.append(
                {
                    "seed": seed,
                    "trigger_step": trigger,
                    "accuracy_at_trigger": at_trigger,
                    "final_step": final_step,
                    "final_alpha": final["alpha"],
                    "final_accuracy": final["accuracy"],
                    "lowest_accuracy_while_annealing": min(during) if during else None,
                }
            )
        annealed = [s for s in per_seed if s["trigger_step"] is not None and s["final_alpha"] == 0]
        summary[read] = {
            "num_seeds": len(per_seed),
            "triggered": sum(s["trigger_step"] is not None for s in per_seed),
            "annealed_to_zero": len(annealed),
            "solved_at_alpha_0": sum(
                s["final_accuracy"] is not None and s["final_accuracy"] >= threshold
                for s in annealed
            ),
            "mean_accuracy_at_trigger": _mean(annealed, "accuracy_at_trigger"),
            "mean_accuracy_at_alpha_0": _mean(annealed, "final_accuracy"),
            "lowest_accuracy_while_annealing": min(
                (
                    s["lowest_accuracy_while_annealing"]
                    for s in annealed
                    if s["lowest_accuracy_while_annealing"] is not None
                ),
                default=None,
            ),
            "seeds": per_seed,
        }
    return summary


def _mean(seeds: Sequence[Mapping], key: str) -> float | None:
    values = [s[key] for s in seeds if s[key] is not None]
    return float(np.mean(values)) if values else None


def anneal_summary(workdir: str | Path, threshold: float) -> dict:
    """``summarize_anneal`` of a workdir's metrics.jsonl ({} when nothing was annealed)."""
    return summarize_anneal(_rows(Path(workdir)), threshold)


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def format_anneal_markdown(summary: Mapping, threshold: float) -> str:
    """The results.md section of the anneal ('' when nothing was annealed)."""
    if not summary:
        return ""
    lines = ["", "## Scaffold anneal: accuracy at α = 0", ""]
    for read, s in summary.items():
        lines += [
            f"**{read}:** {s['triggered']}/{s['num_seeds']} seeds triggered the anneal, "
            f"{s['annealed_to_zero']} reached α = 0; of those {s['solved_at_alpha_0']} are at "
            f"or above {threshold:g} at α = 0. Mean accuracy at the trigger "
            f"{_pct(s['mean_accuracy_at_trigger'])}, at α = 0 "
            f"{_pct(s['mean_accuracy_at_alpha_0'])}; lowest accuracy while α fell "
            f"{_pct(s['lowest_accuracy_while_annealing'])}.",
            "",
            "| seed | trigger step | accuracy at trigger | final step | final α | final accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for seed in s["seeds"]:
            trigger = "-" if seed["trigger_step"] is None else seed["trigger_step"]
            lines.append(
                f"| {seed['seed']} | {trigger} | {_pct(seed['accuracy_at_trigger'])} | "
                f"{seed['final_step']} | {seed['final_alpha']:.2f} | "
                f"{_pct(seed['final_accuracy'])} |"
            )
        lines.append("")
    return "\n".join(lines)
