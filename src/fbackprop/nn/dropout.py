"""Dropout with an explicit PRNG key (inverted dropout: kept units are scaled up).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fbackprop import nn
  >>> y = nn.dropout(jax.random.key(0), jnp.ones((1000,)), rate=0.5)
  >>> sorted(set(y.tolist()))
  [0.0, 2.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(key, x, rate: float, *, deterministic: bool = False):
    """Zeroes each element with probability ``rate`` and scales the rest by 1/(1-rate).

    Args:
      key: a ``jax.random`` key; use a fresh one per step (``jax.random.fold_in``).
      x: any array.
      rate: drop probability in ``[0, 1)``.
      deterministic: if true (evaluation), return ``x`` unchanged.

    Returns:
      Array like ``x``. The gradient flows only through kept units (times 1/(1-rate)).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}.")
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
