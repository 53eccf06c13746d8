"""Reverse mode of ``lax.while_loop`` by online checkpointing: the handler.

The forward loop (:func:`.programs.forward_program`) keeps copies of the loop
state in ``S`` slots (:mod:`.slots`) at iterations the greedy rule of
:mod:`.schedule` chooses; the backward sweep, itself a loop
(:func:`.programs.backward_program`), restores the nearest kept state and
recomputes forward from it. Both are traced once per body, slot count and
activity and bound as named calls (``while_forward``, ``while_backward``).

Activity, constants, zero cost when nothing is differentiated
---------------------------------------------------------------
A carry is differentiated when its initial value is, or when the body makes it
so from a differentiated constant or carry (a fixpoint, as for ``scan``);
integer carries and values behind ``stop_gradient`` carry no cotangent. A
carry the body passes through unchanged (``fori_loop``'s upper bound) is never
copied into a slot. The loop constants' cotangents are summed over the
iterations in the backward loop's carry. A loop with no differentiated carry is
bound as it is. The cond's constants never get a cotangent (it returns a bool).

A loop whose condition is a batch of booleans (``vmap`` of a loop with a
batched condition) is first made a one-condition loop that selects per element
(:func:`.common.scalar_predicate`).

Loops this cannot reverse
-------------------------
A body or cond with side effects (``jax.debug.print``, callbacks, RNG state):
the backward would run them again. The error names the loop's source line and
is raised when a cotangent reaches the loop.
"""

from __future__ import annotations

import dataclasses
import weakref

from jax import tree_util

from ... import compat, residuals, staging
from ...registry import nondiff_primitives
from ..control import _differentiable, _is_var, _strong, _zeros
from ..scan_bodies import _scan_joint
from . import slots as _slots
from .common import nbytes, reorder, scalar_predicate
from .programs import backward_program, forward_program


class _Unsupported:
    """A loop whose reversal raises when a cotangent reaches it."""

    def __init__(self, message):
        self.message = message


tree_util.register_pytree_node(_Unsupported, lambda u: ((), u.message),
                               lambda m, _: _Unsupported(m))


@dataclasses.dataclass(eq=False)
class _Programs:
    """The forward and backward loops of one body, slot count and activity."""
    forward: object
    backward: object
    slots: int
    n_carry: int
    n_bconsts: int
    stored: tuple          # per carry: copied into the slots (not passed through)
    carry_active: tuple
    const_nz: tuple        # body constants whose cotangents accumulate
    where: str


@dataclasses.dataclass
class _Kept:
    """What the forward loop leaves for the backward loop."""
    programs: _Programs
    trip_count: object
    k: object
    steps: object
    order: object
    slots: list
    bconst_start: int      # where the body's constants start in the record's inputs


tree_util.register_pytree_node(
    _Kept, lambda s: ((s.trip_count, s.k, s.steps, s.order, s.slots),
                      (s.programs, s.bconst_start)),
    lambda aux, ch: _Kept(aux[0], *ch, aux[1]))


def _carry_activity(jaxpr, in_active):
    """Activity by a walk over the body (no tracing): for loops that are not
    reversed (side effects), only to say which outputs would need a cotangent."""
    active = {v for v, a in zip(jaxpr.invars, in_active) if a and _differentiable(v.aval)}
    for e in jaxpr.eqns:
        if e.primitive.name in nondiff_primitives:
            continue
        if any(_is_var(v) and v in active for v in e.invars):
            active.update(v for v in e.outvars if _is_var(v) and _differentiable(v.aval))
    return [_is_var(v) and v in active for v in jaxpr.outvars]


_programs_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # body jaxpr -> cond ids


class WhileCall:
    """Reverse mode of ``lax.while_loop`` by online checkpointing (module doc)."""

    def forward(self, eqn, invals, active):
        scalar = scalar_predicate(eqn)
        if scalar is not eqn:
            outs, sub, out_active = self._forward(scalar, reorder(eqn, scalar, invals),
                                                  reorder(eqn, scalar, active))
            if isinstance(sub, _Kept):
                sub.bconst_start = 0      # its body constants are the record's first inputs
            return outs, sub, out_active
        return self._forward(eqn, invals, active)

    def _forward(self, eqn, invals, active):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        body_closed, cond_closed = p["body_jaxpr"], p["cond_jaxpr"]
        body = body_closed.jaxpr
        nk = len(body.outvars)
        b_active = list(active[cn:])
        if body.effects or cond_closed.jaxpr.effects:
            carry_active = [bool(a) for a in b_active[bn:]]
            while True:
                out = _carry_activity(body, b_active[:bn] + carry_active)
                new = [a or b for a, b in zip(carry_active, out)]
                if new == carry_active:
                    break
                carry_active = new
            which = "body" if body.effects else "cond"
            effects = ", ".join(sorted(str(e) for e in
                                       (body.effects or cond_closed.jaxpr.effects)))
            message = (
                f"fbackprop cannot reverse the lax.while_loop at {compat.source_line(eqn)}: "
                f"its {which} has side effects ({effects}). The backward sweep of a while "
                f"loop recomputes iterations from saved loop states, which would run the "
                f"side effects again. Take them out of the loop (e.g. return the values "
                f"and print them after it), or, if the loop has a known bound, write it "
                f"as lax.scan or lax.fori_loop with static bounds, whose reverse mode "
                f"keeps every step instead of recomputing.")
            return (compat.bind_eqn(eqn, invals), _Unsupported(message),
                    [a and _differentiable(v.aval) for a, v in zip(carry_active, eqn.outvars)])
        in_avals = [v.aval for v in body.invars]
        joint, carry_active = _scan_joint(body, body_closed.consts, in_avals, b_active, bn, nk)
        if not any(carry_active):
            return compat.bind_eqn(eqn, invals), None, [False] * nk
        programs = self._programs(eqn, joint, carry_active, in_avals)
        with compat.user_context(eqn):
            outs = programs.forward(list(invals))
        carry_out = outs[:nk]
        T, k, steps, order = outs[nk:nk + 4]
        kept = _Kept(programs, T, k, steps, order, list(outs[nk + 4:]), cn)
        return carry_out, kept, [a and _differentiable(v.aval)
                                 for a, v in zip(carry_active, eqn.outvars)]

    def backward(self, record, cts_out):
        kept = record.sub
        if isinstance(kept, _Unsupported):
            raise ValueError(kept.message)
        prog = kept.programs
        p = record.eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        nk = prog.n_carry
        start, n_bconsts = kept.bconst_start, prog.n_bconsts
        out_avals = [v.aval for v in record.eqn.outvars]
        act = [k for k in range(nk) if prog.carry_active[k]]
        ct0 = [_strong(cts_out[k]) if cts_out[k] is not None else _zeros(out_avals[k])
               for k in act]
        bconsts = list(record.invals[start:start + n_bconsts])
        init = list(record.invals[cn + bn:])
        with compat.user_context(record.eqn):
            outs = prog.backward(bconsts + init + [kept.trip_count, kept.k, kept.steps,
                                                   kept.order] + list(kept.slots) + ct0)
        ct_init, accs, evals = outs[:len(act)], outs[len(act):-1], outs[-1]
        _slots.report(kept.trip_count, evals, prog.slots, prog.where)
        result = [None] * len(record.invals)
        for i, acc in zip(prog.const_nz, accs):
            result[start + i] = acc
        for k, ct in zip(act, ct_init):
            result[cn + bn + k] = ct
        return [c if a else None for c, a in zip(result, record.active)]

    # -------------------------------------------------------------- programs
    def _programs(self, eqn, joint, carry_active, in_avals) -> _Programs:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        body_closed, cond_closed = p["body_jaxpr"], p["cond_jaxpr"]
        body = body_closed.jaxpr
        nk = len(body.outvars)
        stored = tuple(not (body.outvars[k] is body.invars[bn + k]) for k in range(nk))
        slot_bytes = sum(nbytes(in_avals[bn + k]) for k in range(nk) if stored[k])
        where = compat.source_line(eqn)
        S = int(_slots.slot_count(slot_bytes, where))
        const_nz = tuple(i for i in joint.ct_in_nonzero if i < bn)
        cond_avals = [v.aval for v in cond_closed.jaxpr.invars[:cn]]
        key = (S, tuple(carry_active), tuple(residuals._aval_key(a) for a in in_avals),
               tuple(residuals._aval_key(a) for a in cond_avals), id(cond_closed.jaxpr))
        consts = list(joint.consts) + list(body_closed.consts) + list(cond_closed.consts)
        cacheable = not any(compat.is_tracer(c) for c in consts)
        per = _programs_cache.setdefault(joint, {}) if cacheable else {}
        hit = per.get(key)
        if hit is not None and hit[0] is cond_closed:
            return hit[1]
        fwd = forward_program(cn, bn, body_closed, cond_closed, S, stored)
        bwd = backward_program(bn, body_closed, joint, S, stored, carry_active, const_nz)
        if cacheable:
            fwd = staging.StagedFunction(fwd, False, "while_forward")
            bwd = staging.StagedFunction(bwd, False, "while_backward")
        programs = _Programs(fwd, bwd, S, nk, bn, stored, tuple(carry_active), const_nz, where)
        if cacheable:
            per[key] = (cond_closed, programs)
            _built.setdefault(body_closed.jaxpr, set()).add(id(cond_closed.jaxpr))
        return programs

    @staticmethod
    def has_programs(eqn) -> bool:
        """Whether compiled loops exist for this loop's body and cond already."""
        p = scalar_predicate(eqn).params
        return id(p["cond_jaxpr"].jaxpr) in _built.get(p["body_jaxpr"].jaxpr, ())
