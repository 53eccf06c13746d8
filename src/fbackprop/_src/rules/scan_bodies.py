"""The bodies of a differentiated ``lax.scan``: its joint sweep traced and split,
and the forward and backward loop bodies built from the split (see :mod:`.control`).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple
from jax import lax

from .. import compat, residuals
from ..registry import call_handlers_reverse, nondiff_primitives, vjp_rules
from .control import _differentiable, _is_var


def _loop_invariant(joint, num_consts):
    """Predicate: the joint equation depends only on the scan's constants."""
    jaxpr = joint.jaxpr
    invariant = set(jaxpr.constvars) | set(jaxpr.invars[:num_consts])
    ids = set()
    for e in jaxpr.eqns:
        if not e.effects and all(not _is_var(v) or v in invariant for v in e.invars):
            ids.add(id(e))
            invariant.update(v for v in e.outvars if _is_var(v))
    return lambda e: id(e) in ids


def _swept_activity(jaxpr, in_active):
    """Which outputs of ``jaxpr`` the forward sweep marks active, by a walk over
    its equations (no tracing); ``None`` where an equation's activity is not known
    without sweeping it (control flow, library primitives)."""
    active = {v for v, a in zip(jaxpr.invars, in_active) if a}
    for eqn in jaxpr.eqns:
        act = [type(v) is not compat.Literal and v in active for v in eqn.invars]
        if not any(act):
            continue
        name = eqn.primitive.name
        if name in nondiff_primitives:
            continue
        if name in compat.JIT_NAMES:
            sub = _swept_activity(compat.jit_inner(eqn.params).jaxpr, act)
            if sub is None:
                return None
        elif name in call_handlers_reverse and name not in (compat.CUSTOM_JVP_CALL,
                                                            compat.CUSTOM_VJP_CALL):
            return None
        elif name not in vjp_rules and name not in call_handlers_reverse:
            return None
        else:
            sub = [True] * len(eqn.outvars)
        active.update(v for v, a in zip(eqn.outvars, sub)
                      if a and _is_var(v) and _differentiable(v.aval))
    return [type(v) is not compat.Literal and v in active for v in jaxpr.outvars]


def _scan_joint(body, consts, in_avals, active, nc, nk, before_trace=None):
    """The body's joint trace at the fixpoint of carry activity: a carry is
    active when its initial value is, or when the body makes it active."""
    init_active = [bool(a) and _differentiable(av)
                   for a, av in zip(active[nc:nc + nk], in_avals[nc:nc + nk])]
    # The fixpoint found by walking the body's equations needs one trace when the
    # trace agrees with it (a recurrent network's hidden state starts inactive
    # and becomes active in the first step: one trace instead of two).
    carry_active = init_active
    while True:
        in_act = list(active[:nc]) + carry_active + list(active[nc + nk:])
        outs = _swept_activity(body, in_act)
        if outs is None:
            carry_active = init_active
            break
        new = [a or b for a, b in zip(carry_active, outs[:nk])]
        if new == carry_active:
            break
        carry_active = new
    while True:
        in_act = list(active[:nc]) + carry_active + list(active[nc + nk:])
        if before_trace is not None:
            before_trace()
        joint = residuals.trace_joint(body, consts, in_avals, in_act)
        new = [a or b for a, b in zip(init_active, joint.out_active[:nk])]
        if new == carry_active:
            return joint, carry_active
        if not all(b or not a for a, b in zip(carry_active, new)):
            # The walk marked a carry active that the sweep does not: start over
            # from the initial activity (the least fixpoint, one trace a step).
            new = init_active
        carry_active = new


_scan_splits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _SegmentCall(NamedTuple):
    """One segment of a scan's steps, as the scan's backward reads a record."""
    eqn: Any
    invals: list
    outvals: list
    active: list
    sub: Any


class _Segments:
    """A scan run as consecutive shorter scans (a memory-budget plan keeps
    different per-step values in different steps): one record per segment."""

    def __init__(self, records, order):
        self.records = records      # per segment (index order): a Record
        self.order = order          # the order the segments ran in


def _index(x, t):
    return lax.dynamic_index_in_dim(x, t, 0, keepdims=False)


def _update(buf, x, t):
    return lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), t, 0)


def _forward_body_jaxpr(split, res_src, nc, nk, n_out):
    """The forward loop's body as a jaxpr ``(consts, carry, x) -> (carry, y, res)``
    taken from the split's forward part, or ``None`` when its carry outputs are
    not exactly of the carry inputs' types (``lax.scan`` then reconciles them)."""
    fwd = split.fwd
    if any(fwd.outvars[k].aval != fwd.invars[nc + k].aval for k in range(nk)):
        return None
    res = [fwd.outvars[n_out + j] if src == "computed" else fwd.invars[nc + j]
           for src, j in res_src]
    return compat.new_jaxpr(list(fwd.constvars), list(fwd.invars),
                            list(fwd.outvars[:n_out]) + res, list(fwd.eqns), "fwd_scan_body")


def _backward_body_jaxpr(split, plan, ys_pos, xs_pos, ct_ys_pos, carry_pos, act_carry,
                        const_nz, xs_nz, nc, nk, in_avals, n_ys, n_xs, n_ct_ys, n_res):
    """The backward loop's body as a jaxpr, built from the split's backward part
    itself (its equations and variables, not copies) and a few equations around
    it: ``(loop consts, ct carries, const accumulators, residuals, ys, xs, ys
    cotangents) -> (ct carries, accumulators, xs cotangents)``, its constvars the
    split's; also the indices of the scan's consts it reads. ``None`` when the
    body does not fit that form (a value read twice in one role, types that
    differ); ``lax.scan`` then traces it."""
    bwd = split.bwd
    Var = compat.Var
    n_saved = len(split.saved)
    saved_vars, ct_vars = bwd.invars[:n_saved], bwd.invars[n_saved:]
    const_idx, const_vars = [], []
    slots = {"res": [None] * n_res, "ys": [None] * n_ys, "xs": [None] * n_xs}
    positions = {"res": None, "ys": ys_pos, "xs": xs_pos}
    for (src, i), v in zip(plan, saved_vars):
        if src == "const":
            const_idx.append(i)
            const_vars.append(v)
            continue
        j = i if positions[src] is None else positions[src][i]
        if slots[src][j] is not None:
            return None
        slots[src][j] = v
    eqns = []
    carry_in = [Var(in_avals[nc + k]) for k in act_carry]
    ct_ys_vars = [None] * n_ct_ys
    for o, v in zip(split.cts_used, ct_vars):
        if o < nk:
            carry_in[carry_pos[o]] = v
        elif (o - nk) in ct_ys_pos:
            ct_ys_vars[ct_ys_pos[o - nk]] = v
        else:
            eqns.append(compat.zeros_eqn(v))
    acc_in = [Var(in_avals[i]) for i in const_nz]
    invars = (const_vars + carry_in + acc_in + slots["res"] + slots["ys"] + slots["xs"]
              + ct_ys_vars)
    if any(v is None for v in invars) or len(set(invars)) != len(invars) or any(
            v.aval != in_avals[nc + k] for v, k in zip(carry_in, act_carry)):
        return None
    eqns.extend(bwd.eqns)
    cts_in = dict(zip(split.joint.ct_in_nonzero, bwd.outvars))
    carry_out = []
    for k in act_carry:
        aval = in_avals[nc + k]
        v = cts_in.get(nc + k)
        if v is None or type(v) is compat.Literal:
            if v is not None:
                return None
            v = Var(aval)
            eqns.append(compat.zeros_eqn(v))
        elif v.aval != aval:
            if v.aval.update(weak_type=False) != aval:
                return None
            strong = Var(aval)
            eqns.append(compat.strong_eqn(v, strong))
            v = strong
        carry_out.append(v)
    acc_out = []
    for acc, i in zip(acc_in, const_nz):
        v = cts_in[i]
        if type(v) is compat.Literal or v.aval != acc.aval:
            return None
        total = Var(acc.aval)
        eqns.append(compat.add_eqn(acc, v, total))
        acc_out.append(total)
    ct_xs = [cts_in[nc + nk + j] for j in xs_nz]
    jaxpr = compat.new_jaxpr(list(bwd.constvars), invars, carry_out + acc_out + ct_xs, eqns,
                             "bwd_scan_body")
    return jaxpr, const_idx
