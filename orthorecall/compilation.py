"""The XLA compiler options of the study's training step (``training.make_train_step``).

On the CPU, XLA hands work to the YNNPACK library: matrix products, and by default also
the elementwise work and reductions it can fuse with them or on their own. In the
training step, whose backward is full of small reductions over (batch, heads,
positions), those library fusions ran far slower than XLA's own loops. Compiled with
library calls for single matrix products only, the raw model's training step
(v80/s512, batch 16, 2-core CPU) went from 40k-49k to 58k tokens/s, the ns5 step from
11.9k-12.2k to 12.4k-13.3k (docs/speed.md). Forward passes run better with XLA's
defaults (the raw evaluation forward lost a third with this option), and so do the
agents, whose jitted updates are mostly acting: only the training step takes it.

Why single products rather than XLA's "dot" setting (products with their fused
consumers), which was as fast: with that setting XLA:CPU crashed (segmentation fault)
compiling mlstm_kernels' chunkwise backward at B16 H4 T1024 d64; single products did
not (``tests/test_benchmark_chunkwise.py`` keeps the case).

The option is XLA's own and marked experimental: it is tried once on a tiny program
and left out, with one warning, where this JAX does not take it. Set
``ORTHORECALL_XLA_OPTIONS=0`` to compile with XLA's defaults; an
``xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` is the user's choice and
stays in force.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp

from orthorecall.validation import switched_on

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_TRAINING_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        program = jax.jit(lambda x: jnp.sum(x @ x, axis=-1), compiler_options=dict(options))
        program.lower(jnp.ones((4, 4), jnp.float32)).compile()
    except Exception as e:  # Any refusal means: compile with XLA's defaults.
        warnings.warn(
            f"XLA did not take the compiler options {dict(options)} ({e}); the training "
            "step compiles with XLA's defaults.",
            stacklevel=3,
        )
        return False
    return True


def training_options(backend: str | None = None) -> dict[str, str] | None:
    """The options for a training step compiled for ``backend`` (default: JAX's), or
    None for XLA's defaults: off the CPU, when switched off, or when ``XLA_FLAGS`` sets
    the option itself."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or not switched_on("ORTHORECALL_XLA_OPTIONS"):
        return None
    if YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    if not _accepted(tuple(sorted(CPU_TRAINING_OPTIONS.items()))):
        return None
    return dict(CPU_TRAINING_OPTIONS)


def jit_training_step(fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` compiled with ``training_options``."""
    return jax.jit(fn, compiler_options=training_options(), **kwargs)
