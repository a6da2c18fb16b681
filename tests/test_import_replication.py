"""The replication's records as our workdirs (experiments.import_replication), and the
analysis over runs (experiments.analyze) on them."""

import json
import shutil

import pytest

from experiments import analyze, import_replication
from experiments.import_replication import DEFAULT_SOURCE, EXCLUDED, GROUPS, parse_trace
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
    # The gated anneal's alpha comes along; baseline is our raw.
    rows = [
        json.loads(line)
        for line in (workdirs["v80_s512_b16_2k"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert {r["read"] for r in rows} >= {"raw", "ns5", "ns5_anneal_gated", "raw_qkboost"}
    assert all("alpha" in r for r in rows if r["read"] == "ns5_anneal_gated")
    config = json.loads((workdirs["v80_s512_b16_2k"] / "run_config.json").read_text())
    assert config["reads"][0] == "raw" and "CC BY 4.0" in config["attribution"]


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
    assert "| ns5 |" in analyze.format_comparison(result)


def test_analyze_command_end_to_end_and_its_refusals(imported, tmp_path):
    out, workdirs = imported
    done = run_module(
        "experiments.analyze",
        f"--runs={workdirs['v96_s768_b64_2k']}",
        f"--out={tmp_path / 'a.json'}",
    )
    assert done.returncode == 0, done.stderr
    assert "ns5 vs raw | 5/8 | 1/8" in done.stdout
    assert json.loads((tmp_path / "a.json").read_text())["pooled"]["ns5"]["solved"] == 5
    refused = run_module("experiments.analyze", f"--runs={tmp_path / 'nothing'}")
    assert refused.returncode == 2 and "neither a workdir" in refused.stderr
    refused = run_module("experiments.analyze", f"--runs={out}", "--baseline=nonexistent")
    assert refused.returncode == 2 and "baseline" in refused.stderr


def test_import_command_end_to_end_and_refusals(tmp_path):
    done = run_module("experiments.import_replication", f"--out={tmp_path / 'runs'}")
    assert done.returncode == 0, done.stderr
    assert "v80_s512_b16_2k:" in done.stdout and "excluded:" in done.stdout
    again = run_module("experiments.import_replication", f"--out={tmp_path / 'runs'}")
    assert again.returncode == 2 and "not empty" in again.stderr
    missing = run_module(
        "experiments.import_replication", f"--source={tmp_path / 'none'}", "--out=x"
    )
    assert missing.returncode == 2 and "not a directory" in missing.stderr
