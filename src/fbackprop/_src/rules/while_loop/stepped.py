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

The tools that watch the sweeps (the NaN checker, ``fb.explain``, tags in a
loop body) step loops with :func:`fbackprop._src.rules.while_loop.stepped`: each iteration's sweeps are
bracketed by ``enter("while", i, where)`` / ``exit()`` notices.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax import lax, tree_util

from ... import compat, context
from ...engine import sweeps
from ..control import _differentiable
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

    def evaluate(self, eqn, invals):
        return compat.bind_eqn(eqn, invals)

    def forward(self, eqn, invals, active):
        p = eqn.params
        body_closed = p["body_jaxpr"]
        if (any(compat.is_tracer(x) for x in invals) or not compat.is_eager()
                or body_closed.jaxpr.effects or p["cond_jaxpr"].jaxpr.effects
                or (self.prefer_compiled and self.whole.has_programs(eqn))):
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
        where = self.where(eqn)
        tapes, size, kept_bytes = [], 0, 0
        n_eqns = max(1, len(body.eqns))
        state_bytes = sum(nbytes(v.aval) for v in body.invars[n_b:])
        while bool(np.asarray(compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts,
                                                *cconsts, *carry)[0])):
            size += n_eqns
            kept_bytes += state_bytes
            if (self.max_eqns is not None and size > self.max_eqns) or (
                    self.max_bytes is not None and kept_bytes > self.max_bytes):
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
