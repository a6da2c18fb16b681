"""The committed compile report (results/gpu_compile_report.json, written by
``experiments.accelerators.compile_report``): every kernel the model can select compiled, within its
target's shared memory per block, with the warps it was given, and without spills
beyond the ones still open (``OPEN_SPILLS``). Reads the JSON only: no triton, no GPU."""

from __future__ import annotations

import json
import pathlib

import pytest

REPORT = pathlib.Path(__file__).resolve().parents[1] / "results" / "gpu_compile_report.json"

# Kernels that still spill in the committed report, with the most spill bytes per thread
# (stores or loads) it may record for each: all in 64 x 64 blocks (d = 48 and 64), the
# backward passes at "highest" on both targets and at the one-pass precisions mostly on
# sm_80, and 4 B in the chunk forward at d = 48 (docs/accelerators.md says why). Every
# other kernel must compile without spills; a kernel that spills more than its figure
# here, or any other kernel that spills at all, fails. Lower a figure (or drop the
# entry) when a kernel change reduces it.
OPEN_SPILLS = {
    "ns_read_backward_kernel_d48_highest_sm80": 340,
    "ns_read_backward_kernel_d48_highest_sm90": 140,
    "ns_read_backward_kernel_d48_tensorfloat32_sm90": 4,
    "ns_read_backward_kernel_d48_bfloat16_sm80": 20,
    "ns_read_backward_kernel_d64_highest_sm80": 280,
    "ns_read_backward_kernel_d64_highest_sm90": 112,
    "chunk_read_forward_kernel_d48_highest_sm80": 4,
    "chunk_read_backward_kernel_d48_highest_sm80": 548,
    "chunk_read_backward_kernel_d48_highest_sm90": 144,
    "chunk_read_backward_kernel_d48_tensorfloat32_sm80": 44,
    "chunk_read_backward_kernel_d48_bfloat16_sm80": 116,
    "chunk_read_backward_kernel_d64_highest_sm80": 564,
    "chunk_read_backward_kernel_d64_highest_sm90": 148,
    "chunk_read_backward_kernel_d64_tensorfloat32_sm80": 68,
    "chunk_read_backward_kernel_d64_bfloat16_sm80": 136,
}

KERNELS = ("ns_read", "chunk_read")
FUNCTIONS = ("forward", "backward")
WIDTHS = (16, 32, 48, 64)
PRECISIONS = ("highest", "tensorfloat32", "bfloat16")
TARGETS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def report():
    return json.loads(REPORT.read_text())


def test_every_selectable_kernel_is_reported_and_compiled(report):
    names = [entry["name"] for entry in report["kernels"]]
    assert len(names) == len(set(names))
    expected = {
        f"{kernel}_{function}_kernel_d{d}_{precision}_{target.replace('_', '')}"
        for kernel in KERNELS
        for function in FUNCTIONS
        for d in WIDTHS
        for precision in PRECISIONS
        for target in TARGETS
    }
    assert set(names) == expected
    failed = [entry["name"] for entry in report["kernels"] if not entry.get("ok")]
    assert not failed


def test_shared_memory_within_each_targets_block_limit(report):
    for entry in report["kernels"]:
        limit = report["targets"][entry["target"]]["smem_block"]
        assert entry["shared_memory"] <= limit, entry["name"]
        assert entry["fits"], entry["name"]


def test_no_spills_beyond_the_open_ones(report):
    over = {}
    for entry in report["kernels"]:
        spilled = max(entry["spill_stores"], entry["spill_loads"])
        if spilled > OPEN_SPILLS.get(entry["name"], 0):
            over[entry["name"]] = spilled
    assert not over, f"spills beyond OPEN_SPILLS (bytes per thread): {over}"


def test_open_spills_name_reported_kernels(report):
    names = {entry["name"] for entry in report["kernels"]}
    assert set(OPEN_SPILLS) <= names


def test_occupancy_follows_from_the_recorded_figures(report):
    from experiments.accelerators.compile_report import occupancy

    for entry in report["kernels"]:
        cap = int(entry["target"].removeprefix("sm_"))
        want = occupancy(entry["registers"], entry["shared_memory"], entry["num_warps"], cap)
        assert entry["occupancy"] == want, entry["name"]
