"""Reductions and cumulative ops: VJP and JVP rules side by side."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import compat
from .. import trace
from ..engine import sweeps as reverse_mode
from ..engine import tangents as forward_mode
from ..registry import (defjvp, defnondiff, defvjp, register_jvp, register_vjp,
                        zeros_like_aval)


def _kept_dims(ndim, axes):
    return tuple(d for d in range(ndim) if d not in axes)


def _expand(y, like, axes):
    """Broadcasts a reduced value ``y`` back over the reduced ``axes`` of ``like``."""
    return lax.broadcast_in_dim(y, np.shape(like), _kept_dims(np.ndim(like), axes))


# ------------------------------------------------------------------- reduce_sum
# Linear: the cotangent is copied to every summed position.
defvjp(lax.reduce_sum_p, lambda ct, out, x, *, axes, **_: _expand(ct, x, axes))
defjvp(lax.reduce_sum_p, lambda t, out, x, *, axes, **_: lax.reduce_sum(t, axes))


# ------------------------------------------------------------ reduce_max / _min
# The derivative of a max is an average over the positions that attain it:
# with m = [x == max(x)] (per reduced slice) and count = sum(m), the rule is
# dmax = sum(m * dx) / count, so ties share the cotangent equally, as in JAX.
def _chooser_locations(out, x, axes, dtype):
    at_extremum = lax.convert_element_type(lax.eq(x, _expand(out, x, axes)), dtype)
    return at_extremum, lax.reduce_sum(at_extremum, axes)


def _chooser_vjp(ct, out, x, *, axes, **_):
    locations, counts = _chooser_locations(out, x, axes, ct.dtype)
    return lax.mul(locations, _expand(lax.div(ct, counts), x, axes))


def _chooser_jvp(t, out, x, *, axes, **_):
    locations, counts = _chooser_locations(out, x, axes, t.dtype)
    return lax.div(lax.reduce_sum(lax.mul(t, locations), axes), counts)


for _prim in (lax.reduce_max_p, lax.reduce_min_p):
    defvjp(_prim, _chooser_vjp)
    defjvp(_prim, _chooser_jvp)


# ------------------------------------------------------------------ reduce_prod
# d prod(x) / d x_k = prod_{j != k} x_j. Dividing the product by x_k breaks at
# zeros, so the product of the others is formed directly as (exclusive prefix
# product) * (exclusive suffix product) along the flattened reduced axes. It is
# exact with any number of zeros and stays differentiable (cumprod has rules).
def _flatten_reduced(x, axes):
    """Moves ``axes`` to the front and flattens them: shape (n, *kept)."""
    kept = _kept_dims(np.ndim(x), axes)
    perm = tuple(axes) + kept
    shape = np.shape(x)
    n = int(np.prod([shape[d] for d in axes], dtype=np.int64))
    moved = x if perm == tuple(range(np.ndim(x))) else lax.transpose(x, perm)
    return lax.reshape(moved, (n,) + tuple(shape[d] for d in kept)), perm


def _unflatten_reduced(y, x, perm):
    shape = np.shape(x)
    y = lax.reshape(y, tuple(shape[d] for d in perm))
    inverse = tuple(int(i) for i in np.argsort(perm))
    return y if inverse == tuple(range(len(perm))) else lax.transpose(y, inverse)


def _product_of_others(flat):
    """For ``flat`` of shape (n, ...): out[k] = prod_{j != k} flat[j] along axis 0."""
    n = flat.shape[0]
    if n == 1:
        return lax.full_like(flat, 1)
    one = lax.full_like(lax.slice_in_dim(flat, 0, 1, axis=0), 1)
    before = lax.cumprod(lax.slice_in_dim(flat, 0, n - 1, axis=0), axis=0)
    after = lax.cumprod(lax.slice_in_dim(flat, 1, n, axis=0), axis=0, reverse=True)
    return lax.mul(lax.concatenate([one, before], 0), lax.concatenate([after, one], 0))


def _reduce_prod_vjp(ct, out, x, *, axes, **_):
    if np.size(x) == 0:
        return zeros_like_aval(x)
    flat, perm = _flatten_reduced(x, axes)
    others = _product_of_others(flat)
    ct_flat = lax.mul(lax.broadcast_in_dim(ct, others.shape, tuple(range(1, others.ndim))),
                      others)
    return _unflatten_reduced(ct_flat, x, perm)


def _reduce_prod_jvp(t, out, x, *, axes, **_):
    if np.size(x) == 0:
        return zeros_like_aval(out)
    flat, _ = _flatten_reduced(x, axes)
    t_flat, _ = _flatten_reduced(t, axes)
    return lax.reduce_sum(lax.mul(t_flat, _product_of_others(flat)), (0,))


defvjp(lax.reduce_prod_p, _reduce_prod_vjp)
defjvp(lax.reduce_prod_p, _reduce_prod_jvp)


# ------------------------------------------------------------------- cumsum
# Linear; its transpose sums the cotangent in the opposite direction.
defvjp(lax.cumsum_p, lambda ct, out, x, *, axis, reverse, **_:
       lax.cumsum(ct, axis=axis, reverse=not reverse))
defjvp(lax.cumsum_p, lambda t, out, x, *, axis, reverse, **_:
       lax.cumsum(t, axis=axis, reverse=reverse))


# ------------------------------------------ cumprod, cummax, cummin, cumlogsumexp
# These are differentiated through the parallel prefix scan that computes them
# (lax.associative_scan with the matching binary op), with fbackprop's own
# sweeps over its jaxpr: only slices, pads, concatenations and the binary op,
# each with its own rule. As that is also how JAX defines these derivatives,
# the conventions agree exactly: zeros in cumprod, ties in cummax/cummin (the
# max rule splits a tie evenly at each combine), and the overflow-free
# logaddexp in cumlogsumexp.
_COMBINE = {
    "cumprod": lax.mul,
    "cummax": lax.max,
    "cummin": lax.min,
    "cumlogsumexp": jnp.logaddexp,
}


@functools.lru_cache(maxsize=None)
def _prefix_scan(name: str, axis: int, reverse: bool):
    """The associative-scan definition of a cumulative primitive, as a function."""
    combine = _COMBINE[name]

    def scan(x):
        return lax.associative_scan(combine, x, axis=axis, reverse=reverse)

    scan.__name__ = f"{name}_prefix_scan"
    return scan


def _traced_prefix_scan(name, x, axis, reverse):
    fn = _prefix_scan(name, int(axis), bool(reverse))
    leaves, in_tree = jax.tree_util.tree_flatten(((x,), {}))
    return trace.trace_flat(fn, in_tree, leaves, what=fn.__name__).closed


def _cumulative_vjp(name):
    def rule(ct, out, x, *, axis, reverse, **_):
        closed = _traced_prefix_scan(name, x, axis, reverse)
        _, tape = reverse_mode.forward(closed.jaxpr, closed.consts, [x], [True])
        ct_x, = reverse_mode.backward(tape, [ct])
        return zeros_like_aval(x) if ct_x is None else ct_x
    rule.__name__ = f"_{name}_vjp"
    return rule


def _cumulative_jvp(name):
    def rule(primals, tangents, *, axis, reverse, **_):
        x, = primals
        t, = tangents
        closed = _traced_prefix_scan(name, x, axis, reverse)
        outs, out_tangents = forward_mode.jvp_jaxpr(closed.jaxpr, closed.consts, [x], [t])
        return outs[0], out_tangents[0]
    rule.__name__ = f"_{name}_jvp"
    return rule


for _prim in (lax.cumprod_p, lax.cummax_p, lax.cummin_p, lax.cumlogsumexp_p):
    defvjp(_prim, _cumulative_vjp(_prim.name))
    register_jvp(_prim, _cumulative_jvp(_prim.name))


# --------------------------------------------------------------- generic reduce
# lax.reduce with a computation other than a plain add/mul/max/min (a variadic
# argmax, logaddexp, a product with a twist...) binds the generic ``reduce``
# primitive. As JAX does, it is differentiated as the balanced tree of pairwise
# combinations that computes it: the reduced axes are flattened to the front,
# and the two halves are combined by the reducer applied elementwise (an odd
# half padded with the init value) until one row is left. Our own sweeps then
# differentiate that tree, whose jaxpr holds slices, pads and the reducer's ops.
@functools.lru_cache(maxsize=64)
def _reduce_tree(reducer, dimensions: tuple, n_operands: int):
    """``f(*operands, *init_values) -> outputs``: the tree form of a ``reduce``."""

    def tree(*args):
        operands, init_values = args[:n_operands], args[n_operands:]
        shape = np.shape(operands[0])
        kept = _kept_dims(len(shape), dimensions)
        kept_shape = tuple(shape[d] for d in kept)
        n = int(np.prod([shape[d] for d in dimensions], dtype=np.int64))
        if n == 0:
            return [lax.broadcast(i, kept_shape) for i in init_values]
        xs = [lax.reshape(x, (n,) + kept_shape, tuple(dimensions) + kept) for x in operands]

        def combine(*pair):
            return compat.eval_jaxpr(reducer.jaxpr, reducer.consts, *pair)
        for _ in range(len(kept) + 1):
            combine = jax.vmap(combine)
        while n > 1:
            half = (n + 1) // 2
            first = [lax.slice_in_dim(x, 0, half, axis=0) for x in xs]
            second = [lax.slice_in_dim(x, half, n, axis=0) for x in xs]
            if n % 2:
                config = [(0, 1, 0)] + [(0, 0, 0)] * len(kept)
                second = [lax.pad(x, i, config) for x, i in zip(second, init_values)]
            xs, n = list(combine(*first, *second)), half
        return [lax.squeeze(x, (0,)) for x in xs]

    tree.__name__ = "reduce_tree"
    return tree


def _traced_reduce_tree(args, jaxpr, dimensions):
    fn = _reduce_tree(jaxpr, tuple(int(d) for d in dimensions), len(args) // 2)
    leaves, in_tree = jax.tree_util.tree_flatten((tuple(args), {}))
    return trace.trace_flat(fn, in_tree, leaves, what=fn.__name__).closed


def _check_constant_init(tangents_or_active, n):
    if any(tangents_or_active[n:]):
        raise NotImplementedError(
            "fbackprop: the derivative of the generic lax.reduce with respect to its "
            "init values is not implemented (JAX has none either); pass constant init "
            "values (e.g. wrap them in lax.stop_gradient).")


def _reduce_vjp(cts, outs, *args, computation, jaxpr, dimensions, active):
    n = len(args) // 2
    _check_constant_init(active, n)
    closed = _traced_reduce_tree(args, jaxpr, dimensions)
    in_active = list(active[:n]) + [False] * n
    _, tape = reverse_mode.forward(closed.jaxpr, closed.consts, list(args), in_active)
    return reverse_mode.backward(tape, list(cts))


def _reduce_jvp(primals, tangents, *, computation, jaxpr, dimensions):
    n = len(primals) // 2
    _check_constant_init([t is not None for t in tangents], n)
    closed = _traced_reduce_tree(primals, jaxpr, dimensions)
    # The primal outputs come from the primitive itself (the tree's combination
    # order may round differently); the tangents from the tree.
    outs = lax.reduce_p.bind(*primals, computation=computation, jaxpr=jaxpr,
                             dimensions=dimensions)
    _, out_tangents = forward_mode.jvp_jaxpr(closed.jaxpr, closed.consts, list(primals),
                                             list(tangents))
    return list(outs), list(out_tangents)


register_vjp(lax.reduce_p, _reduce_vjp, needs_active=True)
register_jvp(lax.reduce_p, _reduce_jvp)


# ---------------------------------------------------------------- no gradient
# Index-valued and logical reductions: their outputs are integers or booleans.
defnondiff(lax.argmax_p, lax.argmin_p, lax.reduce_and_p, lax.reduce_or_p, lax.reduce_xor_p)
