"""2-D convolution and pooling on ``NCHW`` images (kernels ``OIHW``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fbackprop import nn
  >>> p = nn.init_conv2d(jax.random.key(0), in_channels=1, out_channels=8, kernel_size=3)
  >>> y = nn.conv2d(p, jnp.ones((2, 1, 8, 8)), padding="SAME")
  >>> nn.max_pool(y, window=2).shape
  (2, 8, 4, 4)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import initializers


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def init_conv2d(key, in_channels: int, out_channels: int, kernel_size, *,
                feature_group_count: int = 1, use_bias: bool = True,
                kernel_init: Callable = initializers.he_normal, dtype=jnp.float32) -> dict:
    """Kernel ``(out, in // groups, kh, kw)`` and bias ``(out,)`` of a 2-D convolution."""
    if in_channels % feature_group_count or out_channels % feature_group_count:
        raise ValueError(f"init_conv2d: channels ({in_channels} in, {out_channels} out) must "
                         f"be divisible by feature_group_count={feature_group_count}.")
    kh, kw = _pair(kernel_size)
    w_key, _ = jax.random.split(key)
    shape = (out_channels, in_channels // feature_group_count, kh, kw)
    params = {"w": kernel_init(w_key, shape, dtype)}
    if use_bias:
        params["b"] = jnp.zeros((out_channels,), dtype)
    return params


def conv2d(params: dict, x, *, stride=1, padding="SAME", dilation=1,
           feature_group_count: int = 1):
    """Applies a 2-D convolution to ``x`` of shape ``(batch, channels, height, width)``.

    Args:
      params: from :func:`init_conv2d`.
      x: ``NCHW`` array.
      stride: int or (sh, sw).
      padding: ``"SAME"``, ``"VALID"`` or ``[(lo, hi), (lo, hi)]``.
      dilation: kernel (rhs) dilation, int or pair.
      feature_group_count: grouped convolution (``in_channels`` for depthwise).

    Returns:
      ``NCHW`` array with ``out_channels`` channels.
    """
    w = params["w"].astype(x.dtype)
    y = lax.conv_general_dilated(x, w, window_strides=_pair(stride), padding=padding,
                                 rhs_dilation=_pair(dilation),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                 feature_group_count=feature_group_count)
    if "b" in params:
        y = y + params["b"].astype(x.dtype)[None, :, None, None]
    return y


def _pool(x, init, op, window, stride, padding):
    window, stride = _pair(window), _pair(stride if stride is not None else window)
    return lax.reduce_window(x, init, op, (1, 1) + window, (1, 1) + stride, padding)


def max_pool(x, window=2, stride=None, padding="VALID"):
    """Max over ``window`` patches of an ``NCHW`` array (stride defaults to window)."""
    # Python-scalar identities make JAX emit reduce_window_max / reduce_window_sum.
    return _pool(x, -jnp.inf, lax.max, window, stride, padding)


def avg_pool(x, window=2, stride=None, padding="VALID"):
    """Mean over ``window`` patches of an ``NCHW`` array (stride defaults to window)."""
    kh, kw = _pair(window)
    total = _pool(x, 0.0, lax.add, window, stride, padding)
    return total / jnp.asarray(kh * kw, x.dtype)
