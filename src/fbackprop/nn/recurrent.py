"""Elman RNN and GRU cells, and :func:`run_cell` to unroll one with ``lax.scan``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fbackprop import nn
  >>> p = nn.init_gru_cell(jax.random.key(0), input_size=3, hidden_size=8)
  >>> xs = jnp.ones((10, 4, 3))                        # (time, batch, features)
  >>> h_last, hs = nn.run_cell(nn.gru_cell, p, jnp.zeros((4, 8)), xs)
  >>> hs.shape
  (10, 4, 8)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import initializers
from .dense import dense, init_dense


def init_rnn_cell(key, input_size: int, hidden_size: int, *, dtype=jnp.float32) -> dict:
    """Parameters of ``h' = tanh(x W_x + h W_h + b)``."""
    kx, kh = jax.random.split(key)
    return {"x": init_dense(kx, input_size, hidden_size,
                            kernel_init=initializers.lecun_normal, dtype=dtype),
            "h": init_dense(kh, hidden_size, hidden_size, use_bias=False,
                            kernel_init=initializers.lecun_normal, dtype=dtype)}


def rnn_cell(params: dict, h, x, *, activation: Callable = jnp.tanh):
    """One Elman RNN step: returns the new hidden state ``(batch, hidden)``."""
    return activation(dense(params["x"], x) + dense(params["h"], h))


def init_gru_cell(key, input_size: int, hidden_size: int, *, dtype=jnp.float32) -> dict:
    """Parameters of a GRU cell (reset ``r``, update ``z`` and candidate ``n`` gates)."""
    keys = jax.random.split(key, 6)
    params = {}
    for i, gate in enumerate(("r", "z", "n")):
        params["x" + gate] = init_dense(keys[2 * i], input_size, hidden_size,
                                        kernel_init=initializers.lecun_normal, dtype=dtype)
        params["h" + gate] = init_dense(keys[2 * i + 1], hidden_size, hidden_size,
                                        kernel_init=initializers.lecun_normal, dtype=dtype)
    return params


def gru_cell(params: dict, h, x):
    """One GRU step (the PyTorch/cuDNN formulation).

    ``r = s(x W_xr + h W_hr)``, ``z = s(x W_xz + h W_hz)``,
    ``n = tanh(x W_xn + r * (h W_hn))``, ``h' = (1 - z) * n + z * h``.

    Args:
      params: from :func:`init_gru_cell`.
      h: hidden state ``(batch, hidden)``.
      x: input ``(batch, input_size)``.

    Returns:
      The new hidden state ``(batch, hidden)``.
    """
    r = jax.nn.sigmoid(dense(params["xr"], x) + dense(params["hr"], h))
    z = jax.nn.sigmoid(dense(params["xz"], x) + dense(params["hz"], h))
    n = jnp.tanh(dense(params["xn"], x) + r * dense(params["hn"], h))
    return (1.0 - z) * n + z * h


def run_cell(cell: Callable, params, h0, xs, *, reverse: bool = False, unroll: int = 1):
    """Runs ``cell(params, h, x)`` over the leading (time) axis of ``xs`` with ``lax.scan``.

    Args:
      cell: e.g. :func:`rnn_cell` or :func:`gru_cell`.
      params: the cell's parameters.
      h0: initial hidden state ``(batch, hidden)``.
      xs: inputs ``(time, batch, input_size)``.
      reverse: scan from the last time step to the first.
      unroll: ``lax.scan`` unroll factor.

    Returns:
      ``(h_last, hs)`` with ``hs`` of shape ``(time, batch, hidden)``.
    """

    def step(h, x):
        h = cell(params, h, x)
        return h, h

    return lax.scan(step, h0, xs, reverse=reverse, unroll=unroll)
