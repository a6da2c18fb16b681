"""Seed for seed with the reference: our ``parity`` runs beside the reference's records.

    python -m experiments.parity.report --runs=workdirs/parity --out=results/parity

``--runs`` is a study workdir of the ``parity`` preset (``experiments/configs/
noisy_ar.py``), or a folder of such workdirs (one per seed, say). For every read and
seed they hold, the report sets our accuracy at each evaluation beside the reference
trainer's record of the same seed and variant (``data/replication_runs/
probe2k_s512.jsonl``: the protocol's cosine runs, one evaluation every 200 steps; its
seed 11 runs are the released reference checkpoints'), says whether each solved the
task (an evaluation at or above the threshold, as the replication counts), and where
the two trajectories part. It writes ``parity.json`` and ``README.md`` into ``--out``
and copies each run's ``metrics.jsonl``, ``train_log.jsonl`` and ``run_config.json``
there, under ``seed<S>/`` (a run of several seeds: under its folder's name).
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence

from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE_RECORDS = REPO_ROOT / "data" / "replication_runs" / "probe2k_s512.jsonl"
VARIANT_READS = {"baseline": "raw", "ns5": "ns5"}
THRESHOLD = 0.8
# Two evaluations of the same model on the same 256 sequences differ by float32
# rounding only when their accuracies agree to this (one sequence's probe is 1/256 of a
# batch's scored positions at most; rounding flips a handful of argmaxes at most).
PART_TOLERANCE = 0.01
_TRACE = re.compile(r"step (\d+) acc ([0-9.eE+-]+) loss ([0-9.eE+-]+|nan|inf)")
COPIED = ("metrics.jsonl", "train_log.jsonl", "run_config.json")

_RUNS = flags.DEFINE_string("runs", None, "A parity workdir, or a folder of them.")
_OUT = flags.DEFINE_string("out", None, "Where parity.json and README.md go.")


class ParityError(Exception):
    """The runs or the records cannot be compared; the message says why."""


def reference_traces(path: pathlib.Path = REFERENCE_RECORDS) -> dict[tuple[str, int], dict]:
    """(read, seed) -> {"trace": {step: accuracy}, "final": accuracy} of the reference's
    v80/s512 batch-16 cosine runs."""
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        record = json.loads(line)
        read = VARIANT_READS.get(record.get("variant"))
        if read is None or record.get("regime") != "v80_s512" or record.get("batch_size") != 16:
            continue
        trace = {}
        for entry in record["trace"]:
            match = _TRACE.match(entry)
            if match is None:
                raise ParityError(f"{path}:{number}: unreadable trace entry {entry!r}.")
            trace[int(match[1])] = float(match[2])
        out[read, int(record["seed"])] = {"trace": trace, "final": record["final_val_acc"]}
    return out


def workdirs(runs: pathlib.Path) -> list[pathlib.Path]:
    """The study workdirs at or directly under ``runs`` (those holding metrics.jsonl)."""
    if (runs / "metrics.jsonl").is_file():
        return [runs]
    found = sorted(p for p in runs.iterdir() if (p / "metrics.jsonl").is_file())
    if not found:
        raise ParityError(f"{runs} holds no study workdir (no metrics.jsonl in it or under it).")
    return found


def our_curves(workdir: pathlib.Path) -> dict[tuple[str, int], dict[int, float | None]]:
    """(read, seed) -> {step: accuracy} of one workdir's evaluations."""
    description = json.loads((workdir / "run_config.json").read_text())
    name = description["config"].get("name")
    if name != "parity" or not description["config"].get("init_from"):
        raise ParityError(
            f"{workdir} is a run of the {name!r} preset without init_from; the comparison "
            "is for runs of the parity preset (--config=configs/noisy_ar.py:parity)."
        )
    curves: dict[tuple[str, int], dict[int, float | None]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        curves.setdefault((row["read"], row["seed"]), {})[row["step"]] = row["accuracy"]
    return curves


def solved(curve: dict[int, float | None]) -> bool:
    return any(a is not None and a >= THRESHOLD for a in curve.values())


def compare(ours: dict[int, float | None], reference: dict) -> dict:
    """One read and seed: both curves at the shared evaluations, both outcomes, and the
    first evaluation where they differ by more than rounding."""
    trace = reference["trace"]
    steps = sorted(set(ours) & set(trace))
    parted = next(
        (s for s in steps if ours[s] is None or abs(ours[s] - trace[s]) > PART_TOLERANCE), None
    )
    last = max(ours)
    return {
        "steps": steps,
        "ours": [ours[s] for s in steps],
        "reference": [trace[s] for s in steps],
        "our_final": ours[last],
        "our_final_step": last,
        "reference_final": reference["final"],
        "complete": last >= max(trace),
        "solved_ours": solved(ours),
        "solved_reference": solved(trace),
        "first_parting_step": parted,
    }


def build(runs: pathlib.Path, out: pathlib.Path) -> dict:
    references = reference_traces()
    comparisons = {}
    for workdir in workdirs(runs):
        for (read, seed), curve in our_curves(workdir).items():
            if (read, seed) not in references:
                raise ParityError(f"the reference's records hold no {read} run of seed {seed}.")
            if (read, seed) in comparisons:
                raise ParityError(f"{read} seed {seed} is in two of the runs under {runs}.")
            comparisons[read, seed] = compare(curve, references[read, seed]) | {
                "workdir": workdir.name
            }
        folder = out / workdir.name
        folder.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            if (workdir / name).is_file():
                shutil.copyfile(workdir / name, folder / name)
    rows = [{"read": r, "seed": s, **c} for (r, s), c in sorted(comparisons.items())]
    complete = [r for r in rows if r["complete"]]
    summary = {
        "threshold": THRESHOLD,
        "part_tolerance": PART_TOLERANCE,
        "reference_records": str(REFERENCE_RECORDS.relative_to(REPO_ROOT)),
        "runs": rows,
        "complete_runs": len(complete),
        "outcomes_agree": sum(r["solved_ours"] == r["solved_reference"] for r in complete),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(format_markdown(summary))
    return summary


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def format_markdown(summary: dict) -> str:
    rows = summary["runs"]
    lines = [
        "# Seed for seed with the reference",
        "",
        "Our `parity` runs (`python -m experiments.run --config=configs/noisy_ar.py:parity`: "
        "the reference's v80/s512 batch-16 protocol from its own initial weights, on its "
        "numpy data stream) beside the reference trainer's record of the same seed and "
        f"variant (`{summary['reference_records']}`). Solved: an evaluation at or above "
        f"{summary['threshold']:g}. The reference's seed 11 runs are those of its released "
        "checkpoints (final accuracy 0.0343 baseline, 0.9939 ns5). Rebuilt with "
        "`python -m experiments.parity.report --runs=workdirs/parity --out=results/parity`; "
        "each run's own logs are in the seed folders (`train_log.jsonl`: every "
        "`log_every` steps' loss, gradient norm and learning rate).",
        "",
        "## Outcomes",
        "",
        "| seed | read | reference solved | we solved | agree | final: reference | ours "
        "(step) | trajectories part at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        agree = "yes" if r["solved_ours"] == r["solved_reference"] else "**no**"
        if not r["complete"]:
            agree = "(running)"
        parted = "–" if r["first_parting_step"] is None else f"step {r['first_parting_step']}"
        lines.append(
            f"| {r['seed']} | {r['read']} | {'yes' if r['solved_reference'] else 'no'} | "
            f"{'yes' if r['solved_ours'] else 'no'} | {agree} | {_pct(r['reference_final'])} | "
            f"{_pct(r['our_final'])} ({r['our_final_step']}) | {parted} |"
        )
    lines += [
        "",
        f"Outcomes agree on {summary['outcomes_agree']} of {summary['complete_runs']} complete "
        "runs (2,000 steps). A trajectory parts where the two accuracies first differ by "
        f"more than {summary['part_tolerance']:g}.",
        "",
        "## Accuracy at every evaluation",
    ]
    for r in rows:
        lines += [
            "",
            f"### seed {r['seed']}, {r['read']}",
            "",
            "| step | reference | ours | difference |",
            "|---|---|---|---|",
        ]
        for step, ref, ours in zip(r["steps"], r["reference"], r["ours"], strict=True):
            diff = "–" if ours is None else f"{100 * (ours - ref):+.2f} points"
            lines.append(f"| {step} | {_pct(ref)} | {_pct(ours)} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1 or not _RUNS.value or not _OUT.value:
        print(
            f"parity_report: usage error: give --runs and --out only, got {argv}.", file=sys.stderr
        )
        sys.exit(2)
    try:
        summary = build(pathlib.Path(_RUNS.value), pathlib.Path(_OUT.value))
    except (ParityError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"parity_report: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_markdown(summary).split("## Accuracy")[0].rstrip())


if __name__ == "__main__":
    app.run(main)
