"""The shared argument checks, and that configurations store what they validated."""

import numpy as np
import pytest

from orthorecall import model as model_lib
from orthorecall.cell import CellConfig
from orthorecall.validation import check_bool, check_int


def test_check_int_accepts_python_and_numpy_integers():
    for value in (3, np.int32(3), np.int64(3), np.uint8(3)):
        out = check_int("width", value, minimum=1)
        assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [3.0, "3", True, np.bool_(True), None, np.float32(3)])
def test_check_int_refuses_non_integers_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"width must be an integer, got .*\("):
        check_int("width", value)


def test_check_int_minimum():
    assert check_int("n", 0, minimum=0) == 0
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int("n", 0, minimum=1)


def test_check_bool():
    assert check_bool("flag", np.bool_(True)) is True
    for value in (1, 0, "yes", None):
        with pytest.raises(ValueError, match="flag must be a bool"):
            check_bool("flag", value)


def test_configs_store_plain_ints():
    # Configurations are static jit arguments: numpy and Python integers must give the
    # same (equal, equally hashed) configuration, or a cached program would be missed.
    cell = CellConfig(
        embedding_dim=np.int64(16), num_heads=np.int32(2), inner_multiple=8, chunk_size=np.int64(8)
    )
    assert cell == CellConfig(embedding_dim=16, num_heads=2, inner_multiple=8, chunk_size=8)
    assert hash(cell) == hash(
        CellConfig(embedding_dim=16, num_heads=2, inner_multiple=8, chunk_size=8)
    )
    assert type(cell.embedding_dim) is int and type(cell.chunk_size) is int
    config = model_lib.ModelConfig(vocab_size=np.int64(24), cell=cell)
    assert type(config.vocab_size) is int and config.num_blocks == 1
    for field in ("embedding_dim", "num_heads", "num_blocks", "chunk_size"):
        with pytest.raises(ValueError, match=f"{field} must be >= 1"):
            CellConfig(**{field: 0})
        with pytest.raises(ValueError, match=f"{field} must be an integer"):
            CellConfig(**{field: 2.0})
