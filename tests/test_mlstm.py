"""The recurrence and the chunkwise form against a float64 numpy recurrence."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import mlstm, reads
from orthorecall import newton_schulz as ns
from tests import numpy_reference as ref

B, T, H, D = 2, 29, 2, 6


def _inputs(seed, with_reset=True):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(3))
    igate = (2.0 * rng.standard_normal((B, T, H))).astype(np.float32)
    fgate = (2.0 + 2.0 * rng.standard_normal((B, T, H))).astype(np.float32)
    reset = rng.random((B, T)) < 0.1 if with_reset else None
    if with_reset:
        reset[0, 7] = True  # at least one reset, mid-chunk for most chunk sizes
    return q, k, v, igate, fgate, reset


def _numpy_read(read):
    if read.is_raw:
        return lambda c: c
    if read.kind == "polar":
        return ref.polar
    return functools.partial(
        ref.newton_schulz, steps=ns.iteration_coefficients(read.coefficients, read.num_iterations)
    )


def _run(form, read, q, k, v, igate, fgate, reset, chunk_size=None, state=None):
    args = [jnp.asarray(a) for a in (q, k, v, igate, fgate)]
    reset = None if reset is None else jnp.asarray(reset)
    if form == "recurrent":
        return mlstm.recurrent_sequence(*args, read=read, reset=reset, state=state)
    # "chunkwise_xla": the chunk form itself where the CPU runs a kernel (the raw read).
    implementation = "xla" if form == "chunkwise_xla" else "auto"
    return mlstm.chunkwise_sequence(
        *args,
        read=read,
        reset=reset,
        state=state,
        chunk_size=chunk_size,
        implementation=implementation,
    )


READS = [reads.RAW, reads.NS5, reads.ReadConfig("newton_schulz", 3, "polar_express")]


@pytest.mark.parametrize("read", READS, ids=lambda r: f"{r.kind}{r.num_iterations}{r.coefficients}")
@pytest.mark.parametrize(
    "form,chunk_size",
    [
        ("recurrent", None),
        ("chunkwise", 1),
        ("chunkwise", 4),
        ("chunkwise", 8),
        ("chunkwise", 29),
        ("chunkwise", 64),
        ("chunkwise", None),
        ("chunkwise_xla", 8),
        ("chunkwise_xla", 29),
    ],
)
@pytest.mark.slow
def test_forms_match_float64_recurrence(read, form, chunk_size):
    q, k, v, igate, fgate, reset = _inputs(0)
    want, (c, n, m) = ref.mlstm_recurrence(q, k, v, igate, fgate, _numpy_read(read), reset)
    got, state = _run(form, read, q, k, v, igate, fgate, reset, chunk_size)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(state.c), c, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(state.n), n, atol=2e-5, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(state.m), m, atol=2e-5, rtol=2e-4)


def test_default_chunk_size_by_read_and_backend():
    # The CPU choice is measured (see default_chunk_size); T = 29 above makes
    # the default chunk of a non-raw read pad its tail.
    assert mlstm.default_chunk_size(reads.NS5, "cpu") == 16
    assert mlstm.default_chunk_size(reads.POLAR, "cpu") == 16
    assert mlstm.default_chunk_size(reads.RAW, "cpu") == 64
    # Elsewhere the non-raw reads' 16 is for memory (the XLA read's arrays per position).
    assert mlstm.default_chunk_size(reads.NS5, "gpu") == 16
    assert mlstm.default_chunk_size(reads.RAW, "tpu") == 64
    assert mlstm.default_chunk_size(reads.NS5) == mlstm.default_chunk_size(
        reads.NS5, jax.default_backend()
    )


@pytest.mark.slow
def test_polar_read_matches_float64_recurrence():
    # The polar factor is ill-conditioned when the memory is nearly rank
    # deficient (early steps), so the tolerance is looser than for NS.
    q, k, v, igate, fgate, _ = _inputs(1, with_reset=False)
    want, _ = ref.mlstm_recurrence(q, k, v, igate, fgate, ref.polar)
    for form, chunk in (("recurrent", None), ("chunkwise", 8)):
        got, _ = _run(form, reads.POLAR, q, k, v, igate, fgate, None, chunk)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_initial_state_and_splitting_a_sequence():
    q, k, v, igate, fgate, reset = _inputs(2)
    whole, final = _run("chunkwise", reads.NS5, q, k, v, igate, fgate, reset, 8)
    cut = 13
    first, mid = _run(
        "chunkwise", reads.NS5, *(a[:, :cut] for a in (q, k, v, igate, fgate, reset)), 8
    )
    second, final2 = _run(
        "recurrent", reads.NS5, *(a[:, cut:] for a in (q, k, v, igate, fgate, reset)), state=mid
    )
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final2.c), np.asarray(final.c), atol=1e-5)


@pytest.mark.slow
def test_reset_equals_fresh_start():
    q, k, v, igate, fgate, _ = _inputs(3, with_reset=False)
    reset = np.zeros((B, T), bool)
    reset[:, 11] = True
    with_reset, _ = _run("chunkwise", reads.NS5, q, k, v, igate, fgate, reset, 8)
    fresh, _ = _run("chunkwise", reads.NS5, *(a[:, 11:] for a in (q, k, v, igate, fgate)), None, 8)
    np.testing.assert_allclose(
        np.asarray(with_reset)[:, 11:], np.asarray(fresh), atol=1e-5, rtol=1e-4
    )


@pytest.mark.slow
def test_memory_step_is_one_recurrent_step():
    q, k, v, igate, fgate, reset = _inputs(4)
    seq, _ = _run("recurrent", reads.NS5, q, k, v, igate, fgate, reset)
    state = mlstm.initial_memory_state(B, H, D)
    for t in range(4):
        h, state = mlstm.memory_step(
            state,
            q[:, t],
            k[:, t],
            v[:, t],
            igate[:, t],
            fgate[:, t],
            jnp.asarray(reset[:, t]),
            reads.NS5,
        )
        np.testing.assert_allclose(np.asarray(h), np.asarray(seq[:, t]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("read", [reads.RAW, reads.NS5], ids=["raw", "ns5"])
@pytest.mark.slow
def test_gradients_agree_between_forms(read):
    q, k, v, igate, fgate, reset = _inputs(5)
    weight = jnp.asarray(np.random.default_rng(9).standard_normal((B, T, H, D)), jnp.float32)

    def loss(args, form, chunk):
        out, state = _run(form, read, *args, reset, chunk)
        return jnp.sum(out * weight) + jnp.sum(state.c)

    args = tuple(jnp.asarray(a) for a in (q, k, v, igate, fgate))
    want = jax.grad(loss)(args, "recurrent", None)
    for form, chunk in itertools.product(("chunkwise", "chunkwise_xla"), (4, 7)):
        got = jax.grad(loss)(args, form, chunk)
        for g, w in zip(got, want):
            # Gradients that are exactly zero in the recurrence (a forget gate
            # at a reset step) come out of the chunk's cumulative sums as
            # rounding of the order of eps x the largest gradient.
            scale = float(jnp.max(jnp.abs(w)))
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6 * scale, rtol=5e-4)


@pytest.mark.slow
def test_gradient_matches_float64_finite_differences():
    q, k, v, igate, fgate, reset = _inputs(6)
    weight = np.random.default_rng(10).standard_normal((B, T, H, D))
    read64 = _numpy_read(reads.NS5)

    def f64(ig):
        return np.sum(ref.mlstm_recurrence(q, k, v, ig, fgate, read64, reset)[0] * weight)

    grad = jax.grad(
        lambda ig: jnp.sum(_run("chunkwise", reads.NS5, q, k, v, ig, fgate, reset, 8)[0] * weight)
    )(jnp.asarray(igate))
    ref.assert_directional_derivative(f64, igate, grad, seed=11)


@pytest.mark.slow
def test_zero_state_start_has_finite_gradients():
    # Queries that see a zero memory (the very first step with ĩ -> -inf).
    q, k, v, igate, fgate, _ = _inputs(7, with_reset=False)
    igate = igate.copy()
    igate[:, 0] = -80.0
    grads = jax.grad(
        lambda ig: jnp.sum(_run("chunkwise", reads.NS5, q, k, v, ig, fgate, None, 8)[0])
    )(jnp.asarray(igate))
    assert np.all(np.isfinite(np.asarray(grads)))


def test_shape_errors():
    q, k, v, igate, fgate, _ = _inputs(8)
    with pytest.raises(ValueError, match="input_gate"):
        mlstm.chunkwise_sequence(q, k, v, igate[:, :-1], fgate, read=reads.RAW)
    with pytest.raises(ValueError, match="reset"):
        mlstm.recurrent_sequence(q, k, v, igate, fgate, read=reads.RAW, reset=jnp.zeros((B,), bool))
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm.chunkwise_sequence(q, k, v, igate, fgate, read=reads.RAW, chunk_size=0)


# Non-finite values. Each batch element of _poisoned holds one bad value: in an input
# at BAD_AT, or in the initial state; the second half of the batch repeats the first
# with a reset at RESET_AT. The recurrence is the reference for where bad values may
# go: forward to later positions of their episode, never back and never past a reset.
PT, BAD_AT, RESET_AT = 24, 9, 17
_INJECTIONS = (
    [
        (name, value)
        for name in ("q", "k", "v", "input_gate", "forget_gate")
        for value in (np.nan, np.inf, -np.inf)
    ]
    + [(name, value) for name in ("c", "n", "m") for value in (np.nan, np.inf)]
    + [("m", -np.inf)]
)
# Not bad at all: ĩ = -inf writes nothing, f̃ = -inf forgets everything (f = 0),
# f̃ = +inf keeps everything (f = 1) and m = -inf is a state that weighs nothing; both
# forms must stay finite there.
_HARMLESS = [
    ("input_gate", -np.inf),
    ("forget_gate", np.inf),
    ("forget_gate", -np.inf),
    ("m", -np.inf),
]


def _poisoned(seed, inf_as_nan=False):
    """(args (q, k, v, ĩ, f̃), reset, state) with one injection per batch element.

    With ``inf_as_nan`` every bad inf is injected as NaN instead: run through the
    recurrence, that shows everything a bad value can reach (an inf can also vanish,
    e.g. in a normalizer q·n = inf, which reads 1/inf = 0).
    """
    rng = np.random.default_rng(seed)
    b = 2 * len(_INJECTIONS)
    q, k, v = (rng.standard_normal((b, PT, H, D)).astype(np.float32) for _ in range(3))
    igate = (2.0 * rng.standard_normal((b, PT, H))).astype(np.float32)
    fgate = (2.0 + 2.0 * rng.standard_normal((b, PT, H))).astype(np.float32)
    arrays = {"q": q, "k": k, "v": v, "input_gate": igate, "forget_gate": fgate}
    arrays["c"] = rng.standard_normal((b, H, D, D)).astype(np.float32)
    arrays["n"] = rng.standard_normal((b, H, D)).astype(np.float32)
    arrays["m"] = rng.standard_normal((b, H)).astype(np.float32)
    reset = np.zeros((b, PT), bool)
    reset[len(_INJECTIONS) :, RESET_AT] = True
    for i, (name, value) in enumerate(_INJECTIONS * 2):
        if inf_as_nan and (name, value) not in _HARMLESS:
            value = np.nan
        target = arrays[name]
        if name in ("c", "n", "m"):  # one entry of head 1 of the state
            target[(i, 1) + (2, 3)[: target.ndim - 2]] = value
        elif target.ndim == 4:  # one feature of head 1
            target[i, BAD_AT, 1, 2] = value
        else:
            target[i, BAD_AT, 1] = value
    args = tuple(jnp.asarray(arrays[name]) for name in ("q", "k", "v", "input_gate", "forget_gate"))
    state = mlstm.MemoryState(*(jnp.asarray(arrays[name]) for name in "cnm"))
    return args, jnp.asarray(reset), state


def _assert_bad_exactly_where_reachable(got, want, reachable, err_msg=""):
    """``got`` is NaN exactly where a bad value reaches (``reachable`` NaN), never
    finite where ``want`` is not, and nowhere inf."""
    got, want, reachable = (np.asarray(x) for x in (got, want, reachable))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(reachable), err_msg)
    assert not np.any(np.isfinite(got) & ~np.isfinite(want)), err_msg
    assert not np.any(np.isinf(got)), err_msg


# The raw read twice: on the CPU its kernel ("auto"), and the chunk form ("xla").
POISON_CASES = [(reads.RAW, "auto"), (reads.RAW, "xla"), (reads.NS5, "auto"), (reads.POLAR, "auto")]
POISON_IDS = ["raw", "raw-xla", "newton_schulz", "polar"]


@pytest.mark.parametrize("read,implementation", POISON_CASES, ids=POISON_IDS)
@pytest.mark.slow
def test_non_finite_values_stay_causal_and_inside_their_episode(read, implementation):
    args, reset, state = _poisoned(20)
    want, want_state = mlstm.recurrent_sequence(*args, read=read, reset=reset, state=state)
    nan_args, _, nan_state = _poisoned(20, inf_as_nan=True)
    reachable, reachable_state = mlstm.recurrent_sequence(
        *nan_args, read=read, reset=reset, state=nan_state
    )
    harmless = np.array([injection in _HARMLESS for injection in _INJECTIONS * 2])
    per_element = np.isfinite(np.asarray(reachable)).reshape(len(harmless), -1).all(-1)
    np.testing.assert_array_equal(per_element, harmless)
    tolerance = (
        {"atol": 2e-3, "rtol": 2e-3} if read.kind == "polar" else {"atol": 2e-5, "rtol": 2e-4}
    )
    # A fresh start at the reset: what every element with a reset must give from there.
    fresh, _ = mlstm.chunkwise_sequence(
        *(a[:, RESET_AT:] for a in args), read=read, chunk_size=8, implementation=implementation
    )
    with_reset = np.asarray(reset)[:, RESET_AT]
    # 5 splits BAD_AT and RESET_AT over different chunks; 16 puts BAD_AT mid-chunk and
    # RESET_AT in the next; 24 holds all of them in one chunk.
    for chunk_size in (5, 16, 24):
        got, got_state = mlstm.chunkwise_sequence(
            *args,
            read=read,
            reset=reset,
            state=state,
            chunk_size=chunk_size,
            implementation=implementation,
        )
        message = f"chunk_size={chunk_size}"
        _assert_bad_exactly_where_reachable(got, want, reachable, message)
        for leaf, want_leaf, reachable_leaf in zip(
            *map(jax.tree_util.tree_leaves, (got_state, want_state, reachable_state))
        ):
            _assert_bad_exactly_where_reachable(leaf, want_leaf, reachable_leaf, message)
        finite = np.isfinite(np.asarray(got))
        np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(want)[finite], **tolerance)
        np.testing.assert_allclose(
            np.asarray(got)[with_reset, RESET_AT:], np.asarray(fresh)[with_reset], **tolerance
        )


@pytest.mark.parametrize("read,implementation", POISON_CASES, ids=POISON_IDS)
@pytest.mark.slow
def test_non_finite_values_do_not_spread_through_gradients(read, implementation):
    # The loss takes every output no bad value reaches; a bad value must not turn the
    # gradient of another episode (or any the recurrence keeps finite) into NaN.
    args, reset, state = _poisoned(21)
    nan_args, _, nan_state = _poisoned(21, inf_as_nan=True)
    reachable, _ = mlstm.recurrent_sequence(*nan_args, read=read, reset=reset, state=nan_state)
    keep = jnp.isfinite(reachable)
    weight = jnp.asarray(np.random.default_rng(22).standard_normal((reset.shape[0], PT, H, D)))

    def loss(args, form):
        if form == "recurrent":
            h, _ = mlstm.recurrent_sequence(*args, read=read, reset=reset, state=state)
        else:
            h, _ = mlstm.chunkwise_sequence(
                *args,
                read=read,
                reset=reset,
                state=state,
                chunk_size=16,
                implementation=implementation,
            )
        return jnp.sum(jnp.where(keep, h * weight, 0.0))

    want = jax.grad(loss)(args, "recurrent")
    got = jax.grad(loss)(args, "chunkwise")
    with_reset = np.asarray(reset)[:, RESET_AT]
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        g_bad, w_bad = (~np.isfinite(x).reshape(x.shape[:3] + (-1,)).all(-1) for x in (g, w))
        assert not np.any(w_bad[with_reset, RESET_AT:])  # the other episode's gradients
        assert not np.any(g_bad & ~w_bad), np.argwhere(g_bad & ~w_bad)[:5]
        if read.kind == "polar":
            # The polar factor's derivative (1/(σ_i + σ_j)) is ill-conditioned at these
            # small memories: the two forms differ by a few percent even on finite
            # inputs, so only where the gradients are finite is compared.
            continue
        scale = float(np.max(np.abs(w[np.isfinite(w)])))
        both = np.isfinite(w)
        np.testing.assert_allclose(g[both], w[both], atol=1e-5 * scale, rtol=5e-4)


def test_resets_must_be_bool_with_one_entry_per_sequence_and_step():
    q, k, v, igate, fgate, _ = _inputs(8)
    state = mlstm.initial_memory_state(B, H, D)
    step_args = (state, q[:, 0], k[:, 0], v[:, 0], igate[:, 0], fgate[:, 0])
    # A (1,) reset would broadcast over the batch: every sequence would restart.
    with pytest.raises(ValueError, match=r"reset must have shape \(2,\).*got \(1,\)"):
        mlstm.memory_step(*step_args, jnp.ones((1,), bool), reads.RAW)
    with pytest.raises(ValueError, match=r"reset must be a bool array.*got int32.*astype\(bool\)"):
        mlstm.memory_step(*step_args, jnp.ones((B,), jnp.int32), reads.RAW)
    for form in (mlstm.recurrent_sequence, mlstm.chunkwise_sequence):
        with pytest.raises(
            ValueError, match=rf"reset must have shape \({B}, {T}\).*got \(1, {T}\)"
        ):
            form(q, k, v, igate, fgate, read=reads.RAW, reset=jnp.zeros((1, T), bool))
        with pytest.raises(ValueError, match=r"reset must be a bool array.*got float32"):
            form(q, k, v, igate, fgate, read=reads.RAW, reset=jnp.zeros((B, T)))
    with pytest.raises(ValueError, match=r"reset must be a bool array of shape \(2,\).*got list"):
        mlstm.memory_step(*step_args, [True, False], reads.RAW)
    with pytest.raises(ValueError, match=r"state.c must have shape \(2, 2, 6, 6\)"):
        mlstm.memory_step(mlstm.initial_memory_state(1, H, D), *step_args[1:], None, reads.RAW)
