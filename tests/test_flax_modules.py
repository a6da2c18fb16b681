"""The Flax Linen wrappers compute what the pure functions compute."""

import jax
import numpy as np
import pytest

from orthorecall import cell as cell_lib
from orthorecall import model as model_lib
from orthorecall import reads
from orthorecall.flax_modules import MLSTMCell, MLSTMLanguageModel

CELL = cell_lib.CellConfig(
    embedding_dim=16, num_heads=2, inner_multiple=8, chunk_size=8, read=reads.NS5
)
B, T = 3, 21


@pytest.mark.slow
def test_cell_wrapper_matches_pure_functions():
    params = cell_lib.init_params(jax.random.PRNGKey(4), CELL)
    x = jax.random.normal(jax.random.PRNGKey(5), (B, T, CELL.embedding_dim))
    module = MLSTMCell(CELL)
    initialized = module.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(
        np.shape, initialized["params"]["cell"]
    ) == jax.tree_util.tree_map(np.shape, params)
    variables = {"params": {"cell": params}}
    y, _ = module.apply(variables, x)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(cell_lib.scan(params, x, CELL)[0]), atol=1e-6
    )
    state = module.apply(variables, B, method=MLSTMCell.initial_state)
    y0, _ = module.apply(variables, state, x[:, 0], None, method=MLSTMCell.step)
    np.testing.assert_allclose(np.asarray(y0), np.asarray(y[:, 0]), atol=1e-5)


@pytest.mark.slow
def test_language_model_wrapper_matches_pure_functions():
    config = model_lib.ModelConfig(vocab_size=24, cell=CELL)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 24)
    module = MLSTMLanguageModel(config)
    variables = module.init(jax.random.PRNGKey(2), tokens)
    # The wrapper initializes exactly as model.init_params with the module's key.
    params = variables["params"]["model"]
    want_shapes = jax.tree_util.tree_map(
        np.shape, model_lib.init_params(jax.random.PRNGKey(0), config)
    )
    assert jax.tree_util.tree_map(np.shape, params) == want_shapes
    logits = module.apply(variables, tokens)
    assert logits.shape == (B, T, 24)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(model_lib.apply(params, tokens, config)), atol=1e-6
    )
    reset = np.zeros((B, T), bool)
    reset[1, 7] = True
    np.testing.assert_allclose(
        np.asarray(module.apply(variables, tokens, reset=reset)),
        np.asarray(model_lib.apply(params, tokens, config, reset=reset)),
        atol=1e-6,
    )


def test_wrappers_check_resets_like_the_pure_functions():
    # Abstract variables: the checks run before any computation.
    x = np.zeros((B, T, CELL.embedding_dim), np.float32)
    module = MLSTMCell(CELL)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    state = cell_lib.initial_state(CELL, B)
    with pytest.raises(ValueError, match=r"reset must have shape \(3,\) \(batch,\); got \(1,\)"):
        module.apply(variables, state, x[:, 0], np.ones((1,), bool), method=MLSTMCell.step)
    with pytest.raises(ValueError, match=r"reset must be a bool array.*got int32"):
        module.apply(variables, x, reset=np.zeros((B, T), np.int32))
    config = model_lib.ModelConfig(vocab_size=24, cell=CELL)
    language_model = MLSTMLanguageModel(config)
    tokens = np.zeros((B, T), np.int32)
    variables = jax.eval_shape(language_model.init, jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match=r"reset must have shape \(3, 21\) \(batch, time\)"):
        language_model.apply(variables, tokens, reset=np.zeros((1, T), bool))
