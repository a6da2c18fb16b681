"""The scaffold anneal: training with read = α·R(C) + (1 − α)·C, α going from 1 to 0.

The replication found that the orthogonalized read can be removed once a model has
escaped the chance plateau: anneal α to 0 and what is left is a stock mLSTM at full
accuracy. The mix enters the recurrence as ``read_mix`` (``mlstm``, ``cell``,
``model.apply``): the layer reads α·qᵀR(C_t) + (1 − α)·qᵀC_t, so α = 1 is the read
itself and α = 0 the raw mLSTM, bit for bit.

Two schedules, both functions of the training step (updates done) and, per seed, of
the step that triggered the anneal:

* ``window``: α = 1 until ``start``, linear to 0 at ``end``, 0 after; the same for every
  seed.
* ``gated``: a seed's anneal is triggered by its first evaluation at or above
  ``threshold`` (at step τ); α = 1 until τ + ``dwell``, linear to 0 over ``span`` steps,
  then ``settle`` more steps at α = 0. A seed whose anneal would end after the run's
  budget gets its own, longer budget, τ + dwell + span + settle, so its last evaluation
  is at α = 0 (the replication's choice: 200, 500, 200 with evaluations every 200 steps).
  Seeds that never trigger keep α = 1.

Everything here is elementwise on numpy or JAX arrays of seeds, so a schedule runs on
the host beside the training loop and under ``jit`` alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from orthorecall.validation import check_int

MODES = ("window", "gated")
# A seed whose gated anneal has not been triggered.
NOT_TRIGGERED = -1


@dataclasses.dataclass(frozen=True)
class AnnealSchedule:
    """When α goes from 1 to 0 (see the module docstring).

    Attributes:
        mode: ``"window"`` or ``"gated"``.
        start, end: the window's steps, 0 <= start < end.
        threshold: the gated anneal's trigger accuracy, in (0, 1].
        dwell, span, settle: the gated anneal's steps after the trigger at α = 1, from
            1 to 0 (span >= 1), and at α = 0.
    """

    mode: str = "gated"
    start: int = 0
    end: int = 1
    threshold: float = 0.8
    dwell: int = 200
    span: int = 500
    settle: int = 200

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"anneal mode {self.mode!r} is not known; use one of {MODES}.")
        for name, minimum in (("start", 0), ("end", 1), ("dwell", 0), ("span", 1), ("settle", 0)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=minimum))
        if self.end <= self.start:
            raise ValueError(f"anneal window: end ({self.end}) must be after start ({self.start}).")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
            raise ValueError(f"anneal threshold must be a number in (0, 1], got {threshold!r}.")
        if not 0 < threshold <= 1:
            raise ValueError(f"anneal threshold must be in (0, 1], got {threshold}.")
        object.__setattr__(self, "threshold", float(threshold))

    def alpha(self, step, trigger=None, xp=np):
        """α at ``step`` (updates done) for seeds whose gated anneal was triggered at
        ``trigger`` (``NOT_TRIGGERED`` where not; ignored by the window). ``xp``: numpy
        or ``jax.numpy``. Returns float32 of the broadcast shape."""
        step = xp.asarray(step, xp.float32)
        if self.mode == "window":
            fraction = (step - self.start) / (self.end - self.start)
            alpha = xp.clip(1.0 - fraction, 0.0, 1.0).astype(xp.float32)
            # One α per seed, as the gated schedule gives, when seeds are passed.
            return alpha if trigger is None else xp.broadcast_to(alpha, xp.shape(trigger))
        trigger = xp.asarray(trigger)
        fraction = (step - (trigger.astype(xp.float32) + self.dwell)) / self.span
        annealed = xp.clip(1.0 - fraction, 0.0, 1.0)
        return xp.where(trigger == NOT_TRIGGERED, 1.0, annealed).astype(xp.float32)

    def triggered(self, trigger, step: int, accuracy):
        """The triggers after an evaluation at ``step`` with per-seed ``accuracy``
        (numpy): a seed not yet triggered triggers at its first accuracy at or above the
        threshold. NaN accuracy never triggers. The window ignores triggers."""
        trigger = np.asarray(trigger)
        if self.mode == "window":
            return trigger
        reached = np.nan_to_num(np.asarray(accuracy, np.float64), nan=-1.0) >= self.threshold
        return np.where((trigger == NOT_TRIGGERED) & reached, step, trigger).astype(np.int32)

    def budget(self, trigger, steps: int):
        """Each seed's step budget: ``steps``, or for a triggered gated seed at least
        trigger + dwell + span + settle (its last evaluation then sees α = 0)."""
        trigger = np.asarray(trigger)
        if self.mode == "window":
            return np.full(trigger.shape, steps, np.int64)
        ends = trigger.astype(np.int64) + self.dwell + self.span + self.settle
        return np.where(trigger == NOT_TRIGGERED, steps, np.maximum(steps, ends))
