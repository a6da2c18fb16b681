"""The replication's headline, pooled over both lengths, from its records.

    python results/replication/pooled_headline.py

The headline groups (``v80_s512_b16_2k_headline``, ``v80_s1024_b16_2k_headline``: the
``planA_results`` and ``stack_s512_results`` files, 16 paired seeds each) hold only the
evaluations from step 1,000 on, so ``python -m experiments.replication.analyze`` compares them per
group (counts, Fisher, McNemar) and leaves them out of its pooled (time-to-escape) fits.
This script pools their counts with the same code: each seed's outcome
(``statistics.seed_outcome``), the read summaries (``statistics.summarize_read``) and
Fisher's exact test (``statistics.compare_reads``) over the 32 seeds of each read, and
McNemar's exact test over the 32 seed pairs (``hazard.mcnemar_pooled``). Writes
``pooled_headline.json`` and ``pooled_headline.md`` beside this file.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from experiments.report import hazard  # noqa: E402
from experiments.report.records import load_metrics, load_run_config  # noqa: E402
from experiments.report.statistics import (  # noqa: E402
    analyze,
    compare_reads,
    seed_outcome,
    summarize_read,
)

GROUPS = ("v80_s512_b16_2k_headline", "v80_s1024_b16_2k_headline")
BASELINE, TREATMENT = "raw", "ns5"


def main() -> None:
    outcomes = {BASELINE: [], TREATMENT: []}
    pairs, per_group = [], {}
    for group in GROUPS:
        workdir = HERE / "runs" / group
        metrics, config = load_metrics(workdir), load_run_config(workdir)
        threshold, final_step = float(config["solved_threshold"]), int(config["total_steps"])
        for read in outcomes:
            outcomes[read] += [
                seed_outcome(c, threshold, final_step) for c in metrics.curves[read].values()
            ]
        summaries = analyze(metrics, config)["reads"]
        pairs.append((summaries[BASELINE], summaries[TREATMENT]))
        per_group[group] = {
            read: f"{summaries[read]['solved']}/{summaries[read]['num_seeds']}"
            for read in (BASELINE, TREATMENT)
        }
    base, treat = summarize_read(outcomes[BASELINE]), summarize_read(outcomes[TREATMENT])
    fisher = compare_reads(BASELINE, base, TREATMENT, treat)
    mcnemar = hazard.mcnemar_pooled(pairs)
    result = {
        "groups": list(GROUPS),
        "per_group": per_group,
        "baseline": BASELINE,
        "treatment": TREATMENT,
        "solved": treat["solved"],
        "num_seeds": treat["num_seeds"],
        "baseline_solved": base["solved"],
        "baseline_num_seeds": base["num_seeds"],
        "fisher_table": fisher["fisher_table"],
        "fisher_p": fisher["fisher_p"],
        "mcnemar": mcnemar,
        "mean_final_accuracy": treat["mean_final_accuracy"],
        "baseline_mean_final_accuracy": base["mean_final_accuracy"],
    }
    (HERE / "pooled_headline.json").write_text(json.dumps(result, indent=1) + "\n")
    (b01, b10) = mcnemar["table"][0][1], mcnemar["table"][1][0]
    lines = [
        "# The replication's headline, pooled over both lengths",
        "",
        "`python results/replication/pooled_headline.py` (from `runs/`, which `make "
        "replication` rebuilds); groups " + ", ".join(f"`{g}`" for g in GROUPS) + ".",
        "",
        "| group | raw solved | ns5 solved |",
        "|---|---|---|",
        *(f"| {g} | {c[BASELINE]} | {c[TREATMENT]} |" for g, c in per_group.items()),
        f"| pooled | {base['solved']}/{base['num_seeds']} | "
        f"{treat['solved']}/{treat['num_seeds']} |",
        "",
        f"Pooled: ns5 {treat['solved']}/{treat['num_seeds']} vs raw "
        f"{base['solved']}/{base['num_seeds']}, Fisher exact p = {fisher['fisher_p']:.2g} "
        f"(two-sided); McNemar over the {mcnemar['num_pairs']} seed pairs: "
        f"{max(b01, b10)} vs {min(b01, b10)} discordant, exact p = {mcnemar['p']:.2g}. "
        f"Mean final accuracy {100 * treat['mean_final_accuracy']:.1f}% vs "
        f"{100 * base['mean_final_accuracy']:.1f}%.",
        "",
    ]
    (HERE / "pooled_headline.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
