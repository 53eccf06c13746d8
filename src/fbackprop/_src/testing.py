"""Tolerances and comparison helpers shared by the tests and ``check_grads``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# (atol, rtol) per dtype, for comparing derivatives computed two ways.
TOLERANCES = {
    np.dtype("float64"): (1e-7, 1e-7),
    np.dtype("float32"): (1e-4, 1e-4),
    np.dtype("complex128"): (1e-7, 1e-7),
    np.dtype("complex64"): (1e-4, 1e-4),
    np.dtype(jnp.bfloat16): (5e-2, 5e-2),
    np.dtype("float16"): (1e-2, 1e-2),
}


def tolerance(dtype, override=None) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``; ``override`` maps dtype names to (atol, rtol)."""
    dtype = np.dtype(dtype)
    if override and dtype.name in override:
        return override[dtype.name]
    return TOLERANCES.get(dtype, (1e-4, 1e-4))


def assert_allclose(actual, expected, dtype=None, override=None, err_msg=""):
    """``np.testing.assert_allclose`` with the per-dtype default tolerance."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = dtype or expected.dtype
    atol, rtol = tolerance(dtype, override)
    np.testing.assert_allclose(actual.astype(np.complex128 if np.iscomplexobj(actual)
                                             else np.float64),
                               expected.astype(np.complex128 if np.iscomplexobj(expected)
                                               else np.float64),
                               atol=atol, rtol=rtol, err_msg=err_msg)
