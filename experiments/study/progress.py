"""The training run's console: a progress bar on a terminal, plain status lines elsewhere.

On a terminal, a ``rich`` progress bar is redrawn in place (steps, rate, time left and,
per read, the mean training loss and the seeds solved so far), and notes (resuming,
evaluations) are printed above it. When the output is not a terminal (a log file, a
pipe, CI), the same information is printed as one plain line every ``every`` steps, so
that logs stay readable line by line.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import IO

from rich import progress as rich_progress
from rich.console import Console


class Progress:
    """Shows a run's progress from ``start`` to ``total`` steps.

    Use as a context manager (the bar is removed from the screen's live area and left
    in its final state on exit).

    Args:
        total: the step budget.
        start: the step the run starts from (> 0 when resuming).
        every: steps between plain status lines (non-terminal output).
        stream: where to write (default ``sys.stdout``).
        force_terminal: draw the bar (True) or plain lines (False) whatever ``stream``
            is; None (default) decides from whether ``stream`` is a terminal.
    """

    def __init__(
        self,
        total: int,
        start: int,
        every: int,
        *,
        stream: IO[str] | None = None,
        force_terminal: bool | None = None,
    ):
        self.total, self.start, self.every = total, start, every
        self.console = Console(
            file=stream or sys.stdout,
            force_terminal=force_terminal,
            highlight=False,
            soft_wrap=True,
        )
        self._t0 = time.perf_counter()
        self._bar = None
        if self.console.is_terminal:
            self._bar = rich_progress.Progress(
                rich_progress.TextColumn("{task.completed}/{task.total}"),
                rich_progress.BarColumn(),
                rich_progress.TextColumn("{task.fields[rate]}"),
                rich_progress.TimeRemainingColumn(),
                rich_progress.TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total, completed=start, rate="", status=""
            )

    @property
    def is_bar(self) -> bool:
        """Whether a progress bar is drawn (else plain lines)."""
        return self._bar is not None

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops redrawing (idempotent)."""
        if self._bar is not None:
            self._bar.stop()

    def extend(self, total: int) -> None:
        """The step budget grew to ``total`` (the gated anneal's longer seed budgets)."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def note(self, message: str) -> None:
        """A line of text, printed above the bar on a terminal."""
        self.console.print(message, markup=False)

    def advance(self, step: int) -> None:
        """The run has completed ``step`` steps (cheap: call it every step)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, rate=self._rate(step))

    def update(
        self,
        step: int,
        losses: Mapping[str, float | None],
        solved: Mapping[str, int],
        num_seeds: int,
        nonfinite: Mapping[str, int],
    ) -> None:
        """The per-read status at ``step``: mean training loss, seeds solved so far and
        diverged seeds (a loss of None: no seed has a finite one). On a terminal it
        replaces the bar's status text; otherwise a plain line is printed every ``every``
        steps and at the last step."""
        parts = []
        for read, loss in losses.items():
            bad = f" ({nonfinite[read]} diverged)" if nonfinite[read] else ""
            loss = "n/a" if loss is None else f"{loss:.3f}"
            parts.append(f"{read}: loss {loss} solved {solved[read]}/{num_seeds}{bad}")
        status = " | ".join(parts)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, rate=self._rate(step), status=status)
            return
        if step % self.every and step != self.total:
            return
        rate = self._steps_per_second(step)
        eta = (self.total - step) / rate if rate > 0 else math.nan
        width = 24
        filled = int(width * step / self.total)
        line = " | ".join(
            [
                f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total}",
                f"{rate:.2f} steps/s",
                f"ETA {_duration(eta)}",
                status,
            ]
        )
        self.console.print(line, markup=False)

    def _steps_per_second(self, step: int) -> float:
        return (step - self.start) / max(time.perf_counter() - self._t0, 1e-9)

    def _rate(self, step: int) -> str:
        return f"{self._steps_per_second(step):.2f} steps/s" if step > self.start else ""


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
