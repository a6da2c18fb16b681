"""``experiments.parity.report``: our parity runs beside the reference's records, on
synthetic workdirs whose curves are set by hand against the real records."""

from __future__ import annotations

import json

import pytest

from experiments.parity import report as parity_report
from tests.conftest import run_module

REFERENCE = parity_report.reference_traces()


def write_run(workdir, curves: dict, name="parity", init_from="/init/seed{seed}.pt"):
    """A study workdir holding ``curves``: (read, seed) -> {step: accuracy}."""
    workdir.mkdir(parents=True)
    config = {"name": name, "init_from": init_from}
    (workdir / "run_config.json").write_text(json.dumps({"config": config}))
    rows = [
        {"read": read, "seed": seed, "step": step, "accuracy": accuracy}
        for (read, seed), curve in curves.items()
        for step, accuracy in sorted(curve.items())
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "train_log.jsonl").write_text("")


def evaluations(read, seed, shift=0.0, until=2000):
    trace = REFERENCE[read, seed]["trace"]
    return {s: a + shift for s, a in trace.items() if 200 <= s <= until}


def test_the_records_hold_both_reads_of_seeds_11_to_26_with_the_released_finals():
    assert set(REFERENCE) == {(r, s) for r in ("raw", "ns5") for s in range(11, 27)}
    # Seed 11's runs are the released checkpoints' (0.0343 and 0.9939).
    assert REFERENCE["raw", 11]["final"] == pytest.approx(0.0343, abs=5e-5)
    assert REFERENCE["ns5", 11]["final"] == pytest.approx(0.9939, abs=5e-5)
    assert sorted(REFERENCE["ns5", 11]["trace"]) == [1, *range(200, 2001, 200)]
    # The published headline of this protocol: 3/16 baseline, 9/16 ns5 solved.
    solved = {
        r: sum(parity_report.solved(REFERENCE[r, s]["trace"]) for s in range(11, 27))
        for r in ("raw", "ns5")
    }
    assert solved == {"raw": 3, "ns5": 9}


def test_outcomes_agreement_and_where_trajectories_part(tmp_path):
    runs = tmp_path / "runs"
    # ns5 seed 11: within 2e-3 of the record until step 800, then stuck at chance.
    ns5 = evaluations("ns5", 11, shift=0.002)
    ns5.update({s: 0.03 for s in ns5 if s >= 1000})
    write_run(runs / "seed11", {("raw", 11): evaluations("raw", 11), ("ns5", 11): ns5})
    write_run(runs / "seed12", {("raw", 12): evaluations("raw", 12, until=600)})
    out = tmp_path / "out"
    summary = parity_report.build(runs, out)
    by = {(r["read"], r["seed"]): r for r in summary["runs"]}
    assert by["raw", 11]["first_parting_step"] is None
    assert by["raw", 11]["solved_ours"] is by["raw", 11]["solved_reference"] is False
    assert by["ns5", 11]["first_parting_step"] == 1000
    assert by["ns5", 11]["solved_ours"] is False and by["ns5", 11]["solved_reference"] is True
    assert by["raw", 12]["complete"] is False and by["raw", 12]["our_final_step"] == 600
    # Complete runs only: raw 11 agrees, ns5 11 does not; raw 12 is still running.
    assert (summary["complete_runs"], summary["outcomes_agree"]) == (2, 1)
    text = (out / "README.md").read_text()
    assert "| 11 | ns5 | yes | no | **no** |" in text
    assert "(running)" in text
    assert "Outcomes agree on 1 of 2 complete runs" in text
    assert (out / "seed11" / "metrics.jsonl").is_file()
    assert json.loads((out / "parity.json").read_text()) == summary


def test_a_run_of_another_preset_is_refused(tmp_path):
    write_run(tmp_path / "cpu", {("raw", 11): {200: 0.5}}, name="cpu", init_from=None)
    with pytest.raises(parity_report.ParityError, match="parity preset"):
        parity_report.build(tmp_path / "cpu", tmp_path / "out")
    result = run_module(
        "experiments.parity.report", f"--runs={tmp_path / 'cpu'}", f"--out={tmp_path / 'o'}"
    )
    assert result.returncode == 2 and "parity preset" in result.stderr
    assert "Traceback" not in result.stderr
