"""Control flow: scan, cond/switch, while_loop (and fori_loop, which lowers to them).

Reverse mode of a loop or a branch needs the backward sweep of its body as a
program to run inside a reverse ``lax.scan`` or the taken branch of a
``lax.switch``. We get it from :mod:`fbackprop._src.residuals`: our own forward
and backward sweeps over the body, traced together into one jaxpr and split
by data dependence into a forward part (what the outputs need) and a backward
part (everything else the cotangents need), with the residuals in between.

``scan`` - residual strategy: **save per-step body residuals.** The forward is
a ``lax.scan`` of the forward part that also emits, stacked over the steps,
the body values its backward part reads (for a checkpointed body: only what
the checkpoint policy keeps, i.e. by default just the body inputs). Residuals
that already exist outside the loop are not copied: a per-step residual that is
an ``xs`` slice or a ``ys`` output is read from the stacked array, a
loop-invariant one (a function of the scan's constants only) is recomputed in
the backward body instead of being stacked. The backward is a ``lax.scan`` in
the opposite direction whose carry holds the carry cotangents and the running
sums of the constants' cotangents, and whose outputs are the ``xs``
cotangents. Integer carries (loop counters) carry no cotangent; symbolic zero
output cotangents are made inside the backward body, never stacked. (The other
strategy, keeping only the per-step carries and recomputing the body in the
backward loop, is what a checkpointed body gives: ``lax.scan(jax.checkpoint(
body), ...)``.) Compiled memory against ``jax.grad``: tests/test_memory.py.
Inside a region planned for a memory budget (``fb.checkpoint(...,
memory_budget=...)``, :mod:`fbackprop._src.memplan`) the plan chooses which
body values are stacked and which recomputed in every backward step, and may
run the scan as segments of steps planned differently.

``cond``/``switch`` - the branch index is a residual; each branch keeps its own
residuals, laid out in shared slots (one slot per shape/dtype per branch
position); the backward is a ``lax.switch`` running only the taken branch's
backward part.

``while_loop`` - forward mode only; reverse mode raises an error naming
``fori_loop`` with static bounds (which lowers to ``scan``) and ``scan``.

(The markers checkpointing uses have their rules with their families:
``checkpoint_name`` in debug.py, ``optimization_barrier`` in structural.py.)
"""

from __future__ import annotations

import weakref
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import compat, context, residuals, trace
from ..engine import tangents as _forward
from ..registry import (call_handlers_forward, call_handlers_reverse,
                        is_differentiable_dtype, nondiff_primitives)


def _differentiable(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


def _zeros(aval):
    # One broadcast of a literal zero (what jnp.zeros stages, without its
    # argument handling: loop bodies make many of these).
    return lax.broadcast_in_dim(np.zeros((), aval.dtype), tuple(aval.shape), ())


def _strong(x):
    """``x`` without a weak type, so branch outputs and loop carries agree."""
    return compat.with_weak_type(x, False)


def _is_var(v) -> bool:
    return type(v) is not compat.Literal and type(v) is not compat.DropVar



# ============================================================== stepped sweeps
# While a tool steps the sweeps (``context.steps``: fb.explain, fb.checked_grad)
# the handlers run each step of a scan, each branch of a cond, ... in place, so
# observers see every equation of a body with the step it ran in. Unrolling
# costs compile time in proportion to steps x body size, so larger loops and
# branches run as a whole.
UNROLL_LIMIT = 20_000          # equations (body size x steps) a stepped loop may unroll to


def unrolled_size(jaxpr) -> int:
    """Equations of ``jaxpr`` with every scan unrolled (sub-jaxprs counted)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        if eqn.primitive.name == "scan":
            n += eqn.params["length"] * unrolled_size(eqn.params["jaxpr"].jaxpr)
        else:
            n += sum(unrolled_size(sub) for sub in trace.sub_jaxprs(eqn))
    return n


def short_where(eqn) -> str:
    """``file.py:12``: an equation's source line without folders or function."""
    return compat.source_line(eqn).split(" (")[0].rsplit("/", 1)[-1]


_nonzero_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _jvp_out_nonzero(jaxpr, consts, in_avals, nonzero):
    """Which outputs of ``jaxpr`` get a nonzero tangent from the given inputs'
    (traced once per jaxpr and pattern, so nested loops do not re-trace)."""
    n = len(in_avals)
    nz_idx = [i for i in range(n) if nonzero[i] and _differentiable(in_avals[i])]
    key = (tuple(nz_idx), tuple((tuple(a.shape), a.dtype) for a in in_avals))
    per = _nonzero_cache.setdefault(jaxpr, {})
    if key in per:
        return per[key]
    cell = {}

    def f(*args):
        primals, ts = list(args[:n]), iter(args[n:])
        tangents = [next(ts) if i in nz_idx else None for i in range(n)]
        outs, touts = _forward.jvp_jaxpr(jaxpr, consts, primals, tangents)
        cell["nz"] = [t is not None for t in touts]
        return outs

    jax.make_jaxpr(f)(*[residuals.spec_of(a) for a in in_avals],
                      *[residuals.spec_of(in_avals[i], False) for i in nz_idx])
    per[key] = cell["nz"]
    return cell["nz"]


# ================================================================= while_loop
def _active_outputs(jaxpr, in_active):
    """Conservative activity: an output is active if it depends, through
    primitives that carry gradients, on an active input."""
    active = {v for v, a in zip(jaxpr.invars, in_active) if a and _differentiable(v.aval)}
    for e in jaxpr.eqns:
        if e.primitive.name in nondiff_primitives:
            continue
        if any(_is_var(v) and v in active for v in e.invars):
            active.update(v for v in e.outvars if _is_var(v) and _differentiable(v.aval))
    return [_is_var(v) and v in active for v in jaxpr.outvars]


class WhileCall:
    """Reverse mode of ``lax.while_loop``: an error when a carry is differentiated."""

    def forward(self, eqn, invals, active):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        body = p["body_jaxpr"].jaxpr
        carry_active = [bool(a) for a in active[cn + bn:]]
        while True:
            out = _active_outputs(body, list(active[cn:cn + bn]) + carry_active)
            new = [a or b for a, b in zip(carry_active, out)]
            if new == carry_active:
                break
            carry_active = new
        outvals = compat.bind_eqn(eqn, invals)
        # The error waits for a cotangent to reach the loop (none does through
        # stop_gradient, or when the loop's outputs are not used).
        return outvals, eqn, [a and _differentiable(v.aval)
                              for a, v in zip(carry_active, eqn.outvars)]

    def backward(self, record, cts_out):
        raise ValueError(
            f"Reverse-mode differentiation does not work for lax.while_loop or "
            f"lax.fori_loop with dynamic start/stop values (the loop at "
            f"{compat.source_line(record.eqn)}): its number of iterations is only known "
            f"at run time, so the values each iteration needs for the backward sweep "
            f"cannot be laid out in advance. Use lax.fori_loop with static Python int "
            f"bounds (it lowers to lax.scan, which fbackprop differentiates), or lax.scan "
            f"with a fixed length. Forward mode (fbackprop.jvp) does work on while_loop.")

    # --------------------------------------------------- observed path (tools)
    def evaluate(self, eqn, invals):
        """A loop nothing differentiates, while a tool steps the sweeps: the body
        runs equation by equation inside the loop, and each observer's
        ``watch_while(eqn)`` (``None``, or an object with ``init``, ``step(state,
        i, env) -> state`` and ``finish(state)``) carries its state through the
        iterations (``env``: the body's variables and their values in iteration
        ``i``). ``None`` (the loop is bound as it is) when nothing watches it."""
        if not context.steps("all", linear_ok=True):
            return None
        p = eqn.params
        body_closed, cond_closed = p["body_jaxpr"], p["cond_jaxpr"]
        body = body_closed.jaxpr
        if body.effects or cond_closed.jaxpr.effects or unrolled_size(body) > UNROLL_LIMIT:
            return None
        watches = [w for obs in context.current().observers
                   for w in [getattr(obs, "watch_while", lambda eqn: None)(eqn)]
                   if w is not None]
        if not watches:
            return None
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts = list(invals[:cn]), list(invals[cn:cn + bn])

        def weak(x, v):
            return compat.with_weak_type(x, bool(getattr(v.aval, "weak_type", False))) \
                if hasattr(x, "dtype") else x

        def body_fn(state):
            carry, i, states = state
            env = dict(zip(body.constvars, body_closed.consts))
            env.update(zip(body.invars, bconsts + list(carry)))
            for e in body.eqns:
                ins = [v.val if type(v) is compat.Literal else env[v] for v in e.invars]
                for v, x in zip(e.outvars, compat.bind_eqn(e, ins)):
                    if type(v) is not compat.DropVar:
                        env[v] = x
            new = [weak(v.val if type(v) is compat.Literal else env[v], v)
                   for v in body.outvars]
            return new, i + 1, [w.step(s, i, env) for w, s in zip(watches, states)]

        def cond_fn(state):
            return compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts, *cconsts,
                                     *state[0])[0]

        carry0 = [weak(jnp.asarray(x), v) for x, v in zip(invals[cn + bn:], body.invars[bn:])]
        with compat.user_context(eqn):
            carry, _, states = lax.while_loop(
                cond_fn, body_fn, (carry0, jnp.int32(0), [w.init for w in watches]))
        for w, s in zip(watches, states):
            w.finish(s)
        return list(carry)


call_handlers_reverse["while"] = WhileCall()


def _while_jvp(eqn, invals, tangents):
    """Forward mode of ``lax.while_loop``: the loop carries primals and tangents."""
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


call_handlers_forward["while"] = _while_jvp
