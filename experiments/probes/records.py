"""The probes of ``experiments/probes/probe.py``, one record per trained model, and their table.

Kept apart from the command (no flags here) so that tests and notebooks can call them on
``experiments.probes.sources.TrainedModel``s directly. ``docs/specification.md`` ("Probes")
defines what each computes.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import numpy as np

from experiments.study.cli import ConfigError

PROBES = ("swap", "decode", "oracle")
NORMALIZATIONS = ("frobenius", "stabilized")
OFFSETS = (0, 1)
# The wrong-key control's draws: the replication's generator seed, 777 + the model's seed.
WRONG_KEY_SEED = 777


# ---------------------------------------------------------------------------------------
# The probes, one record each per model
# ---------------------------------------------------------------------------------------


def swap_record(model, inputs, targets, reads: Sequence[str]) -> dict:
    """acc_<read> and loss_<read> of the model's parameters under each read."""
    from orthorecall import evaluation, probes

    record = {}
    for name in reads:
        read = probes.swapped_read(model.config.cell.read, name)
        config = model.config.replace(cell=model.config.cell.replace(read=read))
        metrics = evaluation.evaluate(model.params, config, inputs, targets)
        record[f"acc_{name}"] = metrics["accuracy"]
        record[f"loss_{name}"] = metrics["loss"]
    return record


def oracle_record(model, inputs, targets) -> dict:
    """Accuracy with native queries and with the stored key as query (offsets 0 and 1)."""
    from orthorecall import evaluation, probes

    accuracies = {"native": [], **{f"oracle+{o}": [] for o in OFFSETS}}
    for batch_inputs, batch_targets in zip(inputs, targets, strict=True):
        stored = probes.stored_positions(batch_inputs, batch_targets)
        sources = {"native": np.full(stored.shape, probes.NO_POSITION)}
        for o in OFFSETS:
            sources[f"oracle+{o}"] = np.where(stored >= 0, stored + o, probes.NO_POSITION)
        for name, source in sources.items():
            logits = probes.apply_with_queries(model.params, batch_inputs, model.config, source)
            accuracy = evaluation.masked_metrics(logits, batch_targets)[1]
            accuracies[name].append(float(accuracy))
    return {name: float(np.mean(values)) for name, values in accuracies.items()}


def normalized_memory(memory, normalization: str) -> np.ndarray:
    """float64 memories (..., H, d, d): each head divided by its Frobenius norm (zero stays
    zero) for ``"frobenius"``, as they are for ``"stabilized"``."""
    memory = np.asarray(memory, np.float64)
    if normalization == "stabilized":
        return memory
    norms = np.sqrt(np.sum(memory**2, axis=(-2, -1), keepdims=True))
    return np.divide(memory, norms, out=np.zeros_like(memory), where=norms > 0)


def _sliced(keys, memory) -> np.ndarray:
    """k̂ᵀ C per head, concatenated over heads: keys (n, H, d), memory (n, H, d, d) -> (n, H d)."""
    features = np.einsum("nhd,nhde->nhe", keys, memory)
    return features.reshape(features.shape[0], -1)


def decode_samples(model, inputs, targets, normalization: str):
    """Per scored query: its features (offset -> (n, f)), wrong-key features (offset ->
    (n, f), NaN rows where the sequence has no other stored key), value, sequence id."""
    from orthorecall import probes

    rng = np.random.default_rng(WRONG_KEY_SEED + model.seed)
    stored = probes.stored_positions(inputs, targets)
    width = int((stored >= 0).sum(axis=-1).max())
    features = {o: [] for o in OFFSETS}
    wrong = {o: [] for o in OFFSETS}
    labels, groups = [], []
    for index, (batch_inputs, batch_targets) in enumerate(zip(inputs, targets, strict=True)):
        batch_stored = stored[index]
        other = probes.other_key_positions(batch_inputs, batch_targets, batch_stored, rng)
        rows, times = np.nonzero(batch_stored >= 0)
        # Each sequence's scored positions in slots 0, 1, ... of a (B, width) request.
        positions = np.full((len(batch_inputs), width), probes.NO_POSITION)
        slots = np.zeros(len(rows), np.int64)
        for row in range(len(batch_inputs)):
            in_row = np.flatnonzero(rows == row)
            positions[row, : len(in_row)] = times[in_row]
            slots[in_row] = np.arange(len(in_row))
        _, traces = probes.trace(model.params, batch_inputs, model.config, positions)
        own, others = batch_stored[rows, times], other[rows, times]
        for o in OFFSETS:
            mine, theirs = [], []
            for block in traces:
                k_hat = np.asarray(block.k, np.float64) / math.sqrt(block.k.shape[-1])
                memory = normalized_memory(np.asarray(block.memory.c)[rows, slots], normalization)
                mine.append(_sliced(k_hat[rows, own + o], memory))
                theirs.append(_sliced(k_hat[rows, np.maximum(others, 0) + o], memory))
            features[o].append(np.concatenate(mine, axis=1))
            theirs = np.concatenate(theirs, axis=1)
            theirs[others < 0] = np.nan
            wrong[o].append(theirs)
        labels.append(batch_targets[rows, times])
        groups.append(index * len(batch_inputs) + rows)
    stack = lambda parts: {o: np.concatenate(parts[o]) for o in OFFSETS}
    return stack(features), stack(wrong), np.concatenate(labels), np.concatenate(groups)


def decode_record(model, inputs, targets, normalization: str) -> dict:
    """Held-out accuracy of ridge decoders of the value from k̂ᵀC_t, and their controls."""
    from orthorecall import ridge

    features, wrong, labels, groups = decode_samples(model, inputs, targets, normalization)
    record = {}
    for o in OFFSETS:
        try:
            decoded = ridge.decode(features[o], labels, groups)
        except ValueError as e:
            raise ValueError(f"decode_o{o}: {e}") from None
        has_other = ~np.isnan(wrong[o]).any(axis=1)
        try:
            control = ridge.decode(wrong[o][has_other], labels[has_other], groups[has_other])
        except ValueError as e:
            raise ValueError(
                f"wrongkey_o{o} (queries with another key stored before them): {e}"
            ) from None
        record[f"decode_o{o}"] = decoded.accuracy
        record[f"wrongkey_o{o}"] = control.accuracy
        record[f"lambda_o{o}"] = decoded.ridge
    record["n_samples"] = len(labels)
    record["n_heldout"] = decoded.num_test
    record["memory_normalization"] = normalization
    return record


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def markdown_table(records: Sequence[dict]) -> str:
    """One row per record, one column per field (in first-seen order); accuracies and
    losses to 4 places."""
    columns = []
    for record in records:
        columns += [key for key in record if key not in columns]

    def shown(key, value):
        if not isinstance(value, float):
            return str(value)
        return f"{value:g}" if key.startswith("lambda") else f"{value:.4f}"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in records:
        cells = (shown(key, record.get(key, "")) for key in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_path(out: pathlib.Path) -> pathlib.Path:
    """OUT.md beside OUT.json (OUT.json.md for another suffix)."""
    return out.with_suffix(".md") if out.suffix == ".json" else out.with_name(out.name + ".md")


def _describe(label: dict) -> str:
    """'ns5 seed 3 of DIR' or 'FILE.pt': a model in a message."""
    if "ckpt" in label:
        return label["ckpt"]
    return f"{label['variant']} seed {label['seed']} of {label['workdir']}"


def run(
    probe: str,
    models,
    *,
    reads: Sequence[str] = ("raw", "ns5"),
    num_sequences: int | None = None,
    normalization: str = "frobenius",
    on_record=None,
) -> list[dict]:
    """One record per model: its label, the number of sequences, the probe's fields.

    Args:
        probe: one of ``PROBES``.
        models: ``probe_sources.TrainedModel``s.
        reads: the reads of ``swap``.
        num_sequences: validation sequences per model (default: its run's set).
        normalization: the memory's for ``decode`` (``NORMALIZATIONS``).
        on_record: called with each record as soon as it is made (progress).

    Raises:
        ConfigError: a probe the model or the data cannot take (a read without a
            definition for the model's write, too few sequences to decode), naming it.
    """
    from experiments.probes.sources import validation_batches

    records = []
    for model in models:
        inputs, targets = validation_batches(model, num_sequences)
        record = {**model.label, "num_sequences": int(inputs.shape[0] * inputs.shape[1])}
        try:
            if probe == "swap":
                record |= swap_record(model, inputs, targets, reads)
            elif probe == "oracle":
                record |= oracle_record(model, inputs, targets)
            else:
                record |= decode_record(model, inputs, targets, normalization)
        except ValueError as e:  # a read the model cannot take, too few sequences, ...
            raise ConfigError(f"{_describe(model.label)}: {e}") from None
        records.append(record)
        if on_record is not None:
            on_record(record)
    return records
