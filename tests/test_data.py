"""Tests for orthorecall.data: MAD bit-exactness, validation, streams, and the JAX sampler."""

from __future__ import annotations

import contextlib
import json
import math

import jax
import numpy as np
import pytest
from scipy import stats

from orthorecall import data
from tests.conftest import MAD_FIXTURES

IGNORE = -100


def _load_fixture(name):
    with np.load(MAD_FIXTURES / name) as f:
        return f["inputs"], f["targets"], json.loads(str(f["params"]))


def _task_kwargs(params):
    return {
        k: params[k]
        for k in ("vocab_size", "seq_len", "noise_vocab_size", "frac_noise", "multi_query")
    }


def _task(params):
    return data.NoisyRecallTask(**_task_kwargs(params))


# ---------------------------------------------------------------------------------------
# An independent transcription of REFERENCE.md section 1, written as literally as possible
# (plain lists, rng.choice on explicit arrays), to cross-check the optimized generator.
# ---------------------------------------------------------------------------------------


def transcribed_mad_example(V, S, N, p, multi_query, is_training, rng, ignore=IGNORE):
    M = V - N if multi_query else V - 1 - N
    key_range_array = np.arange(0, M // 2)
    value_range_array = np.arange(M // 2, M)
    noise_range_array = np.arange(M, M + N)
    P = S // 2
    r0 = rng.choice(P)
    inputs, targets = [], []
    presented_keys, presented_values = [], []  # first-seen order
    for i in range(P - 1):
        noise = False
        if p > 0 and i != r0:
            noise = rng.random() < p
        if noise:
            pair = rng.choice(noise_range_array, size=2, replace=True)
            inputs += [int(pair[0]), int(pair[1])]
            targets += [ignore, ignore]
            continue
        k = int(rng.choice(key_range_array))
        if k in presented_keys:
            v = presented_values[presented_keys.index(k)]
            targets += [ignore, v if multi_query else ignore]
        else:
            v = int(rng.choice(value_range_array))
            presented_keys.append(k)
            presented_values.append(v)
            targets += [ignore, ignore]
        inputs += [k, v]
    k_star = int(rng.choice(presented_keys))  # ValueError when empty, as in MAD
    v_star = presented_values[presented_keys.index(k_star)]
    if not multi_query:
        inputs.append(V - 1)
        targets.append(ignore)
    inputs += [k_star, v_star]
    targets += [ignore, v_star]
    if is_training:
        return inputs[:-1], inputs[1:]
    return inputs[:-1], targets[1:]


# ---------------------------------------------------------------------------------------
# numpy generator: bit-exactness
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "v32_s128_train_seed0.npz",
        "v32_s128_single_query_eval_seed1.npz",
        "v80_s512_eval_seed10011.npz",
    ],
)
def test_matches_mad_fixtures(name):
    want_x, want_y, params = _load_fixture(name)
    kwargs = dict(_task_kwargs(params), is_training=params["is_training"])
    rng = np.random.default_rng(params["seed"])
    x, y = data.generate_noisy_recall_batch(
        _task(params), batch_size=params["num_examples"], is_training=params["is_training"], rng=rng
    )
    assert x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
    rng = np.random.default_rng(params["seed"])
    for row in range(params["num_examples"]):
        x1, y1 = data.generate_noisy_recall_example(rng=rng, **kwargs)
        assert x1.dtype == y1.dtype == np.int32 and x1.shape == want_x[row].shape
        np.testing.assert_array_equal(x1, want_x[row])
        np.testing.assert_array_equal(y1, want_y[row])


GRID = [
    # (V, N, S, p)
    (32, 16, 128, 0.2),
    (32, 16, 128, 0.0),
    (80, 16, 64, 0.8),
    (96, 16, 40, 0.5),
    (12, 4, 8, 0.3),
    (7, 3, 4, 0.6),  # minimal length; single-query: one key, two values
    (20, 0, 16, 0.0),  # no noise vocabulary at all
    (40, 5, 30, 0.95),
]


@pytest.mark.parametrize("V,N,S,p", GRID)
@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("is_training", [True, False])
def test_matches_transcription(V, N, S, p, multi_query, is_training):
    seed = V * 1000 + S + int(100 * p) + 7 * multi_query + 3 * is_training
    ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
    kwargs = dict(
        vocab_size=V,
        seq_len=S,
        noise_vocab_size=N,
        frac_noise=p,
        multi_query=multi_query,
        is_training=is_training,
        rng=ours,
    )
    done = 0
    for _ in range(12):
        try:
            want = transcribed_mad_example(V, S, N, p, multi_query, is_training, theirs)
        except ValueError:  # MAD's failure when no key was presented
            with pytest.raises(data.NoKeyPresentedError):
                data.generate_noisy_recall_example(**kwargs)
            assert ours.bit_generator.state == theirs.bit_generator.state
            continue
        x, y = data.generate_noisy_recall_example(**kwargs)
        assert x.dtype == y.dtype == np.int32
        assert len(x) == len(y) == (S - 1 if multi_query else S)
        assert x.tolist() == want[0] and y.tolist() == want[1]
        # Same number of draws consumed: the next example starts from the same state.
        assert ours.bit_generator.state == theirs.bit_generator.state
        done += 1
    assert done >= 6


def test_no_key_presented_raises_exactly_when_mad_fails():
    """With 3 slots (S=6) and p=0.9 MAD fails in ~27% of examples (r0 = 2, both slots noise)."""
    failures = 0
    for seed in range(200):
        ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
        kwargs = dict(
            vocab_size=12,
            seq_len=6,
            noise_vocab_size=4,
            frac_noise=0.9,
            multi_query=True,
            is_training=False,
        )
        try:
            want = transcribed_mad_example(12, 6, 4, 0.9, True, False, theirs)
        except ValueError:
            with pytest.raises(data.NoKeyPresentedError, match="no key-value pair"):
                data.generate_noisy_recall_example(rng=ours, **kwargs)
            failures += 1
        else:
            x, y = data.generate_noisy_recall_example(rng=ours, **kwargs)
            assert (x.tolist(), y.tolist()) == want
        assert ours.bit_generator.state == theirs.bit_generator.state
    assert 30 <= failures <= 80
    assert issubclass(data.NoKeyPresentedError, RuntimeError)


def test_minimum_length_and_vocab():
    rng = np.random.default_rng(0)
    for multi_query, length in [(True, 3), (False, 4)]:
        V = 18 if multi_query else 19  # M = 2: exactly one key (0) and one value (1)
        task = data.NoisyRecallTask(
            vocab_size=V, seq_len=4, noise_vocab_size=16, frac_noise=0.0, multi_query=multi_query
        )
        x, y = data.generate_noisy_recall_batch(task, batch_size=5, is_training=False, rng=rng)
        assert x.shape == y.shape == (5, length)
        assert (x[:, :2] == [0, 1]).all() and (y[:, -1] == 1).all()


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------

BASE = dict(vocab_size=32, seq_len=128, noise_vocab_size=16, frac_noise=0.2, multi_query=True)
TASK_BASE = data.NoisyRecallTask(**BASE)
BAD = [
    (dict(seq_len=127), "seq_len must be even"),
    (dict(seq_len=2), "seq_len must be >= 4"),
    (dict(seq_len=0), "seq_len must be >= 4"),
    (dict(seq_len=128.0), "seq_len must be an integer"),
    (dict(seq_len="128"), "seq_len must be an integer"),
    (dict(vocab_size=32.0), "vocab_size must be an integer"),
    (dict(vocab_size=True), "vocab_size must be an integer"),
    (dict(vocab_size=17), "vocab_size too small"),
    (dict(vocab_size=18, multi_query=False), "vocab_size too small"),
    (dict(noise_vocab_size=-1), "noise_vocab_size must be >= 0"),
    (dict(noise_vocab_size=0), "noise_vocab_size must be >= 1 when frac_noise > 0"),
    (dict(frac_noise=1.0), r"frac_noise must be in \[0, 1\)"),
    (dict(frac_noise=-0.1), r"frac_noise must be in \[0, 1\)"),
    (dict(frac_noise=float("nan")), r"frac_noise must be in \[0, 1\)"),
    (dict(frac_noise="0.2"), "frac_noise must be a real number"),
    (dict(frac_noise=False), "frac_noise must be a real number"),
    (dict(multi_query=1), "multi_query must be a bool"),
    (dict(ignore_index=5), "ignore_index must be an int32 outside"),
    (dict(ignore_index=-100.0), "ignore_index must be an integer"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_invalid_params_raise_value_error(override, message):
    kwargs = {**BASE, **override}
    with pytest.raises(ValueError, match=message):
        data.generate_noisy_recall_example(is_training=True, rng=np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError, match=message):
        data.NoisyRecallTask(**kwargs)


def test_other_invalid_args():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="is_training must be a bool"):
        data.generate_noisy_recall_example(is_training=None, rng=rng, **BASE)
    with pytest.raises(ValueError, match="is_training must be a bool"):
        data.sample_noisy_recall(jax.random.key(0), TASK_BASE, batch_size=2, is_training=0)
    for bad_rng in (np.random.RandomState(0), 0, None):
        with pytest.raises(TypeError, match=r"rng must be a numpy\.random\.Generator"):
            data.generate_noisy_recall_example(is_training=True, rng=bad_rng, **BASE)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.generate_noisy_recall_batch(TASK_BASE, batch_size=0, is_training=True, rng=rng)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.sample_noisy_recall(jax.random.key(0), TASK_BASE, batch_size=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        data.reference_validation_set(TASK_BASE, seed=-1)
    for call in (
        lambda task: data.sample_noisy_recall(jax.random.key(0), task, batch_size=2),
        lambda task: data.generate_noisy_recall_batch(
            task, batch_size=2, is_training=True, rng=rng
        ),
        lambda task: data.reference_validation_set(task, seed=0),
        lambda task: data.ReferenceTrainingStream(task, seed=0, batch_size=2),
    ):
        with pytest.raises(TypeError, match="task must be a NoisyRecallTask"):
            call(BASE)
    with pytest.raises(TypeError):  # keyword-only public contract
        data.generate_noisy_recall_example(32, 128, 16, 0.2, True, True, rng)
    # numpy integer types are fine
    x, _ = data.generate_noisy_recall_example(
        **{**BASE, "vocab_size": np.int64(32), "seq_len": np.int32(16)},
        is_training=np.bool_(True),
        rng=rng,
    )
    assert x.shape == (15,)


# ---------------------------------------------------------------------------------------
# validation set and training stream
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_validation_set_matches_fixture():
    want_x, want_y, params = _load_fixture("v80_s512_eval_seed10011.npz")
    x, y = data.reference_validation_set(
        _task(params), seed=params["seed"] - data.VALIDATION_SEED_OFFSET
    )
    assert x.shape == y.shape == (16, 16, 511) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[0], want_x)
    np.testing.assert_array_equal(y[0], want_y)


def test_reference_validation_set_is_consecutive_batches():
    task = data.NoisyRecallTask(
        vocab_size=32, seq_len=32, noise_vocab_size=16, frac_noise=0.5, multi_query=False
    )
    x, y = data.reference_validation_set(task, seed=3, num_batches=3, batch_size=4)
    flat_x, flat_y = data.generate_noisy_recall_batch(
        task, batch_size=12, is_training=False, rng=np.random.default_rng(10003)
    )
    assert x.shape == (3, 4, 32)
    np.testing.assert_array_equal(x.reshape(12, 32), flat_x)
    np.testing.assert_array_equal(y.reshape(12, 32), flat_y)


STREAM_TASK = data.NoisyRecallTask(vocab_size=32, seq_len=64, noise_vocab_size=16, frac_noise=0.8)
STREAM = dict(seed=5, batch_size=3)


def test_training_stream_matches_reference_batches():
    stream = data.ReferenceTrainingStream(STREAM_TASK, **STREAM)
    rng = np.random.default_rng(STREAM["seed"])
    for step, (x, y) in zip(range(3), stream):
        want_x, want_y = data.generate_noisy_recall_batch(
            STREAM_TASK, batch_size=3, is_training=True, rng=rng
        )
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        assert stream.num_batches == step + 1


def test_training_stream_resumes_bit_exactly():
    stream = data.ReferenceTrainingStream(STREAM_TASK, **STREAM)
    for _ in range(2):
        stream.next_batch()
    saved = stream.state()
    restored_json = data.ReferenceTrainingStream.from_state(json.loads(json.dumps(saved)))
    restored = data.ReferenceTrainingStream.from_state(saved)
    saved["bit_generator_state"]["state"]["state"] = 0  # the stream keeps its own copy
    continued = [stream.next_batch() for _ in range(3)]
    for other in (restored, restored_json):
        assert other.num_batches == 2 and other.task == stream.task
        for want, got in zip(continued, [other.next_batch() for _ in range(3)]):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError):
        data.ReferenceTrainingStream.from_state({"config": {}})


# ---------------------------------------------------------------------------------------
# JAX sampler: exact structural invariants
# ---------------------------------------------------------------------------------------


def _full_sequences(inputs, targets):
    """Unshifted tokens and eval targets (targets[j] belongs to token j) from eval data."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    tokens = np.concatenate([inputs, targets[:, -1:]], axis=1)
    full_targets = np.concatenate([np.full((len(inputs), 1), IGNORE), targets], axis=1)
    return tokens, full_targets


def check_structure(tokens, targets, spec):
    """Exact per-example invariants of the task, written out slot by slot."""
    K, M, N, V = spec.num_keys, spec.num_content, spec.noise_vocab_size, spec.vocab_size
    for seq, tgt in zip(tokens.tolist(), targets.tolist()):
        assert len(seq) == spec.full_len
        assert tgt[0] == IGNORE
        mapping = {}
        for i in range(spec.num_slots - 1):
            a, b = seq[2 * i], seq[2 * i + 1]
            assert tgt[2 * i] == IGNORE
            if M <= a < M + N:  # noise slot: both tokens noise, never scored
                assert M <= b < M + N and tgt[2 * i + 1] == IGNORE
                continue
            assert 0 <= a < K and K <= b < M
            if a in mapping:
                assert b == mapping[a]
                assert tgt[2 * i + 1] == (b if spec.multi_query else IGNORE)
            else:
                mapping[a] = b
                assert tgt[2 * i + 1] == IGNORE
        tail = seq[2 * (spec.num_slots - 1) :]
        tail_targets = tgt[2 * (spec.num_slots - 1) :]
        if not spec.multi_query:
            assert tail[0] == V - 1 and tail_targets[0] == IGNORE
            tail, tail_targets = tail[1:], tail_targets[1:]
        k_star, v_star = tail
        assert k_star in mapping and mapping[k_star] == v_star
        assert tail_targets == [IGNORE, v_star]


# Every JAX test samples batches of JAX_BATCH from these parameter sets only, so each
# set compiles once (compilation, ~1-2 s per set on CPU, dominates the test time).
JAX_BATCH = 300
JAX_CASES = {
    "v32s128p0.8": dict(
        vocab_size=32, seq_len=128, noise_vocab_size=16, frac_noise=0.8, multi_query=True
    ),
    "v32s128p0.2": dict(
        vocab_size=32, seq_len=128, noise_vocab_size=16, frac_noise=0.2, multi_query=True
    ),
    "v29s64p0.6single": dict(
        vocab_size=29, seq_len=64, noise_vocab_size=8, frac_noise=0.6, multi_query=False
    ),
    # 3 slots: ~27% of layouts have no key and are redrawn
    "v12s6p0.9": dict(
        vocab_size=12, seq_len=6, noise_vocab_size=4, frac_noise=0.9, multi_query=True
    ),
    "v20s16p0": dict(
        vocab_size=20, seq_len=16, noise_vocab_size=0, frac_noise=0.0, multi_query=True
    ),
}


def _jax_sample(name, key, is_training=False):
    return data.sample_noisy_recall(
        key, data.NoisyRecallTask(**JAX_CASES[name]), batch_size=JAX_BATCH, is_training=is_training
    )


@pytest.mark.parametrize("name", list(JAX_CASES))
@pytest.mark.slow
def test_jax_structure_exact(name):
    spec = data.NoisyRecallTask(**JAX_CASES[name])
    key = jax.random.key(7)
    x_eval, y_eval = _jax_sample(name, key, is_training=False)
    x_train, y_train = _jax_sample(name, key, is_training=True)
    for arr in (x_eval, y_eval, x_train, y_train):
        assert arr.shape == (JAX_BATCH, spec.example_len) and arr.dtype == np.int32
    # The same key gives the same tokens; only the targets depend on is_training.
    np.testing.assert_array_equal(x_eval, x_train)
    tokens, targets = _full_sequences(x_eval, y_eval)
    np.testing.assert_array_equal(np.asarray(x_train), tokens[:, :-1])
    np.testing.assert_array_equal(np.asarray(y_train), tokens[:, 1:])
    check_structure(tokens, targets, spec)


def test_structure_checker_accepts_numpy_reference():
    case = JAX_CASES["v29s64p0.6single"]
    rng = np.random.default_rng(1)
    x, y = data.generate_noisy_recall_batch(
        data.NoisyRecallTask(**case), batch_size=50, is_training=False, rng=rng
    )
    check_structure(*_full_sequences(x, y), data.NoisyRecallTask(**case))


@pytest.mark.slow
def test_jax_jit_vmap_and_keys():
    name = "v12s6p0.9"  # vmap also runs through the layout-redraw while_loop
    keys = jax.random.split(jax.random.key(42), 3)
    batched_x, batched_y = map(np.asarray, jax.jit(jax.vmap(lambda k: _jax_sample(name, k)))(keys))
    assert batched_x.shape == batched_y.shape == (3, JAX_BATCH, 5)
    for i in range(3):
        single_x, single_y = map(np.asarray, _jax_sample(name, keys[i]))
        np.testing.assert_array_equal(batched_x[i], single_x)
        np.testing.assert_array_equal(batched_y[i], single_y)
        np.testing.assert_array_equal(np.asarray(_jax_sample(name, keys[i])[0]), single_x)
        for j in range(i):
            assert not np.array_equal(batched_x[i], batched_x[j])
    check_structure(
        *_full_sequences(
            batched_x.reshape(3 * JAX_BATCH, -1), batched_y.reshape(3 * JAX_BATCH, -1)
        ),
        data.NoisyRecallTask(**JAX_CASES[name]),
    )


# ---------------------------------------------------------------------------------------
# JAX sampler: same distribution as the numpy reference (deterministic seeds)
# ---------------------------------------------------------------------------------------


def summaries(inputs, targets, spec):
    """Per-example statistics of eval data, vectorized; works for either generator."""
    tokens, full_targets = _full_sequences(inputs, targets)
    n, num_pairs, K, M = len(tokens), spec.num_slots - 1, spec.num_keys, spec.num_content
    pairs = tokens[:, : 2 * num_pairs].reshape(n, num_pairs, 2)
    is_noise = pairs[..., 0] >= M
    holds = (pairs[..., 0, None] == np.arange(K)) & ~is_noise[..., None]  # (n, slots, K)
    first_slot = np.where(holds, np.arange(num_pairs)[:, None], num_pairs).min(axis=1)
    presented = first_slot < num_pairs
    probe = tokens[:, -2]
    probe_first = first_slot[np.arange(n), probe]
    return {
        "noise_slots": is_noise.sum(1),
        "scored": (full_targets != IGNORE).sum(1),
        "distinct_keys": presented.sum(1),
        "repeats": (~is_noise).sum(1) - presented.sum(1),
        # position of the probe key in first-seen order: uniform given distinct_keys
        "probe_rank": (presented & (first_slot < probe_first[:, None])).sum(1),
        "noise_by_slot": is_noise.sum(0),
        "keys": np.bincount(pairs[..., 0][~is_noise], minlength=K),
        # one value per distinct key (repeats reuse it, so counting every slot would
        # correlate the counts)
        "values": np.bincount(
            pairs[..., 1][np.nonzero(presented)[0], first_slot[presented]] - K, minlength=M - K
        ),
        "noise_tokens": np.bincount(pairs[is_noise].ravel() - M, minlength=spec.noise_vocab_size),
    }


def _homogeneity_pvalue(a, b):
    """Chi-square two-sample test on integer samples, pooling sparse bins."""
    values = np.union1d(a, b)
    table = np.stack([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
    return _table_pvalue(table)


def _table_pvalue(table):
    table = np.asarray(table, dtype=float)
    pooled, current = [], np.zeros(2)
    for column in table.T:  # merge adjacent sparse bins: >= 20 per column, ~10 expected per cell
        current = current + column
        if current.sum() >= 20:
            pooled.append(current)
            current = np.zeros(2)
    if current.sum() > 0:
        if pooled:
            pooled[-1] = pooled[-1] + current
        else:
            pooled.append(current)
    if len(pooled) < 2:
        return 1.0
    return stats.chi2_contingency(np.array(pooled).T)[1]


def _numpy_eval_examples(spec, n, seed):
    """n successful eval examples; examples where MAD would fail are skipped (conditioning)."""
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < n:
        with contextlib.suppress(data.NoKeyPresentedError):
            rows.append(data._draw_example(spec, False, rng))
    return np.stack([x for x, _ in rows]), np.stack([y for _, y in rows])


@pytest.mark.parametrize("name", ["v32s128p0.8", "v32s128p0.2", "v29s64p0.6single", "v12s6p0.9"])
@pytest.mark.slow
def test_jax_distribution_matches_numpy(name):
    case, n = JAX_CASES[name], 10 * JAX_BATCH
    spec = data.NoisyRecallTask(**case)
    ref = summaries(*_numpy_eval_examples(spec, n, seed=1234), spec)
    jax_batches = [
        _jax_sample(name, k) for k in jax.random.split(jax.random.key(1234), n // JAX_BATCH)
    ]
    got = summaries(*(np.concatenate(parts) for parts in zip(*jax_batches)), spec)

    for stat in ("noise_slots", "scored", "distinct_keys", "repeats"):
        assert _homogeneity_pvalue(ref[stat], got[stat]) > 1e-3, stat
        assert (
            abs(ref[stat].mean() - got[stat].mean()) <= 5 * ref[stat].std() / math.sqrt(n) + 1e-9
        ), stat
    for stat in ("noise_by_slot", "keys", "values", "noise_tokens"):
        assert _table_pvalue(np.stack([ref[stat], got[stat]])) > 1e-3, stat
    # The probe is uniform over the distinct presented keys: its first-seen rank given the
    # number of distinct keys matches, and P(probe is the first-seen key) = E[1 / distinct].
    for d in np.unique(ref["distinct_keys"]):
        a, b = (
            ref["probe_rank"][ref["distinct_keys"] == d],
            got["probe_rank"][got["distinct_keys"] == d],
        )
        if min(len(a), len(b)) >= 50:
            assert _homogeneity_pvalue(a, b) > 1e-3, f"probe rank | {d} distinct"
    for s in (ref, got):
        first = (s["probe_rank"] == 0).mean()
        expected = (1.0 / s["distinct_keys"]).mean()
        assert abs(first - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9

    if spec.num_slots > 8:  # analytic noise rate: p on every slot but r0, which is uniform over P
        expected_noise = spec.frac_noise * (spec.num_slots - 1) * (1 - 1 / spec.num_slots)
        for s in (ref, got):
            assert abs(s["noise_slots"].mean() - expected_noise) < 5 * s[
                "noise_slots"
            ].std() / math.sqrt(n)
