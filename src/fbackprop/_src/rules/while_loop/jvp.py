"""Forward mode of ``lax.while_loop``: the loop carries primals and tangents.

The tangents of the carries that can become nonzero (a fixpoint over the body,
as for ``scan``) ride along in the loop's carry; a loop whose condition is a
batch of booleans is first made a one-condition loop
(:func:`.common.scalar_predicate`).
"""

from __future__ import annotations

from jax import lax

from ... import compat
from ...engine import tangents as _forward
from ..control import _differentiable, _jvp_out_nonzero, _strong, _zeros
from .common import reorder, scalar_predicate


def while_jvp(eqn, invals, tangents):
    """Forward mode of ``lax.while_loop``: the loop carries primals and tangents."""
    scalar = scalar_predicate(eqn)
    invals, tangents = reorder(eqn, scalar, invals), reorder(eqn, scalar, tangents)
    eqn = scalar
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_closed, body_closed = p["cond_jaxpr"], p["body_jaxpr"]
    body = body_closed.jaxpr
    in_avals = [v.aval for v in body.invars]
    nz = [t is not None and _differentiable(a) for t, a in zip(tangents[cn:], in_avals)]
    while True:
        out_nz = _jvp_out_nonzero(body, body_closed.consts, in_avals, nz)
        new = nz[:bn] + [a or b for a, b in zip(nz[bn:], out_nz)]
        if new == nz:
            break
        nz = new
    cconsts, bconsts = list(invals[:cn]), list(invals[cn:cn + bn])
    bconst_t = [tangents[cn + i] if nz[i] else None for i in range(bn)]
    carry_nz = [k for k in range(len(in_avals) - bn) if nz[bn + k]]
    init_t = [_strong(tangents[cn + bn + k]) if tangents[cn + bn + k] is not None
              else _zeros(in_avals[bn + k]) for k in carry_nz]
    n_carry = len(in_avals) - bn

    def cond_fn(state):
        carry, _ = state
        return compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts, *cconsts, *carry)[0]

    def body_fn(state):
        carry, ts = state
        t_carry = [None] * n_carry
        for k, t in zip(carry_nz, ts):
            t_carry[k] = t
        outs, touts = _forward.jvp_jaxpr(body, body_closed.consts, bconsts + list(carry),
                                         bconst_t + t_carry)
        return list(outs), [_strong(touts[k]) if touts[k] is not None
                            else _zeros(in_avals[bn + k]) for k in carry_nz]

    with compat.user_context(eqn):
        carry, carry_t = lax.while_loop(cond_fn, body_fn, (list(invals[cn + bn:]), init_t))
    touts = [None] * n_carry
    for k, t in zip(carry_nz, carry_t):
        touts[k] = t
    return list(carry), touts
