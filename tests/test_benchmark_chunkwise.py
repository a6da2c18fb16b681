"""mlstm_kernels' JAX chunkwise mLSTM as an external oracle for our raw read, and the
comparison benchmark that times the two (experiments/benchmarks/chunkwise.py)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("mlstm_kernels")

from experiments.benchmarks import chunkwise as bench
from orthorecall import compilation, mlstm, reads


def _inputs(seed, b, t, h, d):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    i = jnp.asarray(2.0 * rng.standard_normal((b, t, h)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((b, t, h)) + 2.0, jnp.float32)
    return q, k, v, i, f


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_our_forms_agree_with_mlstm_kernels(chunk_size):
    native = bench.load_native_chunkwise()
    q, k, v, i, f = _inputs(chunk_size, 2, 128, 3, 24)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    theirs, (c, n, m) = native.mlstm_chunkwise_fw(
        *map(heads_first, (q, k, v, i, f)), chunk_size=chunk_size, return_last_states=True
    )[::3]
    theirs = np.asarray(heads_first(theirs))
    forms = [
        functools.partial(mlstm.chunkwise_sequence, chunk_size=chunk_size),  # the CPU kernel
        functools.partial(mlstm.chunkwise_sequence, chunk_size=chunk_size, implementation="xla"),
        mlstm.recurrent_sequence,
    ]
    for form in forms:
        h, state = form(q, k, v, i, f, read=reads.RAW)
        scale = np.abs(theirs).max()
        np.testing.assert_allclose(np.asarray(h) / scale, theirs / scale, rtol=0, atol=1e-5)
        # Their memory is ours un-normalized by √d (their keys are not scaled; q·k is).
        np.testing.assert_allclose(state.m, m, rtol=0, atol=1e-5)
        np.testing.assert_allclose(state.c * np.sqrt(24), c, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.n * np.sqrt(24), n, rtol=1e-4, atol=1e-5)


def test_training_options_compile_a_backward_xlas_fused_products_crashed_on():
    # With XLA's "dot" setting (products and their fused consumers in YNNPACK), XLA:CPU
    # died (segmentation fault) compiling this gradient; the training step's option
    # (single products) must compile and run it.
    native = bench.load_native_chunkwise()
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    args = tuple(map(heads_first, _inputs(0, 16, 1024, 4, 64)))
    loss = lambda *a: jnp.sum(jnp.square(native.mlstm_chunkwise_fw(*a, chunk_size=64)[0]))
    grads = compilation.jit_training_step(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_benchmark_smoke_writes_figures(tmp_path, capsys):
    out = tmp_path / "compare.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mlstm_kernels"] == bench.MLSTM_KERNELS_VERSION
    (record,) = result["records"]
    assert record["shape"] == {"batch": 2, "heads": 2, "length": 64, "head_dim": 16}
    assert record["relative_output_difference"] < 1e-5
    for direction in ("forward", "forward_backward"):
        r = record[direction]
        assert r["ours_tokens_per_s"] > 0 and r["theirs_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["theirs_tokens_per_s"])
        assert r["chunk_form_ratio"] == pytest.approx(
            r["chunk_form_tokens_per_s"] / r["theirs_tokens_per_s"]
        )
    assert record["ours_runs"] == "cpu kernel"
    assert "ours / theirs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "2,2,64"], "four positive integers"),
        (["--shape", "2,2,100,16"], "multiple of its chunk"),
        (["--rounds", "0"], "at least 1"),
        (["--chunk_size", "0"], "at least 1"),
    ],
)
def test_benchmark_refuses_bad_arguments(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err
