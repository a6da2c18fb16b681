"""The Gram-matrix form of the Newton–Schulz read and the recurrence that carries CᵀC,
against float64 numpy, the explicit iteration and the other sequence forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import cell, gram_read, mlstm, newton_schulz, reads
from orthorecall import model as model_lib

D = 16


def _explicit_read_64(memory, query, steps):
    """float64 numpy: X_0 = C / max(|C|_F, 1e-6), X <- a X + b X XᵀX, h = X_kᵀ q."""
    x = memory / max(np.linalg.norm(memory), 1e-6)
    for a, b in steps:
        x = a * x + b * x @ x.T @ x
    return x.T @ query


def _explicit_read_jax(memory, query, steps):
    x = memory / jnp.maximum(jnp.sqrt(jnp.sum(memory**2, axis=(-2, -1), keepdims=True)), 1e-6)
    for a, b in steps:
        x = a * x + b * x @ jnp.swapaxes(x, -1, -2) @ x
    return jnp.einsum("...i,...ij->...j", query, x)


def _memories(rng, d=D):
    """Random, low-rank, ill-conditioned (singular values 1e-4..1), zero and below-floor."""
    u, _, vt = np.linalg.svd(rng.normal(size=(d, d)))
    return np.stack(
        [
            rng.normal(size=(d, d)),
            rng.normal(size=(d, 3)) @ rng.normal(size=(3, d)),
            (u * np.logspace(-4, 0, d)) @ vt,
            np.zeros((d, d)),
            1e-8 * rng.normal(size=(d, d)),
            1e3 * rng.normal(size=(d, d)),
        ]
    ).astype(np.float32)


def test_gram_steps_cover_cubic_reads_up_to_six_iterations():
    assert gram_read.gram_steps(5) == ((1.5, -0.5),) * 5
    assert reads.NS5.gram_steps() == ((1.5, -0.5),) * 5
    assert all(gram_read.gram_steps(k) is not None for k in range(1, 7))
    # Nothing to read through for k = 0; 3^k products and rounding in G beyond 6;
    # the quintic term of the muon / polar-express sets has no nested form.
    for name in ("ns0", "ns7", "ns5_muon", "ns5_polar_express", "raw", "polar"):
        assert reads.read_from_name(name).gram_steps() is None, name
    assert [gram_read.matvec_count(k) for k in (1, 2, 5)] == [1, 4, 121]


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_read_matches_float64_explicit_iteration(k):
    rng = np.random.default_rng(k)
    memories = _memories(rng)
    queries = rng.normal(size=(len(memories), D)).astype(np.float32)
    steps = gram_read.gram_steps(k)
    got = np.asarray(gram_read.read_through_gram(memories, queries, steps))
    explicit = np.asarray(
        newton_schulz.newton_schulz_read(memories, queries, k, implementation="xla")
    )
    for i, (memory, query) in enumerate(zip(memories, queries, strict=True)):
        want = _explicit_read_64(memory.astype(np.float64), query.astype(np.float64), steps)
        scale = np.abs(want).max() + 1e-30
        # The explicit float32 iteration's own error is the yardstick (~2e-7 here).
        explicit_error = np.abs(explicit[i] - want).max() / scale
        assert np.abs(got[i] - want).max() / scale <= max(8 * explicit_error, 2e-6), i
    assert np.all(got[3] == 0)  # C = 0 reads 0


@pytest.mark.slow
def test_gradients_match_float64_and_stay_finite_at_zero():
    rng = np.random.default_rng(7)
    memories = _memories(rng)
    queries = rng.normal(size=(len(memories), D)).astype(np.float32)
    h_bar = rng.normal(size=queries.shape).astype(np.float32)
    steps = gram_read.gram_steps(5)

    def loss(fn, memory, query):
        return jnp.sum(fn(memory, query, steps) * h_bar)

    got = jax.grad(lambda c, q: loss(gram_read.read_through_gram, c, q), (0, 1))(memories, queries)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)
    with jax.enable_x64(True):
        want = jax.grad(lambda c, q: loss(_explicit_read_jax, c, q), (0, 1))(
            memories.astype(np.float64), queries.astype(np.float64)
        )
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g).reshape(len(memories), -1), np.asarray(w).reshape(len(memories), -1)
        for i in (0, 1, 2, 4, 5):  # float64's norm has no gradient at C = 0
            scale = np.abs(w[i]).max()
            assert np.abs(g[i] - w[i]).max() <= 2e-5 * scale, i


def test_custom_vjp_equals_differentiating_the_products():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, D, D)).astype(np.float32) / 4
    gram = jnp.einsum("...ki,...kj->...ij", x, x)
    y = rng.normal(size=(4, D)).astype(np.float32)
    h_bar = rng.normal(size=(4, D)).astype(np.float32)
    steps = gram_read.gram_steps(4)
    plain = lambda g, yy: gram_read._evaluate(g, yy, steps)[0]
    _, pull_plain = jax.vjp(plain, gram, y)
    _, pull_custom = jax.vjp(lambda g, yy: gram_read.nested_read(g, yy, steps), gram, y)
    for a, b in zip(pull_plain(h_bar), pull_custom(h_bar), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_gram_update_is_the_gram_matrix_of_the_updated_memory():
    rng = np.random.default_rng(4)
    c = rng.normal(size=(3, D, D))
    k, v = rng.normal(size=(3, D)), rng.normal(size=(3, D))
    f, i = np.array([0.3, 1.0, 0.0]), np.array([2.0, 0.5, 1.0])
    with jax.enable_x64(True):
        got = gram_read.gram_update(np.einsum("bki,bkj->bij", c, c), c, k, v, f, i)
    new = f[:, None, None] * c + i[:, None, None] * k[:, :, None] * v[:, None, :]
    np.testing.assert_allclose(got, np.einsum("bki,bkj->bij", new, new), rtol=1e-12, atol=1e-12)


def _sequence_inputs(rng, b=2, t=45, h=2, d=D):
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
    input_gate = rng.normal(size=(b, t, h)).astype(np.float32)
    forget_gate = (rng.normal(size=(b, t, h)) + 3).astype(np.float32)
    reset = np.zeros((b, t), bool)
    reset[0, t // 2] = reset[1, min(3, t - 1)] = True
    return q, k, v, input_gate, forget_gate, reset


@pytest.mark.parametrize(
    "chunk_size",
    [pytest.param(1, marks=pytest.mark.slow), 8, pytest.param(64, marks=pytest.mark.slow)],
)
def test_sequence_matches_the_recurrence_with_resets_and_a_given_state(chunk_size):
    rng = np.random.default_rng(5)
    q, k, v, i_gate, f_gate, reset = _sequence_inputs(rng)
    # A state from a first call, so C_0 ≠ 0 enters through G_0 = C_0ᵀC_0.
    _, state = mlstm.recurrent_sequence(q, k, v, i_gate, f_gate, read=reads.NS5)
    want, want_state = mlstm.recurrent_sequence(
        q, k, v, i_gate, f_gate, read=reads.NS5, reset=reset, state=state
    )
    got, got_state = mlstm.gram_sequence(
        q, k, v, i_gate, f_gate, read=reads.NS5, reset=reset, state=state, chunk_size=chunk_size
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    for a, b in zip(*map(jax.tree_util.tree_leaves, (got_state, want_state)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ns2 has the nesting of every k (products of G inside M inside products of G); NS5's
# own gradients are checked against float64 above and in the model by test_mlstm.
@pytest.mark.parametrize("read", ["ns2"])
def test_sequence_gradients_match_the_recurrence(read):
    rng = np.random.default_rng(6)
    inputs = _sequence_inputs(rng, t=13)
    reset = inputs[-1]
    read = reads.read_from_name(read)

    def grads(form, **kwargs):
        def loss(*xs):
            return jnp.sum(jnp.sin(form(*xs, read=read, reset=reset, **kwargs)[0]))

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*inputs[:-1])

    for got, want in zip(
        grads(mlstm.gram_sequence, chunk_size=4), grads(mlstm.recurrent_sequence), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_sequence_refuses_reads_without_a_gram_form():
    inputs = _sequence_inputs(np.random.default_rng(0), t=4)
    with pytest.raises(ValueError, match="no Gram form"):
        mlstm.gram_sequence(*inputs[:-1], read=reads.read_from_name("ns5_muon"))
    with pytest.raises(ValueError, match="only the cubic Newton-Schulz"):
        cell.CellConfig(read=reads.RAW, sequence_form="gram")


def _recurrence_64(q, k, v, input_gate, forget_gate, steps):
    """float64 numpy recurrence (one batch element, one head) with the explicit read."""
    q, k, v, input_gate, forget_gate = (
        np.asarray(x, np.float64) for x in (q, k, v, input_gate, forget_gate)
    )
    k = k / np.sqrt(k.shape[-1])
    c, n, m = np.zeros((k.shape[-1],) * 2), np.zeros(k.shape[-1]), 0.0
    out = np.zeros_like(q)
    for t in range(len(q)):
        log_f = -np.logaddexp(0.0, -forget_gate[t])
        m_new = max(log_f + m, input_gate[t])
        f_scale, i_scale = np.exp(log_f + m - m_new), np.exp(input_gate[t] - m_new)
        c = f_scale * c + i_scale * np.outer(k[t], v[t])
        n = f_scale * n + i_scale * k[t]
        m = m_new
        denominator = max(abs(q[t] @ n), np.exp(-m)) + mlstm.DENOMINATOR_EPS
        out[t] = _explicit_read_64(c, q[t], steps) / denominator
    return out


@pytest.mark.slow
@pytest.mark.parametrize("forget_bias", [20.0])
def test_8192_steps_stay_finite_and_as_accurate_as_the_recurrence(forget_bias):
    # forget_bias 20: f = 1 to float32, the memory only grows and G's rounding never
    # decays: the case where carrying G could drift from CᵀC.
    rng = np.random.default_rng(8)
    t, d = 8192, 48
    q, k, v = (rng.normal(size=(1, t, 1, d)).astype(np.float32) for _ in range(3))
    input_gate = rng.normal(size=(1, t, 1)).astype(np.float32)
    forget_gate = (rng.normal(size=(1, t, 1)) + forget_bias).astype(np.float32)
    args = (q, k, v, input_gate, forget_gate)
    gram, _ = jax.jit(lambda *xs: mlstm.gram_sequence(*xs, read=reads.NS5))(*args)
    recurrent, _ = jax.jit(lambda *xs: mlstm.recurrent_sequence(*xs, read=reads.NS5))(*args)
    want = _recurrence_64(*(x[0, :, 0] for x in args), gram_read.gram_steps(5))
    gram, recurrent = np.asarray(gram)[0, :, 0], np.asarray(recurrent)[0, :, 0]
    assert np.isfinite(gram).all()
    scale = np.abs(want).max(axis=-1)
    gram_error = np.abs(gram - want).max(axis=-1) / scale
    recurrent_error = np.abs(recurrent - want).max(axis=-1) / scale
    # Measured: both 2.5e-3 at worst with f = 1 (a memory of 8,192 rank-one terms is
    # ill-conditioned in float32 whichever form), medians 8e-6.
    assert gram_error.max() <= 1.1 * recurrent_error.max() + 1e-5
    assert np.median(gram_error) <= 1.5 * np.median(recurrent_error) + 1e-6
    np.testing.assert_allclose(gram, recurrent, rtol=0, atol=1e-3 * np.abs(recurrent).max())


@pytest.mark.slow
def test_cell_and_model_in_gram_form_match_the_chunkwise_form():
    config = model_lib.ModelConfig(
        vocab_size=20, cell=cell.CellConfig(embedding_dim=32, read=reads.NS5)
    )
    gram_config = model_lib.ModelConfig(
        vocab_size=20,
        cell=cell.CellConfig(embedding_dim=32, read=reads.NS5, sequence_form="gram", chunk_size=16),
    )
    params = model_lib.init_params(jax.random.PRNGKey(0), config)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 50), 0, 20)
    want = model_lib.apply(params, tokens, config)
    got = model_lib.apply(params, tokens, gram_config)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
