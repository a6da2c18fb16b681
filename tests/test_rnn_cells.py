"""The mLSTM cell as Flax RNN cells (``MLSTMRNNCell``, ``MLSTMNNXCell``) and the cell's
sequence API as agents use it: ``nn.RNN`` / ``nnx.RNN`` equal ``cell.scan``; any number
of batch axes; a carry keeps its dtype; T = 0 and 1; resets, masks and per-step states
agree with stepping."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from orthorecall import cell as cell_lib
from orthorecall import reads
from orthorecall.flax_modules import MLSTMNNXCell, MLSTMRNNCell, _value

# The recurrent form is what stepping computes; the chunkwise form equals it to float32
# rounding (tests/test_cell.py), so the comparisons below hold at 1e-5 either way. The
# conventions do not depend on the read: the raw read keeps compiles short, and the
# first test runs NS5 too.
CONFIG = cell_lib.CellConfig(
    embedding_dim=8, num_heads=2, inner_multiple=8, chunk_size=4, read=reads.RAW
)
NS5_CONFIG = dataclasses.replace(CONFIG, read=reads.NS5)
D = CONFIG.embedding_dim
TOL = dict(atol=2e-5, rtol=2e-5)


def _x(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (*shape, D))


@pytest.fixture(scope="module")
def params():
    return cell_lib.init_params(jax.random.PRNGKey(3), CONFIG)


def _close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **TOL)


@pytest.mark.parametrize("config", [CONFIG, NS5_CONFIG], ids=["raw", "ns5"])
def test_nn_rnn_equals_the_cells_scan(params, config):
    xs = _x((3, 7))
    rnn = nn.RNN(MLSTMRNNCell(config), return_carry=True)
    variables = rnn.init(jax.random.PRNGKey(0), xs)
    assert jax.tree_util.tree_structure(variables["params"]["cell"]["cell"]) == (
        jax.tree_util.tree_structure(params)
    )
    carry, ys = rnn.apply({"params": {"cell": {"cell": params}}}, xs)
    want_y, want_state = cell_lib.scan(params, xs, config)
    _close(ys, want_y)
    _close(carry, want_state)
    # time_major: the same numbers with time first.
    ys_tm = nn.RNN(MLSTMRNNCell(config), time_major=True).apply(
        {"params": {"cell": {"cell": params}}}, jnp.swapaxes(xs, 0, 1)
    )
    _close(jnp.swapaxes(ys_tm, 0, 1), want_y)


def test_seq_lengths_give_each_sequence_its_own_final_carry(params):
    xs, lengths = _x((3, 6), seed=1), jnp.array([6, 2, 4])
    rnn = nn.RNN(MLSTMRNNCell(CONFIG), return_carry=True)
    carry, ys = rnn.apply({"params": {"cell": {"cell": params}}}, xs, seq_lengths=lengths)
    for b, n in enumerate(np.asarray(lengths)):
        want_y, want_state = cell_lib.scan(params, xs[b : b + 1, :n], CONFIG)
        _close(ys[b, :n], want_y[0])
        _close(jax.tree_util.tree_map(lambda a, b=b: a[b], carry), _squeeze(want_state))
    # The cell's own mask does the same without nn.RNN: padded steps leave the state.
    mask = jnp.arange(6)[None, :] < lengths[:, None]
    y, state = cell_lib.scan(params, xs, CONFIG, mask=mask)
    _close(state, carry)
    _close(jnp.where(mask[..., None], ys, 0.0), y)


def _squeeze(state):
    return jax.tree_util.tree_map(lambda a: a[0], state)


def test_any_number_of_batch_axes(params):
    xs = _x((2, 3, 5), seed=2)
    y, state = cell_lib.scan(params, xs, CONFIG)
    flat_y, _ = cell_lib.scan(params, xs.reshape(6, 5, D), CONFIG)
    _close(y.reshape(6, 5, D), flat_y)
    assert state.memory.c.shape[:2] == (2, 3)
    # nn.RNN with two batch axes; and a step without any batch axis.
    ys = nn.RNN(MLSTMRNNCell(CONFIG)).apply({"params": {"cell": {"cell": params}}}, xs)
    _close(ys, y)
    single = cell_lib.initial_state(CONFIG, ())
    y0, _ = cell_lib.step(params, single, xs[0, 0, 0], None, CONFIG)
    assert y0.shape == (D,)
    _close(y0, y[0, 0, 0])


def test_a_bfloat16_carry_stays_bfloat16_through_a_scan(params):
    xs = _x((2, 4), seed=3)
    cell = MLSTMRNNCell(CONFIG, carry_dtype=jnp.bfloat16)
    carry = cell.initialize_carry(jax.random.PRNGKey(0), xs[:, 0].shape)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(carry)} == {jnp.dtype(jnp.bfloat16)}
    variables = {"params": {"cell": params}}

    def body(carry, x):
        return cell.apply(variables, carry, x)

    final, ys = jax.lax.scan(body, carry, jnp.swapaxes(xs, 0, 1))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(final)} == {jnp.dtype(jnp.bfloat16)}
    assert ys.dtype == jnp.float32 and np.isfinite(np.asarray(ys)).all()
    _, full = cell_lib.scan(params, xs, CONFIG, state=carry)
    assert full.memory.c.dtype == jnp.bfloat16


def test_zero_and_one_steps(params):
    state = cell_lib.scan(params, _x((2, 3), seed=4), CONFIG)[1]
    y, same = cell_lib.scan(params, jnp.zeros((2, 0, D)), CONFIG, state=state)
    assert y.shape == (2, 0, D)
    _close(same, state)
    y, same, states = cell_lib.scan(
        params, jnp.zeros((2, 0, D)), CONFIG, state=state, return_states=True
    )
    assert states.memory.c.shape == (2, 0, *state.memory.c.shape[1:])
    x1 = _x((2, 1), seed=5)
    y1, state1 = nn.RNN(MLSTMRNNCell(CONFIG), return_carry=True).apply(
        {"params": {"cell": {"cell": params}}}, x1
    )[::-1]
    want_y, want_state = cell_lib.step(
        params, cell_lib.initial_state(CONFIG, 2), x1[:, 0], None, CONFIG
    )
    _close(y1[:, 0], want_y)
    _close(state1, want_state)


def test_resets_by_tuple_and_by_channel_equal_the_scans(params):
    xs = _x((2, 9), seed=6)
    reset = np.zeros((2, 9), bool)
    reset[0, 4] = reset[1, 2] = reset[1, 7] = True
    want_y, want_state = cell_lib.scan(params, xs, CONFIG, reset=jnp.asarray(reset))
    cell = MLSTMRNNCell(CONFIG)
    variables = {"params": {"cell": params}}
    carry = cell.initialize_carry(jax.random.PRNGKey(0), (2, D))

    def body(carry, inputs):
        return cell.apply(variables, carry, inputs)

    final, ys = jax.lax.scan(body, carry, (jnp.swapaxes(xs, 0, 1), jnp.asarray(reset.T)))
    _close(jnp.swapaxes(ys, 0, 1), want_y)
    _close(final, want_state)
    flagged = jnp.concatenate([xs, jnp.asarray(reset, jnp.float32)[..., None]], axis=-1)
    ys = nn.RNN(MLSTMRNNCell(CONFIG, reset_channel=True)).apply(
        {"params": {"cell": {"cell": params}}}, flagged
    )
    _close(ys, want_y)


def test_masked_steps_leave_the_state_and_states_are_per_step(params):
    xs = _x((2, 6), seed=7)
    mask = np.ones((2, 6), bool)
    mask[0, 2] = mask[0, 3] = mask[1, 5] = False
    y, state, states = cell_lib.scan(params, xs, CONFIG, mask=jnp.asarray(mask), return_states=True)
    for b in range(2):
        kept = xs[b : b + 1, mask[b]]
        want_y, want_state = cell_lib.scan(params, kept, CONFIG)
        _close(y[b, mask[b]], want_y[0])
        _close(jax.tree_util.tree_map(lambda a, b=b: a[b], state), _squeeze(want_state))
        assert np.all(np.asarray(y[b, ~mask[b]]) == 0)
    # The per-step states are those of scanning each prefix.
    for t in (0, 3, 5):
        _, prefix = cell_lib.scan(
            params, xs[:, : t + 1], CONFIG, mask=jnp.asarray(mask[:, : t + 1])
        )
        _close(jax.tree_util.tree_map(lambda a, t=t: a[:, t], states), prefix)


def test_a_learned_initial_state_starts_every_episode():
    xs = _x((2, 5), seed=8)
    reset = jnp.asarray(np.array([[False, False, True, False, False]] * 2))
    flagged = jnp.concatenate([xs, reset[..., None].astype(jnp.float32)], axis=-1)
    rnn = nn.RNN(MLSTMRNNCell(CONFIG, learned_initial_state=True, reset_channel=True))
    variables = rnn.init(jax.random.PRNGKey(0), flagged)
    learned = variables["params"]["cell"]["initial_state"]
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(learned))

    def loss(variables):
        return jnp.sum(rnn.apply(variables, flagged) ** 2)

    grads = jax.grad(loss)(variables)["params"]["cell"]["initial_state"]
    assert float(jnp.abs(grads.memory.c).sum()) > 0 and float(jnp.abs(grads.conv).sum()) > 0
    # A learned C = I: the first episode and the one after the reset both start from it.
    eye = jnp.broadcast_to(jnp.eye(CONFIG.head_dim), learned.memory.c.shape)
    start = learned._replace(memory=learned.memory._replace(c=eye))
    variables["params"]["cell"]["initial_state"] = start
    ys = rnn.apply(variables, flagged)
    params = variables["params"]["cell"]["cell"]
    state = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (2, *a.shape)), start)
    _close(ys[:, :2], cell_lib.scan(params, xs[:, :2], CONFIG, state=state)[0])
    _close(ys[:, 2:], cell_lib.scan(params, xs[:, 2:], CONFIG, state=state)[0])


def test_bidirectional_runs_both_directions(params):
    xs = _x((2, 5), seed=9)
    bi = nn.Bidirectional(nn.RNN(MLSTMRNNCell(CONFIG)), nn.RNN(MLSTMRNNCell(CONFIG)))
    variables = bi.init(jax.random.PRNGKey(0), xs)
    out = bi.apply(variables, xs)
    assert out.shape == (2, 5, 2 * D)
    forward = cell_lib.scan(variables["params"]["forward_rnn"]["cell"]["cell"], xs, CONFIG)[0]
    _close(out[..., :D], forward)
    backward = cell_lib.scan(
        variables["params"]["backward_rnn"]["cell"]["cell"], xs[:, ::-1], CONFIG
    )[0]
    _close(out[..., D:], backward[:, ::-1])


def test_nnx_cell_in_nnx_rnn_equals_the_cells_scan():
    xs = _x((3, 6), seed=10)
    cell = MLSTMNNXCell(CONFIG, rngs=nnx.Rngs(0))
    ys = nnx.RNN(cell)(xs)
    _close(ys, cell_lib.scan(_value(cell.cell), xs, CONFIG)[0])
    learned = MLSTMNNXCell(CONFIG, rngs=nnx.Rngs(0), learned_initial_state=True)
    carry = learned.initialize_carry((3, D))
    assert carry.memory.c.shape == (3, *cell_lib.initial_state(CONFIG, 1).memory.c.shape[1:])
