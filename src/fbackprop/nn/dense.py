"""Dense layers and multi-layer perceptrons as init/apply pairs over dict params.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fbackprop import nn
  >>> params = nn.init_mlp(jax.random.key(0), [64, 128, 10])
  >>> nn.mlp(params, jnp.ones((5, 64))).shape
  (5, 10)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from . import initializers


def init_dense(key, in_features: int, out_features: int, *, use_bias: bool = True,
               kernel_init: Callable = initializers.he_normal,
               bias_init: Callable = initializers.zeros, dtype=jnp.float32) -> dict:
    """Parameters of ``y = x @ w + b``.

    Args:
      key: a ``jax.random`` key.
      in_features: size of the last input dimension.
      out_features: size of the last output dimension.
      use_bias: whether to add a bias ``b``.
      kernel_init: ``init(key, shape, dtype)`` for ``w`` of shape ``(in, out)``.
      bias_init: initializer for ``b`` of shape ``(out,)``.
      dtype: parameter dtype.

    Returns:
      ``{"w": (in, out)}`` plus ``"b": (out,)`` when ``use_bias``.
    """
    w_key, b_key = jax.random.split(key)
    params = {"w": kernel_init(w_key, (in_features, out_features), dtype)}
    if use_bias:
        params["b"] = bias_init(b_key, (out_features,), dtype)
    return params


def dense(params: dict, x):
    """Applies a dense layer: ``x @ w + b`` over the last axis of ``x``.

    Args:
      params: from :func:`init_dense`.
      x: array ``(..., in_features)``.

    Returns:
      Array ``(..., out_features)`` in the dtype of ``x`` (parameters are cast to it,
      so bf16 activations compute in bf16 while float32 master weights stay float32).
    """
    w = params["w"]
    if w.shape[0] != x.shape[-1]:
        raise ValueError(f"dense: input has {x.shape[-1]} features (shape {x.shape}) but the "
                         f"kernel expects {w.shape[0]} (w shape {w.shape}); initialize the "
                         f"layer with in_features={x.shape[-1]}.")
    y = x @ w.astype(x.dtype)
    if "b" in params:
        y = y + _along_last_axis(params["b"].astype(x.dtype), y)
    return y


def init_mlp(key, sizes: Sequence[int], *, kernel_init: Callable = initializers.he_normal,
             dtype=jnp.float32) -> list[dict]:
    """Parameters of an MLP with layer widths ``sizes`` (input first, output last).

    Args:
      key: a ``jax.random`` key.
      sizes: e.g. ``[784, 512, 512, 10]`` for two hidden layers.
      kernel_init: initializer of every kernel.
      dtype: parameter dtype.

    Returns:
      A list of dense-layer parameter dicts, one per layer.
    """
    if len(sizes) < 2:
        raise ValueError(f"init_mlp needs at least an input and an output size, got {sizes}.")
    keys = jax.random.split(key, len(sizes) - 1)
    return [init_dense(k, n_in, n_out, kernel_init=kernel_init, dtype=dtype)
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params: Sequence[dict], x, *, activation: Callable = jax.nn.relu,
        final_activation: Callable | None = None):
    """Applies an MLP: dense -> activation for every layer but the last.

    Args:
      params: from :func:`init_mlp`.
      x: array ``(..., sizes[0])``.
      activation: nonlinearity between layers (``jax.nn.relu``, ``jax.nn.gelu``,
        ``jax.nn.sigmoid``, ``jnp.tanh``...).
      final_activation: optional nonlinearity after the last layer (default none,
        i.e. logits).

    Returns:
      Array ``(..., sizes[-1])``.
    """
    for layer in params[:-1]:
        x = activation(dense(layer, x))
    x = dense(params[-1], x)
    return x if final_activation is None else final_activation(x)


def _along_last_axis(v, like):
    """``v`` (shape ``(n,)``) shaped to broadcast over the last axis of ``like``
    explicitly, so the layers work under ``jax_numpy_rank_promotion='raise'``."""
    return jnp.reshape(v, (1,) * (jnp.ndim(like) - 1) + (-1,))
