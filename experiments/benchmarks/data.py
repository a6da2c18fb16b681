"""Time the numpy reference generator against the jitted JAX sampler.

    python -m experiments.benchmarks.data [--batch-size 64] [--seq-len 1024] [--variants]

Both produce training batches (``is_training=True``) of the MAD noisy-recall task at
v80 / noise vocab 16 / frac_noise 0.8. The JAX figure is after warm-up (compilation
reported separately), with ``block_until_ready``, median over repeats.
``--variants`` also times the alternatives considered for the JAX sampler's
first-occurrence computation (the part that replaces MAD's sequential dict).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from orthorecall import data

VOCAB_SIZE = 80  # The reference task at v80; the length is a flag.


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _report(name: str, seconds: float, batch_size: int) -> None:
    print(f"{name:>28s}: {seconds * 1e3:9.2f} ms/batch  {batch_size / seconds:12,.0f} examples/s")


def benchmark_generators(batch_size: int, seq_len: int, repeats: int) -> None:
    """Print ms per batch and examples/s for the numpy and the JAX generator."""
    rng = np.random.default_rng(0)
    task = data.NoisyRecallTask(vocab_size=VOCAB_SIZE, seq_len=seq_len)
    numpy_batch = lambda _: data.generate_noisy_recall_batch(
        task, batch_size=batch_size, is_training=True, rng=rng
    )
    numpy_batch(0)
    _report("numpy (MAD-exact)", _median_seconds(numpy_batch, max(3, repeats // 10)), batch_size)

    keys = jax.random.split(jax.random.key(0), repeats + 1)
    jax_batch = lambda i: jax.block_until_ready(
        data.sample_noisy_recall(keys[i], task, batch_size=batch_size, is_training=True)
    )
    start = time.perf_counter()
    jax_batch(repeats)  # warm-up: trace + compile
    print(f"{'JAX first call (compile)':>28s}: {(time.perf_counter() - start) * 1e3:9.0f} ms")
    _report("JAX (jitted, jax.random)", _median_seconds(jax_batch, repeats), batch_size)


def _scatter_min(slot_keys, is_noise, num_keys):
    b, n = slot_keys.shape
    index = jnp.arange(n)
    first = (
        jnp.full((b, num_keys), n)
        .at[jnp.arange(b)[:, None], slot_keys]
        .min(jnp.where(is_noise, n, index))
    )
    return first < n, ~is_noise & (index > jnp.take_along_axis(first, slot_keys, axis=1))


def _one_hot_min(slot_keys, is_noise, num_keys):
    n = slot_keys.shape[1]
    index = jnp.arange(n)
    holds = (slot_keys[..., None] == jnp.arange(num_keys)) & ~is_noise[..., None]
    first = jnp.min(jnp.where(holds, index[:, None], n), axis=1)
    return first < n, ~is_noise & (index > jnp.take_along_axis(first, slot_keys, axis=1))


def _pairwise(slot_keys, is_noise, num_keys):
    n = slot_keys.shape[1]
    index = jnp.arange(n)
    earlier_same = (
        (slot_keys[:, :, None] == slot_keys[:, None, :])
        & ~is_noise[:, None, :]
        & (index[None, :] < index[:, None])
    )
    presented = ((slot_keys[..., None] == jnp.arange(num_keys)) & ~is_noise[..., None]).any(axis=1)
    return presented, ~is_noise & earlier_same.any(axis=-1)


def _scan(slot_keys, is_noise, num_keys):
    def step(seen, slot):
        keys, noise = slot
        repeated = ~noise & jnp.take_along_axis(seen, keys[:, None], axis=1)[:, 0]
        return seen | ((jnp.arange(num_keys) == keys[:, None]) & ~noise[:, None]), repeated

    init = jnp.zeros((slot_keys.shape[0], num_keys), dtype=bool)
    seen, repeated = jax.lax.scan(step, init, (slot_keys.T, is_noise.T))
    return seen, repeated.T


def benchmark_first_occurrence(batch_size: int, seq_len: int, repeats: int) -> None:
    """Time the candidate (presented keys, repeated slots) computations on equal inputs."""
    spec = data.NoisyRecallTask(vocab_size=VOCAB_SIZE, seq_len=seq_len)
    k_keys, k_noise = jax.random.split(jax.random.key(1))
    shape = (batch_size, spec.num_slots - 1)
    slot_keys = jax.random.randint(k_keys, shape, 0, spec.num_keys)
    is_noise = jax.random.uniform(k_noise, shape) < spec.frac_noise
    expected = None
    for name, fn in [
        ("scatter-min (used)", _scatter_min),
        ("one-hot min", _one_hot_min),
        ("pairwise O(P^2)", _pairwise),
        ("lax.scan over slots", _scan),
    ]:
        jitted = jax.jit(fn, static_argnums=2)
        out = jax.block_until_ready(jitted(slot_keys, is_noise, spec.num_keys))
        expected = expected or out
        assert all(np.array_equal(a, b) for a, b in zip(out, expected, strict=True)), name
        seconds = _median_seconds(
            lambda _, jitted=jitted: jax.block_until_ready(
                jitted(slot_keys, is_noise, spec.num_keys)
            ),
            repeats,
        )
        print(f"{name:>28s}: {seconds * 1e3:9.3f} ms/batch")


# A batch that would take longer than this for the numpy generator to draw once is
# refused (the study's limit per numpy training step, experiments.study.train).
MAX_BATCH_SECONDS = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--variants", action="store_true", help="also time first-occurrence variants"
    )
    return parser


def check_arguments(args) -> data.NoisyRecallTask:
    """The arguments (``experiments.study.config_checks``' rules), the task they make, and the
    time one numpy batch takes at ``orthorecall.footprint``'s rate, before anything runs.

    Raises:
        ConfigError: naming the argument.
    """
    from experiments.study.config_checks import FLAGS as FLAG_CHECKS
    from orthorecall import footprint

    for name in ("batch_size", "seq_len", "repeats"):
        FLAG_CHECKS.int(name.replace("_", "-"), getattr(args, name), minimum=1)
    try:
        task = data.NoisyRecallTask(vocab_size=VOCAB_SIZE, seq_len=args.seq_len)
    except ValueError as e:
        FLAG_CHECKS.fail("seq-len", str(e))
    seconds = footprint.numpy_generation_seconds(
        num_sequences=args.batch_size, seq_len=args.seq_len
    )
    if seconds > MAX_BATCH_SECONDS:
        FLAG_CHECKS.fail(
            "batch-size",
            f"one batch of {args.batch_size} x {args.seq_len} would take about {seconds:,.0f} s "
            f"to draw with numpy (at most {MAX_BATCH_SECONDS:.0f} s); ask for less.",
        )
    return task


def main(argv=None) -> None:
    import sys

    from experiments.study.cli import ConfigError

    args = build_parser().parse_args(argv)
    try:
        task = check_arguments(args)
    except ConfigError as e:
        print(f"benchmark_data: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"batch {args.batch_size}, {task}, {jax.devices()[0].platform}")
    benchmark_generators(args.batch_size, args.seq_len, args.repeats)
    if args.variants:
        print("first-occurrence computation only:")
        benchmark_first_occurrence(args.batch_size, args.seq_len, args.repeats)


if __name__ == "__main__":
    main()
