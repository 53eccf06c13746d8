"""Reverse and forward mode of ``lax.cond`` / ``lax.switch`` (see :mod:`.control`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .. import compat, context, residuals
from ..engine import sweeps
from ..engine import tangents as _forward
from ..registry import call_handlers_forward, call_handlers_reverse
from . import control
from .control import _differentiable, _jvp_out_nonzero, _strong, _zeros, short_where


# ================================================================ cond / switch
class CondCall:
    """Reverse mode of ``lax.cond``/``lax.switch``: the index is a residual and
    the backward runs only the taken branch's backward part."""

    def forward(self, eqn, invals, active):
        if context.steps("all") and _steppable(eqn):
            return self._forward_branches(eqn, invals, active)
        branches = eqn.params["branches"]
        index, ops = invals[0], list(invals[1:])
        act = list(active[1:])
        in_avals = [v.aval for v in branches[0].jaxpr.invars]
        joints = [residuals.trace_joint(b.jaxpr, b.consts, in_avals, act) for b in branches]
        splits = [residuals.split_joint(j) for j in joints]
        n_out = len(eqn.outvars)
        out_active = [any(j.out_active[k] for j in joints) for k in range(n_out)]

        # Residual slots shared by the branches: a branch's j-th computed
        # residual goes to the first slot of its shape/dtype it has not used.
        slot_avals, slot_of = [], []
        for s in splits:
            used, mapping = set(), {}
            for (kind, j), v in zip(s.saved, s.saved_vars):
                if kind != "computed":
                    continue
                key = (tuple(v.aval.shape), v.aval.dtype)
                q = next((q for q, a in enumerate(slot_avals)
                          if (tuple(a.shape), a.dtype) == key and q not in used), None)
                if q is None:
                    slot_avals.append(v.aval)
                    q = len(slot_avals) - 1
                used.add(q)
                mapping[j] = q
            slot_of.append(mapping)

        def make_fwd(b):
            s, mapping = splits[b], slot_of[b]

            def branch(*ops):
                outs = residuals.eval_jaxpr(s.fwd, s.consts, *ops)
                computed = outs[n_out:]
                slots = [_zeros(a) for a in slot_avals]
                for j, q in mapping.items():
                    slots[q] = _strong(computed[j])
                return list(outs[:n_out]), slots
            return branch

        with compat.user_context(eqn):
            outs, slots = lax.switch(index, [make_fwd(b) for b in range(len(branches))],
                                     *ops)
        state = {"splits": splits, "slot_of": slot_of, "slots": slots, "ops": ops,
                 "index": index}
        return list(outs), state, out_active

    def backward(self, record, cts_out):
        if isinstance(record.sub, _Branches):
            return self._backward_branches(record, cts_out)
        eqn = record.eqn
        st = record.sub
        splits, slot_of = st["splits"], st["slot_of"]
        ops = st["ops"]
        branches = eqn.params["branches"]
        in_avals = [v.aval for v in branches[0].jaxpr.invars]
        out_avals = [v.aval for v in branches[0].jaxpr.outvars]
        cts_used = sorted(set().union(*(s.cts_used for s in splits)))
        nonzero = sorted(set().union(*(s.joint.ct_in_nonzero for s in splits)))
        cts = [_strong(cts_out[o]) if cts_out[o] is not None else _zeros(out_avals[o])
               for o in cts_used]
        ops_used = sorted({i for s in splits for kind, i in s.saved if kind == "input"})

        def make_bwd(b):
            s, mapping = splits[b], slot_of[b]

            def branch(slots, used_ops, cts):
                op_of = dict(zip(ops_used, used_ops))
                saved = [op_of[i] if kind == "input" else slots[mapping[i]]
                         for kind, i in s.saved]
                ct_of = dict(zip(cts_used, cts))
                cts_in = dict(zip(s.joint.ct_in_nonzero, residuals.eval_jaxpr(
                    s.bwd, s.consts, *saved, *[ct_of[o] for o in s.cts_used])))
                return [_strong(cts_in[i]) if i in cts_in else _zeros(in_avals[i])
                        for i in nonzero]
            return branch

        with compat.user_context(eqn):
            cts_in = lax.switch(st["index"], [make_bwd(b) for b in range(len(branches))],
                                st["slots"], [ops[i] for i in ops_used], cts)
        result = [None] * len(record.invals)
        for i, ct in zip(nonzero, cts_in):
            result[1 + i] = ct
        return [c if a else None for c, a in zip(result, record.active)]


    # --------------------------------------------------- observed path (tools)
    # While a tool steps the sweeps (``context.steps("all")``), every branch is
    # swept in place and the taken branch's results are selected (the same
    # numbers): observers see each branch's equations, and are told which
    # branch each result comes from (``"pick"``), so a non-finite value in a
    # branch not taken is never reported.
    def evaluate(self, eqn, invals):
        """The stepped forward of a cond nothing differentiates (``None``: bound
        as a whole)."""
        if not (context.steps("all", linear_ok=True) and _steppable(eqn)):
            return None
        return self._forward_branches(eqn, invals, [False] * len(invals))[0]

    def _forward_branches(self, eqn, invals, active):
        branches = eqn.params["branches"]
        index, ops, act = invals[0], list(invals[1:]), list(active[1:])
        where = short_where(eqn)
        kind = "cond" if len(branches) == 2 else "switch"
        per, tapes = [], []
        for b, branch in enumerate(branches):
            context.notify("enter", kind, b, where)
            try:
                outs_b, tape = sweeps.forward(branch.jaxpr, branch.consts, ops, act)
            finally:
                context.notify("exit")
            per.append(outs_b)
            tapes.append(tape)
        outs = []
        for k in range(len(eqn.outvars)):
            parts = [o[k] for o in per]
            with compat.user_context(eqn):
                out = lax.select_n(index, *[jnp.asarray(x) for x in parts]) \
                    if len(parts) > 1 else parts[0]
            context.notify("pick", out, parts, index)
            outs.append(out)
        out_act = [any(t.out_active[k] for t in tapes) for k in range(len(eqn.outvars))]
        return outs, _Branches(tapes, where), out_act

    def _backward_branches(self, record, cts_out):
        tapes, where = record.sub.tapes, record.sub.where
        branches = record.eqn.params["branches"]
        kind = "cond" if len(branches) == 2 else "switch"
        index = record.invals[0]
        per = []
        for b, (branch, tape) in enumerate(zip(branches, tapes)):
            context.notify("enter", kind, b, where)
            try:
                context.notify("seed", branch.jaxpr.outvars, cts_out)
                cts_in = sweeps.backward(tape, list(cts_out))
                context.notify("end_sweep", branch.jaxpr, cts_in)
            finally:
                context.notify("exit")
            per.append(cts_in)
        in_avals = [v.aval for v in branches[0].jaxpr.invars]
        result = [None]
        for i, aval in enumerate(in_avals):
            parts = [c[i] for c in per]
            if all(c is None for c in parts):
                result.append(None)
                continue
            parts = [c if c is not None else jnp.zeros(aval.shape, aval.dtype) for c in parts]
            with compat.user_context(record.eqn):
                total = lax.select_n(index, *parts) if len(parts) > 1 else parts[0]
            context.notify("pick", total, parts, index)
            result.append(total)
        return [c if a else None for c, a in zip(result, record.active)]


class _Branches:
    """What a stepped cond keeps: each branch's tape."""

    def __init__(self, tapes, where):
        self.tapes, self.where = tapes, where


def _steppable(eqn) -> bool:
    """A cond small enough to sweep every branch for a tool, with no effects."""
    branches = eqn.params["branches"]
    return not any(b.jaxpr.effects for b in branches) and \
        sum(control.unrolled_size(b.jaxpr) for b in branches) <= control.UNROLL_LIMIT


call_handlers_reverse["cond"] = CondCall()


def _cond_jvp(eqn, invals, tangents):
    """Forward mode of ``lax.cond``/``lax.switch``: each branch pushes tangents."""
    branches = eqn.params["branches"]
    index, ops = invals[0], list(invals[1:])
    in_avals = [v.aval for v in branches[0].jaxpr.invars]
    out_avals = [v.aval for v in branches[0].jaxpr.outvars]
    nz = [t is not None and _differentiable(a) for t, a in zip(tangents[1:], in_avals)]
    out_nz = [False] * len(out_avals)
    for b in branches:
        out_nz = [x or y for x, y in zip(out_nz, _jvp_out_nonzero(
            b.jaxpr, b.consts, in_avals, nz))]
    nz_in = [i for i in range(len(ops)) if nz[i]]
    nz_out = [k for k in range(len(out_avals)) if out_nz[k]]

    def make(b):
        def branch(ops, ts):
            tangents = [None] * len(ops)
            for i, t in zip(nz_in, ts):
                tangents[i] = t
            outs, touts = _forward.jvp_jaxpr(b.jaxpr, b.consts, list(ops), tangents)
            return list(outs), [_strong(touts[k]) if touts[k] is not None
                                else _zeros(out_avals[k]) for k in nz_out]
        return branch

    with compat.user_context(eqn):
        outs, ts = lax.switch(index, [make(b) for b in branches], ops,
                              [tangents[1 + i] for i in nz_in])
    touts = [None] * len(out_avals)
    for k, t in zip(nz_out, ts):
        touts[k] = t
    return list(outs), touts


call_handlers_forward["cond"] = _cond_jvp
