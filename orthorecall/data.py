"""MAD noisy in-context recall: the reference numpy generator and a JAX-native sampler.

Token layout (``V`` = ``vocab_size``, ``N`` = ``noise_vocab_size``)::

    M = V - N        if multi_query   (the benchmark and the reference use this)
    M = V - 1 - N    otherwise        (token V-1 is then the copy marker)

    keys    [0, M//2)      values  [M//2, M)      noise  [M, M+N)

e.g. V=80, N=16, multi_query: keys 0-31, values 32-63, noise 64-79 (chance ~1/32);
V=96, N=16: keys 0-39, values 40-79, noise 80-95.

An example is ``P = seq_len // 2`` two-token slots: slots ``0 .. P-2`` each hold either a
key-value pair or two noise tokens, the last slot holds the probe ``(k*, v*)`` (preceded
by the copy marker when not ``multi_query``). The full token sequence therefore has
``seq_len`` tokens (``seq_len + 1`` without ``multi_query``) and the returned
``inputs``/``targets`` have one token fewer: length ``seq_len - 1`` with ``multi_query``,
``seq_len`` without.

The task's parameters are one :class:`NoisyRecallTask`, validated when it is built;
two generators take it:

* :func:`generate_noisy_recall_batch` / :func:`reference_validation_set` /
  :class:`ReferenceTrainingStream` -- numpy, bit-exact with MAD's generator for the same
  ``numpy.random.Generator``; :func:`generate_noisy_recall_example` is MAD's own
  signature (keyword task parameters), for code written against MAD;
* :func:`sample_noisy_recall` -- ``jax.random``, jit/vmap-able, same distribution
  (not the same bits).

Usage::

    task = NoisyRecallTask(vocab_size=80, seq_len=512)   # the reference's v80/s512
    inputs, targets = reference_validation_set(task, seed=11)
    inputs, targets = sample_noisy_recall(jax.random.key(0), task, batch_size=64)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orthorecall.validation import check_bool, check_int

__all__ = [
    "IGNORE_INDEX",
    "MIN_SEQ_LEN",
    "VALIDATION_SEED_OFFSET",
    "NoKeyPresentedError",
    "NoisyRecallTask",
    "ReferenceTrainingStream",
    "generate_noisy_recall_batch",
    "generate_noisy_recall_example",
    "reference_validation_set",
    "sample_noisy_recall",
]

IGNORE_INDEX = -100
# The reference draws its fixed validation set from default_rng(10000 + seed).
VALIDATION_SEED_OFFSET = 10000
# One key-value slot plus the probe slot; with fewer slots no key can ever be presented.
MIN_SEQ_LEN = 4
_INT32_MIN, _INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


class NoKeyPresentedError(RuntimeError):
    """No key-value pair was presented before the probe, so there is nothing to probe.

    MAD itself fails here (``rng.choice`` of an empty list). It can only happen when the
    noise-free slot ``r0 = rng.choice(P)`` lands on the probe slot ``P-1`` and every
    other slot comes up noise: probability ``(1/P) * p**(P-1)`` per example
    (about 1e-27 at ``seq_len=512, p=0.8``, but 27% at ``seq_len=6, p=0.9``).
    """


# ---------------------------------------------------------------------------------------
# The task (validated once, at construction; shared by the numpy and the JAX generator)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoisyRecallTask:
    """The task's parameters, validated at construction, and the derived token layout.

    The defaults are the reference study's task (noise vocabulary 16, noise fraction
    0.8, multi-query), so ``NoisyRecallTask(vocab_size=80, seq_len=512)`` is the
    published v80/s512 regime. Frozen and hashable: a static ``jax.jit`` argument.

    Attributes:
        vocab_size: V, total vocabulary.
        seq_len: S, even and >= ``MIN_SEQ_LEN`` (4): at least one key-value slot and the
            probe slot. The copy marker (not multi_query) is added on top of S; it does
            not take a slot.
        noise_vocab_size: N >= 0; must be >= 1 when ``frac_noise > 0``.
        frac_noise: p in [0, 1), the probability that a slot holds noise.
        multi_query: every repeated key is scored (the benchmark and the reference), or
            only the probe, announced by the copy marker V-1.
        ignore_index: the target of unscored positions; an int32 outside ``[0, V)``.

    Raises:
        ValueError: naming the parameter and the violated constraint. ``M = V - N``
            (multi_query) or ``V - 1 - N`` must be >= 2 so that there is at least one
            key and one value.
    """

    vocab_size: int
    seq_len: int
    noise_vocab_size: int = 16
    frac_noise: float = 0.8
    multi_query: bool = True
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        # Stored as plain Python types: jit's static-argument cache compares by ==, so
        # vocab_size=np.int64(32) and 32 must be the same task, and 32.0 is refused.
        vocab_size = check_int("vocab_size", self.vocab_size, minimum=1)
        if vocab_size > _INT32_MAX:
            raise ValueError(f"vocab_size must fit in int32, got {vocab_size}")
        seq_len = check_int("seq_len", self.seq_len)
        noise_vocab_size = check_int("noise_vocab_size", self.noise_vocab_size, minimum=0)
        multi_query = check_bool("multi_query", self.multi_query)
        ignore_index = check_int("ignore_index", self.ignore_index)
        frac_noise = self.frac_noise

        if seq_len % 2:
            raise ValueError(f"seq_len must be even (key-value slots of two tokens), got {seq_len}")
        if seq_len < MIN_SEQ_LEN:
            raise ValueError(
                f"seq_len must be >= {MIN_SEQ_LEN} (one key-value slot plus the probe slot), "
                f"got {seq_len}"
            )
        if isinstance(frac_noise, (bool, np.bool_)) or not isinstance(frac_noise, numbers.Real):
            raise ValueError(f"frac_noise must be a real number, got {frac_noise!r}")
        frac_noise = float(frac_noise)
        if not 0.0 <= frac_noise < 1.0:  # also rejects NaN
            raise ValueError(f"frac_noise must be in [0, 1), got {frac_noise}")
        if frac_noise > 0 and noise_vocab_size < 1:
            raise ValueError("noise_vocab_size must be >= 1 when frac_noise > 0")
        reserved = noise_vocab_size + (0 if multi_query else 1)
        if vocab_size - reserved < 2:
            raise ValueError(
                f"vocab_size too small: vocab_size - noise_vocab_size"
                f"{'' if multi_query else ' - 1 (copy marker)'} must be >= 2 to hold at least "
                f"one key and one value, got vocab_size={vocab_size}, "
                f"noise_vocab_size={noise_vocab_size}"
            )
        if 0 <= ignore_index < vocab_size or not _INT32_MIN <= ignore_index <= _INT32_MAX:
            raise ValueError(
                f"ignore_index must be an int32 outside the vocabulary [0, {vocab_size}), "
                f"got {ignore_index}"
            )
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("noise_vocab_size", noise_vocab_size),
            ("frac_noise", frac_noise),
            ("multi_query", multi_query),
            ("ignore_index", ignore_index),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> NoisyRecallTask:
        """The task of a mapping that may hold other keys too (a run configuration, a
        checkpoint's ``cfg``); absent task fields take the reference defaults.

        Raises:
            ValueError: as the constructor, or ``vocab_size`` / ``seq_len`` missing.
        """
        missing = [name for name in ("vocab_size", "seq_len") if name not in fields]
        if missing:
            raise ValueError(f"the task needs {missing}; got only {sorted(fields)}")
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})

    def to_dict(self) -> dict[str, Any]:
        """The six parameters as a plain dict (JSON-serializable)."""
        return dataclasses.asdict(self)

    @property
    def num_slots(self) -> int:
        """P: two-token slots per example; the last one holds the probe."""
        return self.seq_len // 2

    @property
    def num_content(self) -> int:
        """M: size of the key + value range (tokens below the noise range)."""
        return self.vocab_size - self.noise_vocab_size - (0 if self.multi_query else 1)

    @property
    def num_keys(self) -> int:
        """Keys are ``[0, num_keys)``."""
        return self.num_content // 2

    @property
    def value_start(self) -> int:
        """Values are ``[value_start, value_start + num_values)``."""
        return self.num_keys

    @property
    def num_values(self) -> int:
        """M - M//2 values (one more than keys when M is odd)."""
        return self.num_content - self.num_keys

    @property
    def noise_start(self) -> int:
        """Noise tokens are ``[noise_start, noise_start + noise_vocab_size)``."""
        return self.num_content

    @property
    def copy_marker(self) -> int | None:
        """Token ``V-1`` announcing the probe when not multi_query, else None."""
        return None if self.multi_query else self.vocab_size - 1

    @property
    def full_len(self) -> int:
        """Tokens in the unshifted sequence: seq_len, plus the copy marker if any."""
        return self.seq_len + (0 if self.multi_query else 1)

    @property
    def example_len(self) -> int:
        """L: length of the returned inputs / targets (one less than full_len)."""
        return self.full_len - 1


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            "rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return rng


def _check_task(task: Any) -> NoisyRecallTask:
    if not isinstance(task, NoisyRecallTask):
        raise TypeError(
            "task must be a NoisyRecallTask (e.g. NoisyRecallTask(vocab_size=80, seq_len=512)), "
            f"got {type(task).__name__}"
        )
    return task


# ---------------------------------------------------------------------------------------
# numpy reference generator (bit-exact with MAD)
# ---------------------------------------------------------------------------------------


def _draw_example(
    task: NoisyRecallTask, is_training: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One example from ``rng`` in MAD's exact draw order; parameters already validated.

    MAD draws with ``rng.choice(array)``; for a 1-D population with replacement and no
    weights numpy's ``Generator.choice`` is literally ``a[integers(0, len(a),
    dtype=int64)]``, and our populations are contiguous ranges, so we call
    ``integers`` directly (about 4x faster, same bits; the tests compare against a
    literal ``rng.choice`` transcription and MAD's own fixtures).
    """
    integers, random = rng.integers, rng.random
    p, ignore = task.frac_noise, task.ignore_index
    num_slots, num_keys, num_values = task.num_slots, task.num_keys, task.num_values
    value_start, noise_start, noise_size = task.value_start, task.noise_start, task.noise_vocab_size
    multi_query = task.multi_query

    inputs = np.empty(task.full_len, dtype=np.int32)
    targets = np.full(task.full_len, ignore, dtype=np.int32)
    kv: dict[int, int] = {}  # insertion order == first-seen order, as MAD's keys_presented

    r0 = int(integers(0, num_slots, dtype=np.int64))
    for i in range(num_slots - 1):
        if p > 0 and i != r0 and random() < p:
            inputs[2 * i : 2 * i + 2] = noise_start + integers(
                0, noise_size, size=2, dtype=np.int64
            )
            continue
        k = int(integers(0, num_keys, dtype=np.int64))
        v = kv.get(k)
        if v is None:
            v = kv[k] = value_start + int(integers(0, num_values, dtype=np.int64))
        elif multi_query:
            targets[2 * i + 1] = v
        inputs[2 * i] = k
        inputs[2 * i + 1] = v

    if not kv:
        raise NoKeyPresentedError(
            "no key-value pair was presented before the probe (the noise-free slot "
            f"r0={r0} fell on the probe slot and all {num_slots - 1} other slots were noise); "
            "MAD's generator fails here too. The rng has advanced past this example."
        )
    presented = list(kv)
    k_probe = presented[int(integers(0, len(presented), dtype=np.int64))]
    tail = 2 * (num_slots - 1)
    if not multi_query:
        inputs[tail] = task.copy_marker
        tail += 1
    inputs[tail] = k_probe
    inputs[tail + 1] = targets[tail + 1] = kv[k_probe]

    if is_training:
        return inputs[:-1], inputs[1:]
    return inputs[:-1], targets[1:]


def generate_noisy_recall_example(
    *,
    vocab_size: int,
    seq_len: int,
    noise_vocab_size: int,
    frac_noise: float,
    multi_query: bool,
    is_training: bool,
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """One noisy-recall example, bit-exact with MAD's generator for the same ``rng``.

    Draw order (each step consumes ``rng`` exactly as MAD does)::

        r0 = rng.choice(P)                                  # slot kept free of noise
        for i in 0 .. P-2:
            noise = p > 0 and i != r0 and rng.random() < p  # no draw when p == 0 or i == r0
            noise slot: rng.choice(noise_range, size=2)     # both targets ignored
            key slot:   k = rng.choice(key_range)
                        v = rng.choice(value_range) only if k is new in this example
                        targets: key ignored; value = v if k was seen before and
                        multi_query, else ignored
        k* = rng.choice(distinct presented keys, in first-seen order); v* its value
        append (copy marker V-1 unless multi_query), k*, v*; targets ignored.., v*

    Args:
        vocab_size, seq_len, noise_vocab_size, frac_noise, multi_query, ignore_index:
            task parameters, see :class:`NoisyRecallTask` (seq_len even and >= 4).
        is_training: if True the targets are the next tokens (``inputs`` shifted by one,
            noise included); otherwise the recall targets above.
        rng: the ``numpy.random.Generator`` to draw from; advanced in place.

    Returns:
        ``(inputs, targets)``, 1-D int32 arrays of length L = ``seq_len - 1`` when
        ``multi_query`` else ``seq_len``.

    Raises:
        ValueError: invalid parameters (see :class:`NoisyRecallTask`).
        TypeError: ``rng`` is not a ``numpy.random.Generator``.
        NoKeyPresentedError: (a ``RuntimeError``) no key-value pair before the probe,
            i.e. ``r0 == P-1`` and slots ``0..P-2`` all noise; MAD fails here as well,
            so no MAD-exact output exists. ``rng`` has then consumed the draws of the
            failed example. Probability ``(1/P) * p**(P-1)``: only reachable in
            practice for very short sequences with heavy noise.
    """
    task = NoisyRecallTask(
        vocab_size=vocab_size,
        seq_len=seq_len,
        noise_vocab_size=noise_vocab_size,
        frac_noise=frac_noise,
        multi_query=multi_query,
        ignore_index=ignore_index,
    )
    return _draw_example(task, check_bool("is_training", is_training), _check_rng(rng))


def _draw_examples(
    task: NoisyRecallTask, is_training: bool, rng: np.random.Generator, count: int
) -> tuple[np.ndarray, np.ndarray]:
    pairs = [_draw_example(task, is_training, rng) for _ in range(count)]
    return np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs])


def generate_noisy_recall_batch(
    task: NoisyRecallTask, *, batch_size: int, is_training: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` examples drawn one after another from ``rng`` (the reference batching).

    Row ``b`` equals the ``b``-th call of :func:`generate_noisy_recall_example` on the
    same ``rng`` with the task's parameters.

    Args:
        task: the task.
        batch_size: int >= 1.
        is_training, rng: as :func:`generate_noisy_recall_example`.

    Returns:
        ``(inputs, targets)``, int32 arrays of shape ``(batch_size, L)``.

    Raises:
        ValueError, TypeError, NoKeyPresentedError: as
        :func:`generate_noisy_recall_example`.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return _draw_examples(
        _check_task(task), check_bool("is_training", is_training), _check_rng(rng), batch_size
    )


def reference_validation_set(
    task: NoisyRecallTask, *, seed: int, num_batches: int = 16, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's fixed validation set for a training seed.

    ``num_batches * batch_size`` evaluation examples (``is_training=False``) drawn one
    after another from a single ``numpy.random.default_rng(10000 + seed)``, batch after
    batch.

    Args:
        task: the task.
        seed: the run's training seed, int >= 0.
        num_batches, batch_size: ints >= 1 (reference: 16 x 16 = 256 sequences).

    Returns:
        ``(inputs, targets)``, int32 arrays of shape ``(num_batches, batch_size, L)``.

    Raises:
        ValueError: invalid parameters. NoKeyPresentedError: see
        :func:`generate_noisy_recall_example`.
    """
    task = _check_task(task)
    seed = check_int("seed", seed, minimum=0)
    num_batches = check_int("num_batches", num_batches, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    rng = np.random.default_rng(VALIDATION_SEED_OFFSET + seed)
    # Consecutive batches from one rng are just consecutive examples.
    inputs, targets = _draw_examples(task, False, rng, num_batches * batch_size)
    shape = (num_batches, batch_size, task.example_len)
    return inputs.reshape(shape), targets.reshape(shape)


class ReferenceTrainingStream:
    """The reference training data: fresh ``is_training=True`` batches from ``default_rng(seed)``.

    Batch ``n`` (0-based) holds examples ``n*B .. n*B+B-1`` drawn one after another from
    the single generator. Checkpointable: :meth:`state` returns a plain dict (config,
    ``rng.bit_generator.state`` and the batch counter) and :meth:`from_state` resumes
    bit-exactly. The bit-generator state holds 128-bit Python ints (PCG64): ``json``
    round-trips them; formats limited to 64-bit ints need them stored as strings.

    Usage::

        task = NoisyRecallTask(vocab_size=80, seq_len=512)
        stream = ReferenceTrainingStream(task, seed=0, batch_size=16)
        inputs, targets = stream.next_batch()       # int32 (16, 511) each
        saved = stream.state()
        stream = ReferenceTrainingStream.from_state(saved)
    """

    def __init__(self, task: NoisyRecallTask, *, seed: int, batch_size: int):
        """Args: ``task``, ``seed`` (int >= 0), ``batch_size`` (int >= 1).
        Raises ValueError on invalid parameters, TypeError if ``task`` is not a task."""
        self._task = _check_task(task)
        self._seed = check_int("seed", seed, minimum=0)
        self._batch_size = check_int("batch_size", batch_size, minimum=1)
        self._rng = np.random.default_rng(self._seed)
        self._num_batches = 0

    @property
    def task(self) -> NoisyRecallTask:
        """The task."""
        return self._task

    @property
    def batch_size(self) -> int:
        """Examples per batch."""
        return self._batch_size

    @property
    def num_batches(self) -> int:
        """Batches drawn so far."""
        return self._num_batches

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Next ``(inputs, targets)``, int32 arrays ``(batch_size, L)``; targets are the
        inputs shifted by one. Raises NoKeyPresentedError as
        :func:`generate_noisy_recall_example` (not reachable at realistic sizes)."""
        batch = _draw_examples(self._task, True, self._rng, self._batch_size)
        self._num_batches += 1
        return batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    def state(self) -> dict:
        """A deep-copied plain dict from which :meth:`from_state` resumes bit-exactly."""
        return {
            "config": {"seed": self._seed, "batch_size": self._batch_size, **self._task.to_dict()},
            "bit_generator_state": copy.deepcopy(self._rng.bit_generator.state),
            "num_batches": self._num_batches,
        }

    @classmethod
    def from_state(cls, state: dict) -> ReferenceTrainingStream:
        """Rebuild a stream from :meth:`state`; its next batch is the one the saved
        stream would have produced next.

        Raises:
            ValueError: the state is malformed or not from a PCG64 ``default_rng``.
        """
        try:
            config, bit_state, num_batches = (
                state["config"],
                state["bit_generator_state"],
                state["num_batches"],
            )
            config = dict(config)
            seed, batch_size = config.pop("seed"), config.pop("batch_size")
            stream = cls(NoisyRecallTask(**config), seed=seed, batch_size=batch_size)
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"state must be a dict produced by ReferenceTrainingStream.state(): {exc!r}"
            ) from exc
        if not isinstance(bit_state, dict) or bit_state.get("bit_generator") != "PCG64":
            raise ValueError(
                "state['bit_generator_state'] must be a PCG64 bit_generator.state dict"
            )
        stream._rng.bit_generator.state = copy.deepcopy(bit_state)
        stream._num_batches = check_int("num_batches", num_batches, minimum=0)
        return stream


# ---------------------------------------------------------------------------------------
# JAX sampler (same distribution, static shapes, jit / vmap friendly)
# ---------------------------------------------------------------------------------------


def _randint(key: jax.Array, shape: tuple[int, ...], low: int, high: int) -> jax.Array:
    """Uniform int32 in ``[low, high)`` of the given shape.

    Drawn flat and reshaped (same distribution): XLA:CPU compiles the partitionable
    threefry over a 1-D shape markedly faster than over an N-D one, and compilation
    (seconds) dominates the cost of a new parameter set.
    """
    size = math.prod(shape)
    return jax.random.randint(key, (size,), low, high, dtype=jnp.int32).reshape(shape)


def _sample_slot_noise(key: jax.Array, batch_size: int, task: NoisyRecallTask) -> jax.Array:
    """Noise mask ``(batch, P-1)`` of the numpy generator, conditioned on >= 1 key slot.

    A row is degenerate (numpy raises NoKeyPresentedError) only if every slot is noise;
    whether that happens depends on the layout alone, so redrawing the layout of those
    rows until they are not degenerate samples exactly the numpy distribution
    conditioned on success. At realistic sizes the loop body runs exactly once.
    """
    num_pairs = task.num_slots - 1
    slot_index = jnp.arange(num_pairs)

    def draw(k):
        k_r0, k_u = jax.random.split(k)
        r0 = _randint(k_r0, (batch_size, 1), 0, task.num_slots)
        u = jax.random.uniform(k_u, (batch_size * num_pairs,)).reshape(batch_size, num_pairs)
        return (u < task.frac_noise) & (slot_index != r0)

    def redraw(carry):
        k, noise = carry
        k, k_draw = jax.random.split(k)
        degenerate = jnp.all(noise, axis=1, keepdims=True)
        return k, jnp.where(degenerate, draw(k_draw), noise)

    # Starting from an all-noise (degenerate) layout makes the first draw happen inside
    # the loop, so the sampler is traced and compiled once instead of twice.
    _, noise = jax.lax.while_loop(
        lambda carry: jnp.any(jnp.all(carry[1], axis=1)),
        redraw,
        (key, jnp.ones((batch_size, num_pairs), dtype=bool)),
    )
    return noise


def sample_noisy_recall(
    key: jax.Array, task: NoisyRecallTask, *, batch_size: int, is_training: bool = True
) -> tuple[jax.Array, jax.Array]:
    """A batch of noisy-recall examples drawn with ``jax.random`` (jit- and vmap-able).

    Same distribution as :func:`generate_noisy_recall_example` (not the same bits):
    slot ``r0`` uniform over the P slots is kept noise-free, every other slot before
    the probe is noise with probability p (two uniform noise tokens), keys are uniform,
    each key's value is uniform and fixed within the example (one value table per
    example, which equals drawing on first appearance), the probe key is uniform over
    the distinct presented keys, and targets follow the same rules. Where the numpy
    generator raises :class:`NoKeyPresentedError` this one redraws the slot layout, i.e.
    it samples the numpy distribution conditioned on not raising (identical unless
    ``seq_len`` is tiny and ``frac_noise`` large). For a given key the tokens do not
    depend on ``is_training``; only the targets do.

    Vectorized over slots: each key's first slot is a scatter-min over the slots, which
    on CPU beat a ``(batch, P-1, num_keys)`` one-hot min, an O(P^2) pairwise comparison
    and a ``lax.scan`` over slots (``python -m experiments.benchmarks.data``).

    The sampling is jitted and cached per (task, batch size), so only ``key`` is traced;
    calling this under ``jax.jit`` / ``jax.vmap`` works the same.

    Args:
        key: a ``jax.random`` key, e.g. ``jax.random.key(seed)`` (a raw uint32
            ``PRNGKey`` works too but is a different input type, so it compiles anew).
        task: the task.
        batch_size: int >= 1.
        is_training: bool; next-token targets if True, recall targets if False.

    Returns:
        ``(inputs, targets)``: int32 arrays of shape ``(batch_size, L)``, L = seq_len - 1
        with multi_query else seq_len.

    Raises:
        ValueError: invalid batch size or mode. TypeError: ``task`` is not a task.
    """
    task = _check_task(task)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    is_training = check_bool("is_training", is_training)
    # One compiled program serves both modes (compiling the threefry draws takes ~1 s per
    # parameter set on CPU); under an outer jit the unused targets are dead code.
    inputs, next_tokens, recall_targets = _sample_sequences(key, task=task, batch_size=batch_size)
    return inputs, next_tokens if is_training else recall_targets


# batch_size is checked outside: jit's static-argument cache compares by ==, so 4.0
# would otherwise hit a cached trace for 4 silently (the task validates itself).
@functools.partial(jax.jit, static_argnames=("task", "batch_size"))
def _sample_sequences(
    key: jax.Array, *, task: NoisyRecallTask, batch_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(inputs, next-token targets, recall targets)``, int32 ``(batch_size, L)`` each."""
    num_pairs, num_keys = task.num_slots - 1, task.num_keys
    shape = (batch_size, num_pairs)
    k_noise_mask, k_keys, k_values, k_noise_tokens, k_probe = jax.random.split(key, 5)

    if task.frac_noise > 0:
        is_noise = _sample_slot_noise(k_noise_mask, batch_size, task)
    else:  # no draws needed: with P >= 2, slot 0 .. P-2 all hold keys
        is_noise = jnp.zeros(shape, dtype=bool)
    slot_keys = _randint(k_keys, shape, 0, num_keys)
    value_table = _randint(
        k_values, (batch_size, num_keys), task.value_start, task.value_start + task.num_values
    )
    slot_values = jnp.take_along_axis(value_table, slot_keys, axis=1)

    # first_slot[b, k]: index of the first key slot holding k (num_pairs if never presented)
    slot_index = jnp.arange(num_pairs, dtype=jnp.int32)
    rows = jnp.arange(batch_size)[:, None]
    first_slot = (
        jnp.full((batch_size, num_keys), num_pairs, dtype=jnp.int32)
        .at[rows, slot_keys]
        .min(jnp.where(is_noise, num_pairs, slot_index))
    )
    presented = first_slot < num_pairs
    repeated = ~is_noise & (slot_index > jnp.take_along_axis(first_slot, slot_keys, axis=1))

    # Exactly uniform over the distinct presented keys (>= 1 thanks to the layout redraw):
    # a uniform rank among them, mapped back to the key holding that rank.
    num_presented = presented.sum(axis=1, dtype=jnp.int32)
    rank = jax.random.randint(k_probe, (batch_size,), 0, num_presented, dtype=jnp.int32)
    probe_key = jnp.argmax(jnp.cumsum(presented, axis=1, dtype=jnp.int32) > rank[:, None], axis=1)
    probe_key = probe_key.astype(jnp.int32)[:, None]
    probe_value = jnp.take_along_axis(value_table, probe_key, axis=1)

    if task.noise_vocab_size > 0:
        noise_tokens = _randint(
            k_noise_tokens, shape + (2,), task.noise_start, task.noise_start + task.noise_vocab_size
        )
        first = jnp.where(is_noise, noise_tokens[..., 0], slot_keys)
        second = jnp.where(is_noise, noise_tokens[..., 1], slot_values)
    else:  # frac_noise == 0 here (validated), so no slot is noise
        first, second = slot_keys, slot_values
    pair_tokens = jnp.stack([first, second], axis=-1).reshape(batch_size, 2 * num_pairs)
    marker = [] if task.multi_query else [jnp.full((batch_size, 1), task.copy_marker, jnp.int32)]
    tokens = jnp.concatenate([pair_tokens, *marker, probe_key, probe_value], axis=1)

    ignore = jnp.full((batch_size, 1), task.ignore_index, dtype=jnp.int32)
    scored = repeated if task.multi_query else jnp.zeros_like(repeated)
    value_targets = jnp.where(scored, slot_values, task.ignore_index)
    pair_targets = jnp.stack(
        [jnp.full(shape, task.ignore_index, jnp.int32), value_targets], axis=-1
    ).reshape(batch_size, 2 * num_pairs)
    marker_targets = [] if task.multi_query else [ignore]
    targets = jnp.concatenate([pair_targets, *marker_targets, ignore, probe_value], axis=1)
    return tokens[:, :-1], tokens[:, 1:], targets[:, 1:]
