"""The Pallas chunk read (each C_t formed on chip), in interpret mode on CPU, against
chunk_read's XLA form (formed memories, then the XLA read): values and every cotangent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import chunk_read, pallas_chunk_read, pallas_read, reads
from orthorecall import newton_schulz as ns

pytestmark = pytest.mark.skipif(
    not pallas_read.available(), reason="this JAX has no Pallas Triton backend"
)

CUBIC5 = ns.iteration_coefficients("cubic", 5)


def _chunk(seed, batch, length, d):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal((*batch, *shape)), jnp.float32)
    log_f = -np.abs(rng.standard_normal((*batch, length))) * 0.3
    cum = np.cumsum(log_f, axis=-1)
    decay = np.exp(cum[..., :, None] - cum[..., None, :]) * np.tri(length)
    scale = jnp.asarray(np.exp(cum), jnp.float32)
    return (
        f(d, d),
        scale,
        jnp.asarray(decay, jnp.float32),
        f(length, d),
        f(length, d),
        f(length, d),
    )


def _formed(steps):
    def read(memory, scale, decay, keys, values, queries):
        memories = chunk_read.chunk_memories(memory, scale, decay, keys, values)
        return ns._jax_read(memories, queries, steps)

    return read


def _check(operands, steps, rtol=2e-5, **kwargs):
    h_bar = jnp.asarray(np.random.default_rng(1).standard_normal(operands[-1].shape), jnp.float32)
    kwargs = {"steps": steps, "interpret": True, **kwargs}
    with jax.default_matmul_precision("highest"):
        h = pallas_chunk_read.chunk_read_forward(*operands, **kwargs)
        bars = pallas_chunk_read.chunk_read_backward(*operands, h_bar, **kwargs)
        want_h, vjp = jax.vjp(_formed(steps), *operands)
        want_bars = vjp(h_bar)
    names = ("h", "memory", "scale", "decay", "keys", "values", "queries")
    for name, got, want in zip(names, (h, *bars), (want_h, *want_bars), strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got - want)) <= rtol * scale + 1e-30, (
            name,
            np.max(np.abs(got - want)),
            scale,
        )


@pytest.mark.parametrize(("length", "d"), [(16, 16), (5, 13), (8, 48)])
def test_matches_the_formed_xla_read_values_and_cotangents(length, d):
    _check(_chunk(length + d, (2,), length, d), CUBIC5)


def test_quintic_steps_and_two_leading_axes():
    steps = ns.iteration_coefficients("polar_express", 3)
    _check(_chunk(3, (2, 2), 6, 12), steps)


def test_huge_and_zero_chunk_start_memories():
    memory, scale, decay, keys, values, queries = _chunk(4, (3,), 4, 8)
    # A chunk whose memories are all huge (rescaled in the kernel), and one whose C0 and
    # keys are zero (every C_t zero: h = 0 with finite gradients).
    memory = memory * jnp.asarray([1.0, 1e20, 0.0])[:, None, None]
    keys = keys * jnp.asarray([1.0, 1e20, 0.0])[:, None, None]
    _check((memory, scale, decay, keys, values, queries), CUBIC5)


def test_tensorfloat32_products_stay_close():
    operands = _chunk(5, (2,), 8, 16)
    _check(operands, CUBIC5, rtol=2e-2, jax_precision="tensorfloat32")


def test_lowers_for_cuda_with_triton_kernels():
    from tests.test_pallas_read import _skip_unless_lowering_emits_triton_ir, _triton_kernels

    _skip_unless_lowering_emits_triton_ir()
    steps = CUBIC5
    shapes = [(2, 48, 48), (2, 64), (2, 64, 64)] + [(2, 64, 48)] * 4
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

    def both(*args):
        kwargs = {"steps": steps, "jax_precision": "highest"}
        return (
            pallas_chunk_read.chunk_read_forward(*args[:6], **kwargs),
            pallas_chunk_read.chunk_read_backward(*args, **kwargs),
        )

    text = jax.jit(both).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    names = [name for name, _ in _triton_kernels(text)]
    assert names == [
        "chunk_read_forward_kernel",
        "chunk_read_iterates_kernel",
        "chunk_read_backward_kernel",
    ]


def test_rejects_bad_shapes():
    operands = list(_chunk(6, (2,), 4, 8))
    with pytest.raises(ValueError, match="decay"):
        pallas_chunk_read.chunk_read_forward(
            operands[0], operands[1], operands[2][:, :3], *operands[3:], steps=CUBIC5
        )
    wide = _chunk(6, (1,), 2, 65)
    with pytest.raises(ValueError, match="MAX_WIDTH"):
        pallas_chunk_read.chunk_read_forward(*wide, steps=CUBIC5)


# --- Selected for GPUs by chunk_read ------------------------------------------------------


@pytest.fixture
def gpu_process(monkeypatch):
    monkeypatch.setattr(ns, "_process_backend", lambda: "gpu")
    for module in (pallas_read, pallas_chunk_read):
        module.compile_failure.cache_clear()
    yield
    for module in (pallas_read, pallas_chunk_read):
        module.compile_failure.cache_clear()


def _vjp_of_chunk_read(operands, **kwargs):
    h_bar = jnp.asarray(np.random.default_rng(2).standard_normal(operands[-1].shape), jnp.float32)
    with jax.default_matmul_precision("highest"):
        h, vjp = jax.vjp(lambda *a: chunk_read.chunk_read(*a, reads.NS5, **kwargs), *operands)
        return (h, *vjp(h_bar))


def test_chunk_read_runs_the_pallas_chunk_read_on_gpus(gpu_process, monkeypatch):
    """A GPU process's chunk_read takes the Pallas chunk read through its custom VJP (run
    here in interpret mode in the CUDA branch): values and cotangents as the XLA form's."""
    branches = []

    def cuda_branch(*operands, cuda, default):
        branches.append(cuda.func.__name__)
        return cuda(*operands, interpret=True)

    operands = _chunk(9, (2,), 6, 12)
    want = _vjp_of_chunk_read(operands, implementation="xla")
    monkeypatch.setattr(jax.lax, "platform_dependent", cuda_branch)
    got = _vjp_of_chunk_read(operands)
    assert branches == ["chunk_read_forward", "chunk_read_backward"]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(w))))


def test_a_chunk_kernel_that_does_not_build_falls_back_to_formed_memories(gpu_process, monkeypatch):
    def unlowerable(c):  # a sort: not in Pallas' Triton lowering
        return jnp.sum(jnp.sort(jnp.sum(c, axis=0))) * 0.0 + 1.0

    monkeypatch.setattr(pallas_chunk_read, "_rescaling", unlowerable)
    operands = _chunk(10, (2,), 4, 8)
    with pytest.warns(RuntimeWarning, match="forming the memories with XLA"):
        got = _vjp_of_chunk_read(operands)
    want = _vjp_of_chunk_read(operands, implementation="xla")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.slow
def test_the_ns5_reference_checkpoint_evaluates_the_same_through_the_kernels(monkeypatch):
    """The ns5 reference checkpoint evaluated with its reads through the Pallas chunk read
    at the default precision (3xTF32 products; interpret mode in the CUDA branch) gives
    the evaluation of the default path: the same accuracy, the loss within 1e-4. (The
    default path reproduces the reference's recorded figures within 1e-3:
    tests/test_reference_checkpoint.py.)"""
    import json

    from experiments.study.evaluate_reference import evaluate_checkpoint
    from tests.conftest import REFERENCE_CHECKPOINTS

    records = json.loads((REFERENCE_CHECKPOINTS / "records.json").read_text())
    path = REFERENCE_CHECKPOINTS / next(r for r in records if r["variant"] == "ns5")["ckpt"]
    kwargs = {"num_batches": 2, "batch_size": 8}
    want = evaluate_checkpoint(path, **kwargs)

    branches = []

    def cuda_branch(*operands, cuda=None, default=None, **platforms):
        if cuda is None:
            return default(*operands)
        branches.append(cuda.func.__name__)
        return cuda(*operands, interpret=True)

    monkeypatch.setattr(
        ns, "_implementation", lambda steps, backend, width: "pallas_gpu" if steps else "xla"
    )
    monkeypatch.setattr(jax.lax, "platform_dependent", cuda_branch)
    jax.clear_caches()  # retrace the evaluation
    got = evaluate_checkpoint(path, **kwargs)
    jax.clear_caches()
    assert "chunk_read_forward" in branches
    assert got["accuracy"] == want["accuracy"]
    assert abs(got["loss"] - want["loss"]) < 1e-4, (got["loss"], want["loss"])
