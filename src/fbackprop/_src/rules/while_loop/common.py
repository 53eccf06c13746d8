"""What the while-loop handlers share: the loop-state helpers, and a loop whose
condition is a batch of booleans (``vmap`` of a loop) as a one-condition loop.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ... import compat, residuals


def like(xs, avals):
    """``xs`` with the weak types of ``avals`` (loop carries must keep their types)."""
    return [compat.with_weak_type(x, bool(getattr(a, "weak_type", False)))
            for x, a in zip(xs, avals)]


def nbytes(aval) -> int:
    """Bytes of a value of type ``aval``."""
    # (``dtype.itemsize`` covers extended dtypes too, e.g. PRNG keys.)
    return int(np.prod(aval.shape, dtype=np.int64)) * int(aval.dtype.itemsize)


def reorder(eqn, scalar, xs):
    """The inputs ``xs`` of ``eqn`` (or their activities, tangents) as the inputs
    of ``scalar = scalar_predicate(eqn)``: the cond's constants are also the
    first body constants."""
    if scalar is eqn:
        return list(xs)
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    return list(xs[:cn]) + list(xs[:cn + bn]) + list(xs[cn + bn:])


_scalar_pred_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scalar_predicate(eqn):
    """A ``while`` whose cond returns a batch of booleans (what ``vmap`` of a loop
    with a batched condition makes: it runs while any is true, and a carry
    element changes only while its own condition holds) as a loop with one
    boolean: the body selects, per element, the new or the old carry, so
    finished elements are left as they are and get the identity's derivative.

    Returns ``eqn`` unchanged when its cond returns one boolean; otherwise an
    equation over ``(cond consts, cond consts + body consts, carry)``: its body
    reads the cond's constants too (they decide the selection; no cotangent
    reaches them through a boolean).
    """
    p = eqn.params
    cond_closed, body_closed = p["cond_jaxpr"], p["body_jaxpr"]
    if not cond_closed.jaxpr.outvars[0].aval.shape:
        return eqn
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    per = _scalar_pred_cache.setdefault(body_closed.jaxpr, {})
    hit = per.get(id(cond_closed.jaxpr))
    if hit is None or hit[0] is not cond_closed:
        c_avals = [v.aval for v in cond_closed.jaxpr.invars[:cn]]
        b_avals = [v.aval for v in body_closed.jaxpr.invars[:bn]]
        k_avals = [v.aval for v in body_closed.jaxpr.invars[bn:]]

        def pred_of(cconsts, carry):
            return compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts, *cconsts,
                                     *carry)[0]

        def cond(*args):
            return jnp.any(pred_of(args[:cn], args[cn:]))

        def body(*args):
            cconsts, bconsts, carry = args[:cn], args[cn:cn + bn], args[cn + bn:]
            pred = pred_of(cconsts, carry)
            new = compat.eval_jaxpr(body_closed.jaxpr, body_closed.consts, *bconsts, *carry)
            return [lax.select(lax.broadcast_in_dim(pred, jnp.shape(x), tuple(range(pred.ndim))),
                               y, x) for y, x in zip(like(new, k_avals), carry)]

        spec = residuals.spec_of
        new_cond = jax.make_jaxpr(cond)(*map(spec, c_avals + k_avals))
        new_body = jax.make_jaxpr(body)(*map(spec, c_avals + b_avals + k_avals))
        hit = per[id(cond_closed.jaxpr)] = (cond_closed, new_cond, new_body)
    _, new_cond, new_body = hit
    invars = list(eqn.invars)
    return eqn.replace(
        invars=invars[:cn] + invars[:cn + bn] + invars[cn + bn:],
        params=dict(p, cond_jaxpr=new_cond, body_jaxpr=new_body, body_nconsts=cn + bn))
