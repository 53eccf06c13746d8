"""Weight initializers: ``init(key, shape, dtype) -> array``, always with an explicit key.

Fan-in/fan-out follow the usual conventions: for a dense kernel of shape
``(in, out)`` fan-in is ``in``; for a convolution kernel ``(out, in, kh, kw)``
(the ``OIHW`` layout used by :func:`fbackprop.nn.conv2d`) fan-in is ``in*kh*kw``.

Example:
  >>> import jax
  >>> from fbackprop.nn import initializers
  >>> w = initializers.he_normal(jax.random.key(0), (64, 32))
  >>> w.shape
  (64, 32)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a kernel shape: dense (in, out) or conv (out, in, *window)."""
    if len(shape) < 2:
        return max(shape[0], 1) if shape else 1, max(shape[0], 1) if shape else 1
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def zeros(key, shape, dtype=jnp.float32):
    """All zeros (``key`` is accepted for a uniform signature and ignored)."""
    del key
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype=jnp.float32):
    """All ones (``key`` is ignored)."""
    del key
    return jnp.ones(shape, dtype)


def normal(stddev: float = 1.0):
    """Returns an initializer drawing from N(0, stddev^2)."""

    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def uniform(scale: float = 1e-2):
    """Returns an initializer drawing from U(-scale, scale)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def glorot_uniform(key, shape, dtype=jnp.float32):
    """Glorot/Xavier uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def glorot_normal(key, shape, dtype=jnp.float32):
    """Glorot/Xavier normal: N(0, 2 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    return math.sqrt(2.0 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)


def he_normal(key, shape, dtype=jnp.float32):
    """He/Kaiming normal for ReLU networks: N(0, 2 / fan_in)."""
    fan_in, _ = _fans(shape)
    return math.sqrt(2.0 / fan_in) * jax.random.normal(key, shape, dtype)


def he_uniform(key, shape, dtype=jnp.float32):
    """He/Kaiming uniform: U(-a, a) with a = sqrt(6 / fan_in)."""
    fan_in, _ = _fans(shape)
    limit = math.sqrt(6.0 / fan_in)
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def lecun_normal(key, shape, dtype=jnp.float32):
    """LeCun normal: N(0, 1 / fan_in) (keeps activations' variance for tanh/GELU)."""
    fan_in, _ = _fans(shape)
    return math.sqrt(1.0 / fan_in) * jax.random.normal(key, shape, dtype)
