"""Structural primitives (shape, layout, indexing, sorting, pooling): VJP and JVP rules.

Almost everything here is linear in its array inputs (a reshape, a slice, a gather
with fixed indices...), so the VJP of each op is its transpose, written with
another structural op whose own rule lives in this file too; that keeps second
and higher orders closed:

    slice <-> pad              gather <-> scatter-add         split <-> concatenate
    dynamic_slice <-> dynamic_update_slice                   tile -> reduce_sum
    reduce_window_max -> select_and_scatter_add <-> select_and_gather_add

Integer inputs (indices, iota, the index output of argsort/top_k) carry no
gradient. A rule gets the primitive's parameters exactly as the equation holds
them and binds primitives directly where JAX's public wrapper would change the
meaning (e.g. ``lax.dynamic_slice`` wraps negative indices, the primitive clamps).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import compat
from ..engine.tangents import jvp_jaxpr
from ..registry import defjvp, defjvp_linear, defnondiff, defvjp, register_jvp, register_vjp

_PROMISE = lax.GatherScatterMode.PROMISE_IN_BOUNDS


# --------------------------------------------------------------------- helpers
def _dtype(x):
    return compat.typeof(x).dtype


def _zeros(shape, dtype):
    return lax.full(tuple(shape), 0, dtype)


def _zeros_like(x):
    return _zeros(np.shape(x), _dtype(x))


def _or_zeros(t, like):
    return _zeros_like(like) if t is None else t


def _dilate_shape(shape, dilation):
    return tuple(0 if d == 0 else 1 + r * (d - 1) for d, r in zip(shape, dilation))


# -------------------------------------------------- broadcasting and reshaping
def _broadcast_in_dim_vjp(ct, out, x, *, shape, broadcast_dimensions, **_):
    # Sum over the dimensions the broadcast created or expanded from size 1.
    in_shape = np.shape(x)
    new_dims = tuple(d for d in range(len(shape)) if d not in broadcast_dimensions)
    expanded = tuple(d for i, d in enumerate(broadcast_dimensions)
                     if in_shape[i] == 1 and shape[d] != 1)
    summed = lax.reduce_sum(ct, new_dims + expanded) if new_dims + expanded else ct
    return lax.reshape(summed, in_shape)


defvjp(lax.broadcast_in_dim_p, _broadcast_in_dim_vjp)
defjvp_linear(lax.broadcast_in_dim_p)


def _reshape_vjp(ct, out, x, *, dimensions, **_):
    # reshape(x, new_sizes, dimensions) == reshape(transpose(x, dimensions), new_sizes).
    if dimensions is None:
        return lax.reshape(ct, np.shape(x))
    permuted_shape = tuple(np.shape(x)[d] for d in dimensions)
    return lax.transpose(lax.reshape(ct, permuted_shape), tuple(np.argsort(dimensions)))


defvjp(lax.reshape_p, _reshape_vjp)
defjvp_linear(lax.reshape_p)

defvjp(lax.squeeze_p, lambda ct, out, x, **_: lax.reshape(ct, np.shape(x)))
defjvp_linear(lax.squeeze_p)

defvjp(lax.transpose_p, lambda ct, out, x, *, permutation:
       lax.transpose(ct, tuple(int(i) for i in np.argsort(permutation))))
defjvp_linear(lax.transpose_p)

defvjp(lax.rev_p, lambda ct, out, x, *, dimensions: lax.rev(ct, dimensions))
defjvp_linear(lax.rev_p)


def _tile_vjp(ct, out, x, *, reps):
    # Output index r * d + j along each axis holds x[j]: view the cotangent as
    # (r0, d0, r1, d1, ...) and sum the repetition axes.
    shape = np.shape(x)
    split_shape = tuple(k for pair in zip(reps, shape) for k in pair)
    return lax.reduce_sum(lax.reshape(ct, split_shape), tuple(range(0, 2 * len(shape), 2)))


defvjp(lax.tile_p, _tile_vjp)
defjvp_linear(lax.tile_p)


# ------------------------------------------------------- slicing and padding
def _slice_vjp(ct, out, x, *, start_indices, limit_indices, strides):
    # Transpose of a (strided) slice: put the cotangent back with zero padding,
    # strides becoming interior padding.
    shape = np.shape(x)
    if strides is None or all(s == 1 for s in strides):
        config = [(int(lo), int(d - hi), 0)
                  for lo, hi, d in zip(start_indices, limit_indices, shape)]
    else:
        real_limits = [lo if n == 0 else lo + 1 + (n - 1) * s
                       for lo, n, s in zip(start_indices, np.shape(ct), strides)]
        config = [(int(lo), int(d - hi), int(s - 1))
                  for lo, hi, d, s in zip(start_indices, real_limits, shape, strides)]
    return lax.pad(ct, np.zeros((), _dtype(ct)), config)


defvjp(lax.slice_p, _slice_vjp)
defjvp_linear(lax.slice_p)


def _unpad(ct, in_shape, padding_config):
    """The part of a pad output's cotangent that came from the operand."""
    # Negative low/high padding cropped the operand: pad the cotangent back with
    # zeros so every operand element has a position, then take every
    # (interior + 1)-th element.
    restore = [(max(-lo, 0), max(-hi, 0), 0) for lo, hi, _ in padding_config]
    if any(lo or hi for lo, hi, _ in restore):
        ct = lax.pad(ct, np.zeros((), _dtype(ct)), restore)
    starts = [max(lo, 0) for lo, _, _ in padding_config]
    steps = [interior + 1 for _, _, interior in padding_config]
    limits = [s if d == 0 else s + (d - 1) * k + 1 for s, d, k in zip(starts, in_shape, steps)]
    return lax.slice(ct, starts, limits, steps)


def _pad_vjp(ct, out, x, padding_value, *, padding_config, active):
    ct_x = _unpad(ct, np.shape(x), padding_config)
    ct_value = None
    if active[1]:
        # Every output element is either an operand element or the padding value.
        everything = tuple(range(np.ndim(ct)))
        ct_value = lax.sub(lax.reduce_sum(ct, everything), lax.reduce_sum(ct_x, everything))
    return [ct_x if active[0] else None, ct_value]


register_vjp(lax.pad_p, _pad_vjp, needs_active=True)
defjvp_linear(lax.pad_p)


def _concatenate_vjp(ct, out, *operands, dimension, active):
    cts, start = [], 0
    for x, a in zip(operands, active):
        size = np.shape(x)[dimension]
        cts.append(lax.slice_in_dim(ct, start, start + size, axis=dimension) if a else None)
        start += size
    return cts


register_vjp(lax.concatenate_p, _concatenate_vjp, needs_active=True)
defjvp_linear(lax.concatenate_p)


def _split_vjp(cts, outs, x, *, sizes, axis):
    return [lax.concatenate([_or_zeros(c, o) for c, o in zip(cts, outs)], axis)]


def _split_jvp(primals, tangents, *, sizes, axis):
    x, = primals
    t, = tangents
    return lax.split_p.bind(x, sizes=sizes, axis=axis), lax.split_p.bind(t, sizes=sizes, axis=axis)


register_vjp(lax.split_p, _split_vjp)
register_jvp(lax.split_p, _split_jvp)


def _stack_vjp(ct, out, *operands, axis, active):
    if all(active):
        return list(lax.unstack_p.bind(ct, axis=axis))
    return [lax.index_in_dim(ct, i, axis, keepdims=False) if a else None
            for i, a in enumerate(active)]


register_vjp(lax.stack_p, _stack_vjp, needs_active=True)
defjvp_linear(lax.stack_p)


def _unstack_vjp(cts, outs, x, *, axis):
    return [lax.stack_p.bind(*[_or_zeros(c, o) for c, o in zip(cts, outs)], axis=axis)]


def _unstack_jvp(primals, tangents, *, axis):
    x, = primals
    t, = tangents
    return lax.unstack_p.bind(x, axis=axis), lax.unstack_p.bind(t, axis=axis)


register_vjp(lax.unstack_p, _unstack_vjp)
register_jvp(lax.unstack_p, _unstack_jvp)


def _dynamic_slice_vjp(ct, out, x, *indices, slice_sizes, active):
    # The primitive clamps the start so the slice fits; dynamic_update_slice
    # clamps the same way, so the cotangent lands where the slice came from.
    return [lax.dynamic_update_slice_p.bind(_zeros_like(x), ct, *indices)] + \
        [None] * len(indices)


def _dynamic_slice_jvp(primals, tangents, *, slice_sizes):
    x, *indices = primals
    out = lax.dynamic_slice_p.bind(x, *indices, slice_sizes=slice_sizes)
    return out, lax.dynamic_slice_p.bind(tangents[0], *indices, slice_sizes=slice_sizes)


register_vjp(lax.dynamic_slice_p, _dynamic_slice_vjp, needs_active=True)
register_jvp(lax.dynamic_slice_p, _dynamic_slice_jvp)


def _dynamic_update_slice_vjp(ct, out, x, update, *indices, active):
    ct_x = ct_update = None
    if active[0]:
        ct_x = lax.dynamic_update_slice_p.bind(ct, _zeros_like(update), *indices)
    if active[1]:
        ct_update = lax.dynamic_slice_p.bind(ct, *indices, slice_sizes=np.shape(update))
    return [ct_x, ct_update] + [None] * len(indices)


def _dynamic_update_slice_jvp(primals, tangents, **params):
    x, update, *indices = primals
    t_x, t_update = tangents[:2]
    out = lax.dynamic_update_slice_p.bind(x, update, *indices)
    if t_x is None and t_update is None:
        return out, None
    return out, lax.dynamic_update_slice_p.bind(
        _or_zeros(t_x, x), _or_zeros(t_update, update), *indices)


register_vjp(lax.dynamic_update_slice_p, _dynamic_update_slice_vjp, needs_active=True)
register_jvp(lax.dynamic_update_slice_p, _dynamic_update_slice_jvp)


# ------------------------------------------------------------ gather / scatter
def _scatter_dnums_of(gather_dnums):
    return lax.ScatterDimensionNumbers(
        update_window_dims=gather_dnums.offset_dims,
        inserted_window_dims=gather_dnums.collapsed_slice_dims,
        scatter_dims_to_operand_dims=gather_dnums.start_index_map,
        operand_batching_dims=gather_dnums.operand_batching_dims,
        scatter_indices_batching_dims=gather_dnums.start_indices_batching_dims)


def _gather_of_scatter(scatter_dnums, operand_shape, updates_shape):
    """(gather dimension numbers, slice sizes) reading back what a scatter wrote."""
    dnums = lax.GatherDimensionNumbers(
        offset_dims=scatter_dnums.update_window_dims,
        collapsed_slice_dims=scatter_dnums.inserted_window_dims,
        start_index_map=scatter_dnums.scatter_dims_to_operand_dims,
        operand_batching_dims=scatter_dnums.operand_batching_dims,
        start_indices_batching_dims=scatter_dnums.scatter_indices_batching_dims)
    slice_sizes, pos = [], 0
    for i in range(len(operand_shape)):
        if i in scatter_dnums.inserted_window_dims or i in scatter_dnums.operand_batching_dims:
            slice_sizes.append(1)
        else:
            slice_sizes.append(updates_shape[scatter_dnums.update_window_dims[pos]])
            pos += 1
    return dnums, tuple(slice_sizes)


def _gather_scattered(ct, indices, updates, *, dimension_numbers, indices_are_sorted,
                      unique_indices, mode):
    """The cotangent at the positions a scatter wrote, shaped like its updates."""
    dnums, slice_sizes = _gather_of_scatter(dimension_numbers, np.shape(ct), np.shape(updates))
    return lax.gather(ct, indices, dnums, slice_sizes, indices_are_sorted=indices_are_sorted,
                      unique_indices=unique_indices, mode=mode, fill_value=0)


def _gather_vjp(ct, out, x, indices, *, dimension_numbers, slice_sizes, indices_are_sorted,
                unique_indices, mode, fill_value):
    # Transpose of a gather: add each gathered slice's cotangent back where it
    # was read from (repeated indices accumulate; dropped slices contribute nothing).
    return lax.scatter_add(_zeros_like(x), indices, ct, _scatter_dnums_of(dimension_numbers),
                           indices_are_sorted=indices_are_sorted,
                           unique_indices=unique_indices, mode=mode)


def _gather_jvp(t, out, x, indices, *, dimension_numbers, slice_sizes, indices_are_sorted,
                unique_indices, mode, fill_value):
    # Filled (out-of-bounds) slices are constants: their tangent is 0.
    return lax.gather(t, indices, dimension_numbers, slice_sizes,
                      indices_are_sorted=indices_are_sorted, unique_indices=unique_indices,
                      mode=mode, fill_value=0)


defvjp(lax.gather_p, _gather_vjp, None)
defjvp(lax.gather_p, _gather_jvp)


def _scatter_index_params(params):
    return dict(dimension_numbers=params["dimension_numbers"],
                indices_are_sorted=params["indices_are_sorted"],
                unique_indices=params["unique_indices"], mode=params["mode"])


def _scatter_add_vjp(ct, out, x, indices, updates, *, active, **params):
    ct_updates = None
    if active[2]:
        ct_updates = _gather_scattered(ct, indices, updates, **_scatter_index_params(params))
    return [ct if active[0] else None, None, ct_updates]


def _scatter_sub_vjp(ct, out, x, indices, updates, *, active, **params):
    ct_x, _, ct_updates = _scatter_add_vjp(ct, out, x, indices, updates, active=active, **params)
    return [ct_x, None, None if ct_updates is None else lax.neg(ct_updates)]


def _scatter_addsub_jvp(prim):
    def jvp(primals, tangents, **params):
        x, indices, updates = primals
        t_x, _, t_updates = tangents
        out = prim.bind(x, indices, updates, **params)
        if t_updates is None:
            return out, t_x
        return out, prim.bind(_or_zeros(t_x, x), indices, t_updates, **params)
    return jvp


register_vjp(lax.scatter_add_p, _scatter_add_vjp, needs_active=True)
register_jvp(lax.scatter_add_p, _scatter_addsub_jvp(lax.scatter_add_p))
register_vjp(lax.scatter_sub_p, _scatter_sub_vjp, needs_active=True)
register_jvp(lax.scatter_sub_p, _scatter_addsub_jvp(lax.scatter_sub_p))


def _require_unique(params, what):
    if not params["unique_indices"]:
        raise NotImplementedError(
            f"fbackprop: the derivative of scatter-mul with respect to its updates "
            f"({what}) is only implemented for unique indices (as in JAX): with repeated "
            f"indices several updates multiply the same element. Pass "
            f"`unique_indices=True` to `.at[...].multiply` if the indices are unique.")


def _scatter_mul_vjp(ct, out, x, indices, updates, *, active, **params):
    # out = x * prod(updates hitting each position); d out / d x is that product.
    ct_x = ct_updates = None
    if active[0]:
        ct_x = lax.scatter_mul_p.bind(ct, indices, updates, **params)
    if active[2]:
        _require_unique(params, "reverse mode")
        # With unique indices out = x * u at the written positions: d out / d u = x.
        ct_updates = _gather_scattered(lax.mul(ct, x), indices, updates,
                                       **_scatter_index_params(params))
    return [ct_x, None, ct_updates]


def _scatter_mul_jvp(primals, tangents, **params):
    x, indices, updates = primals
    t_x, _, t_updates = tangents
    out = lax.scatter_mul_p.bind(x, indices, updates, **params)
    total = None
    if t_x is not None:
        total = lax.scatter_mul_p.bind(t_x, indices, updates, **params)
    if t_updates is not None:
        _require_unique(params, "forward mode")
        term = lax.mul(x, lax.scatter_add(_zeros_like(x), indices, t_updates,
                                          **_scatter_index_params(params)))
        total = term if total is None else lax.add(total, term)
    return out, total


register_vjp(lax.scatter_mul_p, _scatter_mul_vjp, needs_active=True)
register_jvp(lax.scatter_mul_p, _scatter_mul_jvp)


def _scatter_winners(x, indices, updates, params):
    """Which operand elements survive a scatter and which updates win.

    With repeated indices one update overwrites the others (which one is up to
    the backend). Scattering distinct positive ids with the very same scatter
    and reading them back tells both: an operand element survives where the
    scattered id is 0, an update won where the id read back is its own.
    """
    dnums = params["dimension_numbers"]
    updates_shape = np.shape(updates)
    ids_shape = tuple(1 if d in dnums.update_window_dims else n
                      for d, n in enumerate(updates_shape))
    ids = lax.add(lax.reshape(lax.iota(np.int32, math.prod(ids_shape)), ids_shape),
                  np.int32(1))
    ids = lax.broadcast_in_dim(ids, updates_shape, tuple(range(len(updates_shape))))
    index_params = _scatter_index_params(params)
    scattered = lax.scatter(_zeros(np.shape(x), np.int32), indices, ids, **index_params)
    read_back = _gather_scattered(scattered, indices, ids, **index_params)
    return lax.eq(scattered, np.int32(0)), lax.eq(read_back, ids)


def _scatter_vjp(ct, out, x, indices, updates, *, active, **params):
    if params.get("update_jaxpr") is not None:
        raise NotImplementedError(
            "fbackprop: scatter with a custom update computation (scatter_apply) has no "
            "derivative rule (JAX has none either).")
    index_params = _scatter_index_params(params)
    ct_x = ct_updates = None
    if params["unique_indices"]:
        # Overwritten positions get zero, each update gets the cotangent where it landed.
        if active[0]:
            ct_x = lax.scatter(ct, indices, _zeros_like(updates), **index_params)
        if active[2]:
            ct_updates = _gather_scattered(ct, indices, updates, **index_params)
    else:
        survived, won = _scatter_winners(x, indices, updates, params)
        if active[0]:
            ct_x = lax.select(survived, ct, _zeros_like(ct))
        if active[2]:
            gathered = _gather_scattered(ct, indices, updates, **index_params)
            ct_updates = lax.select(won, gathered, _zeros_like(gathered))
    return [ct_x, None, ct_updates]


def _scatter_jvp(primals, tangents, **params):
    x, indices, updates = primals
    t_x, _, t_updates = tangents
    out = lax.scatter_p.bind(x, indices, updates, **params)
    if params.get("update_jaxpr") is not None:
        raise NotImplementedError(
            "fbackprop: scatter with a custom update computation (scatter_apply) has no "
            "derivative rule (JAX has none either).")
    t_x, t_updates = _or_zeros(t_x, x), _or_zeros(t_updates, updates)
    index_params = _scatter_index_params(params)
    if params["unique_indices"]:
        return out, lax.scatter(t_x, indices, t_updates, **index_params)
    # Keep only the surviving operand tangents and the winning update tangents,
    # then add (the positions no longer overlap).
    survived, won = _scatter_winners(x, indices, updates, params)
    t_x = lax.select(survived, t_x, _zeros_like(t_x))
    t_updates = lax.select(won, t_updates, _zeros_like(t_updates))
    return out, lax.scatter_add(t_x, indices, t_updates, **index_params)


register_vjp(lax.scatter_p, _scatter_vjp, needs_active=True)
register_jvp(lax.scatter_p, _scatter_jvp)


# --------------------------------------------------------------------- sorting
def _along_axis_dnums(ndim, axis):
    batch = tuple(d for d in range(ndim) if d != axis)
    gather = lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(axis,), start_index_map=(axis,),
        operand_batching_dims=batch, start_indices_batching_dims=batch)
    return gather, _scatter_dnums_of(gather)


def _take_along_axis(x, idx, axis):
    """out[..., i, ...] = x[..., idx[..., i, ...], ...]: a permutation or selection."""
    dnums, _ = _along_axis_dnums(np.ndim(x), axis)
    return lax.gather(x, lax.expand_dims(idx, (np.ndim(idx),)), dnums, (1,) * np.ndim(x),
                      mode=_PROMISE)


def _put_along_axis(ct, idx, axis, shape):
    """Transpose of ``_take_along_axis``: ct goes back to the positions idx names."""
    _, dnums = _along_axis_dnums(len(shape), axis)
    return lax.scatter_add(_zeros(shape, _dtype(ct)), lax.expand_dims(idx, (np.ndim(idx),)),
                           ct, dnums, unique_indices=True, mode=_PROMISE)


def _sort_permutation(operands, dimension, is_stable, num_keys):
    # The sort's permutation: sort an iota along as an extra, non-key operand.
    shape = np.shape(operands[0])
    iota = lax.broadcasted_iota(np.int32, shape, dimension)
    return lax.sort_p.bind(*operands, iota, dimension=dimension, is_stable=is_stable,
                           num_keys=num_keys)


def _sort_fwd(*operands, dimension, is_stable, num_keys):
    # Sort an iota along, so the permutation comes out of the forward sort itself.
    *outs, perm = _sort_permutation(operands, dimension, is_stable, num_keys)
    return outs, perm


def _sort_vjp(cts, outs, *operands, dimension, is_stable, num_keys, active, residuals):
    # Sorting permutes each operand the same way; the cotangent is permuted back.
    perm = residuals
    shape = np.shape(operands[0])
    return [None if (ct is None or not a) else _put_along_axis(ct, perm, dimension, shape)
            for ct, a in zip(cts, active)]


def _sort_jvp(primals, tangents, *, dimension, is_stable, num_keys):
    *outs, perm = _sort_permutation(primals, dimension, is_stable, num_keys)
    return outs, [None if t is None else _take_along_axis(t, perm, dimension)
                  for t in tangents]


register_vjp(lax.sort_p, _sort_vjp, needs_active=True, fwd=_sort_fwd)
register_jvp(lax.sort_p, _sort_jvp)


def _top_k_axis(params, x):
    return params.get("axis", np.ndim(x) - 1)


def _top_k_vjp(cts, outs, x, **params):
    ct_values = cts[0]
    if ct_values is None:
        return [None]
    return [_put_along_axis(ct_values, outs[1], _top_k_axis(params, x), np.shape(x))]


def _top_k_jvp(primals, tangents, **params):
    x, = primals
    t, = tangents
    values, idx = lax.top_k_p.bind(x, **params)
    return [values, idx], [_take_along_axis(t, idx, _top_k_axis(params, x)), None]


register_vjp(lax.top_k_p, _top_k_vjp)
register_jvp(lax.top_k_p, _top_k_jvp)


# approx_max_k / approx_min_k: like top_k, the values are a selection of the
# operand along the reduction dimension, named by the (distinct) index output.
def _approx_top_k_axis(x, reduction_dimension):
    return reduction_dimension % np.ndim(x)


def _approx_top_k_vjp(cts, outs, x, *, reduction_dimension, **_):
    ct_values = cts[0]
    if ct_values is None:
        return [None]
    return [_put_along_axis(ct_values, outs[1], _approx_top_k_axis(x, reduction_dimension),
                            np.shape(x))]


def _approx_top_k_jvp(primals, tangents, **params):
    x, = primals
    t, = tangents
    values, idx = lax.approx_top_k_p.bind(x, **params)
    axis = _approx_top_k_axis(x, params["reduction_dimension"])
    return [values, idx], [_take_along_axis(t, idx, axis), None]


register_vjp(lax.approx_top_k_p, _approx_top_k_vjp)
register_jvp(lax.approx_top_k_p, _approx_top_k_jvp)

defnondiff(lax.iota_p)


# -------------------------------------------------- windowed reductions (pooling)
def _reduce_window_sum_vjp(ct, out, x, *, window_dimensions, window_strides, padding,
                           base_dilation, window_dilation):
    # Each input element receives the sum of the cotangents of the windows that
    # contain it: dilate the cotangent by the strides, pad it so every input
    # position sees a full window, and sum windows again (the window of ones is
    # symmetric, so no flip is needed).
    in_shape = np.shape(x)
    lhs = _dilate_shape(in_shape, base_dilation)
    rhs = _dilate_shape(window_dimensions, window_dilation)
    out_dilated = _dilate_shape(np.shape(ct), window_strides)
    before = [r - lo - 1 for r, (lo, _) in zip(rhs, padding)]
    after = [l + r - 1 - o - b for l, r, o, b in zip(lhs, rhs, out_dilated, before)]
    config = [(int(b), int(a), int(s - 1)) for b, a, s in zip(before, after, window_strides)]
    padded = lax.pad(ct, np.zeros((), _dtype(ct)), config)
    ones = (1,) * len(in_shape)
    return lax.reduce_window_sum_p.bind(
        padded, window_dimensions=tuple(window_dimensions), window_strides=tuple(base_dilation),
        padding=((0, 0),) * len(in_shape), base_dilation=ones,
        window_dilation=tuple(window_dilation))


defvjp(lax.reduce_window_sum_p, _reduce_window_sum_vjp)
defjvp_linear(lax.reduce_window_sum_p)


def _chooser_identity(select_prim, dtype):
    return np.array(-np.inf if select_prim is lax.ge_p else np.inf, dtype)


def _scatter_to_selected(ct, x, select_prim, window_dimensions, window_strides, padding,
                         base_dilation, window_dilation):
    """Sends each window's cotangent to the element the window selected (max or min)."""
    if any(d != 1 for d in window_dilation):
        raise NotImplementedError(
            f"fbackprop: the VJP of max/min pooling (reduce_window_max/min, "
            f"select_and_gather_add) with window dilation {tuple(window_dilation)} is not "
            f"implemented (JAX does not implement it either). Use window_dilation=1.")
    has_base_dilation = any(d != 1 for d in base_dilation)
    if has_base_dilation:
        # Holes of the dilated input never win the selection.
        x = lax.pad(x, _chooser_identity(select_prim, _dtype(x)),
                    tuple((0, 0, d - 1) for d in base_dilation))
    result = lax.select_and_scatter_add_p.bind(
        ct, x, select_prim=select_prim, window_dimensions=tuple(window_dimensions),
        window_strides=tuple(window_strides), padding=tuple(map(tuple, padding)))
    if has_base_dilation:
        result = lax.slice(result, (0,) * np.ndim(result), np.shape(result), base_dilation)
    return result


def _check_real(name, x):
    # jnp.issubdtype: numpy alone does not count bfloat16 as a floating dtype.
    if not jnp.issubdtype(_dtype(x), jnp.floating):
        raise NotImplementedError(
            f"fbackprop: the derivative of {name} is implemented for real floating "
            f"inputs only, got {_dtype(x)}.")


def _window_chooser_rules(prim, select_prim):
    def vjp(ct, out, x, **params):
        _check_real(prim.name, x)
        return _scatter_to_selected(ct, x, select_prim, **params)

    def jvp(t, out, x, **params):
        # The output tangent is the tangent of the selected element of each window.
        _check_real(prim.name, x)
        return lax.select_and_gather_add_p.bind(t, x, select_prim=select_prim, **params)

    defvjp(prim, vjp)
    defjvp(prim, jvp)


_window_chooser_rules(lax.reduce_window_max_p, lax.ge_p)
_window_chooser_rules(lax.reduce_window_min_p, lax.le_p)


# select_and_scatter_add(source, operand): linear in source, piecewise constant in
# operand (the selection), so operand gets no gradient. Its transpose reads each
# window's selected element: select_and_gather_add, and vice versa.
def _select_and_scatter_add_vjp(ct, out, source, operand, *, select_prim, window_dimensions,
                                window_strides, padding):
    ones = (1,) * len(window_dimensions)
    return lax.select_and_gather_add_p.bind(
        ct, operand, select_prim=select_prim, window_dimensions=window_dimensions,
        window_strides=window_strides, padding=padding, base_dilation=ones,
        window_dilation=ones)


defvjp(lax.select_and_scatter_add_p, _select_and_scatter_add_vjp, None)
defjvp(lax.select_and_scatter_add_p,
       lambda t, out, source, operand, **params:
       lax.select_and_scatter_add_p.bind(t, operand, **params), None)

defvjp(lax.select_and_gather_add_p,
       lambda ct, out, tangents, operand, *, select_prim, **params:
       _scatter_to_selected(ct, operand, select_prim, **params), None)
defjvp(lax.select_and_gather_add_p,
       lambda t, out, tangents, operand, **params:
       lax.select_and_gather_add_p.bind(t, operand, **params), None)


def _reduce_window_vjp(cts, outs, *args, **params):
    raise NotImplementedError(
        "fbackprop: reverse mode through lax.reduce_window with a custom reducer (the "
        "generic `reduce_window` primitive) is not supported (JAX does not support it "
        "either). Use lax.add / lax.max / lax.min with their identity as init value "
        "(0, -inf, +inf), which become reduce_window_sum/max/min, or use forward mode.")


def _reduce_window_jvp(primals, tangents, *, jaxpr, consts, window_dimensions,
                       window_strides, padding, base_dilation, window_dilation):
    # Reduce (value, tangent) pairs with the reducer's own JVP (fbackprop's forward
    # sweep over the reducer's jaxpr).
    n = len(primals) // 2
    operands, inits = list(primals[:n]), list(primals[n:])
    if any(t is not None for t in tangents[n:]):
        raise NotImplementedError(
            "fbackprop: the JVP of reduce_window with a differentiated init value is not "
            "supported (JAX does not support it either); pass a constant init value.")
    operand_tangents = [_or_zeros(t, x) for t, x in zip(tangents[:n], operands)]
    init_tangents = [np.zeros((), _dtype(v)) for v in inits]

    def reducer(left, right):
        values, tans = jvp_jaxpr(jaxpr, consts, [*left[:n], *right[:n]],
                                 [*left[n:], *right[n:]])
        return (*values, *[_or_zeros(t, v) for t, v in zip(tans, values)])

    results = lax.reduce_window(tuple(operands + operand_tangents), tuple(inits + init_tangents),
                                reducer, window_dimensions, window_strides, padding,
                                base_dilation, window_dilation)
    return list(results[:n]), list(results[n:])


register_vjp(lax.reduce_window_p, _reduce_window_vjp)
register_jvp(lax.reduce_window_p, _reduce_window_jvp)


# ------------------------------------------------------------ identity-like ops
def _optimization_barrier_vjp(cts, outs, *primals):
    # The cotangents go through a barrier too, so the backward sweep keeps the
    # scheduling the barrier imposed (what rematerialization relies on).
    present = [i for i, c in enumerate(cts) if c is not None]
    passed = lax.optimization_barrier_p.bind(*[cts[i] for i in present])
    result = [None] * len(primals)
    for i, c in zip(present, passed):
        result[i] = c
    return result


def _optimization_barrier_jvp(primals, tangents):
    present = [i for i, t in enumerate(tangents) if t is not None]
    both = lax.optimization_barrier_p.bind(*primals, *[tangents[i] for i in present])
    outs, passed = list(both[:len(primals)]), both[len(primals):]
    out_tangents = [None] * len(primals)
    for i, t in zip(present, passed):
        out_tangents[i] = t
    return outs, out_tangents


register_vjp(lax.optimization_barrier_p, _optimization_barrier_vjp)
register_jvp(lax.optimization_barrier_p, _optimization_barrier_jvp)

defvjp(lax.sharding_constraint_p,
       lambda ct, out, x, **params: lax.sharding_constraint_p.bind(ct, **params))
defjvp_linear(lax.sharding_constraint_p)


def _device_put_vjp(cts, outs, *xs, devices, srcs, copy_semantics):
    # Send each cotangent back where its input came from; a fresh copy always
    # (the cotangent may be shared by other uses, so it is never donated).
    present = [i for i, c in enumerate(cts) if c is not None]
    if not present:
        return [None] * len(xs)
    copy = [type(copy_semantics[i]).ALWAYS_COPY for i in present]
    moved = lax.device_put_p.bind(
        *[cts[i] for i in present], devices=tuple(srcs[i] for i in present),
        srcs=tuple(devices[i] for i in present), copy_semantics=tuple(copy))
    result = [None] * len(xs)
    for i, c in zip(present, moved):
        result[i] = c
    return result


def _device_put_jvp(primals, tangents, *, devices, srcs, copy_semantics):
    outs = lax.device_put_p.bind(*primals, devices=devices, srcs=srcs,
                                 copy_semantics=copy_semantics)
    present = [i for i, t in enumerate(tangents) if t is not None]
    out_tangents = [None] * len(primals)
    if present:
        moved = lax.device_put_p.bind(
            *[tangents[i] for i in present], devices=tuple(devices[i] for i in present),
            srcs=tuple(srcs[i] for i in present),
            copy_semantics=tuple(copy_semantics[i] for i in present))
        for i, t in zip(present, moved):
            out_tangents[i] = t
    return list(outs), out_tangents


register_vjp(lax.device_put_p, _device_put_vjp)
register_jvp(lax.device_put_p, _device_put_jvp)
