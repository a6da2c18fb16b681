"""Reading a training workdir: ``metrics.jsonl`` and ``run_config.json``.

Also names every file the report reads or writes in a workdir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ACCURACY_PNG",
    "CONFIG_FILE",
    "ESCAPE_PNG",
    "METRICS_FILE",
    "RESULTS_JSON",
    "RESULTS_MD",
    "SOLVED_PNG",
    "Metrics",
    "SeedCurve",
    "load_metrics",
    "load_run_config",
]

# Read from a workdir.
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "run_config.json"
# Written into it.
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ACCURACY_PNG = "accuracy_curves.png"
ESCAPE_PNG = "escape_curves.png"
SOLVED_PNG = "solved_counts.png"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SeedCurve:
    """The evaluations of one (read, seed), sorted by step, duplicates resolved.

    Attributes:
        read: read name, e.g. ``"raw"`` or ``"ns5"``.
        seed: training seed.
        steps: int array of evaluation steps, strictly increasing.
        accuracy: float array, NaN where the trainer logged NaN or null.
        nonfinite: bool array, the trainer's per-evaluation ``nonfinite`` flag.
    """

    read: str
    seed: int
    steps: np.ndarray
    accuracy: np.ndarray
    nonfinite: np.ndarray


@dataclasses.dataclass(frozen=True)
class Metrics:
    """Everything read from ``metrics.jsonl``.

    Attributes:
        curves: read -> seed -> :class:`SeedCurve`; reads in order of first appearance,
            seeds ascending.
        num_lines: evaluation lines read (including duplicates).
        num_duplicates: lines superseded by a later line for the same (read, seed, step),
            as a resumed run writes them.
        num_skipped: lines that were not valid JSON (e.g. a line cut short by a crash)
            and were skipped.
    """

    curves: dict[str, dict[int, SeedCurve]]
    num_lines: int
    num_duplicates: int
    num_skipped: int


def _as_accuracy(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: accuracy must be a number or null, got {value!r}")
    return float(value)


def load_metrics(workdir: str | Path) -> Metrics:
    """Reads ``workdir/metrics.jsonl``; the last line for a (read, seed, step) wins.

    Raises:
        ValueError: naming the file, when it is missing, holds no evaluation, or a line
            is a JSON value without the ``read``, ``seed``, ``step`` and ``accuracy``
            fields.
    """
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found (is --workdir a training workdir?)")
    # (read, seed, step) -> (accuracy, nonfinite); dict order = first appearance, which
    # fixes the read order when run_config.json does not list the reads.
    records: dict[tuple[str, int, int], tuple[float, bool]] = {}
    num_lines = num_skipped = 0
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A crash mid-write leaves a partial line that a resumed run appends to;
                # its evaluations are rewritten after the resume, so skipping loses nothing.
                _log.warning("%s: not valid JSON, skipped", where)
                num_skipped += 1
                continue
            if not isinstance(row, dict) or not {"read", "seed", "step", "accuracy"} <= row.keys():
                raise ValueError(f"{where}: expected an object with read, seed, step, accuracy")
            try:
                key = (str(row["read"]), int(row["seed"]), int(row["step"]))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: seed and step must be integers ({e})") from e
            records[key] = (_as_accuracy(row["accuracy"], where), bool(row.get("nonfinite", False)))
            num_lines += 1
    if not records:
        raise ValueError(f"{path}: empty, no evaluation has been written yet")

    grouped: dict[str, dict[int, list[tuple[int, float, bool]]]] = {}
    for (read, seed, step), (accuracy, nonfinite) in records.items():
        grouped.setdefault(read, {}).setdefault(seed, []).append((step, accuracy, nonfinite))
    curves = {}
    for read, by_seed in grouped.items():
        curves[read] = {}
        for seed in sorted(by_seed):
            rows = sorted(by_seed[seed])
            curves[read][seed] = SeedCurve(
                read=read,
                seed=seed,
                steps=np.array([r[0] for r in rows], dtype=np.int64),
                accuracy=np.array([r[1] for r in rows], dtype=np.float64),
                nonfinite=np.array([r[2] for r in rows], dtype=bool),
            )
    return Metrics(
        curves=curves,
        num_lines=num_lines,
        num_duplicates=num_lines - len(records),
        num_skipped=num_skipped,
    )


def load_run_config(workdir: str | Path) -> dict:
    """Returns ``workdir/run_config.json`` as a dict, or ``{}`` when the file is absent.

    Raises:
        ValueError: naming the file, when it is not a JSON object.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
