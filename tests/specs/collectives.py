"""Collectives inside ``jax.shard_map`` (and the shard_map call itself), and psum/pmean
over a ``jax.vmap`` axis name.

Each spec wraps its collective in a ``shard_map`` over a 1-D mesh of every
available device, so the parametrized tests differentiate the whole mapped
function with fbackprop and with JAX. In the ordinary test process there is one
CPU device (axis size 1); tests/test_data_parallel.py re-runs these specs in a
subprocess with 8 simulated devices, where the collectives really communicate.
Inputs have a leading dimension of 8 so they split evenly over 1, 2, 4 or 8 devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from .common import Spec

AXIS = "i"
MESH = Mesh(np.array(jax.devices()), (AXIS,))
N = MESH.size


def smap(f, in_specs, out_specs, check_vma=True):
    return jax.shard_map(f, mesh=MESH, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)


def _shift(k):
    return [(j, (j + k) % N) for j in range(N)]


SPECS = [
    # psum with vma typing: psum_invariant (varying -> invariant) and its transpose pvary.
    Spec("shard_map_psum", smap(lambda x: lax.psum(jnp.sin(x) * x, AXIS), P(AXIS), P()),
         shapes=((8, 3),)),
    Spec("shard_map_pmean", smap(lambda x: lax.pmean(x * x, AXIS), P(AXIS), P()),
         shapes=((8, 3),)),
    # A replicated input used with a sharded one: pvary appears explicitly.
    Spec("shard_map_replicated_weight",
         smap(lambda w, x: lax.psum(jnp.sum(jnp.tanh(x * w[None, :]), 0), AXIS), (P(), P(AXIS)), P()),
         shapes=((3,), (8, 3))),
    Spec("shard_map_sharded_output",
         smap(lambda w, x: jnp.sin(x) * w[None, :], (P(), P(AXIS)), P(AXIS)), shapes=((3,), (8, 3))),
    # check_vma=False: the plain psum primitive (psum + broadcast; transpose is psum).
    Spec("shard_map_psum_no_vma",
         smap(lambda w, x: lax.psum(jnp.sum(x * w[None, :], 0), AXIS), (P(), P(AXIS)), P(),
              check_vma=False), shapes=((3,), (8, 3))),
    Spec("shard_map_pmean_no_vma",
         smap(lambda x: lax.pmean(jnp.exp(x), AXIS), P(AXIS), P(), check_vma=False),
         shapes=((8, 3),)),
    # all_gather <-> psum_scatter (reduce_scatter).
    Spec("shard_map_all_gather",
         smap(lambda x: lax.all_gather(x * x, AXIS), P(AXIS), P(AXIS)), shapes=((8, 3),)),
    Spec("shard_map_all_gather_tiled",
         smap(lambda x: jnp.sin(lax.all_gather(x, AXIS, axis=1, tiled=True)), P(AXIS),
              P(AXIS)), shapes=((8, 3),)),
    Spec("shard_map_psum_scatter",
         smap(lambda x: lax.psum_scatter(x * x, AXIS, scatter_dimension=0, tiled=True),
              P(None, AXIS), P(AXIS)), shapes=((8, 8),)),
    # ppermute: a ring shift; the transpose shifts back.
    Spec("shard_map_ppermute",
         smap(lambda x: lax.ppermute(jnp.sin(x), AXIS, perm=_shift(1)) * x, P(AXIS), P(AXIS)),
         shapes=((8, 3),)),
    Spec("shard_map_all_to_all",
         smap(lambda x: lax.all_to_all(x * x, AXIS, split_axis=1, concat_axis=0, tiled=True),
              P(AXIS), P(AXIS)), shapes=((8, 8),)),
    # axis_index has no gradient; it only scales here.
    Spec("shard_map_axis_index",
         smap(lambda x: x * x * (1.0 + lax.axis_index(AXIS)).astype(x.dtype), P(AXIS),
              P(AXIS)), shapes=((8, 3),)),
    # Under jax.vmap(..., axis_name=...), psum/pmean over the vmapped name are a psum
    # over a positional axis (no devices involved); its transpose broadcasts back.
    Spec("vmap_axis_name_psum",
         jax.vmap(lambda v: jnp.sin(lax.psum(v, "b")) * v, axis_name="b"), shapes=((4, 3),)),
    Spec("vmap_axis_name_pmean",
         jax.vmap(lambda v: v / lax.pmean(v * v + 1.0, "b"), axis_name="b"), shapes=((4, 3),)),
]
