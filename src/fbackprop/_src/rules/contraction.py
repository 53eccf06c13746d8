"""Contractions: dot_general and convolutions, VJP and JVP rules side by side.

Both primitives are bilinear, so their JVP is the sum of the primitive applied to
one tangent and the other primal, and each VJP is again a contraction of the
same kind: a ``dot_general`` for ``dot_general``, a ``conv_general_dilated`` for
``conv_general_dilated``. The cotangent layouts follow the ones XLA handles
without extra copies, so a compiled gradient costs what JAX's costs.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from ..registry import defjvp, defvjp


def _cast(x, dtype):
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _transpose(x, perm):
    perm = tuple(int(p) for p in perm)
    return x if perm == tuple(range(len(perm))) else lax.transpose(x, perm)


def _remaining(ndim, *removed):
    """The dimensions of an ``ndim`` array not in any of ``removed``, in order."""
    gone = {d for group in removed for d in group}
    return [d for d in range(ndim) if d not in gone]


def _consecutive_ranges(*lengths):
    """Splits ``range(sum(lengths))`` into consecutive tuples of the given lengths."""
    out, start = [], 0
    for n in lengths:
        out.append(tuple(range(start, start + n)))
        start += n
    return out


# ------------------------------------------------------------------ dot_general
# out[b, i, j] = sum_c x[b, i, c] y[b, j, c], where b are the batch dimensions,
# i the free dimensions of x, j those of y, c the contracting ones; the output
# lays out (batch, x free, y free). Hence
#   ct_x[b, i, c] = sum_j ct[b, i, j] y[b, j, c]
# is a dot_general of the cotangent with y that contracts the cotangent's
# y-free dimensions with y's free dimensions and batches over the batch
# dimensions; its result comes out as (batch, x free, c in y's order) and one
# transpose puts it in x's layout (XLA folds that transpose into the dot).
# ct_y is the same with the roles of x and y swapped, except that the cotangent
# holds y's free dimensions after x's.
def _dot_general_ct_operand(ct, x, y, *, x_is_lhs, dimension_numbers, precision,
                            preferred_element_type):
    """The cotangent of operand ``x`` of ``dot_general``; ``y`` is the other operand."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if x_is_lhs:
        x_contract, y_contract, x_batch, y_batch = lhs_contract, rhs_contract, lhs_batch, rhs_batch
    else:
        x_contract, y_contract, x_batch, y_batch = rhs_contract, lhs_contract, rhs_batch, lhs_batch
    x_free = _remaining(np.ndim(x), x_contract, x_batch)
    y_free = _remaining(np.ndim(y), y_contract, y_batch)
    if x_is_lhs:
        ct_batch, _, ct_y_free = _consecutive_ranges(len(x_batch), len(x_free), len(y_free))
    else:
        ct_batch, ct_y_free, _ = _consecutive_ranges(len(x_batch), len(y_free), len(x_free))
    dims = ((ct_y_free, tuple(y_free)), (ct_batch, tuple(y_batch)))
    # The result's trailing dimensions are y's remaining ones (its contracting
    # dimensions, in increasing order), i.e. x's contracting dimensions sorted
    # by their partner in y.
    x_contract_in_y_order = [x_contract[i] for i in np.argsort(y_contract)]
    result_axes = list(x_batch) + x_free + x_contract_in_y_order
    ct_x = lax.dot_general(ct, y, dims, precision=precision,
                           preferred_element_type=preferred_element_type)
    return _cast(_transpose(ct_x, np.argsort(result_axes)), x.dtype)


def _dot_general_vjp_lhs(ct, out, lhs, rhs, *, dimension_numbers, precision,
                         preferred_element_type, **_):
    return _dot_general_ct_operand(ct, lhs, rhs, x_is_lhs=True,
                                   dimension_numbers=dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)


def _dot_general_vjp_rhs(ct, out, lhs, rhs, *, dimension_numbers, precision,
                         preferred_element_type, **_):
    return _dot_general_ct_operand(ct, rhs, lhs, x_is_lhs=False,
                                   dimension_numbers=dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)


defvjp(lax.dot_general_p, _dot_general_vjp_lhs, _dot_general_vjp_rhs)
# Bilinear: d(x . y) = dx . y + x . dy, with the primal's own parameters.
defjvp(lax.dot_general_p,
       lambda t, out, lhs, rhs, **params: lax.dot_general_p.bind(t, rhs, **params),
       lambda t, out, lhs, rhs, **params: lax.dot_general_p.bind(lhs, t, **params))


# --------------------------------------------------------- conv_general_dilated
# In the canonical layout (lhs N C spatial, rhs O I spatial, out N O spatial),
# one spatial dimension, stride s, lhs dilation dl, rhs dilation dr, low
# padding lo, and no grouping:
#   out[n, o, y] = sum_{i, k} lhs[n, i, x] rhs[o, i, k]  over  x*dl = y*s + k*dr - lo.
#
# Cotangent of lhs. Substituting k = K-1-k' (the kernel flipped in space):
#   x*dl = y*s + ((K-1)*dr - lo) - k'*dr,
# so ct_lhs[n, i, x] = sum_{o, y, k'} ct[n, o, y] rev(rhs)[o, i, k'] is a
# convolution of the cotangent dilated by s (lhs dilation s), with the flipped
# kernel whose O and I roles swap, rhs dilation dr, window stride dl, and low
# padding (K-1)*dr - lo; the high padding makes the output exactly lhs's size.
#
# Cotangent of rhs. The same sum read with k free and n, y contracted:
#   ct_rhs[o, i, k] = sum_{n, y} lhs[n, i, x] ct[n, o, y]  over  x*dl = k*dr + y*s - lo,
# a convolution whose "batch" is lhs's feature dimension i, whose contracted
# "features" are the batch n, whose kernel is the cotangent (O = o, I = n,
# kernel dilation s), window stride dr, lhs dilation dl and low padding lo; the
# high padding makes the output exactly rhs's spatial size.
#
# Feature groups G (lhs C = G*I, out features = G*Og, group-major):
#   out[n, g*Og + o, .] = sum_i lhs[n, g*I + i, .] rhs[g*Og + o, i, .].
# For ct_lhs the kernel must map the G*Og cotangent features to G*I features in
# G groups: split rhs's O into (G, Og) and move G into I (major), then convolve
# with feature_group_count=G. For ct_rhs, lhs's feature dimension (the
# transposed convolution's batch) splits into G groups that each meet one group
# of the cotangent's features: that is batch_group_count=G.
# Batch groups B (lhs N = B*Nb, out N = Nb, out features B*Og, group-major):
#   out[n, b*Og + o, .] = sum_i lhs[b*Nb + n, i, .] rhs[b*Og + o, i, .].
# For ct_lhs the same kernel regrouping gives, with feature_group_count=B, an
# output whose features are (B, I) group-major; moving B into the batch
# dimension (major) gives lhs's layout. For ct_rhs, lhs's batch (the
# transposed convolution's features) splits into B groups each meeting one
# group of the cotangent's features: that is feature_group_count=B.
def _dilated(size, dilation):
    return 0 if size == 0 else 1 + dilation * (size - 1)


def _split_axis(x, axis, groups):
    """[..., G*n, ...] -> [..., G, n, ...] at ``axis``."""
    shape = list(np.shape(x))
    shape[axis:axis + 1] = [groups, shape[axis] // groups]
    return lax.reshape(x, tuple(shape))


def _merge_axis(x, src, dst):
    """Removes axis ``src`` and merges it into axis ``dst`` (numbered after the
    removal) as the major part: [.., G, .., n, ..] -> [.., G*n, ..]."""
    perm = [d for d in range(np.ndim(x)) if d != src]
    perm.insert(dst, src)
    x = _transpose(x, perm)
    shape = list(np.shape(x))
    shape[dst:dst + 2] = [shape[dst] * shape[dst + 1]]
    return lax.reshape(x, tuple(shape))


def _conv_sizes(lhs, rhs, ct, dimension_numbers):
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    return ([np.shape(lhs)[d] for d in lhs_spec[2:]],
            [np.shape(rhs)[d] for d in rhs_spec[2:]],
            [np.shape(ct)[d] for d in out_spec[2:]])


def _swap_first_two(spec):
    return (spec[1], spec[0]) + tuple(spec[2:])


def _conv_vjp_lhs(ct, out, lhs, rhs, *, window_strides, padding, lhs_dilation,
                  rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
                  precision, preferred_element_type, **_):
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    if np.size(lhs) == 0:
        return lax.full(np.shape(lhs), 0, lhs.dtype)
    groups = max(feature_group_count, batch_group_count)
    kernel = rhs
    if groups > 1:
        kernel = _split_axis(kernel, rhs_spec[0], groups)
        kernel = _merge_axis(kernel, rhs_spec[0], rhs_spec[1])
    kernel = _cast(lax.rev(kernel, tuple(rhs_spec[2:])), ct.dtype)
    lhs_sizes, kernel_sizes, out_sizes = _conv_sizes(lhs, rhs, ct, dimension_numbers)
    pads = []
    for n, k, o, s, (lo, _hi), dl, dr in zip(lhs_sizes, kernel_sizes, out_sizes,
                                             window_strides, padding, lhs_dilation,
                                             rhs_dilation):
        before = _dilated(k, dr) - 1 - lo
        after = _dilated(n, dl) + _dilated(k, dr) - 1 - _dilated(o, s) - before
        pads.append((int(before), int(after)))
    ct_lhs = lax.conv_general_dilated(
        ct, kernel, window_strides=tuple(lhs_dilation), padding=pads,
        lhs_dilation=tuple(window_strides), rhs_dilation=tuple(rhs_dilation),
        dimension_numbers=lax.ConvDimensionNumbers(
            tuple(out_spec), _swap_first_two(rhs_spec), tuple(lhs_spec)),
        feature_group_count=groups, batch_group_count=1, precision=precision,
        preferred_element_type=preferred_element_type)
    ct_lhs = _cast(ct_lhs, lhs.dtype)
    if batch_group_count > 1:
        ct_lhs = _split_axis(ct_lhs, lhs_spec[1], batch_group_count)
        ct_lhs = _merge_axis(ct_lhs, lhs_spec[1], lhs_spec[0])
    return ct_lhs


def _conv_vjp_rhs(ct, out, lhs, rhs, *, window_strides, padding, lhs_dilation,
                  rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
                  precision, preferred_element_type, **_):
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    if np.size(ct) == 0 or np.size(rhs) == 0:
        # Nothing flows back (and a convolution with an empty kernel is degenerate).
        return lax.full(np.shape(rhs), 0, rhs.dtype)
    lhs_sizes, kernel_sizes, out_sizes = _conv_sizes(lhs, rhs, ct, dimension_numbers)
    pads = []
    for n, k, o, s, (lo, _hi), dl, dr in zip(lhs_sizes, kernel_sizes, out_sizes,
                                             window_strides, padding, lhs_dilation,
                                             rhs_dilation):
        after = _dilated(o, s) - _dilated(n, dl) + _dilated(k, dr) - 1 - lo
        pads.append((int(lo), int(after)))
    if batch_group_count > 1:
        groups = dict(feature_group_count=batch_group_count, batch_group_count=1)
    else:
        groups = dict(feature_group_count=1, batch_group_count=feature_group_count)
    ct_rhs = lax.conv_general_dilated(
        _cast(lhs, ct.dtype), ct, window_strides=tuple(rhs_dilation), padding=pads,
        lhs_dilation=tuple(lhs_dilation), rhs_dilation=tuple(window_strides),
        dimension_numbers=lax.ConvDimensionNumbers(
            _swap_first_two(lhs_spec), _swap_first_two(out_spec), _swap_first_two(rhs_spec)),
        precision=precision, preferred_element_type=preferred_element_type, **groups)
    return _cast(ct_rhs, rhs.dtype)


defvjp(lax.conv_general_dilated_p, _conv_vjp_lhs, _conv_vjp_rhs)
# Bilinear: d conv(x, w) = conv(dx, w) + conv(x, dw), with the primal's parameters.
defjvp(lax.conv_general_dilated_p,
       lambda t, out, lhs, rhs, **params: lax.conv_general_dilated_p.bind(t, rhs, **params),
       lambda t, out, lhs, rhs, **params: lax.conv_general_dilated_p.bind(lhs, t, **params))
