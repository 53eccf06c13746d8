"""Specs for shape, layout, indexing, sorting and pooling primitives.

Many structural ops are linear, so their second derivative is zero; the order-2
specs wrap them in a nonlinearity (``sin``, a product) so that reverse-over-
reverse really runs the rules' own rules.
"""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from .common import Spec


def _uniform(rng, dtype, *shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, size=shape).astype(dtype)


def _with_int(shape, ints):
    """make_args: one float array of ``shape`` and a fixed int32 index array."""
    return lambda rng, dtype: (_uniform(rng, dtype, *shape), np.asarray(ints, np.int32))


def _with_update(shape, update_shape, ints):
    """make_args: operand, int32 indices, updates."""
    return lambda rng, dtype: (_uniform(rng, dtype, *shape), np.asarray(ints, np.int32),
                               _uniform(rng, dtype, *update_shape))


def _const(x, value):
    """A scalar of ``x``'s dtype (lax ops taking init/padding values need it exact)."""
    return jnp.asarray(value, x.dtype)


def _max_pool(window, strides, padding):
    return lambda x: lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)


def _sort_keys(rng, dtype):
    # First key with ties (broken by the second key), distinct values.
    k1 = rng.integers(0, 2, size=(3, 5)).astype(dtype)
    return (k1, _uniform(rng, dtype, 3, 5), _uniform(rng, dtype, 3, 5))


def _avg_pool_same(x):
    window, strides = (3, 3), (2, 2)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, "SAME")
    counts = lax.reduce_window(jnp.ones(x.shape, x.dtype), 0.0, lax.add, window, strides,
                               "SAME")
    return total * (1.0 / counts)


_POOL = dict(window_dimensions=(2, 2), window_strides=(2, 1), padding=((0, 1), (1, 0)))
_SINGLE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])

SPECS = [
    # -------------------------------------------------- broadcasting, reshaping
    Spec("broadcast_in_dim", lambda x: lax.sin(lax.broadcast_in_dim(x, (2, 3, 4), (1, 2)))),
    Spec("broadcast_in_dim_size1", lambda x: lax.broadcast_in_dim(x, (3, 4), (0, 1)) * 1.5,
         shapes=((1, 4),)),
    Spec("broadcast_scalar", lambda x: lax.sin(jnp.broadcast_to(x, (2, 3))), shapes=((),)),
    Spec("reshape", lambda x: lax.sin(x.reshape(2, 6))),
    Spec("reshape_dimensions", lambda x: lax.reshape(x, (2, 6), dimensions=(1, 0)) * 2.0),
    Spec("squeeze", lambda x: lax.sin(lax.squeeze(x, (0, 2))), shapes=((1, 3, 1, 4),)),
    Spec("expand_dims", lambda x: lax.sin(jnp.expand_dims(x, (0, 2)))),
    Spec("transpose", lambda x: lax.sin(jnp.transpose(x, (2, 0, 1))), shapes=((2, 3, 4),)),
    Spec("rev", lambda x: lax.rev(x, (0, 1)) * x),
    Spec("tile", lambda x: lax.sin(jnp.tile(x, (2, 3)))),
    # ---------------------------------------------------------------- slicing
    Spec("slice_columns", lambda x: lax.sin(x[:, 1:3])),
    Spec("slice_step", lambda x: x[::2] * x[1::2], shapes=((4, 3),)),
    Spec("slice_strided_2d", lambda x: lax.sin(x[1::2, ::3]), shapes=((5, 7),)),
    Spec("slice_negative_step", lambda x: lax.sin(x[::-2, 1:]), shapes=((5, 3),)),
    Spec("index_int", lambda x: x[1] * x[2]),
    Spec("dynamic_slice_traced_index",
         lambda x, i: lax.sin(lax.dynamic_slice(x, (i, i + 1), (2, 2))),
         make_args=_with_int((4, 5), 1)),
    Spec("dynamic_slice_clamped",
         lambda x, i: lax.sin(lax.dynamic_slice(x, (i, i), (2, 3))),
         make_args=_with_int((4, 5), 9)),
    Spec("dynamic_index_in_dim",
         lambda x, i: lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False) * 3.0,
         make_args=_with_int((4, 5), 2)),
    Spec("dynamic_update_slice",
         lambda x, i, u: lax.sin(lax.dynamic_update_slice(x, u, (i, i + 1))),
         make_args=_with_update((4, 5), (2, 3), 1)),
    Spec("dynamic_update_slice_clamped",
         lambda x, i, u: lax.dynamic_update_slice(x, u * u, (i, i)),
         make_args=_with_update((4, 5), (2, 2), 7)),
    # ---------------------------------------------------------------- padding
    Spec("pad", lambda x: lax.sin(lax.pad(x, _const(x, 0.0), ((1, 2, 0), (0, 1, 1))))),
    Spec("pad_negative_interior",
         lambda x: lax.sin(lax.pad(x, _const(x, 0.0), ((-1, 2, 1), (2, -3, 2))))),
    Spec("pad_traced_value",
         lambda x, v: lax.sin(lax.pad(x, v, ((1, -1, 1), (-1, 2, 0)))),
         shapes=((3, 4), ())),
    Spec("jnp_pad_constant", lambda x: jnp.pad(x, ((1, 1), (2, 0)), constant_values=0.5) * 2.0),
    Spec("jnp_pad_reflect", lambda x: lax.sin(jnp.pad(x, ((1, 1), (2, 0)), mode="reflect"))),
    # ------------------------------------------------- concatenate, split, stack
    Spec("concatenate", lambda x, y: lax.sin(jnp.concatenate([x, y, x], axis=1)),
         shapes=((3, 4), (3, 2))),
    Spec("split", lambda x: tuple(lax.sin(p) for p in jnp.split(x, [1, 3], axis=1)),
         shapes=((3, 5),)),
    Spec("split_one_used", lambda x: jnp.split(x, 3, axis=0)[1] * 2.0, shapes=((6, 2),)),
    Spec("stack", lambda x, y: lax.sin(jnp.stack([x, y, x], axis=1)),
         shapes=((3, 4), (3, 4))),
    Spec("unstack", lambda x: tuple(lax.sin(r) for r in jnp.unstack(x, axis=1))),
    Spec("unstack_one_used", lambda x: jnp.unstack(x)[2] * 2.0),
    # ---------------------------------------------------------------- gather
    Spec("fancy_index", lambda x, i: lax.sin(x[i]), make_args=_with_int((4, 3), [0, 2, 2, -1])),
    Spec("fancy_index_2d", lambda x, i: x[i, i[::-1]] * x[i, 0],
         make_args=_with_int((4, 4), [3, 1, 1, 0])),
    Spec("fancy_index_columns", lambda x, i: lax.sin(x[:, i]),
         make_args=_with_int((3, 5), [[4, 0], [1, 1]])),
    Spec("take_along_axis", lambda x, i: lax.sin(jnp.take_along_axis(x, i, axis=1)),
         make_args=_with_int((3, 4), [[0, 3], [2, 2], [1, 0]])),
    Spec("take_clip_out_of_bounds", lambda x, i: lax.sin(jnp.take(x, i, axis=1, mode="clip")),
         make_args=_with_int((3, 4), [0, 7, 3, 9])),
    Spec("take_fill_out_of_bounds",
         lambda x, i: lax.sin(jnp.take(x, i, axis=0, mode="fill", fill_value=0.5)),
         make_args=_with_int((3, 4), [1, 5, -7, 2])),
    Spec("get_promise_in_bounds",
         lambda x, i: lax.sin(x.at[i].get(mode="promise_in_bounds")),
         make_args=_with_int((5, 2), [4, 0, 4])),
    # ---------------------------------------------------------------- scatter
    Spec("at_add_repeated", lambda x, i, u: lax.sin(x.at[i].add(u)),
         make_args=_with_update((5, 3), (4, 3), [1, 3, 1, 0])),
    Spec("at_add_drop_out_of_bounds", lambda x, i, u: x.at[i].add(u * u, mode="drop"),
         make_args=_with_update((5,), (4,), [1, 9, 2, -9])),
    Spec("at_subtract", lambda x, i, u: lax.sin(x.at[i].subtract(u)),
         make_args=_with_update((5, 2), (3, 2), [4, 0, 4])),
    Spec("at_set_unique", lambda x, u: lax.sin(x.at[1].set(u)), shapes=((4, 3), (3,))),
    Spec("at_set_repeated", lambda x, i, u: lax.sin(x.at[i].set(u)),
         make_args=_with_update((5, 3), (4, 3), [1, 3, 1, 0])),
    Spec("at_set_drop_out_of_bounds", lambda x, i, u: x.at[i].set(u * u, mode="drop"),
         make_args=_with_update((5,), (4,), [1, 9, 2, 3])),
    Spec("at_set_columns", lambda x, i, u: lax.sin(x.at[:, i].set(u)),
         make_args=_with_update((3, 5), (3, 2), [4, 1])),
    Spec("at_multiply_unique", lambda x, u: lax.sin(x.at[2].multiply(u)), shapes=((4, 3), (3,))),
    Spec("at_multiply_repeated_operand_only",
         lambda x, i: lax.sin(x.at[i].multiply(1.5)),
         make_args=_with_int((5, 2), [0, 3, 0])),
    # ---------------------------------------------------------------- sorting
    Spec("sort", lambda x: jnp.sort(x, axis=1) * x),
    Spec("sort_axis0", lambda x: lax.sin(jnp.sort(x, axis=0)), shapes=((5, 3),)),
    Spec("argsort_take", lambda x: lax.sin(jnp.take_along_axis(x, jnp.argsort(x, axis=1), 1))),
    Spec("sort_key_val", lambda k, v: lax.sin(lax.sort((k, v), num_keys=1)[1]) * k,
         shapes=((3, 4), (3, 4))),
    Spec("sort_two_keys", lambda k1, k2, v: tuple(lax.sin(o) for o in
                                                  lax.sort((k1, k2, v), num_keys=2)),
         make_args=_sort_keys),
    Spec("sort_int_keys", lambda k, v: lax.sin(lax.sort((k, v), num_keys=1, is_stable=True)[1]),
         make_args=lambda rng, dtype: (rng.permutation(12).reshape(3, 4).astype(np.int32),
                                       _uniform(rng, dtype, 3, 4))),
    Spec("top_k", lambda x: lax.sin(lax.top_k(x, 2)[0]), shapes=((3, 5),)),
    Spec("top_k_with_indices", lambda x: lax.top_k(x, 3)[0] * lax.top_k(x, 3)[1], shapes=((6,),)),
    Spec("approx_max_k", lambda x: lax.sin(lax.approx_max_k(x, 2)[0]), shapes=((3, 5),)),
    Spec("approx_min_k_axis0",
         lambda x: lax.sin(lax.approx_min_k(x, 2, reduction_dimension=0)[0]) * 2.0,
         shapes=((4, 3),)),
    # ----------------------------------------------------------------- pooling
    Spec("max_pool_valid", lambda x: lax.sin(_max_pool((2, 2), (2, 2), "VALID")(x)),
         shapes=((4, 6),)),
    Spec("max_pool_same_strided", lambda x: lax.sin(_max_pool((3, 3), (2, 2), "SAME")(x)),
         shapes=((5, 5),)),
    Spec("max_pool_nhwc_same",
         lambda x: lax.sin(_max_pool((1, 3, 3, 1), (1, 2, 2, 1), "SAME")(x)),
         shapes=((2, 5, 5, 2),)),
    Spec("max_pool_nhwc_valid",
         lambda x: _max_pool((1, 2, 2, 1), (1, 2, 1, 1), "VALID")(x) * 2.0,
         shapes=((1, 4, 5, 2),)),
    Spec("max_pool_base_dilation",
         lambda x: lax.sin(lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 1), "SAME",
                                             base_dilation=(2, 1)))),
    # bfloat16 is a floating dtype for jnp but not for numpy's issubdtype.
    Spec("max_pool_bfloat16", lambda x: _max_pool((2, 2), (1, 1), "VALID")(x) * 2.0,
         shapes=((4, 5),), dtypes=("bfloat16",), order=1),
    Spec("min_pool", lambda x: lax.sin(lax.reduce_window(x, jnp.inf, lax.min, (2, 3), (1, 2),
                                                         "SAME")), shapes=((4, 5),)),
    Spec("avg_pool_valid",
         lambda x: lax.sin(lax.reduce_window(x, 0.0, lax.add, (2, 2), (2, 2), "VALID") * 0.25),
         shapes=((4, 6),)),
    Spec("avg_pool_same", lambda x: lax.sin(_avg_pool_same(x)), shapes=((5, 6),)),
    Spec("avg_pool_nhwc_same",
         lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 2, 2, 1), "SAME") * x[
             :, ::2, ::2, :], shapes=((2, 5, 5, 2),)),
    Spec("window_sum_dilated",
         lambda x: lax.sin(lax.reduce_window(x, 0.0, lax.add, (2, 2), (1, 2), ((1, 0), (0, 2)),
                                             base_dilation=(2, 1), window_dilation=(1, 2)))),
    Spec("select_and_scatter_add",
         lambda s, x: lax.sin(lax.select_and_scatter_add_p.bind(s, x, select_prim=lax.ge_p,
                                                                **_POOL)),
         shapes=((2, 4), (3, 4))),
    Spec("select_and_gather_add",
         lambda t, x: lax.sin(lax.select_and_gather_add_p.bind(
             t, x, select_prim=lax.le_p, base_dilation=(1, 1), window_dilation=(1, 1), **_POOL)),
         shapes=((3, 4), (3, 4))),
    Spec("reduce_window_generic_product",
         lambda x: lax.reduce_window(x, _const(x, 1.0), lax.mul, (2, 2), (1, 1), "VALID"),
         domain=(0.5, 1.5), order=1, modes=("fwd",)),
    Spec("reduce_window_generic_pair",
         lambda x, y: lax.reduce_window((x, y), (_const(x, -jnp.inf), _const(y, 0.0)),
                                        lambda a, b: (lax.max(a[0], b[0]),
                                                      a[1] * lax.sin(b[1])),
                                        (2, 2), (1, 1), "SAME"),
         shapes=((3, 4), (3, 4)), order=1, modes=("fwd",)),
    # ------------------------------------------------------- identity-like ops
    Spec("barrier_two_outputs",
         lambda x, y: tuple(lax.sin(o) for o in lax.optimization_barrier((x, y * 2.0))),
         shapes=((3, 4), (2,))),
    Spec("barrier_one_used",
         lambda x: lax.optimization_barrier((x, x * 3.0, 1))[1] * x),
    Spec("sharding_constraint",
         lambda x: lax.sin(lax.with_sharding_constraint(x, _SINGLE_DEVICE)) * x),
    Spec("device_put", lambda x: lax.sin(jax.device_put(x)) * jax.device_put(x, jax.devices()[0])),
]
