"""experiments.study.config_checks: the one validation path every command uses."""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest

from experiments.study import config_checks as checks
from experiments.study.cli import ConfigError


def test_integers_are_bounded_on_both_sides_and_typed():
    assert checks.check_int("a.b", np.int64(3), minimum=1) == 3
    for bad, message in (
        (0, r"config\.a\.b: must be >= 1, got 0\."),
        (2**31, r"config\.a\.b: must be <= 2147483647, got 2147483648\."),
        (2**64, r"must be <= 2147483647"),
        (1.0, r"must be an integer, got 1\.0 \(float\)"),
        (True, r"must be an integer"),
        ("3", r"must be an integer"),
        (math.nan, r"must be an integer"),
    ):
        with pytest.raises(ConfigError, match=(bad and message) or message):
            checks.check_int("a.b", bad, minimum=1)
    assert checks.check_int("a.b", 2**40, minimum=0, maximum=None) == 2**40


def test_reals_must_be_finite_and_in_range():
    assert checks.check_real("x", 3, minimum=0) == 3.0
    for bad in (math.nan, math.inf, -math.inf, 10**400):
        with pytest.raises(ConfigError, match=r"config\.x: must be finite"):
            checks.check_real("x", bad, minimum=0)
    with pytest.raises(ConfigError, match=r"config\.x: must be > 0, got 0; a hint\."):
        checks.check_real("x", 0, "a hint", minimum=0, minimum_inclusive=False)
    with pytest.raises(ConfigError, match=r"--y: must be a real number"):
        checks.FLAGS.real("y", "1.0")


def test_seeds_stay_below_two_to_the_32():
    assert checks.check_seeds("seeds.first_seed", 2**32 - 2, 2, "seeds.num_seeds") == (2**32 - 2, 2)
    with pytest.raises(ConfigError, match=r"seeds 4294967295\.\.4294967296 go past 2\*\*32 - 1"):
        checks.check_seeds("seeds.first_seed", 2**32 - 1, 2, "seeds.num_seeds")
    with pytest.raises(
        ConfigError, match=r"--seed: seed 4294967296 goes past .* --seed < 4294967296"
    ):
        checks.FLAGS.seeds("seed", 2**32)
    with pytest.raises(ConfigError, match=r"--seed: must be >= 0"):
        checks.FLAGS.seeds("seed", -1)


def test_output_paths(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    assert checks.FLAGS.output_folder("out", tmp_path / "new" / "deeper").name == "deeper"
    assert checks.FLAGS.output_file("out", tmp_path / "new" / "x.json").name == "x.json"
    with pytest.raises(ConfigError, match=r"--out: .*file is a file, not a folder"):
        checks.FLAGS.output_folder("out", tmp_path / "file")
    with pytest.raises(ConfigError, match=r"--out: cannot create .*: .*file is a file"):
        checks.FLAGS.output_folder("out", tmp_path / "file" / "sub")
    with pytest.raises(ConfigError, match=r"--out: .*folder is a folder; give the path of a file"):
        checks.FLAGS.output_file("out", tmp_path / "folder")
    with pytest.raises(ConfigError, match=r"--out: .*over 255 bytes"):
        checks.FLAGS.output_file("out", tmp_path / ("x" * 300))
    with pytest.raises(ConfigError, match=r"--out: must be a path"):
        checks.FLAGS.output_file("out", "")
    # Nothing was created by the checks.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_numeric_leaves_walk_every_section():
    config = ml_collections.ConfigDict(
        {"a": 1, "b": {"c": 2.5, "d": True, "e": "s", "f": {"g": np.int32(3)}}, "h": None}
    )
    assert dict(checks.numeric_leaves(config)) == {"a": 1, "b.c": 2.5, "b.f.g": 3}


def test_bound_integers_names_any_field_beyond_int32():
    config = ml_collections.ConfigDict({"a": {"b": 2**64, "seed": 2**33}, "c": 2.0**70})
    with pytest.raises(ConfigError, match=r"config\.a\.b: must lie in \[-2147483647, 2147483647\]"):
        checks.bound_integers(config)
    config.a.b = 5
    checks.bound_integers(config, exempt=("a.seed",))  # floats are check_real's
