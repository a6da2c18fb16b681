"""The compiler options of the training step (orthorecall.compilation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthorecall import compilation


def _reduction(x, y):
    # Elementwise work and a reduction that follow no product: XLA's default CPU
    # pipeline hands them to a YNNPACK fusion.
    return jnp.sum(jnp.exp(x) * y, axis=-1)


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    monkeypatch.delenv("ORTHORECALL_XLA_OPTIONS", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    compilation._accepted.cache_clear()
    yield
    compilation._accepted.cache_clear()


def test_cpu_training_steps_leave_only_single_products_to_the_library():
    assert compilation.training_options("cpu") == compilation.CPU_TRAINING_OPTIONS
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.standard_normal((16, 4, 64, 64)), jnp.float32) for _ in range(2))
    text = compilation.jit_training_step(_reduction).lower(x, y).compile().as_text()
    assert "__ynn_fusion" not in text
    # A product still goes to the library.
    product = compilation.jit_training_step(lambda a, b: a @ b).lower(x, y).compile().as_text()
    assert "__ynn_fusion" in product
    np.testing.assert_allclose(
        np.asarray(compilation.jit_training_step(_reduction)(x, y)),
        np.asarray(jax.jit(_reduction)(x, y)),
        rtol=1e-5,
        atol=1e-4,
    )


def test_other_backends_the_switch_and_the_users_flags_keep_xlas_defaults(monkeypatch):
    assert compilation.training_options("gpu") is None
    assert compilation.training_options("tpu") is None
    monkeypatch.setenv("ORTHORECALL_XLA_OPTIONS", "off")
    assert compilation.training_options("cpu") is None
    monkeypatch.delenv("ORTHORECALL_XLA_OPTIONS")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert compilation.training_options("cpu") is None


def test_an_option_xla_refuses_falls_back_to_the_defaults_with_a_warning(monkeypatch):
    monkeypatch.setattr(
        compilation, "CPU_TRAINING_OPTIONS", {compilation.YNN_FUSION_OPTION: "NOT_A_FUSION_TYPE"}
    )
    with pytest.warns(UserWarning, match="did not take the compiler options"):
        assert compilation.training_options("cpu") is None
    x = jnp.ones((2, 4, 4))
    got = compilation.jit_training_step(_reduction)(x, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reduction(x, x)))
