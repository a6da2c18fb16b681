"""The XLA compiler options the library's jitted steps are compiled with.

On the CPU, XLA hands fusions to the YNNPACK library: matrix products, and by default
also the elementwise work and reductions around them. For this model's small
reductions over (batch, heads, positions) the library's fusions ran far slower than
XLA's own loops: with products only, the raw model's training step (v80/s512, batch
16, 2-core CPU) went from 49k to 65k tokens/s and the ns5 step from 12.0k to 13.4k,
the evaluation forwards unchanged (docs/speed.md). So the training and evaluation
steps ask for products only (``compiler_options``), on the CPU and nowhere else.

The option is XLA's own and marked experimental: it is tried once on a tiny program,
and left out (with one warning) where this JAX does not take it. Set
``ORTHORECALL_XLA_OPTIONS=0`` to compile with XLA's defaults; an
``xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` is the user's choice and is
left to apply.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp

from orthorecall.validation import switched_on

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        program = jax.jit(lambda x: jnp.sum(x @ x, axis=-1), compiler_options=dict(options))
        program.lower(jnp.ones((4, 4), jnp.float32)).compile()
    except Exception as e:  # Any refusal means: compile with XLA's defaults.
        warnings.warn(
            f"XLA did not take the compiler options {dict(options)} ({e}); the library's "
            "steps compile with XLA's defaults.",
            stacklevel=3,
        )
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """The options for a step compiled for ``backend`` (default: JAX's), or None for
    XLA's defaults: off the CPU, when switched off, or when ``XLA_FLAGS`` sets them."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or not switched_on("ORTHORECALL_XLA_OPTIONS"):
        return None
    if YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    if not _accepted(tuple(sorted(CPU_OPTIONS.items()))):
        return None
    return dict(CPU_OPTIONS)


def jit(fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` with the library's ``compiler_options``."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
