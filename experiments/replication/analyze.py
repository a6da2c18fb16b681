"""Compare reads over any set of runs: per run and pooled, with hazard ratios.

    python -m experiments.replication.analyze --runs=DIR[,DIR...] [--baseline=raw] [--reads=ns5,rls]
        [--threshold=0.8] [--hazard_model=stratum_interval] [--out=FILE.json]

Each DIR is a workdir (``metrics.jsonl``, ``run_config.json``: ours, or the
replication's through ``experiments.replication.importer``) or a directory of them. Every
run is a stratum: per run and read, the solved count against the baseline's (Fisher's
exact test), the log-rank test of escape times, the discrete-time hazard ratio and
McNemar's test on paired seeds (``experiments.report.hazard``); then, per read, the
hazard ratio pooled over the runs that hold it and the baseline, stratified by run (under
``--hazard_model``'s baseline hazard, and refitted under the others: the ratio's
dependence on that model is part of the answer), and McNemar's test over their paired
seeds. Runs without the baseline read are skipped, and said so. A run whose escapes
before some step are only dated to it (``escapes_dated_from_step`` in its run_config:
the replication's headline files) counts for solved counts, Fisher and McNemar, not for
time-to-escape statistics (nor for the pooled fits). Prints markdown tables; ``--out``
also writes JSON. Exit status 2 with a message on bad input (no metrics, a baseline or
read no run holds).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import app, flags

from experiments.report import hazard
from experiments.report.build import find_regime_workdirs
from experiments.report.records import METRICS_FILE, load_metrics, load_run_config
from experiments.report.statistics import analyze, compare_reads
from experiments.report.tables import format_hazard_ratio, format_p
from experiments.study.cli import config_flag_parser, library_logging_at_warning
from experiments.study.config_checks import FLAGS as FLAG_CHECKS


def resolve_runs(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The workdirs named by ``paths`` (a workdir, or a directory of workdirs), each once.

    Every path is resolved (symbolic links, ``..``) and a directory of workdirs expanded
    to its workdirs, so a run named twice, or named and also reached through its parent,
    is counted once; the second element says which were (one line each, for the
    output). Two different folders holding byte-identical ``metrics.jsonl`` files are
    one run copied, and refused.

    Raises:
        ValueError: a path that is neither a workdir nor a directory of them, or a run
            copied into two folders.
    """
    found: dict[Path, list[str]] = {}
    for given in paths:
        path = Path(given)
        if (path / METRICS_FILE).is_file():
            candidates = [path]
        elif path.is_dir() and find_regime_workdirs(path):
            candidates = find_regime_workdirs(path)
        else:
            raise ValueError(
                f"{given}: neither a workdir with {METRICS_FILE} nor a directory of them"
            )
        for candidate in candidates:
            named = given if candidate == path else f"{given} (inside it)"
            found.setdefault(candidate.resolve(), []).append(named)
    notes = [
        f"{run} was named {len(names)} times ({'; '.join(names)}): counted once"
        for run, names in found.items()
        if len(names) > 1
    ]
    digests: dict[str, Path] = {}
    for run in found:
        digest = hashlib.sha256((run / METRICS_FILE).read_bytes()).hexdigest()
        if digest in digests:
            raise ValueError(
                f"{digests[digest]} and {run} hold the same {METRICS_FILE}, byte for byte: "
                "one run copied into two folders would be counted twice; name only one"
            )
        digests[digest] = run
    return list(found), notes


def run_dirs(paths: Sequence[str]) -> list[Path]:
    """The workdirs named by ``paths``, each once (``resolve_runs``)."""
    return resolve_runs(paths)[0]


def check_evaluation_order(workdir: Path) -> None:
    """Refuses a ``metrics.jsonl`` whose evaluations of a (read, seed) go back in step
    (out of order) or repeat a step with a different accuracy or ``nonfinite`` flag: the
    analysis would otherwise keep one of them silently. A repeat with the same values (a
    resumed run writing an evaluation again) is harmless. Lines that are not JSON (a
    crash mid-write) are left to ``load_metrics``, which skips them.

    Raises:
        ValueError: naming the file, line, read, seed and step.
    """
    path = workdir / METRICS_FILE
    last: dict[tuple, int] = {}
    values: dict[tuple, tuple] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not {"read", "seed", "step"} <= row.keys():
                continue  # load_metrics refuses it, naming the line
            run = (str(row["read"]), row["seed"])
            key = (*run, row["step"])
            value = (row.get("accuracy"), bool(row.get("nonfinite", False)))
            where = f"{path}:{lineno}: read {run[0]} seed {run[1]} step {row['step']}"
            if key in values:
                if values[key] != value:
                    raise ValueError(
                        f"{where} is evaluated twice with different values ({values[key][0]} "
                        f"and {value[0]}); which one is the run's is unknown"
                    )
                continue
            if not isinstance(row["step"], int) or row["step"] < last.get(run, -1):
                raise ValueError(
                    f"{where} comes after step {last.get(run)}: evaluations out of order"
                )
            last[run], values[key] = row["step"], value


def compare_runs(
    workdirs: Sequence[Path],
    baseline: str | None = None,
    reads: Sequence[str] | None = None,
    threshold: float | None = None,
    hazard_model: str = hazard.DEFAULT_BASELINE,
) -> dict:
    """Per-run comparisons of every read (or ``reads``) with the baseline (default: each
    run's first read), and per read the hazard ratio pooled over runs.

    Args:
        workdirs: the runs; each is a stratum of the pooled fits.
        baseline: the read every other is compared with; runs without it are skipped
            (listed in the result's ``skipped``).
        reads: compare only these reads (default: all).
        threshold: solved threshold (default: each run's).
        hazard_model: the baseline-hazard model of the hazard ratios
            (``hazard.BASELINES``); the pooled fits are also given under every model.

    Returns:
        {"runs": [{"run", "baseline", "time_to_escape", "reads": {read: {"solved",
        "num_seeds", "baseline_solved", "baseline_num_seeds", "fisher_p", "logrank_p",
        "hazard_ratio", "mcnemar"}}}], "pooled": {read: {"runs", "solved", "num_seeds",
        "baseline_solved", "baseline_num_seeds", "hazard_ratio", "hazard_ratio_by_model",
        "mcnemar"}},
        "skipped": [{"run", "reason"}], "hazard_model"}

    Raises:
        ValueError: no workdir, an unknown ``hazard_model``, a read of ``reads`` that no
            run holds, a run without evaluations, or no run holding the baseline.
    """
    _check_run_arguments(workdirs, hazard_model)
    runs, strata, skipped, seen = [], {}, [], set()
    for workdir in workdirs:
        check_evaluation_order(Path(workdir))
        config = load_run_config(workdir)
        results = analyze(load_metrics(workdir), config, threshold)
        summaries = results["reads"]
        seen.update(summaries)
        base_name = baseline or results["baseline"]
        if base_name not in summaries:
            skipped.append(
                {"run": str(workdir), "reason": f"no read {base_name!r} (it has {list(summaries)})"}
            )
            continue
        entry, timed_strata = _compare_run(workdir, config, results, base_name, reads, hazard_model)
        for name, stratum in timed_strata.items():
            strata.setdefault(name, []).append(stratum)
        runs.append(entry)
    unknown = sorted(set(reads or ()) - seen)
    if unknown:
        raise ValueError(f"no run holds the read(s) {unknown}; the runs hold {sorted(seen)}")
    if not runs:
        raise ValueError(
            f"no run holds the baseline read {baseline!r} (the runs hold {sorted(seen)}); "
            "check --baseline"
        )
    pooled = {name: _pool_read(groups, hazard_model) for name, groups in strata.items()}
    return {"runs": runs, "pooled": pooled, "skipped": skipped, "hazard_model": hazard_model}


def _check_run_arguments(workdirs: Sequence[Path], hazard_model: str) -> None:
    """Refuses no run, an unknown hazard model, or a run named twice."""
    if not workdirs:
        raise ValueError("no run given; pass --runs=DIR[,DIR...]")
    if hazard_model not in hazard.BASELINES:
        raise ValueError(f"--hazard_model={hazard_model!r}; use one of {hazard.BASELINES}")
    resolved = [Path(w).resolve() for w in workdirs]
    repeated = sorted({str(w) for w in resolved if resolved.count(w) > 1})
    if repeated:
        raise ValueError(f"runs given twice: {repeated}; each run counts once (resolve_runs)")


def _compare_run(
    workdir: Path,
    config: Mapping,
    results: Mapping,
    base_name: str,
    reads: Sequence[str] | None,
    hazard_model: str,
) -> tuple[dict, dict[str, tuple]]:
    """One run's comparison of each read with ``base_name`` (its entry of ``runs``), and
    per read the run's stratum of the pooled fits: ``(run, baseline summary, summary,
    evaluation interval)``, only when the run's escapes are timed."""
    if not results["eval_every"]:
        raise ValueError(f"{workdir}: no evaluation after step 0; nothing to time")
    summaries = results["reads"]
    timed = config.get("escapes_dated_from_step") is None
    interval = int(results["eval_every"])
    entry = {"run": str(workdir), "baseline": base_name, "time_to_escape": timed, "reads": {}}
    strata = {}
    base = summaries[base_name]
    for name, summary in summaries.items():
        if name == base_name or (reads and name not in reads):
            continue
        comparison = compare_reads(base_name, base, name, summary)
        hazard_ratio = (
            hazard.hazard_ratio([(base, summary, interval)], hazard_model) if timed else None
        )
        entry["reads"][name] = {
            "solved": summary["solved"],
            "num_seeds": summary["num_seeds"],
            "baseline_solved": base["solved"],
            "baseline_num_seeds": base["num_seeds"],
            "fisher_p": comparison["fisher_p"],
            "logrank_p": comparison["logrank_p"] if timed else None,
            "hazard_ratio": hazard_ratio,
            "mcnemar": hazard.mcnemar_paired(base, summary),
        }
        if timed:
            strata[name] = (str(workdir), base, summary, interval)
    return entry, strata


def _pool_read(groups: Sequence[tuple], hazard_model: str) -> dict:
    """One read's counts, hazard ratio (under every baseline model, stratified by run)
    and McNemar test pooled over its runs' ``groups`` (``_compare_run``'s strata)."""
    by_model = {m: hazard.hazard_ratio([g[1:] for g in groups], m) for m in hazard.BASELINES}
    return {
        "runs": [g[0] for g in groups],
        "solved": sum(g[2]["solved"] for g in groups),
        "num_seeds": sum(g[2]["num_seeds"] for g in groups),
        "baseline_solved": sum(g[1]["solved"] for g in groups),
        "baseline_num_seeds": sum(g[1]["num_seeds"] for g in groups),
        "hazard_ratio": by_model[hazard_model],
        "hazard_ratio_by_model": by_model,
        "mcnemar": hazard.mcnemar_pooled([g[1:3] for g in groups]),
    }


def format_comparison(result: Mapping) -> str:
    """The markdown tables of ``compare_runs``' result."""
    model = result.get("hazard_model", hazard.DEFAULT_BASELINE)
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
                f"{format_hazard_ratio(r['hazard_ratio'])} | "
                f"{format_p(mcnemar['p'])} ({mcnemar['num_pairs']}) |"
            )
    others = [m for m in hazard.BASELINES if m != model]
    lines += [
        "",
        f"Hazard ratios: discrete-time logistic, {hazard.BASELINE_DESCRIPTIONS[model]}, 95% Wald "
        "interval; pooled over the runs as strata. The last columns refit the pooled ratio "
        "with the other baseline-hazard models.",
        "",
        "| read | runs pooled | solved | baseline solved | pooled hazard ratio [95% CI] | Wald p | "
        "McNemar p (pairs) | " + " | ".join(hazard.BASELINE_DESCRIPTIONS[m] for m in others) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(others),
    ]
    for name, p in result["pooled"].items():
        mcnemar = p["mcnemar"]
        lines.append(
            f"| {name} | {len(p['runs'])} | {p['solved']}/{p['num_seeds']} | "
            f"{p['baseline_solved']}/{p['baseline_num_seeds']} | "
            f"{format_hazard_ratio(p['hazard_ratio'])} | {format_p(p['hazard_ratio']['p'])} | "
            f"{format_p(mcnemar['p'])} ({mcnemar['num_pairs']}) | "
            + " | ".join(format_hazard_ratio(p["hazard_ratio_by_model"][m]) for m in others)
            + " |"
        )
    if result.get("counted_once"):
        lines.append("")
        lines += [f"- {note}." for note in result["counted_once"]]
    if result.get("skipped"):
        lines.append("")
        lines += [f"- Skipped {Path(k['run']).name}: {k['reason']}." for k in result["skipped"]]
    return "\n".join(lines) + "\n"


def _define_flags() -> dict:
    """The command's flags, defined only when it runs as a program: the module is also
    imported as a library (tests, experiments.replication.analyze and import_replication together),
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
        "hazard_model": flags.DEFINE_enum(
            "hazard_model",
            hazard.DEFAULT_BASELINE,
            list(hazard.BASELINES),
            "Baseline hazard of the hazard ratios: per interval and run (default), per "
            "interval shared by the runs, or constant in time.",
        ),
    }


def main(argv: Sequence[str]) -> None:
    library_logging_at_warning()
    if len(argv) > 1:
        _refuse(f"unexpected arguments: {list(argv[1:])}")
    if not _FLAGS["runs"].value:
        _refuse("--runs=DIR[,DIR...] is required.")
    threshold, out = _FLAGS["threshold"].value, _FLAGS["out"].value
    try:
        if threshold is not None:
            FLAG_CHECKS.real("threshold", threshold, minimum=0, maximum=1, minimum_inclusive=False)
        if out:
            FLAG_CHECKS.output_file("out", out)
        workdirs, counted_once = resolve_runs(_FLAGS["runs"].value)
        result = compare_runs(
            workdirs,
            _FLAGS["baseline"].value,
            _FLAGS["reads"].value,
            threshold,
            _FLAGS["hazard_model"].value,
        )
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        _refuse(str(e))
    if counted_once:
        result["counted_once"] = counted_once
    print(format_comparison(result), end="")
    if out:
        Path(out).write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")


def _refuse(message: str):
    print(f"analyze: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    _FLAGS = _define_flags()
    app.run(main, flags_parser=config_flag_parser("analyze"))
