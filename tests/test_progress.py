"""The run's console: plain status lines when not on a terminal, a bar on one."""

import io

from experiments.study.progress import Progress

LOSSES = {"raw": 3.25, "ns5": None}
SOLVED = {"raw": 1, "ns5": 0}
NONFINITE = {"raw": 0, "ns5": 2}


def test_plain_lines_every_few_steps_when_not_a_terminal():
    out = io.StringIO()
    with Progress(total=12, start=0, every=5, stream=out) as progress:
        assert not progress.is_bar  # a StringIO is no terminal
        for step in range(1, 13):
            progress.advance(step)
            progress.update(step, LOSSES, SOLVED, 3, NONFINITE)
        progress.note("evaluation at step 12")
    lines = out.getvalue().splitlines()
    # Steps 5 and 10, and the last step whatever the cadence; then the note.
    assert [line.split("|")[0].split("] ")[1].strip() for line in lines[:3]] == [
        "5/12",
        "10/12",
        "12/12",
    ]
    assert lines[3] == "evaluation at step 12"
    assert "raw: loss 3.250 solved 1/3" in lines[0]
    assert "ns5: loss n/a solved 0/3 (2 diverged)" in lines[0]
    assert "\x1b[" not in out.getvalue() and "\r" not in out.getvalue()


def test_resumed_run_counts_from_its_start():
    out = io.StringIO()
    with Progress(total=20, start=10, every=10, stream=out) as progress:
        progress.update(20, LOSSES, SOLVED, 3, NONFINITE)
    assert out.getvalue().startswith("[" + "#" * 24 + "] 20/20")


def test_bar_redraws_in_place_on_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich's width for a terminal it cannot measure
    out = io.StringIO()
    with Progress(total=12, start=0, every=5, stream=out, force_terminal=True) as progress:
        assert progress.is_bar
        for step in range(1, 13):
            progress.advance(step)
            progress.update(step, LOSSES, SOLVED, 3, NONFINITE)
        progress.note("evaluation at step 12")
    text = out.getvalue()
    assert "\x1b[" in text  # cursor and colour control: redrawn, not appended
    assert "12/12" in text and "evaluation at step 12" in text
    assert "raw: loss 3.250 solved 1/3" in text
    assert "[####" not in text  # no plain status lines on a terminal
