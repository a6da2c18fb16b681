"""Compare reads over any set of runs: per run and pooled, with hazard ratios.

    python -m experiments.analyze --runs=DIR[,DIR...] [--baseline=raw] [--reads=ns5,rls]
        [--threshold=0.8] [--out=FILE.json]

Each DIR is a workdir (``metrics.jsonl``, ``run_config.json``: ours, or the
replication's through ``experiments.import_replication``) or a directory of them. Every
run is a stratum: per run and read, the solved count against the baseline's (Fisher's
exact test), the log-rank test of escape times, the discrete-time hazard ratio and
McNemar's test on paired seeds (``experiments.report.hazard``); then, per read, the
hazard ratio pooled over the runs that hold it and the baseline, stratified by run. A
run whose escapes before some step are only dated to it (``escapes_dated_from_step`` in
its run_config: the replication's headline files) counts for solved counts and Fisher,
not for time-to-escape statistics. Prints a markdown table; ``--out`` also writes JSON.
Exit status 2 with a message on bad input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import app, flags

from experiments.cli import library_logging_at_warning
from experiments.report import hazard
from experiments.report.build import find_regime_workdirs
from experiments.report.records import METRICS_FILE, load_metrics, load_run_config
from experiments.report.statistics import analyze, compare_reads
from experiments.report.tables import format_p


def run_dirs(paths: Sequence[str]) -> list[Path]:
    """The workdirs named by ``paths`` (a workdir, or a directory of workdirs)."""
    out = []
    for path in map(Path, paths):
        if (path / METRICS_FILE).is_file():
            out.append(path)
        elif path.is_dir() and find_regime_workdirs(path):
            out += find_regime_workdirs(path)
        else:
            raise ValueError(
                f"{path}: neither a workdir with {METRICS_FILE} nor a directory of them"
            )
    return out


def _ratio(result: Mapping | None) -> str:
    if result is None:
        return "-"
    if result["ratio"] is None:
        return f"n/a ({result['reason']})"
    low, high = result["ci"]
    return f"{result['ratio']:.2g}x [{low:.2g}, {high:.2g}]"


def compare_runs(
    workdirs: Sequence[Path],
    baseline: str | None = None,
    reads: Sequence[str] | None = None,
    threshold: float | None = None,
) -> dict:
    """Per-run comparisons of every read (or ``reads``) with the baseline (default: each
    run's first read), and per read the hazard ratio pooled over runs.

    Returns:
        {"runs": [{"run", "baseline", "time_to_escape", "reads": {read: {"solved",
        "num_seeds", "fisher_p", "logrank_p", "hazard_ratio", "mcnemar"}}}], "pooled":
        {read: {"runs", "solved", "num_seeds", "baseline_solved", "baseline_num_seeds",
        "hazard_ratio"}}}

    Raises:
        ValueError: no run holds the baseline.
    """
    runs, strata = [], {}
    for workdir in workdirs:
        config = load_run_config(workdir)
        results = analyze(load_metrics(workdir), config, threshold)
        summaries = results["reads"]
        base_name = baseline or results["baseline"]
        if base_name not in summaries:
            continue
        timed = config.get("escapes_dated_from_step") is None
        interval = int(results["eval_every"])
        entry = {"run": str(workdir), "baseline": base_name, "time_to_escape": timed, "reads": {}}
        base = summaries[base_name]
        for name, summary in summaries.items():
            if name == base_name or (reads and name not in reads):
                continue
            comparison = compare_reads(base_name, base, name, summary)
            entry["reads"][name] = {
                "solved": summary["solved"],
                "num_seeds": summary["num_seeds"],
                "baseline_solved": base["solved"],
                "baseline_num_seeds": base["num_seeds"],
                "fisher_p": comparison["fisher_p"],
                "logrank_p": comparison["logrank_p"] if timed else None,
                "hazard_ratio": hazard.hazard_ratio([(base, summary, interval)]) if timed else None,
                "mcnemar": hazard.mcnemar_paired(base, summary),
            }
            if timed:
                strata.setdefault(name, []).append((str(workdir), base, summary, interval))
        runs.append(entry)
    if not runs:
        raise ValueError(f"no run holds the baseline read {baseline!r}; check --baseline")
    pooled = {}
    for name, groups in strata.items():
        pooled[name] = {
            "runs": [g[0] for g in groups],
            "solved": sum(g[2]["solved"] for g in groups),
            "num_seeds": sum(g[2]["num_seeds"] for g in groups),
            "baseline_solved": sum(g[1]["solved"] for g in groups),
            "baseline_num_seeds": sum(g[1]["num_seeds"] for g in groups),
            "hazard_ratio": hazard.hazard_ratio([g[1:] for g in groups]),
        }
    return {"runs": runs, "pooled": pooled}


def format_comparison(result: Mapping) -> str:
    """The markdown tables of ``compare_runs``' result."""
    lines = [
        "| run | read | solved | baseline solved | Fisher p | log-rank p | hazard ratio [95% CI] "
        "| McNemar p (pairs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for name, r in run["reads"].items():
            mcnemar = r["mcnemar"]
            lines.append(
                f"| {Path(run['run']).name} | {name} vs {run['baseline']} | "
                f"{r['solved']}/{r['num_seeds']} | "
                f"{r['baseline_solved']}/{r['baseline_num_seeds']} | {format_p(r['fisher_p'])} | "
                f"{format_p(r['logrank_p']) if run['time_to_escape'] else 'not timed'} | "
                f"{_ratio(r['hazard_ratio'])} | "
                f"{format_p(mcnemar['p'])} ({mcnemar['num_pairs']}) |"
            )
    lines += [
        "",
        "| read | runs pooled | solved | baseline solved | pooled hazard ratio [95% CI] | Wald p |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in result["pooled"].items():
        lines.append(
            f"| {name} | {len(p['runs'])} | {p['solved']}/{p['num_seeds']} | "
            f"{p['baseline_solved']}/{p['baseline_num_seeds']} | {_ratio(p['hazard_ratio'])} | "
            f"{format_p(p['hazard_ratio']['p'])} |"
        )
    return "\n".join(lines) + "\n"


def _define_flags() -> dict:
    """The command's flags, defined only when it runs as a program: the module is also
    imported as a library (tests, experiments.analyze and import_replication together),
    and absl refuses a flag defined twice."""
    return {
        "runs": flags.DEFINE_list("runs", None, "Workdirs, or directories of workdirs."),
        "baseline": flags.DEFINE_string(
            "baseline", None, "Baseline read (default: each run's first)."
        ),
        "reads": flags.DEFINE_list("reads", None, "Compare only these reads with the baseline."),
        "threshold": flags.DEFINE_float(
            "threshold", None, "Solved threshold (default: each run's)."
        ),
        "out": flags.DEFINE_string("out", None, "Also write the result as JSON here."),
    }


def main(argv: Sequence[str]) -> None:
    library_logging_at_warning()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not _FLAGS["runs"].value:
        raise app.UsageError("--runs=DIR[,DIR...] is required.")
    try:
        result = compare_runs(
            run_dirs(_FLAGS["runs"].value),
            _FLAGS["baseline"].value,
            _FLAGS["reads"].value,
            _FLAGS["threshold"].value,
        )
    except (ValueError, OSError) as e:
        print(f"analyze: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_comparison(result), end="")
    if _FLAGS["out"].value:
        Path(_FLAGS["out"].value).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    _FLAGS = _define_flags()
    app.run(main)
