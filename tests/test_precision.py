"""The matrix-product precision policy (orthorecall.precision, CellConfig.matmul_precision):
checked in the programs lowered for GPUs and TPUs, which this CPU can produce."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from experiments.study import study_config
from experiments.study.cli import ConfigError
from experiments.study.workdir import differing_fields
from orthorecall import cell, model, precision, training
from orthorecall.reads import read_from_name
from tests.test_training import tiny_config

# How each choice shows in StableHLO: the precision_config of every dot_general.
LOWERED = {
    "highest": "precision = [HIGHEST, HIGHEST]",
    "tensorfloat32": "precision = [HIGH, HIGH]",
    "bfloat16": None,  # DEFAULT, which the printer leaves out
    "default": None,
}


def _config(read: str, matmul_precision: str, **cell_fields) -> model.ModelConfig:
    cell_config = cell.CellConfig(
        embedding_dim=16,
        num_heads=2,
        inner_multiple=8,
        chunk_size=4,
        read=read_from_name(read),
        matmul_precision=matmul_precision,
        **cell_fields,
    )
    return model.ModelConfig(vocab_size=24, cell=cell_config)


def _train_step_module(configs, platform: str) -> str:
    """The trainer's step (forward, backward, AdamW) for 2 seeds, lowered for ``platform``."""
    optimizer = training.make_optimizer(total_steps=4)
    states = {
        name: jax.eval_shape(lambda c=config: training.init_seed_states(np.arange(2), c, optimizer))
        for name, config in configs.items()
    }
    keys = jax.ShapeDtypeStruct((2, 2), jnp.uint32)
    batch = (jax.ShapeDtypeStruct((2, 3, 11), jnp.int32),) * 2
    step = training.make_train_step(configs, optimizer, None)
    return export.export(step, platforms=[platform])(states, keys, batch).mlir_module()


def _dot_generals(module: str) -> list[str]:
    return [line for line in module.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.slow
@pytest.mark.parametrize(
    "platform, matmul_precision",
    [
        ("cuda", "highest"),
        ("tpu", "highest"),
        ("cuda", "tensorfloat32"),
        ("tpu", "bfloat16"),
    ],
)
def test_every_product_of_the_training_step_has_the_requested_precision(platform, matmul_precision):
    # Every product, forward and backward: the chunkwise form and the explicit
    # Newton-Schulz iteration's custom VJP (ns5), the Gram read's (ns3 through CᵀC), the
    # polar factor's; and the projections, the head and their transposes.
    configs = {
        "ns5": _config("ns5", matmul_precision),
        "ns3": _config("ns3", matmul_precision, sequence_form="gram"),
    }
    if platform == "cuda":
        # On TPUs JAX's own SVD is made of products it asks HIGHEST for; on GPUs it is a
        # library call, so there every product is the polar read's (and its VJP's).
        configs["polar"] = _config("polar", matmul_precision)
    dots = _dot_generals(_train_step_module(configs, platform))
    assert len(dots) > 100
    expected = LOWERED[matmul_precision]
    for line in dots:
        if expected is None:
            assert "precision =" not in line, line
        else:
            assert expected in line, line
    # The kernel of the CPU never reaches an accelerator's program.
    assert not any("orthorecall_" in line for line in dots)


def test_the_default_is_float32_everywhere_a_config_is_made():
    assert cell.CellConfig().matmul_precision == "highest"
    assert model.ModelConfig().cell.matmul_precision == "highest"
    config = study_config.model_configs(train_config := tiny_config())
    assert {c.cell.matmul_precision for c in config.values()} == {"highest"}
    assert train_config.model.matmul_precision == "highest"


def test_the_cli_field_reaches_the_cell_and_bad_values_name_the_field():
    configs = study_config.model_configs(tiny_config(model__matmul_precision="tensorfloat32"))
    assert {c.cell.matmul_precision for c in configs.values()} == {"tensorfloat32"}
    with pytest.raises(ConfigError, match=r"^config\.model.*matmul_precision.*'highest'"):
        study_config.model_configs(tiny_config(model__matmul_precision="fp32"))
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        cell.CellConfig(matmul_precision="HIGHEST")


def test_the_cpu_computes_float32_whatever_is_asked():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 24)
    outputs = {}
    for choice in ("highest", "bfloat16"):
        config = _config("raw", choice)
        params = model.init_params(jax.random.PRNGKey(1), config)
        outputs[choice] = model.apply(params, tokens, config)
    np.testing.assert_array_equal(outputs["highest"], outputs["bfloat16"])


def test_custom_vjps_run_their_backward_under_the_forward_precision():
    # The backward of a custom VJP is traced after the forward's context has closed; it
    # must still get the forward's precision, and not the one around jax.grad.
    config = _config("ns5", "highest")
    params = model.init_params(jax.random.PRNGKey(0), config)
    tokens = jnp.zeros((2, 9), jnp.int32)

    def loss(p):
        return jnp.sum(model.apply(p, tokens, config))

    with jax.default_matmul_precision("bfloat16"):
        module = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"])(params).mlir_module()
    dots = _dot_generals(module)
    assert dots and all(LOWERED["highest"] in line for line in dots)
    assert precision.current() is None  # nothing leaks out of the model's context


def test_old_workdirs_without_the_field_ran_in_float32():
    stored = {"model": {"chunk_size": 8}, "train": {"steps": 24}}
    now = {"model": {"chunk_size": 8, "matmul_precision": "highest"}, "train": {"steps": 24}}
    assert differing_fields(stored, now) == ""
    now["model"]["matmul_precision"] = "tensorfloat32"
    assert re.fullmatch(
        r"model\.matmul_precision: workdir has 'highest', now 'tensorfloat32'",
        differing_fields(stored, now),
    )
