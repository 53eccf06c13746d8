"""Reductions and cumulative ops: VJP and JVP rules side by side."""

from __future__ import annotations

import numpy as np
from jax import lax

from ..registry import defjvp, defvjp


def _reduce_sum_vjp(ct, out, x, *, axes, **_):
    shape = np.shape(x)
    kept = tuple(d for d in range(len(shape)) if d not in axes)
    return lax.broadcast_in_dim(ct, shape, kept)


defvjp(lax.reduce_sum_p, _reduce_sum_vjp)
defjvp(lax.reduce_sum_p, lambda t, out, x, *, axes, **_: lax.reduce_sum(t, axes))
