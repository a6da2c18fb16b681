"""The replication's records as our workdirs (experiments.replication.importer), and the
analysis over runs (experiments.replication.analyze) on them."""

import json
import shutil
from pathlib import Path

import pytest

from experiments.replication import analyze
from experiments.replication import importer as import_replication
from experiments.replication.importer import DEFAULT_SOURCE, EXCLUDED, GROUPS, parse_trace
from experiments.report.records import load_metrics, load_run_config
from experiments.report.statistics import analyze as analyze_run
from tests.conftest import run_module


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("replication") / "runs"
    return out, import_replication.import_records(DEFAULT_SOURCE, out)


def test_every_file_is_grouped_or_excluded_for_a_reason():
    files = {p.name for p in DEFAULT_SOURCE.glob("*.jsonl")}
    grouped = {s.file for g in GROUPS for s in g.sources}
    assert files == grouped | set(EXCLUDED)
    assert not grouped & set(EXCLUDED)
    assert (DEFAULT_SOURCE / "NOTICE").is_file()


def test_a_record_round_trips_into_our_metrics(imported):
    _, workdirs = imported
    record = next(
        json.loads(line)
        for line in (DEFAULT_SOURCE / "rls2k_s512.jsonl").read_text().splitlines()
        if json.loads(line)["seed"] == 11
    )
    curve = load_metrics(workdirs["v80_s512_b16_2k"]).curves["rls"][11]
    want = parse_trace(record["trace"], "rls2k")
    assert list(curve.steps) == [row["step"] for row in want]
    assert list(curve.accuracy) == [row["accuracy"] for row in want]
    assert curve.accuracy[-1] == pytest.approx(record["final_val_acc"], abs=1e-5)
    # Baseline is our raw; the gated anneal's alpha comes along.
    rows = [
        json.loads(line)
        for line in (workdirs["v80_s512_b16_2k"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert {r["read"] for r in rows} >= {"raw", "ns5", "rls", "raw_qkboost"}
    assert {r["seed"] for r in rows if r["read"] == "rls"} == set(range(11, 19))
    config = json.loads((workdirs["v80_s512_b16_2k"] / "run_config.json").read_text())
    assert config["reads"][0] == "raw" and "CC BY 4.0" in config["attribution"]
    assert config["schedule"] == "cosine" and config["batch_size"] == 16
    assert (config["vocab_size"], config["seq_len"], config["noise_vocab_size"]) == (80, 512, 16)
    gated = load_metrics(workdirs["v80_s512_b16_2k_constant_lr"])
    record = json.loads((DEFAULT_SOURCE / "anneal_gated_s512.jsonl").read_text().splitlines()[0])
    want = parse_trace(record["trace"], "anneal_gated")
    curve = gated.curves["ns5_anneal_gated"][record["seed"]]
    assert list(curve.steps) == [row["step"] for row in want]
    assert list(curve.accuracy) == [row["accuracy"] for row in want]
    rows = (workdirs["v80_s512_b16_2k_constant_lr"] / "metrics.jsonl").read_text().splitlines()
    alphas = [json.loads(r)["alpha"] for r in rows if '"ns5_anneal_gated"' in r]
    assert len(alphas) == sum(len(c.steps) for c in gated.curves["ns5_anneal_gated"].values())


def test_the_published_headline_counts_come_out(imported):
    _, workdirs = imported
    counts = {}
    for group in ("v80_s512_b16_2k_headline", "v80_s1024_b16_2k_headline", "v96_s768_b64_2k"):
        results = analyze_run(load_metrics(workdirs[group]), load_run_config(workdirs[group]))
        counts[group] = {r: s["solved"] for r, s in results["reads"].items()}
    assert counts["v80_s512_b16_2k_headline"]["raw"] == 3
    assert counts["v80_s512_b16_2k_headline"]["ns5"] == 9
    assert (
        counts["v80_s1024_b16_2k_headline"]["raw"],
        counts["v80_s1024_b16_2k_headline"]["ns5"],
    ) == (4, 10)
    assert (counts["v96_s768_b64_2k"]["raw"], counts["v96_s768_b64_2k"]["ns5"]) == (1, 5)


def test_duplicates_unknown_files_and_overwrites_are_refused(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(DEFAULT_SOURCE, source)
    # The same (read, seed) twice in a group.
    with (source / "delta2k_s512.jsonl").open("a") as f:
        f.write((source / "delta2k_s512.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="twice"):
        import_replication.import_records(source, tmp_path / "a")
    shutil.copy(DEFAULT_SOURCE / "delta2k_s512.jsonl", source / "delta2k_s512.jsonl")
    (source / "new_runs.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="new_runs"):
        import_replication.import_records(source, tmp_path / "b")
    (source / "new_runs.jsonl").unlink()
    out = tmp_path / "c"
    import_replication.import_records(source, out)
    with pytest.raises(ValueError, match="not empty"):
        import_replication.import_records(source, out)
    with pytest.raises(ValueError, match="trace entry"):
        parse_trace(["step 200 accuracy 0.5"], "here")


def test_analysis_pools_strata_and_leaves_untimed_runs_out(imported):
    out, workdirs = imported
    result = analyze.compare_runs(analyze.run_dirs([str(out)]), baseline="raw", reads=["ns5"])
    by_run = {r["run"]: r for r in result["runs"]}
    headline = by_run[str(workdirs["v80_s512_b16_2k_headline"])]
    assert headline["time_to_escape"] is False
    assert headline["reads"]["ns5"]["hazard_ratio"] is None
    assert headline["reads"]["ns5"]["fisher_p"] == pytest.approx(0.0656, abs=1e-3)
    pooled = result["pooled"]["ns5"]
    assert str(workdirs["v80_s512_b16_2k_headline"]) not in pooled["runs"]
    # Pooled over strata, the ratio lies between the smallest and largest per-run ones
    # with a finite estimate, and its interval is tighter than any of theirs.
    ratios = [
        r["reads"]["ns5"]["hazard_ratio"]
        for r in result["runs"]
        if r["time_to_escape"]
        and "ns5" in r["reads"]
        and r["reads"]["ns5"]["hazard_ratio"]["ratio"]
    ]
    assert (
        min(h["ratio"] for h in ratios)
        < pooled["hazard_ratio"]["ratio"]
        < max(h["ratio"] for h in ratios)
    )
    width = lambda h: h["ci"][1] / h["ci"][0]
    assert width(pooled["hazard_ratio"]) < min(width(h) for h in ratios)
    # The pooled fit under each baseline-hazard model; the chosen one is the default.
    by_model = pooled["hazard_ratio_by_model"]
    assert set(by_model) == {"stratum_interval", "shared_interval", "constant"}
    assert pooled["hazard_ratio"] == by_model["stratum_interval"]
    # A baseline constant in time pulls the ratio towards 1 (ns5 escapes earlier, while
    # the baseline hazard is still low).
    assert 1 < by_model["constant"]["ratio"] < by_model["stratum_interval"]["ratio"]
    # Every group with raw and ns5 and a full trace is a stratum (the batch 4 and 8 grids
    # included: their raw is the lr 3e-3 run); runs without raw are said.
    assert len(pooled["runs"]) == 16
    assert {Path(s["run"]).name for s in result["skipped"]} == {"v80_s512_b16_2k_data_seeds"}
    text = analyze.format_comparison(result)
    assert "| ns5 | 16 |" in text and "Skipped v80_s512_b16_2k_data_seeds" in text


def test_analyze_command_end_to_end_and_its_refusals(imported, tmp_path):
    out, workdirs = imported
    done = run_module(
        "experiments.replication.analyze",
        f"--runs={workdirs['v96_s768_b64_2k']}",
        f"--out={tmp_path / 'a.json'}",
        "--hazard_model=constant",
    )
    assert done.returncode == 0, done.stderr
    assert "ns5 vs raw | 5/8 | 1/8" in done.stdout
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["pooled"]["ns5"]["solved"] == 5 and written["hazard_model"] == "constant"
    assert written["pooled"]["ns5"]["hazard_ratio"]["baseline_model"] == "constant"
    refused = run_module("experiments.replication.analyze", f"--runs={tmp_path / 'nothing'}")
    assert refused.returncode == 2 and "neither a workdir" in refused.stderr
    refused = run_module(
        "experiments.replication.analyze", f"--runs={out}", "--baseline=nonexistent"
    )
    assert refused.returncode == 2 and "baseline" in refused.stderr
    refused = run_module("experiments.replication.analyze", f"--runs={out}", "--reads=ns7")
    assert refused.returncode == 2 and "ns7" in refused.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    refused = run_module("experiments.replication.analyze", f"--runs={empty}")
    assert refused.returncode == 2 and "metrics.jsonl" in refused.stderr


def test_import_command_end_to_end_and_refusals(tmp_path):
    done = run_module("experiments.replication.importer", f"--out={tmp_path / 'runs'}")
    assert done.returncode == 0, done.stderr
    assert "v80_s512_b16_2k:" in done.stdout and "excluded:" in done.stdout
    again = run_module("experiments.replication.importer", f"--out={tmp_path / 'runs'}")
    assert again.returncode == 2 and "not empty" in again.stderr
    missing = run_module(
        "experiments.replication.importer", f"--source={tmp_path / 'none'}", "--out=x"
    )
    assert missing.returncode == 2 and "not a directory" in missing.stderr


def _first_evaluations(file, variant, **fields):
    """seed -> the accuracies after step 1, as printed in the record's trace."""
    out = {}
    for line in (DEFAULT_SOURCE / file).read_text().splitlines():
        record = json.loads(line)
        if record["variant"] == variant and all(record[k] == v for k, v in fields.items()):
            out[record["seed"]] = [row["accuracy"] for row in parse_trace(record["trace"], file)][
                1:
            ]
    return out


def test_schedules_the_records_do_not_state_are_read_off_their_evaluations():
    # Runs of one read and seed under one learning-rate schedule print the same first
    # evaluations; a cosine and a constant rate differ from step 200 on (mostly).
    cosine, constant = (
        _first_evaluations(f, "ns5") for f in ("probe2k_s512.jsonl", "ns5constlr2k_s512.jsonl")
    )
    for file in ("anneal2k_s512.jsonl", "anneal_gated_s512.jsonl"):
        for seed, evaluations in _first_evaluations(file, "ns5").items():
            assert evaluations[0] == constant[seed][0] != cosine[seed][0], (file, seed)
    raw_cosine = _first_evaluations("probe2k_s512.jsonl", "baseline")
    raw_constant = _first_evaluations("constlr2k_s512.jsonl", "baseline")
    grid = _first_evaluations("batch16_grid.jsonl", "baseline", lr=3e-3)
    assert sum(e[0] == raw_constant[s][0] for s, e in grid.items()) == 6
    assert not any(e[0] == raw_cosine[s][0] != raw_constant[s][0] for s, e in grid.items())
    # The groups follow: the anneals with the constant-rate runs, not with probe2k's.
    group_of = {src.file: g for g in GROUPS for src in g.sources}
    assert group_of["anneal_gated_s512.jsonl"] is group_of["ns5constlr2k_s512.jsonl"]
    assert group_of["anneal2k_s512.jsonl"].schedule == "constant"
    assert group_of["probe2k_s512.jsonl"].schedule == "cosine"
    assert group_of["batch16_grid.jsonl"].schedule == "constant"
