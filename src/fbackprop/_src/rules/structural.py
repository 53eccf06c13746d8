"""Structural primitives (shape, layout, indexing): VJP and JVP rules side by side."""

from __future__ import annotations

import numpy as np
from jax import lax

from ..registry import defjvp, defvjp


def _broadcast_in_dim_vjp(ct, out, x, *_, shape, broadcast_dimensions, **__):
    # Sum over the dimensions the broadcast created or expanded from size 1.
    in_shape = np.shape(x)
    new_dims = tuple(d for d in range(len(shape)) if d not in broadcast_dimensions)
    expanded = tuple(d for i, d in enumerate(broadcast_dimensions)
                     if in_shape[i] == 1 and shape[d] != 1)
    summed = lax.reduce_sum(ct, new_dims + expanded) if new_dims + expanded else ct
    return summed.reshape(in_shape)


defvjp(lax.broadcast_in_dim_p, _broadcast_in_dim_vjp)
defjvp(lax.broadcast_in_dim_p,
       lambda t, out, x, *dyn, shape, broadcast_dimensions, sharding, **_:
       lax.broadcast_in_dim(t, shape, broadcast_dimensions))

defvjp(lax.reshape_p, lambda ct, out, x, *_, **__: ct.reshape(np.shape(x)))
defjvp(lax.reshape_p, lambda t, out, x, *_, new_sizes, **__: t.reshape(new_sizes))
