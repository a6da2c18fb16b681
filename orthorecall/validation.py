"""Argument checks shared by the library's entry points, with messages that name the
argument, what it must be and what it was."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as a Python int, or a ValueError naming ``name``.

    numpy integers are accepted (and converted, so that hashing and jit's static-argument
    cache see plain ints); bools, floats and strings are refused, even when integral.

    Raises:
        ValueError: not an integer, or below ``minimum``.
    """
    # bool is an int subclass; True as a width is certainly a mistake.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    minimum_inclusive: bool = True,
    maximum_inclusive: bool = True,
) -> float:
    """``value`` as a finite Python float within the bounds, or a ValueError naming ``name``.

    Python and numpy reals are accepted (an int learning rate is fine); bools, strings,
    None, NaN and infinities are refused: ``inf`` passes a ``> 0`` test, and as a learning
    rate or a clip norm it trains NaNs or no clip at all.

    Raises:
        ValueError: "NAME must ..., got VALUE".
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    low_ok = minimum is None or (number >= minimum if minimum_inclusive else number > minimum)
    high_ok = maximum is None or (number <= maximum if maximum_inclusive else number < maximum)
    if not (low_ok and high_ok):
        if minimum is not None and maximum is not None:
            interval = (
                f"{'[' if minimum_inclusive else '('}{minimum:g}, "
                f"{maximum:g}{']' if maximum_inclusive else ')'}"
            )
            raise ValueError(f"{name} must lie in {interval}, got {value!r}")
        if minimum is not None:
            raise ValueError(
                f"{name} must be {'>=' if minimum_inclusive else '>'} {minimum:g}, got {value!r}"
            )
        raise ValueError(
            f"{name} must be {'<=' if maximum_inclusive else '<'} {maximum:g}, got {value!r}"
        )
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool (numpy bools accepted), or a ValueError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def switched_on(variable: str) -> bool:
    """False when the environment variable ``variable`` is set to 0/false/no/off (any
    case, spaces ignored); True when it is unset or anything else."""
    value = os.environ.get(variable, "1").strip().lower()
    return value not in ("0", "false", "no", "off")
