"""Import the replication's published per-seed records as our study's workdirs.

    python -m experiments.replication.importer [--source=data/replication_runs] --out=DIR

The replication (Aquino-Michaels 2026, arXiv:2607.19390; records CC BY 4.0, see
``data/replication_runs/NOTICE``) released one JSON line per trained model, with its
evaluation trace every 200 steps. This writes one workdir per comparison group under
DIR (``metrics.jsonl`` rows {read, seed, step, accuracy, loss[, alpha]} and
``run_config.json``), so that ``python -m experiments.report --workdir=DIR`` and
``python -m experiments.replication.analyze --runs=DIR`` read their runs as they read ours.

Comparison groups are defined here, by source file, not by the records' fields: the
fields do not tell runs apart (``ns5constlr2k_s512`` and ``probe2k_s512``'s ns5 agree on
every field and differ in the learning-rate schedule, known only from the file name;
``qkboost2k_s512``'s "baseline" is a modified model; the same (variant, seed) recurs in
many files). The schedule is not in the records at all, and not always in the file
names: the anneal runs at v80/s512 (``anneal2k_s512``, ``anneal_gated_s512``) share their
first evaluations, digit for digit, with the constant-rate ns5 runs and not with the
cosine ones, so they are grouped with the constant-rate runs (each group says how its
schedule is known: ``Group.schedule_evidence``). Within a group a read name is the
replication's variant ("baseline" is our "raw"), renamed where a file changes the run
(``raw_qkboost``, ``ns5_anneal_gated``, ``raw_lr001``); a (read, seed) twice in a group
is refused. Every file is either in a group or listed in ``EXCLUDED`` with the reason.
The headline files (``planA_results``, ``stack_s512_results``) hold only the evaluations
from step 1,000 on: they give solved counts and final accuracies exactly, and their
run_config says that escapes before step 1,000 are dated 1,000
(``escapes_dated_from_step``), so time-to-escape statistics leave them out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import app, flags

from experiments.study.cli import ConfigError, config_flag_parser, library_logging_at_warning
from experiments.study.config_checks import FLAGS as FLAG_CHECKS

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "data" / "replication_runs"
ATTRIBUTION = (
    "Per-seed records of K. Aquino-Michaels, 'The Orthogonalized Read Is a Removable "
    "Training Scaffold for Recurrent Memory' (No Way Labs, 2026, arXiv:2607.19390), "
    "CC BY 4.0; converted by orthorecall's experiments.import_replication."
)
EVAL_EVERY = 200
THRESHOLD = 0.8
_TRACE = re.compile(
    r"step (?P<step>\d+) acc (?P<acc>[-+0-9.eE]+|nan) loss (?P<loss>[-+0-9.eE]+|nan)"
    r" t [0-9.]+s(?: alpha (?P<alpha>[0-9.]+))?$"
)


@dataclasses.dataclass(frozen=True)
class Source:
    """Rows of one file in a group: ``rename`` maps the file's variant to the group's
    read name (variants not in it keep their name, "baseline" becoming "raw");
    ``regime`` keeps only that regime's rows; ``lr`` only that learning rate's."""

    file: str
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    regime: str | None = None
    lr: float | None = None


@dataclasses.dataclass(frozen=True)
class Group:
    """One comparison: runs that differ only in the read (and what ``note`` says).

    ``schedule`` is the learning-rate schedule ("cosine", "constant" or "not recorded")
    and ``schedule_evidence`` how we know it: the records never say, so it comes from a
    file's name or from the evaluations themselves (the schedule fingerprint below).
    ``tail_only``: the records hold the last six evaluations (steps 1000-2000) only, so
    escapes before step 1000 are dated 1000.
    """

    name: str
    sources: tuple[Source, ...]
    schedule: str
    schedule_evidence: str
    note: str = ""
    tail_only: bool = False


# How a schedule the records do not state is read off them (the schedule fingerprint):
# runs of one read and seed that share a learning-rate schedule share their first
# evaluations to the printed digit (the GPU runs drift apart only later), while a cosine
# and a constant rate mostly differ at step 200 already; and a cosine that ends at the
# budget leaves the last evaluations almost still (validation loss moving by about
# 0.002-0.02 over the last 200 steps, in the middle of the seeds), where a constant rate
# keeps them moving (0.05-0.3). tests/test_import_replication.py checks the first part.
_CONSTANT_BY_NAME = "constant: the file names say so (constlr, ns5constlr)"
_GRID_EVIDENCE = (
    "constant, inferred: batch16_grid's lr 3e-3 runs repeat constlr2k/constlr12k's "
    "first evaluation to the printed digit (6 of 8 seeds, none the cosine probe2k's "
    "where the two differ), and the batch grids are one sweep (one record layout); "
    "batch64_v96_cosine, a cosine rerun by its name, is kept apart from them"
)


def _grid_groups() -> list[Group]:
    groups = []
    for batch, steps in ((4, 6000), (8, 4000), (16, 3000), (32, 2000), (64, 2000)):
        # raw is the baseline at the study's lr 3e-3 (the ns5 runs' rate); the other
        # rates are reads of their own, compared with it.
        sources = [
            Source(f"batch{batch}_grid.jsonl", {"baseline": name}, lr=lr)
            for name, lr in (("raw", 3e-3), ("raw_lr001", 1e-3), ("raw_lr010", 1e-2))
        ]
        if batch in (4, 8):
            sources.append(Source(f"batch{batch}_ns5.jsonl"))
        groups.append(
            Group(
                f"v80_s512_b{batch}_{steps // 1000}k_lr_grid",
                tuple(sources),
                schedule="constant",
                schedule_evidence=_GRID_EVIDENCE,
                note=f"learning-rate grid at batch {batch}, {steps} steps",
            )
        )
    for regime in ("v80_s768", "v88_s768", "v96_s768"):
        for tag in ("001", "003", "010"):
            groups.append(
                Group(
                    f"{regime}_b16_3k_lr{tag}",
                    (Source(f"grid_lr{tag}.jsonl", regime=regime),),
                    schedule="not recorded",
                    schedule_evidence="no run of known schedule shares these regimes; "
                    "the last evaluations do not tell cosine from constant clearly",
                    note=f"lr {int(tag) / 1000:g}, 3000 steps",
                )
            )
    return groups


GROUPS: tuple[Group, ...] = (
    Group(
        "v80_s512_b16_2k",
        (
            Source("probe2k_s512.jsonl"),
            Source("ns02k_s512.jsonl"),
            Source("nsdose2k_s512.jsonl"),
            Source("st2k_s512.jsonl"),
            Source("delta2k_s512.jsonl"),
            Source("rls2k_s512.jsonl"),
            Source("randk2k_s512.jsonl"),
            Source("qkboost2k_s512.jsonl", {"baseline": "raw_qkboost"}),
        ),
        schedule="cosine",
        schedule_evidence="probe2k is the protocol's cosine (the reference checkpoints' "
        "run); the variant files' last evaluations barely move, as probe2k's do and the "
        "constant-rate files' do not (assumed cosine; not recorded)",
        note="the mechanism study: every variant at v80/s512, batch 16, lr 3e-3 cosine, "
        "2,000 steps",
    ),
    Group(
        "v80_s512_b16_2k_headline",
        (Source("planA_results.jsonl", regime="v80_s512"), Source("stack_s512_results.jsonl")),
        schedule="cosine",
        schedule_evidence="the published protocol; planA's 32 raw and ns5 runs solve "
        "exactly the seeds probe2k's cosine runs solve",
        note="the published headline runs (3/16 vs 9/16)",
        tail_only=True,
    ),
    Group(
        "v80_s1024_b16_2k_headline",
        (Source("planA_results.jsonl", regime="v80_s1024"),),
        schedule="cosine",
        schedule_evidence="the published protocol (as v80_s512_b16_2k_headline)",
        note="the published headline runs (4/16 vs 10/16)",
        tail_only=True,
    ),
    Group(
        "v80_s512_b16_2k_constant_lr",
        (
            Source("constlr2k_s512.jsonl"),
            Source("ns5constlr2k_s512.jsonl"),
            Source("anneal2k_s512.jsonl", {"ns5": "ns5_anneal_window"}),
            Source("anneal_gated_s512.jsonl", {"ns5": "ns5_anneal_gated"}),
        ),
        schedule="constant",
        schedule_evidence=_CONSTANT_BY_NAME + "; the anneal files' first evaluations "
        "repeat ns5constlr2k's to the printed digit for every seed (the first 1 to 6) "
        "and never probe2k's cosine ones",
        note="constant learning rate 3e-3, with the scaffold anneals (gated anneals run "
        "past 2,000 steps when triggered late)",
    ),
    Group(
        "v80_s512_b16_4k",
        (
            Source("budget4k_baseline_s512.jsonl"),
            Source("probe4k_baseline_s512.jsonl", {"baseline": "raw_probe_rerun"}),
            Source("ns5_4k_s512.jsonl"),
        ),
        schedule="cosine",
        schedule_evidence="a cosine over 4,000 steps (budget4k, ns5_4k; probe4k repeats "
        "budget4k's first evaluations for 15 of 16 seeds); the last evaluations do not "
        "move",
        note="a cosine stretched to 4,000 steps",
    ),
    Group(
        "v80_s1024_b16_4k",
        (Source("budget4k_baseline_s1024.jsonl"),),
        schedule="cosine",
        schedule_evidence="a cosine over 4,000 steps (budget4k); the last evaluations do not move",
        note="baseline only",
    ),
    Group(
        "v80_s512_b16_12k_constant_lr",
        (Source("constlr12k_s512.jsonl"),),
        schedule="constant",
        schedule_evidence=_CONSTANT_BY_NAME,
        note="baseline only, 12,000 steps at a constant lr",
    ),
    Group(
        "v96_s768_b64_2k",
        (Source("batch64_v96_cosine.jsonl"), Source("batch64_v96_ns5.jsonl")),
        schedule="cosine",
        schedule_evidence="the baseline's file name; the ns5 file's schedule is not "
        "recorded (taken as the same)",
        note="the published v96/s768 batch-64 comparison (1/8 vs 5/8)",
    ),
    Group(
        "v96_s768_b16_4k",
        (
            Source("frontier_v96s768.jsonl"),
            Source("anneal_gated_v96.jsonl", {"ns5": "ns5_anneal_gated"}),
        ),
        schedule="constant",
        schedule_evidence="inferred: the last evaluations keep moving (a 4,000-step "
        "cosine leaves them still); the anneal file's first evaluations repeat "
        "frontier's ns5 ones to the printed digit, so both share it",
        note="4,000 steps at batch 16",
    ),
    Group(
        "v80_s512_b16_2k_data_seeds",
        tuple(
            Source(f"factorial_ds{d}.jsonl", {"baseline": f"raw_data_seed{d}"})
            for d in (11, 12, 13, 14)
        ),
        schedule="constant",
        schedule_evidence="inferred: the runs whose data seed is their model seed repeat "
        "constlr2k's first evaluations to the printed digit (seeds 11, 12, 14)",
        note="baseline with the data seed varied independently of the model seed",
    ),
    *_grid_groups(),
)

EXCLUDED = {
    "c_decode_probe2k.jsonl": "probe of trained checkpoints (ridge decode), no training "
    "trace; compare with `python -m experiments.probes.probe --probe=decode`",
    "oracle_probe2k.jsonl": "probe of trained checkpoints (oracle query), no training trace",
    "swap_probe2k.jsonl": "probe of trained checkpoints (swap evaluation), no training trace",
}


class RecordError(ValueError):
    """A record that cannot be imported; the message starts with its file and line."""


def parse_trace(entries: Sequence[str], where: str, last_step: int | None = None) -> list[dict]:
    """The evaluations of a ``trace`` list: {step, accuracy, loss[, alpha]}, checked:
    steps strictly increasing (and at most ``last_step``, the run's length, when given),
    accuracies in [0, 1], losses a number or an explicit ``nan`` (a diverged run),
    alpha in [0, 1].

    Raises:
        RecordError: naming ``where`` and the entry.
    """
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise RecordError(f"{where}: a trace must be a list of strings, got {entries!r:.80}")
    out = []
    for entry in entries:
        match = _TRACE.fullmatch(entry.strip())
        if match is None:
            raise RecordError(f"{where}: trace entry {entry!r} is not 'step N acc A loss L t Ts'")
        try:
            row = {
                "step": int(match["step"]),
                "accuracy": float(match["acc"]),
                "loss": float(match["loss"]),
            }
        except ValueError:
            raise RecordError(f"{where}: trace entry {entry!r} holds a malformed number") from None
        if not 0.0 <= row["accuracy"] <= 1.0:  # NaN fails too
            raise RecordError(f"{where}: trace entry {entry!r}: accuracy outside [0, 1]")
        if math.isinf(row["loss"]):
            raise RecordError(
                f"{where}: trace entry {entry!r}: an infinite loss (a diverged run's loss "
                "is written nan)"
            )
        if out and row["step"] <= out[-1]["step"]:
            raise RecordError(
                f"{where}: trace entry {entry!r}: step {row['step']} does not follow step "
                f"{out[-1]['step']} (evaluations must be in increasing step order, each once)"
            )
        if last_step is not None and row["step"] > last_step:
            raise RecordError(
                f"{where}: trace entry {entry!r}: step {row['step']} is past the run's "
                f"{last_step} steps"
            )
        if match["alpha"] is not None:
            row["alpha"] = float(match["alpha"])
            if not 0.0 <= row["alpha"] <= 1.0:
                raise RecordError(f"{where}: trace entry {entry!r}: alpha outside [0, 1]")
        out.append(row)
    return out


# What every training record holds, and what it must be.
_REQUIRED = {
    "variant": "a read name (string)",
    "seed": "an integer in [0, 2**32)",
    "regime": "'v<vocab>_s<length>'",
    "batch_size": "an integer >= 1",
    "lr": "a finite number > 0",
    "steps": "an integer >= 1",
    "noise_vocab_size": "an integer >= 0",
    "frac_noise": "a number in [0, 1]",
}


def _is_int(value, minimum: int, maximum: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    )


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_record(record, where: str, *, tail_only: bool) -> list[dict]:
    """Checks one training record (its fields, types and trace); returns its trace's
    evaluations (``trace_tail``'s when ``tail_only``).

    Raises:
        RecordError: naming ``where`` (file:line) and the field.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    valid = {
        "variant": lambda v: isinstance(v, str) and bool(v.strip()),
        "seed": lambda v: _is_int(v, 0, 2**32 - 1),
        "regime": lambda v: isinstance(v, str) and re.fullmatch(r"v\d+_s\d+", v) is not None,
        "batch_size": lambda v: _is_int(v, 1),
        "lr": lambda v: _is_real(v) and v > 0,
        "steps": lambda v: _is_int(v, 1),
        "noise_vocab_size": lambda v: _is_int(v, 0),
        "frac_noise": lambda v: _is_real(v) and 0 <= v <= 1,
    }
    for field, must in _REQUIRED.items():
        if field not in record:
            raise RecordError(
                f"{where}: no {field!r}; a training record names its variant, seed, regime, "
                "batch_size, lr, steps and task (list a probe file in EXCLUDED)"
            )
        if not valid[field](record[field]):
            raise RecordError(f"{where}: {field} must be {must}, got {record[field]!r:.80}")
    steps_run = record.get("steps_run")
    if steps_run is not None and not _is_int(steps_run, 1):
        raise RecordError(f"{where}: steps_run must be an integer >= 1, got {steps_run!r:.80}")
    trigger = record.get("anneal_trigger_step")
    if trigger is not None and not _is_int(trigger, 0):
        raise RecordError(
            f"{where}: anneal_trigger_step must be null or an integer >= 0, got {trigger!r:.80}"
        )
    key = "trace_tail" if tail_only else "trace"
    if record.get(key) is None:
        raise RecordError(f"{where}: no {key!r}; list the file in EXCLUDED or tail_only")
    # Gated anneals run past the budget when they trigger late (steps_run).
    last_step = max(record["steps"], steps_run or 0)
    return parse_trace(record[key], where, last_step)


def read_sources(source: Path) -> dict[str, list[tuple[str, dict]]]:
    """Every record of every grouped file, parsed and checked before anything is
    written: file name -> [(file:line, record)] (a record checked for every way a group
    reads it: full trace, tail only).

    Raises:
        RecordError: the first bad record, with its file and line.
    """
    tail_only = {s.file: g.tail_only for g in GROUPS for s in g.sources}
    records = {}
    for name in sorted(tail_only):
        path = source / name
        if not path.is_file():
            raise RecordError(f"{path}: missing (a file of the comparison groups)")
        rows = []
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise RecordError(f"{path}: cannot be read ({e})") from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not a JSON line ({e.msg})") from None
            check_record(record, where, tail_only=tail_only[name])
            rows.append((where, record))
        records[name] = rows
    return records


def _read_name(variant: str, rename: Mapping[str, str]) -> str:
    if variant in rename:
        return rename[variant]
    return "raw" if variant == "baseline" else variant


def group_rows(
    group: Group, source: Path, records: Mapping[str, list[tuple[str, dict]]] | None = None
) -> tuple[list[dict], dict]:
    """The metrics rows of a group and what its run_config needs, from ``records``
    (``read_sources``; read from ``source`` when not given)."""
    if records is None:
        records = read_sources(source)
    fields = {
        "regimes": "regime",
        "batch": "batch_size",
        "lr": "lr",
        "steps": "steps",
        "noise_vocab_size": "noise_vocab_size",
        "frac_noise": "frac_noise",
    }
    rows, seen, meta = [], set(), {name: set() for name in fields}
    reads: list[str] = []
    for src in group.sources:
        for where, record in records[src.file]:
            if src.regime is not None and record["regime"] != src.regime:
                continue
            if src.lr is not None and record["lr"] != src.lr:
                continue
            read = _read_name(record["variant"], src.rename)
            key = (read, record["seed"])
            if key in seen:
                raise RecordError(
                    f"{where}: {read} seed {key[1]} appears twice in group {group.name}; "
                    "give one of the files a rename in experiments.replication.importer."
                )
            seen.add(key)
            if read not in reads:
                reads.append(read)
            trace = record["trace_tail"] if group.tail_only else record["trace"]
            trigger = record.get("anneal_trigger_step")
            for evaluation in parse_trace(trace, where):
                row = {"read": read, "seed": key[1], **evaluation, "nonfinite": False}
                if "alpha" in evaluation:
                    # As our trainer writes an annealed read's rows: the seed's
                    # trigger step once it has triggered (experiments.report.anneal).
                    reached = trigger is not None and evaluation["step"] >= trigger
                    row["anneal_trigger_step"] = trigger if reached else None
                rows.append(row)
            for name, field in fields.items():
                meta[name].add(record[field])
    if not rows:
        raise RecordError(f"group {group.name}: its sources hold no row")
    return rows, {**meta, "reads": reads}


def _only(values: set):
    """The one value of a set, or its values sorted when the group mixes several."""
    return next(iter(values)) if len(values) == 1 else sorted(values)


def run_config(group: Group, meta: Mapping, rows: Sequence[Mapping]) -> dict:
    """The run_config.json of a group, in the fields our report reads."""
    if len(meta["regimes"]) != 1:
        raise ValueError(
            f"group {group.name} mixes regimes {sorted(meta['regimes'])}; give each regime "
            "its own group (Source(regime=...))"
        )
    regime = _only(meta["regimes"])
    vocab, length = (int(x) for x in re.fullmatch(r"v(\d+)_s(\d+)", regime).groups())
    # The baseline first (the report compares every read with the first), then the
    # order of the group's files.
    reads = sorted(meta["reads"], key=lambda r: r != "raw")
    seeds = sorted({r["seed"] for r in rows})
    return {
        "name": group.name,
        "regime": regime,
        "total_steps": max(meta["steps"]),
        "eval_every": EVAL_EVERY,
        "reads": reads,
        "num_seeds": len(seeds),
        "seeds": seeds,
        "solved_threshold": THRESHOLD,
        "batch_size": _only(meta["batch"]),
        "learning_rate": _only(meta["lr"]),
        "schedule": group.schedule,
        "schedule_evidence": group.schedule_evidence,
        "vocab_size": vocab,
        "seq_len": length,
        "noise_vocab_size": _only(meta["noise_vocab_size"]),
        "frac_noise": _only(meta["frac_noise"]),
        "multi_query": True,
        "source_files": [s.file for s in group.sources],
        "note": group.note,
        # Escapes before this step are dated to it (None: every evaluation is known);
        # experiments.replication.analyze leaves such runs out of time-to-escape statistics.
        "escapes_dated_from_step": 1000 if group.tail_only else None,
        "attribution": ATTRIBUTION,
    }


def import_records(source: str | Path, out: str | Path) -> dict[str, Path]:
    """Writes one workdir per group under ``out``; returns group -> workdir.

    All or nothing: every record of every grouped file is parsed and checked, and every
    group's rows and run_config computed, before anything is written; the workdirs are
    then written into a temporary folder beside ``out`` and renamed into place, so
    ``out`` either holds the whole import or is left as it was.

    Raises:
        ValueError: a file of ``source`` in no group and not excluded, a group's file
            missing, a malformed record (``RecordError``, naming its file and line), a
            duplicate (read, seed) in a group, or an ``out`` that already holds
            something (it is not overwritten) or cannot be created.
    """
    source, out = Path(source), Path(out).absolute()
    if not source.is_dir():
        raise ValueError(f"--source {source}: not a directory of replication JSONL files")
    grouped = {s.file for g in GROUPS for s in g.sources}
    unknown = sorted(
        p.name for p in source.glob("*.jsonl") if p.name not in grouped | set(EXCLUDED)
    )
    if unknown:
        raise ValueError(f"{source}: files in no comparison group: {unknown}; add them to GROUPS")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} is not empty; give a new directory (nothing is overwritten)")
    try:
        FLAG_CHECKS.output_folder("out", out)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    records = read_sources(source)
    contents = {}
    for group in GROUPS:
        rows, meta = group_rows(group, source, records)
        contents[group.name] = (rows, run_config(group, meta, rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for name, (rows, config) in contents.items():
            workdir = staging / name
            workdir.mkdir()
            (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (workdir / "run_config.json").write_text(json.dumps(config, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: out / name for name in contents}


def _define_flags() -> dict:
    """The command's flags, defined only when it runs as a program: the module is also
    imported as a library (tests, experiments.replication.analyze and import_replication together),
    and absl refuses a flag defined twice."""
    return {
        "source": flags.DEFINE_string("source", str(DEFAULT_SOURCE), "Directory of the records."),
        "out": flags.DEFINE_string("out", None, "New directory for one workdir per group."),
    }


def main(argv: Sequence[str]) -> None:
    library_logging_at_warning()
    if len(argv) > 1:
        _usage(f"unexpected arguments: {list(argv[1:])}")
    if not _FLAGS["out"].value:
        _usage("--out=DIR is required.")
    try:
        workdirs = import_records(_FLAGS["source"].value, _FLAGS["out"].value)
    except (ValueError, OSError) as e:
        print(f"import_replication: error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, workdir in workdirs.items():
        print(f"{name}: {workdir}")
    print(f"excluded: {', '.join(sorted(EXCLUDED))} (probes without a training trace)")


def _usage(message: str):
    print(f"import_replication: usage error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    _FLAGS = _define_flags()
    app.run(main, flags_parser=config_flag_parser("import_replication"))
