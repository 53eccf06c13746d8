"""Layer normalization as an init/apply pair.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fbackprop import nn
  >>> p = nn.init_layer_norm(16)
  >>> y = nn.layer_norm(p, jnp.arange(32.0).reshape(2, 16))
  >>> [abs(round(float(v), 3)) for v in y.mean(-1)]
  [0.0, 0.0]
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .dense import _along_last_axis


def init_layer_norm(features: int, *, dtype=jnp.float32) -> dict:
    """Scale (ones) and offset (zeros) of a layer norm over ``features``."""
    return {"scale": jnp.ones((features,), dtype), "bias": jnp.zeros((features,), dtype)}


def layer_norm(params: dict, x, *, eps: float = 1e-5):
    """Normalizes ``x`` over its last axis, then scales and shifts.

    ``y = (x - mean) / sqrt(var + eps) * scale + bias``. Statistics are computed in
    float32 even for bf16/f16 inputs (their sums lose too much precision), and the
    result is returned in the input dtype.

    Args:
      params: from :func:`init_layer_norm`.
      x: array ``(..., features)``.
      eps: added to the variance for numerical stability.

    Returns:
      Array with the shape and dtype of ``x``.
    """
    dtype = x.dtype
    x32 = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    y = centered * lax.rsqrt(var + eps)
    y = (y * _along_last_axis(params["scale"].astype(y.dtype), y)
         + _along_last_axis(params["bias"].astype(y.dtype), y))
    return y.astype(dtype)
