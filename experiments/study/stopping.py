"""Stopping a training loop cleanly on Ctrl-C or SIGTERM.

The signals only set a flag, which the loop reads between steps and answers by writing
a checkpoint: raised in the middle of a step, the interruption could drop the step's
result after its input states were donated (deleted), or leave the step counter, the
states and the records out of step. A second signal stops at once, without a checkpoint.

Arm the handlers once the first step has returned: until then (tracing, compiling)
nothing has been computed that a checkpoint would keep, and the default handlers stop
at once even inside XLA, where a Python handler would wait for it to return.
"""

from __future__ import annotations

import signal


class StopOnSignal:
    """Catches SIGINT/SIGTERM between ``arm()`` and ``restore()`` (or the end of a
    ``with`` block); ``requested`` says whether one arrived."""

    def __init__(self):
        self._signals: list[int] = []
        self._previous: dict[int, object] = {}

    @property
    def armed(self) -> bool:
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        return bool(self._signals)

    def _request(self, signum, frame):
        if self._signals:  # The second signal: stop now.
            raise KeyboardInterrupt
        self._signals.append(signum)  # (No print here: a handler may interrupt a print.)

    def arm(self) -> None:
        """Installs the handlers (idempotent). An ignored SIGINT (a background job of
        a non-interactive shell) stays ignored."""
        if self.armed:
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signum != signal.SIGINT or signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._request)

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopOnSignal:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
