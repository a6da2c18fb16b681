"""The Pallas (Triton) Newton–Schulz read: its numbers in interpret mode, on CPU, against
the XLA read and float64 numpy, and its CUDA lowering (exported from this CPU machine)
down to the precision of every Triton product."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from orthorecall import newton_schulz as ns
from orthorecall import pallas_read

pytestmark = pytest.mark.skipif(
    not pallas_read.available(), reason="this JAX has no Pallas Triton backend"
)

CUBIC5 = ns.iteration_coefficients("cubic", 5)


def _inputs(seed, shape, d):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((*shape, d, d)).astype(np.float32)
    q = rng.standard_normal((*shape, d)).astype(np.float32)
    h_bar = rng.standard_normal((*shape, d)).astype(np.float32)
    return jnp.asarray(c), jnp.asarray(q), jnp.asarray(h_bar)


def _xla_read_and_vjp(c, q, h_bar, steps):
    h, vjp = jax.vjp(functools.partial(ns._jax_read, steps=steps), c, q)
    return (h, *vjp(h_bar))


def _pallas_read_and_vjp(c, q, h_bar, steps, **kwargs):
    h = pallas_read.ns_read_forward(c, q, steps=steps, interpret=True, **kwargs)
    c_bar, q_bar = pallas_read.ns_read_backward(c, q, h_bar, steps=steps, interpret=True, **kwargs)
    return h, c_bar, q_bar


def _assert_close(got, want, rtol=1e-5):
    """Within rtol of the largest entry of ``want``, per leading index (the memories of a
    batch may differ in scale by many orders of magnitude)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    largest = np.max(np.abs(want.reshape(want.shape[0], -1)), axis=1)
    error = np.max(np.abs(got - want).reshape(want.shape[0], -1), axis=1)
    assert np.all(error <= rtol * largest + 1e-30), (error, largest)


def _assert_matches_xla(c, q, h_bar, steps, rtol=1e-5):
    """Checks (h, C̄, q̄) against the XLA read and returns them."""
    lead = int(np.prod(c.shape[:-2]))
    results = _pallas_read_and_vjp(c, q, h_bar, steps)
    for got, want in zip(results, _xla_read_and_vjp(c, q, h_bar, steps), strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32
        _assert_close(got.reshape(lead, -1), want.reshape(lead, -1), rtol)
    return results


@pytest.mark.parametrize("d", [16, 13, 48])
def test_cubic_read_and_gradients_match_xla(d):
    _assert_matches_xla(*_inputs(d, (2,), d), CUBIC5)


@pytest.mark.parametrize(
    ("coefficients", "k", "d"), [("muon", 5, 16), ("polar_express", 5, 13), ("cubic", 1, 20)]
)
def test_other_coefficients_and_one_iteration_match_xla(coefficients, k, d):
    steps = ns.iteration_coefficients(coefficients, k)
    # Both reads are within a few 1e-6 of float64 (test_float32_faithful_*): their
    # difference, through the polar-express schedule's large coefficients, up to 2e-5.
    _assert_matches_xla(*_inputs(k + d, (2,), d), steps, rtol=2e-5)


def test_two_leading_axes():
    h, c_bar, q_bar = _assert_matches_xla(*_inputs(7, (2, 3), 13), CUBIC5)
    assert h.shape == q_bar.shape == (2, 3, 13) and c_bar.shape == (2, 3, 13, 13)


def test_zero_tiny_and_huge_memories_match_xla():
    # All zero (h = 0, finite gradient r X̄0), below the Frobenius floor (the constant
    # branch of the normalization's VJP), ordinary, and ~1e20 (the rescaling path: its
    # sum of squares would overflow float32 unscaled).
    c, q, h_bar = _inputs(3, (4,), 13)
    c = c * jnp.asarray([0.0, 1e-9, 1.0, 1e20])[:, None, None]
    h, c_bar, q_bar = _assert_matches_xla(c, q, h_bar, CUBIC5)
    assert np.all(np.asarray(h[0]) == 0.0) and np.all(np.asarray(q_bar[0]) == 0.0)
    assert np.all(np.isfinite(np.asarray(c_bar))) and np.any(np.asarray(c_bar[0]) != 0.0)
    assert np.max(np.abs(np.asarray(h[3]))) > 0.1  # not lost to an overflow


def _numpy_newton_schulz(c, steps):
    x = np.asarray(c, np.float64)
    x = x / max(np.sqrt(np.sum(x * x)), 1e-6)
    for a, b, cc in steps:
        g = x.T @ x
        x = a * x + x @ (b * g + cc * g @ g)
    return x


def test_forward_matches_float64_numpy():
    steps = ns.iteration_coefficients("polar_express", 6)
    c, q, _ = _inputs(11, (3,), 24)
    h = pallas_read.ns_read_forward(c, q, steps=steps, interpret=True)
    want = np.stack(
        [_numpy_newton_schulz(m, steps).T @ v for m, v in zip(np.asarray(c), np.asarray(q))]
    )
    _assert_close(h, want, 2e-5)


def _float64_read_and_vjp(c, q, h_bar, steps):
    """(h, C̄, q̄) of the XLA read in float64 (x64 enabled for the call)."""
    with jax.enable_x64(True):
        c, q, h_bar = (jnp.asarray(np.asarray(x), jnp.float64) for x in (c, q, h_bar))

        def read(c, q):
            x = c / jnp.sqrt(jnp.maximum(jnp.sum(c * c, axis=(-2, -1), keepdims=True), 1e-12))
            for a, b, cc in steps:
                g = jnp.swapaxes(x, -1, -2) @ x
                x = a * x + x @ (b * g + cc * g @ g)
            return jnp.einsum("...i,...ij->...j", q, x)

        h, vjp = jax.vjp(read, c, q)
        return tuple(np.asarray(v) for v in (h, *vjp(h_bar)))


def _faithfulness(c, q, h_bar, steps):
    """Per output (h, C̄, q̄): the largest error relative to the largest entry, against
    float64, of the Pallas read at "highest" (3xTF32 products) and of the XLA read with
    IEEE float32 products."""
    want = _float64_read_and_vjp(c, q, h_bar, steps)
    lead = int(np.prod(c.shape[:-2]))
    with jax.default_matmul_precision("highest"):
        pallas = _pallas_read_and_vjp(c, q, h_bar, steps, jax_precision="highest")
        xla = _xla_read_and_vjp(c, q, h_bar, steps)

    def error(got, w):
        got, w = np.asarray(got, np.float64).reshape(lead, -1), w.reshape(lead, -1)
        return np.max(np.abs(got - w)) / np.max(np.abs(w))

    return [(error(p, w), error(x, w)) for p, x, w in zip(pallas, xla, want, strict=True)]


@pytest.mark.parametrize(
    ("coefficients", "d"), [("cubic", 48), ("cubic", 64), ("polar_express", 48)]
)
def test_float32_faithful_on_random_memories(coefficients, d):
    """The default precision's tensor-core products (3xTF32, rounded in the kernel as on
    the GPU) are as accurate as IEEE float32 ones: within twice the XLA float32 read's
    error against float64, for the read and both cotangents."""
    steps = ns.iteration_coefficients(coefficients, 5)
    c, q, h_bar = _inputs(d, (6,), d)
    # Ill-conditioned memories too (singular values over three decades).
    c = c.at[3:].set(c[3:] * jnp.logspace(0, -3, d)[None, None, :])
    for pallas_error, xla_error in _faithfulness(c, q, h_bar, steps):
        assert pallas_error <= 2 * xla_error, (pallas_error, xla_error)


def _ns5_memories(count=8):
    """Memories C_t and queries q_t of the ns5 reference checkpoint on its validation
    data: its first block, one head, positions spread over a sequence (float32)."""
    import json

    from orthorecall import data, probes
    from orthorecall import reference_checkpoint as rc
    from tests.conftest import REFERENCE_CHECKPOINTS

    records = json.loads((REFERENCE_CHECKPOINTS / "records.json").read_text())
    record = next(r for r in records if r["variant"] == "ns5")
    checkpoint = rc.load_reference_checkpoint(REFERENCE_CHECKPOINTS / record["ckpt"])
    task = data.NoisyRecallTask.from_mapping(checkpoint.cfg)
    inputs, _ = data.reference_validation_set(
        task, seed=checkpoint.cfg["seed"], num_batches=1, batch_size=2
    )
    tokens = np.asarray(inputs)[0]
    length = tokens.shape[1]
    positions = np.linspace(length // 8, length - 1, count // 2).astype(np.int64)
    positions = np.stack([positions, positions])
    _, blocks = probes.trace(checkpoint.params, tokens, checkpoint.config, positions)
    block = blocks[0]
    c = np.asarray(block.memory.c)[:, :, 0].reshape(-1, *block.memory.c.shape[-2:])
    q = np.asarray(block.q)[np.arange(2)[:, None], positions, 0].reshape(c.shape[:-1])
    return jnp.asarray(c, jnp.float32), jnp.asarray(q, jnp.float32)


def test_float32_faithful_on_the_reference_checkpoints_memories():
    """As above on the memories the ns5 reference checkpoint forms on its task."""
    c, q = _ns5_memories()
    h_bar = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
    for pallas_error, xla_error in _faithfulness(c, q, h_bar, CUBIC5):
        assert pallas_error <= 2 * xla_error, (pallas_error, xla_error)


def test_bfloat16_products_stay_close_to_float32():
    # Interpret mode rounds the operands to bfloat16 as the GPU would; 8 bits of mantissa
    # through five iterations, so only a loose agreement.
    c, q, h_bar = _inputs(5, (2,), 16)
    got = _pallas_read_and_vjp(c, q, h_bar, CUBIC5, jax_precision="bfloat16")
    want = _xla_read_and_vjp(c, q, h_bar, CUBIC5)
    for g, w in zip(got, want, strict=True):
        _assert_close(g.reshape(2, -1), w.reshape(2, -1), 0.1)
        assert not np.allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6)


def test_empty_batch_returns_zeros():
    c, q = jnp.zeros((0, 3, 5, 5)), jnp.zeros((0, 3, 5))
    assert pallas_read.ns_read_forward(c, q, steps=CUBIC5).shape == (0, 3, 5)
    c_bar, q_bar = pallas_read.ns_read_backward(c, q, q, steps=CUBIC5)
    assert c_bar.shape == (0, 3, 5, 5) and q_bar.shape == (0, 3, 5)


def test_works_under_jit_and_vmap_with_other_float_dtypes():
    c, q, _ = _inputs(2, (3, 2), 8)
    c, q = c.astype(jnp.bfloat16), q.astype(jnp.float16)
    read = functools.partial(pallas_read.ns_read_forward, steps=CUBIC5, interpret=True)
    # vmap goes through pallas_call's batching rule (one more grid axis).
    got = jax.jit(jax.vmap(read))(c, q)
    assert got.dtype == jnp.float32 and got.shape == (3, 2, 8)
    want = ns._jax_read(c.astype(jnp.float32), q.astype(jnp.float32), CUBIC5)
    _assert_close(got.reshape(6, -1), want.reshape(6, -1))


@pytest.mark.parametrize(
    ("memory", "query", "kwargs", "message"),
    [
        ((2, 4, 5), (2, 4), {}, "square"),
        ((4,), (4,), {}, "square"),
        ((2, 4, 4), (3, 4), {}, "memory.shape"),
        ((2, 4, 4), (2, 4), {"steps": ()}, "steps"),
        ((2, 4, 4), (2, 4), {"steps": ((1.5, -0.5),)}, "steps"),
        ((2, 4, 4), (2, 4), {"jax_precision": "BF16_BF16_F32_X3"}, "jax_precision"),
        ((1, 65, 65), (1, 65), {}, "MAX_WIDTH"),
    ],
)
def test_rejects_bad_arguments(memory, query, kwargs, message):
    kwargs = {"steps": CUBIC5, **kwargs}
    with pytest.raises(ValueError, match=message):
        pallas_read.ns_read_forward(jnp.zeros(memory), jnp.zeros(query), **kwargs)


def test_backward_rejects_mismatched_h_bar_and_integer_memory():
    c, q = jnp.zeros((2, 4, 4)), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="h_bar"):
        pallas_read.ns_read_backward(c, q, jnp.zeros((2, 5)), steps=CUBIC5)
    with pytest.raises(ValueError, match="real floating memory"):
        pallas_read.ns_read_backward(c.astype(jnp.int32), q, q, steps=CUBIC5)


def test_block_width():
    assert [pallas_read.block_width(d) for d in (1, 13, 16, 17, 48, 64)] == [
        16,
        16,
        16,
        32,
        64,
        64,
    ]


# --- The CUDA lowering, exported on this CPU machine -------------------------------------


def _export_for_cuda(jax_precision, steps=CUBIC5, d=48):
    """Forward and backward exported for CUDA (interpret=False): the exported StableHLO."""

    def read_and_vjp(c, q, h_bar):
        kwargs = {"steps": steps, "jax_precision": jax_precision}
        return (
            pallas_read.ns_read_forward(c, q, **kwargs),
            pallas_read.ns_read_backward(c, q, h_bar, **kwargs),
        )

    matrix = jax.ShapeDtypeStruct((2, 3, d, d), jnp.float32)
    vector = jax.ShapeDtypeStruct((2, 3, d), jnp.float32)
    # The Triton custom call has no export compatibility guarantee, so export refuses it
    # unless told; this is a lowering check, not a serialized artifact.
    exported = export.export(
        jax.jit(read_and_vjp),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(pallas_read.TRITON_CUSTOM_CALL)],
    )(matrix, vector, vector)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def _triton_kernels(module_text):
    """(name, Triton IR in generic form) of each Triton custom call of ``module_text``, as
    the compile report reads them (``compile_report.triton_kernels``). The generic form
    prints attributes that the pretty form leaves out at their default, tt.dot's
    inputPrecision = IEEE among them."""
    from experiments.accelerators import compile_report

    return [(name, asm) for name, asm, _ in compile_report.triton_kernels(module_text)]


def _dots(asm):
    """(inputPrecision, operand element type) of every tt.dot of a generic-form kernel."""
    return re.findall(r'"tt\.dot"\(.*inputPrecision = (\d+) : i32.*\(tensor<\d+x\d+x(\w+)>', asm)


def _skip_unless_lowering_emits_triton_ir():
    # jaxlib <= 0.10.2 puts the Triton IR into the custom call and compiles it in XLA; later
    # ones compile it while lowering, which needs the CUDA plugin this machine lacks.
    from jax._src.lib import triton, version

    if version > (0, 10, 2) and not triton.has_compilation_handler("CUDA"):
        pytest.skip("this jaxlib compiles Triton kernels at lowering: needs jax-cuda")


def _tf32_products(asm):
    """The tt.dots of a kernel: all TF32 (the float32 precision's 3xTF32 included)."""
    from jax._src.lib.triton import dialect as tt_dialect

    tf32 = str(int(tt_dialect.InputPrecision.TF32))
    dots = _dots(asm)
    assert dots and all(dot == (tf32, "f32") for dot in dots), dots
    return len(dots)


def test_lowers_for_cuda_to_triton_kernels_on_tensor_cores_for_highest():
    _skip_unless_lowering_emits_triton_ir()
    text = _export_for_cuda("highest")
    assert f"stablehlo.custom_call @{pallas_read.TRITON_CUSTOM_CALL}" in text
    kernels = _triton_kernels(text)
    assert [name for name, _ in kernels] == [
        "ns_read_forward_kernel",
        "ns_read_iterates_kernel",
        "ns_read_backward_kernel",
    ]
    (_, forward), (_, iterates), (_, backward) = kernels
    # Float32 products as three TF32 products each (3xTF32), the Gram-type ones (XᵀX,
    # XᵀȲ) in 4 blocks of 16 along their contraction (D = 64). Cubic steps, as loops: the
    # forward's step has G and X P(G), and so has the backward's first kernel (which
    # writes every step's input X_j); the second kernel's reverse step reads X_j (nothing
    # recomputed) and has G, XᵀȲ, and Ȳ (aI + P(G)) and X (Ḡ + Ḡᵀ) added to the same
    # accumulator.
    gram, product = 3 * 4, 3
    assert _tf32_products(forward) == gram + product
    assert _tf32_products(iterates) == gram + product
    assert _tf32_products(backward) == 2 * gram + 2 * product
    for asm in (forward, iterates, backward):
        assert len(re.findall(r'"scf\.(for|while)"', asm)) == 1
    # The operands are rounded to TF32 in the kernel (bit masks), so the tensor cores'
    # own conversion is exact.
    assert "arith.andi" in forward and "tt.bitcast" in forward
    # d = 48 in 64 x 64 blocks, loaded and stored with masks from and to the unpadded
    # arrays; the iterates (an array of the backward's own) padded to the block, without
    # masks, loaded whole and by blocks of 16 rows. (Pallas lowers a store as a swap,
    # whose unused load of the old value Triton drops as dead code.)
    for asm, stored in ((forward, ["64"]), (iterates, ["64x64", "64"]), (backward, ["64x64"])):
        memory_ops = re.findall(r'"tt\.(load|store)".*: \((.*)\)', asm)
        assert any("tensor<64x64x!tt.ptr<f32>>, tensor<64x64xi1>" in t for _, t in memory_ops)
        assert [
            re.match(r"tensor<(\w+)x!tt", types)[1] for op, types in memory_ops if op == "store"
        ] == stored
    forward_ops = re.findall(r'"tt\.(?:load|store)".*: \((.*)\)', forward)
    assert all("i1>" in types for types in forward_ops)
    # The reverse step loads X_j in blocks of 16 rows for its Gram-type products (4 + 4
    # for XᵀX, 4 for XᵀȲ) and whole for X (Ḡ + Ḡᵀ).
    loaded = re.findall(r'"tt\.load".*: \((.*)\)', backward)
    assert sum(t.startswith("tensor<16x64x!tt.ptr<f32>>") for t in loaded) == 12


@pytest.mark.parametrize(
    ("jax_precision", "precision", "dtype", "passes"),
    [
        (None, "TF32", "f32", 1),
        ("tensorfloat32", "TF32", "f32", 1),
        ("float32", "TF32", "f32", 3),
        ("bfloat16", "IEEE", "bf16", 1),
    ],
)
def test_lowered_product_precision(jax_precision, precision, dtype, passes):
    _skip_unless_lowering_emits_triton_ir()
    from jax._src.lib.triton import dialect as tt_dialect

    steps = ns.iteration_coefficients("muon", 1)
    expected = (str(int(getattr(tt_dialect.InputPrecision, precision))), dtype)
    # Quintic: 3 products forward (G, G², X (aI + P(G))), as many in the backward's
    # first kernel; its second kernel's reverse step has 7 (G, G², XᵀȲ, G XᵀȲ, XᵀȲ G,
    # Ȳ (aI + P(G)) and X (Ḡ + Ḡᵀ)).
    forward, iterates, backward = _triton_kernels(_export_for_cuda(jax_precision, steps, d=13))
    assert _dots(forward[1]) == [expected] * 3 * passes
    assert _dots(iterates[1]) == [expected] * 3 * passes
    assert _dots(backward[1]) == [expected] * 7 * passes


# --- Selected for GPUs: newton_schulz_read and the model ---------------------------------


def _select_pallas(monkeypatch):
    """What a GPU process decides at trace time (newton_schulz._implementation)."""
    monkeypatch.setattr(
        ns, "_implementation", lambda steps, backend, width: "pallas_gpu" if steps else "xla"
    )


def test_newton_schulz_read_runs_the_kernel_through_its_custom_vjp(monkeypatch):
    """With the Pallas kernel selected, the read's value and both cotangents come from it
    (run here in interpret mode in the CUDA branch) and equal the XLA read's."""
    _select_pallas(monkeypatch)
    monkeypatch.setattr(
        ns,
        "_FORWARD_KERNELS",
        {"pallas_gpu": functools.partial(pallas_read.ns_read_forward, interpret=True)},
    )
    monkeypatch.setattr(
        ns,
        "_BACKWARD_KERNELS",
        {"pallas_gpu": functools.partial(pallas_read.ns_read_backward, interpret=True)},
    )
    branches = []

    def cuda_branch(*operands, cuda, default):
        branches.append("cuda")
        return cuda(*operands)

    monkeypatch.setattr(jax.lax, "platform_dependent", cuda_branch)
    c, q, h_bar = _inputs(7, (3,), 20)

    def read(implementation):
        return lambda c, q: ns.newton_schulz_read(c, q, 5, implementation=implementation)

    with jax.default_matmul_precision("highest"):
        h, vjp = jax.vjp(read("auto"), c, q)
        c_bar, q_bar = vjp(h_bar)
    assert branches == ["cuda", "cuda"]  # forward and backward
    h_x, vjp_x = jax.vjp(read("xla"), c, q)
    for got, want in zip((h, *(c_bar, q_bar)), (h_x, *vjp_x(h_bar)), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_the_models_training_step_lowers_with_the_kernel_for_cuda(monkeypatch):
    """The trainer's step with NS5 (chunkwise form) exported for CUDA as a GPU process
    would build it: the chunk read's forward and backward are Triton kernels,
    with float32 products on tensor cores (3xTF32) under the default precision policy."""
    _skip_unless_lowering_emits_triton_ir()

    from orthorecall import cell, model, training
    from orthorecall.reads import read_from_name

    _select_pallas(monkeypatch)
    config = model.ModelConfig(
        vocab_size=24,
        cell=cell.CellConfig(
            embedding_dim=16,
            num_heads=2,
            inner_multiple=8,
            chunk_size=4,
            read=read_from_name("ns5"),
        ),
    )
    optimizer = training.make_optimizer(total_steps=4)
    states = {
        "ns5": jax.eval_shape(lambda: training.init_seed_states(np.arange(2), config, optimizer))
    }
    keys = jax.ShapeDtypeStruct((2, 2), jnp.uint32)
    batch = (jax.ShapeDtypeStruct((2, 3, 11), jnp.int32),) * 2
    step = training.make_train_step({"ns5": config}, optimizer, None)
    text = export.export(
        step,
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(pallas_read.TRITON_CUSTOM_CALL)],
    )(states, keys, batch).mlir_module()
    kernels = _triton_kernels(text)
    names = {name for name, _ in kernels}
    # The chunkwise form's reads: the chunk kernels (each C_t formed on chip).
    assert names == {
        "chunk_read_forward_kernel",
        "chunk_read_iterates_kernel",
        "chunk_read_backward_kernel",
    }
    for _, asm in kernels:
        _tf32_products(asm)
