"""orthorecall.training.make_optimizer, a public entry point, refuses bad arguments with a
ValueError naming them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orthorecall import training


@pytest.mark.parametrize(
    "argument, value",
    [
        ("learning_rate", math.inf),
        ("learning_rate", 0.0),
        ("learning_rate", "3e-3"),
        ("b1", 2.0),
        ("b2", 1.0),
        ("b1", True),
        ("eps", 0.0),
        ("eps", math.nan),
        ("weight_decay", -1.0),
        ("clip_norm", 0.0),
        ("clip_norm", math.inf),
        ("total_steps", 0),
        ("total_steps", 10.0),
        ("total_steps", 2**31),
        ("stretch_steps", 2.5),
        ("schedule", "linear"),
        ("schedule", None),
    ],
)
def test_make_optimizer_refuses_bad_arguments_naming_them(argument, value):
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        training.make_optimizer(**{argument: value})


def test_make_optimizer_accepts_integers_numpy_reals_and_no_clip():
    training.make_optimizer(learning_rate=1, b1=np.float32(0.5), b2=0, weight_decay=0)
    training.make_optimizer(clip_norm=None, schedule="stretched_cosine", stretch_steps=4000)
