"""The precision of the model's float32 matrix products: an explicit choice.

JAX's default precision lets accelerators trade accuracy for speed: on NVIDIA GPUs
float32 products run as TensorFloat-32 (10-bit mantissas), on TPUs as one bfloat16
pass. The reference computes in float32, and the Newton–Schulz read is sensitive to
it (emulated on the ns5 reference checkpoint: training gradients 0.3% off with TF32,
2.8% with bfloat16, 29% for the input-gate bias), so the model asks for float32
products unless told otherwise (``CellConfig.matmul_precision``):

* ``"highest"`` (default): float32 (``Precision.HIGHEST``), as the reference.
* ``"tensorfloat32"``: ``Precision.HIGH``: TF32 on NVIDIA GPUs, three bfloat16 passes
  on TPUs.
* ``"bfloat16"``: ``Precision.DEFAULT``, one bfloat16 pass on TPUs (NVIDIA GPUs run
  DEFAULT as TF32).
* ``"default"``: whatever the backend does without being asked (also ``DEFAULT``).

CPUs compute float32 products in float32 whatever is asked. The choice is applied as
JAX's ``default_matmul_precision`` around the cell and the model, so it reaches every
product they trace, their autodiff transposes (which inherit it), and the custom VJPs
of the reads, which record the precision in force when their forward is traced
(``current()``) and run their backward under it (``scope``).
"""

from __future__ import annotations

import contextlib

import jax

# Names jax.default_matmul_precision takes as they are.
MATMUL_PRECISIONS = ("highest", "tensorfloat32", "bfloat16", "default")


def check_matmul_precision(value: object) -> str:
    """Returns ``value`` if it is one of ``MATMUL_PRECISIONS``; raises ValueError otherwise."""
    if not isinstance(value, str) or value not in MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision must be one of {MATMUL_PRECISIONS} ('highest' = float32, "
            f"as the reference), got {value!r}."
        )
    return value


def matmul_precision(name: str):
    """A context in which the products JAX traces have the precision ``name``."""
    return jax.default_matmul_precision(check_matmul_precision(name))


def current() -> str | None:
    """JAX's default matmul precision in force now (None: the backend's default); custom
    VJPs keep it as a static argument so that their backward runs under it too."""
    return jax.config.jax_default_matmul_precision


def scope(jax_precision: str | None):
    """Re-enters a precision recorded by ``current()`` (nothing to enter for None)."""
    if jax_precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(jax_precision)
