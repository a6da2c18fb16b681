"""Never worse than the fallback: when the Pallas read's kernels do not build (Triton or
Pallas lowering fails), a GPU process warns once with the reason and runs the XLA read;
the trainer's step, the model and the read itself are traced without a crash."""

import warnings

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


@pytest.fixture
def gpu_process(monkeypatch):
    """Trace as a GPU process would (the kernels are only lowered here: no GPU), with the
    per-configuration compile check fresh."""
    monkeypatch.setattr(ns, "_process_backend", lambda: "gpu")
    pallas_read.compile_failure.cache_clear()
    yield
    pallas_read.compile_failure.cache_clear()


@pytest.fixture
def broken_lowering(monkeypatch):
    """Makes the kernels' lowering fail: a sort, which Pallas' Triton lowering does not
    implement, inside the normalization."""

    def unlowerable(c, floor):
        s = jnp.sum(jnp.sort(jnp.sum(c * c, axis=1)))
        return s, jax.lax.rsqrt(jnp.maximum(s, floor * floor))

    monkeypatch.setattr(pallas_read, "_inverse_norm", unlowerable)


def test_a_lowering_failure_warns_once_and_selects_the_xla_read(gpu_process, broken_lowering):
    with pytest.warns(RuntimeWarning, match="using the XLA read") as caught:
        assert ns.read_implementation(5, "cubic", width=48) == "xla"
    assert "d = 48" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per configuration
        assert ns.read_implementation(5, "cubic", width=48) == "xla"


def test_the_kernels_are_selected_when_they_build(gpu_process):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ns.read_implementation(5, "cubic", width=48) == "pallas_gpu"
    assert pallas_read.compile_failure(ns.iteration_coefficients("cubic", 5), 48, None) is None


def test_the_read_runs_on_xla_after_a_failure(gpu_process, broken_lowering):
    rng = np.random.default_rng(0)
    c = jnp.asarray(rng.standard_normal((3, 20, 20)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 20)), jnp.float32)
    with pytest.warns(RuntimeWarning, match="using the XLA read"):
        h, vjp = jax.vjp(lambda c, q: ns.newton_schulz_read(c, q, 5), c, q)
    h_x, vjp_x = jax.vjp(lambda c, q: ns.newton_schulz_read(c, q, 5, implementation="xla"), c, q)
    np.testing.assert_array_equal(h, h_x)
    for got, want in zip(vjp(q), vjp_x(q), strict=True):
        np.testing.assert_array_equal(got, want)


def _training_step_for_cuda():
    """The trainer's NS5 step exported for CUDA: its StableHLO text."""
    from orthorecall import cell, model, training
    from orthorecall.reads import read_from_name

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
    return export.export(
        step,
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(pallas_read.TRITON_CUSTOM_CALL)],
    )(states, keys, batch).mlir_module()


def _skip_unless_lowering_emits_triton_ir():
    from jax._src.lib import triton, version

    if version > (0, 10, 2) and not triton.has_compilation_handler("CUDA"):
        pytest.skip("this jaxlib compiles Triton kernels at lowering: needs jax-cuda")


def test_the_training_step_falls_back_to_xla(gpu_process, broken_lowering):
    _skip_unless_lowering_emits_triton_ir()
    with pytest.warns(RuntimeWarning, match="using the XLA read"):
        text = _training_step_for_cuda()
    assert pallas_read.TRITON_CUSTOM_CALL not in text


def test_the_training_step_uses_the_kernels_when_they_build(gpu_process):
    _skip_unless_lowering_emits_triton_ir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        text = _training_step_for_cuda()
    assert text.count(pallas_read.TRITON_CUSTOM_CALL) >= 2
