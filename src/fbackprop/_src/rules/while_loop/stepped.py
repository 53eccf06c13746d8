"""Reverse mode of a while loop with concrete values, recorded iteration by iteration.

Called eagerly, the trip count is concrete, and the alternative to the
checkpointed loops (:mod:`.checkpointed`) is recording every iteration
(:class:`SteppedWhile`: one op-by-op forward sweep per iteration and one
backward sweep each, memory ``T`` times the residuals). The compiled loops cost
two dispatches once compiled, but they are traced and compiled per body jaxpr,
and a loop's body is usually a closure made afresh in each call (then every
call compiles, about a second); recording costs the body's operations times
``T`` dispatches and no compilation. So eager calls record, up to
``EAGER_RECORD_EQNS`` body equations and ``EAGER_RECORD_BYTES`` of loop states,
and run the compiled loops beyond that, or when they exist already for the loop
(``python -m fbackprop bench --while`` measures both). The numbers are the same
either way. Inside a compiled eager program (fbackprop's eager engine compiles
programs that repeat) the values are traced, and the compiled loops run.

While a tool steps the sweeps (``context.steps("while")``: the NaN checker,
``fb.explain``, tags in a loop body) this is the handler's observed path: each
iteration's sweeps are bracketed by ``enter("while", i, where)`` / ``exit()``
notices, up to ``control.UNROLL_LIMIT`` body equations (without limit for
``stepping="while"``, tags in the body); for the NaN checker a loop nothing
differentiates runs with its watch (:meth:`SteppedWhile.evaluate`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax, tree_util

from ... import compat, context
from ...engine import sweeps
from ..control import UNROLL_LIMIT, _differentiable, short_where, unrolled_size
from .common import nbytes, reorder, scalar_predicate

# Called eagerly, a loop is recorded iteration by iteration up to this size
# (body equations x iterations, and bytes of loop states kept): with the body's
# closures made afresh in each call (the usual way), the compiled loops would be
# traced and compiled again in every call, which costs more than sweeping that
# many equations op by op. Longer loops, and loops compiled already, run the
# compiled checkpointed loops (memory bounded). `python -m fbackprop bench
# --while` measures both.
EAGER_RECORD_EQNS = 20_000
EAGER_RECORD_BYTES = 256 * 2 ** 20


@dataclasses.dataclass
class _Steps:
    """The tapes of a loop swept iteration by iteration (a pytree of their values)."""
    tapes: list
    where: str
    start: int
    n_b: int
    body: object


tree_util.register_pytree_node(
    _Steps, lambda s: ((s.tapes,), (s.where, s.start, s.n_b, s.body)),
    lambda aux, ch: _Steps(ch[0], *aux))


class SteppedWhile:
    """Reverse mode of a while loop whose values are concrete, as one in-place
    forward sweep of the body per iteration (kept, like a Python loop under
    ``jax.grad``) and one backward sweep each, with ``enter("while", i, where)``
    / ``exit()`` notices around them: what tools that watch the sweeps (the
    NaN checker, ``fb.explain``) need to name the iteration. The same numbers as
    :class:`.checkpointed.WhileCall`; memory grows with the trip count.

    Falls back to ``whole`` (the checkpointed handler) when the values are
    traced (the trip count is unknown), when the body has side effects, or once
    the iterations recorded exceed ``max_eqns`` body equations or ``max_bytes``
    of loop states (the loop is then run again as a whole). With
    ``prefer_compiled``, a loop whose compiled loops exist already runs them.
    """

    def __init__(self, whole, max_eqns: int | None = None, max_bytes: int | None = None,
                 prefer_compiled: bool = False, where=None):
        self.whole = whole
        self.max_eqns = max_eqns
        self.max_bytes = max_bytes
        self.prefer_compiled = prefer_compiled
        self.where = where or compat.source_line

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

    def forward(self, eqn, invals, active):
        p = eqn.params
        body_closed = p["body_jaxpr"]
        max_eqns, max_bytes, prefer_compiled = self.max_eqns, self.max_bytes, \
            self.prefer_compiled
        where = self.where
        if context.steps("while"):
            # A tool steps the sweeps: each iteration it can, whatever is
            # compiled; tags in the body ("while") at any trip count.
            stepping = context.current().stepping
            max_eqns = None if stepping == "while" else UNROLL_LIMIT
            max_bytes, prefer_compiled, where = None, False, short_where
            if stepping == "all" and (any(compat.is_tracer(x) for x in invals)
                                      or not compat.is_eager()):
                # The trip count is unknown: the checker watches the forward
                # run as a whole (the loop is then reversed as a whole).
                self.evaluate(eqn, invals)
        if (any(compat.is_tracer(x) for x in invals) or not compat.is_eager()
                or body_closed.jaxpr.effects or p["cond_jaxpr"].jaxpr.effects
                or (prefer_compiled and self.whole.has_programs(eqn))):
            outs, sub, out_act = self.whole.forward(eqn, invals, active)
            return outs, ("whole", sub), out_act
        scalar = scalar_predicate(eqn)
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        start, n_b = cn, bn
        whole_args = (eqn, list(invals), list(active))
        if scalar is not eqn:
            invals, active = reorder(eqn, scalar, invals), reorder(eqn, scalar, active)
            start, n_b = 0, cn + bn
        sp = scalar.params
        cond_closed, body_closed = sp["cond_jaxpr"], sp["body_jaxpr"]
        body = body_closed.jaxpr
        cconsts, bconsts = list(invals[:cn]), list(invals[cn:cn + n_b])
        b_act, k_act = list(active[cn:cn + n_b]), list(active[cn + n_b:])
        carry = list(invals[cn + n_b:])
        where = where(eqn)
        tapes, size, kept_bytes = [], 0, 0
        n_eqns = max(1, len(body.eqns))
        state_bytes = sum(nbytes(v.aval) for v in body.invars[n_b:])
        while bool(np.asarray(compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts,
                                                *cconsts, *carry)[0])):
            size += n_eqns
            kept_bytes += state_bytes
            if (max_eqns is not None and size > max_eqns) or (
                    max_bytes is not None and kept_bytes > max_bytes):
                outs, sub, out_act = self.whole.forward(*whole_args)
                return outs, ("whole", sub), out_act
            i = len(tapes)
            context.notify("enter", "while", i, where)
            try:
                carry, tape = sweeps.forward(body, body_closed.consts, bconsts + carry,
                                             b_act + k_act)
            finally:
                context.notify("exit")
            carry = list(carry)
            k_act = [a or b for a, b in zip(k_act, tape.out_active)]
            tapes.append(tape)
        out_act = [a and _differentiable(v.aval) for a, v in zip(k_act, eqn.outvars)]
        return carry, ("steps", _Steps(tapes, where, start, n_b, body)), out_act

    def backward(self, record, cts_out):
        kind, sub = record.sub
        if kind == "whole":
            return self.whole.backward(dataclasses.replace(record, sub=sub), cts_out)
        tapes, where, start, n_b, body = sub.tapes, sub.where, sub.start, sub.n_b, sub.body
        p = record.eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        ct = list(cts_out)
        const_parts: list = [[] for _ in range(n_b)]
        for i in range(len(tapes) - 1, -1, -1):
            context.notify("enter", "while", i, where)
            try:
                context.notify("seed", body.outvars, ct)
                cts_in = sweeps.backward(tapes[i], ct)
                context.notify("end_sweep", body, cts_in)
            finally:
                context.notify("exit")
            for j in range(n_b):
                if cts_in[j] is not None:
                    const_parts[j].append(cts_in[j])
            ct = list(cts_in[n_b:])
        result = [None] * len(record.invals)
        for j, parts in enumerate(const_parts):
            total = None
            for c in parts:
                total = c if total is None else lax.add(total, c)
            if len(parts) > 1:
                context.notify("link", total, parts)
            if total is not None:
                prev = result[start + j]
                result[start + j] = total if prev is None else lax.add(prev, total)
        for k, c in enumerate(ct):
            result[cn + bn + k] = c
        return [c if a else None for c, a in zip(result, record.active)]
