"""Control flow: scan and cond/switch (and fori_loop, which lowers to scan).

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

``while_loop`` (and ``fori_loop`` with traced bounds) - see while_loop.py:
reverse mode by online checkpointing, and forward mode.

(The markers checkpointing uses have their rules with their families:
``checkpoint_name`` in debug.py, ``optimization_barrier`` in structural.py.)
"""

from __future__ import annotations

import contextlib
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import compat, memplan, residuals, reverse
from .. import forward as _forward
from ..registry import (
    call_handlers_forward,
    call_handlers_reverse,
    is_differentiable_dtype,
    nondiff_primitives,
    vjp_rules,
)


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


# ===================================================================== scan
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


class ScanCall:
    """Reverse mode of ``lax.scan``: a forward scan that stacks the per-step
    residuals, a backward scan in the opposite direction that consumes them.

    A memory-budget plan may split the steps into segments planned
    differently (:mod:`fbackprop._src.memplan`): each segment is then a scan
    over its step numbers that reads ``xs`` (and ``ys``, and their
    cotangents) from the full arrays and writes ``ys`` (and the ``xs``
    cotangents) into full-length buffers carried from segment to segment, so
    nothing is sliced or concatenated.
    """

    def forward(self, eqn, invals, active):
        # Inside a region planned for a memory budget the plan decides which
        # per-step values the loop stacks (see fbackprop._src.memplan).
        hook = memplan.scan_hook(eqn)
        if hook is not None and hook.segments:
            return self._forward_segments(eqn, invals, active, hook.segments)
        return self._forward(eqn, invals, active, hook)

    def _forward_segments(self, eqn, invals, active, segments):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = list(invals[:nc]), list(invals[nc:nc + nk]), list(invals[nc + nk:])
        out_avals = [v.aval for v in p["jaxpr"].jaxpr.outvars[nk:]]
        length = p["length"]
        ybufs = [jnp.zeros((length,) + tuple(a.shape), a.dtype) for a in out_avals]
        offsets, start = [], 0
        for n, _ in segments:
            offsets.append(start)
            start += n
        order = list(range(len(segments)))[::-1 if p["reverse"] else 1]
        carry_active = list(active[nc:nc + nk])
        records, ys_active = [None] * len(segments), [False] * len(out_avals)
        for j in order:
            n, hook = segments[j]
            sub_eqn = eqn.replace(params=dict(p, length=n))
            sub_in = consts + carry + xs
            sub_active = list(active[:nc]) + carry_active + list(active[nc + nk:])
            outs, state, out_active = self._forward(sub_eqn, sub_in, sub_active, hook,
                                                    window=(offsets[j], n, ybufs))
            carry, ybufs = list(outs[:nk]), list(outs[nk:])
            carry_active = [a or b for a, b in zip(carry_active, out_active[:nk])]
            ys_active = [a or b for a, b in zip(ys_active, out_active[nk:])]
            records[j] = reverse.Record(sub_eqn, sub_in, list(outs), sub_active, state)
        return carry + ybufs, _Segments(records, order), carry_active + ys_active

    def _backward_segments(self, record, cts_out):
        p = record.eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        segs = record.sub
        ct_carry, ct_ys = list(cts_out[:nk]), list(cts_out[nk:])
        const_cts = [None] * nc
        bufs: dict = {}
        for j in reversed(segs.order):
            cts_in, bufs = self._backward(segs.records[j], ct_carry + ct_ys, bufs)
            for i in range(nc):
                if cts_in[i] is not None:
                    const_cts[i] = cts_in[i] if const_cts[i] is None else \
                        lax.add(const_cts[i], cts_in[i])
            ct_carry = list(cts_in[nc:nc + nk])
        n_xs = len(record.invals) - nc - nk
        result = const_cts + ct_carry + [bufs.get(j) for j in range(n_xs)]
        return [c if a else None for c, a in zip(result, record.active)]

    def _forward(self, eqn, invals, active, hook, window=None):
        """``window = (offset, steps, ys buffers)``: run only those steps (see
        the class docstring)."""
        p = eqn.params
        closed = p["jaxpr"]
        nc, nk = p["num_consts"], p["num_carry"]
        body = closed.jaxpr
        in_avals = [v.aval for v in body.invars]
        if hook is None:
            joint, carry_active = _scan_joint(body, closed.consts, in_avals, active, nc, nk)
            per_joint = _scan_splits.setdefault(joint, {})
            split = per_joint.get((nc, nk))
            if split is None:
                split = per_joint[nc, nk] = residuals.split_joint(
                    joint, recompute=_loop_invariant(joint, nc),
                    costly_inputs=range(nc, nc + nk))
        else:
            with hook.body():
                joint, carry_active = _scan_joint(body, closed.consts, in_avals, active,
                                                  nc, nk, before_trace=hook.begin_trace)
            split = hook.split(joint, _loop_invariant(joint, nc), range(nc, nc + nk))
        n_out = joint.n_out

        # Where each residual comes from in the backward scan.
        plan, res_src = [], []
        for kind, idx in split.saved:
            if kind == "input":
                if idx < nc:
                    plan.append(("const", idx))
                elif idx < nc + nk:
                    plan.append(("res", len(res_src)))
                    res_src.append(("carry", idx - nc))
                else:
                    plan.append(("xs", idx - nc - nk))
            else:
                out = split.computed_as_output[idx]
                if out is not None and out >= nk:
                    plan.append(("ys", out - nk))
                else:
                    plan.append(("res", len(res_src)))
                    res_src.append(("computed", idx))

        consts = list(invals[:nc])
        init = list(invals[nc:nc + nk])
        xs = list(invals[nc + nk:])

        def step(carry, x):
            outs = residuals.eval_jaxpr(split.fwd, split.consts, *consts, *carry, *x)
            computed = outs[n_out:]
            res = [computed[j] if src == "computed" else carry[j] for src, j in res_src]
            return list(outs[:nk]), list(outs[nk:n_out]), res

        scope = hook.scope() if hook is not None else contextlib.nullcontext()
        body_jaxpr = None
        if window is None and hook is None and reverse.sweeps_unwatched():
            body_jaxpr = _forward_body_jaxpr(split, res_src, nc, nk, n_out)
        if body_jaxpr is not None:
            # The forward loop's body is the split's forward part with its outputs
            # rearranged: built directly, nothing to trace.
            with compat.user_context(eqn):
                outs = compat.bind_scan(p, body_jaxpr, list(split.consts), nc,
                                        consts + init + xs)
            carry_out, ys, res = outs[:nk], outs[nk:n_out], outs[n_out:]
        elif window is None:
            def fwd_body(carry, x):
                new, ys_t, res = step(carry, x)
                return new, (ys_t, res)

            with compat.user_context(eqn), scope:
                carry_out, (ys, res) = lax.scan(fwd_body, init, xs, length=p["length"],
                                                reverse=p["reverse"], unroll=p["unroll"])
        else:
            offset, n, ybufs = window

            def fwd_body(state, t):
                carry, bufs = state
                new, ys_t, res = step(carry, [_index(x, t) for x in xs])
                return (new, [_update(b, y, t) for b, y in zip(bufs, ys_t)]), res

            steps = jnp.arange(offset, offset + n, dtype=jnp.int32)
            with compat.user_context(eqn), scope:
                (carry_out, ys), res = lax.scan(fwd_body, (init, list(ybufs)), steps,
                                                length=n, reverse=p["reverse"],
                                                unroll=p["unroll"])
        state = {"split": split, "plan": plan, "consts": consts, "xs": xs, "ys": ys,
                 "res": res, "carry_active": carry_active,
                 "window": None if window is None else window[:2]}
        out_active = list(carry_active) + list(joint.out_active[nk:])
        return list(carry_out) + list(ys), state, out_active

    def backward(self, record, cts_out):
        if isinstance(record.sub, _Segments):
            return self._backward_segments(record, cts_out)
        return self._backward(record, cts_out)[0]

    def _backward(self, record, cts_out, ct_bufs=None):
        """The cotangents of the inputs; with a window, also the full-length
        buffers of the ``xs`` cotangents (``ct_bufs``: from the segment that
        ran before, by ``xs`` index)."""
        eqn = record.eqn
        p = eqn.params
        st = record.sub
        split, plan = st["split"], st["plan"]
        joint = split.joint
        nc, nk = p["num_consts"], p["num_carry"]
        body = p["jaxpr"].jaxpr
        in_avals = [v.aval for v in body.invars]
        out_avals = [v.aval for v in body.outvars]
        consts, xs, ys, res = st["consts"], st["xs"], st["ys"], st["res"]
        window = st["window"]

        act_carry = [k for k in range(nk) if st["carry_active"][k]]
        carry_pos = {k: i for i, k in enumerate(act_carry)}
        ct_carry0 = [_strong(cts_out[k]) if cts_out[k] is not None
                     else _zeros(in_avals[nc + k]) for k in act_carry]
        nonzero = joint.ct_in_nonzero
        const_nz = [i for i in nonzero if i < nc]
        xs_nz = [i - nc - nk for i in nonzero if i >= nc + nk]
        accs0 = [_zeros(in_avals[i]) for i in const_nz]

        # Per-step inputs of the backward body: stacked residuals, the ys and xs
        # arrays that double as residuals, and the present ys cotangents.
        ys_idx = sorted({i for src, i in plan if src == "ys"})
        xs_idx = sorted({i for src, i in plan if src == "xs"})
        ys_pos = {y: i for i, y in enumerate(ys_idx)}
        xs_pos = {x: i for i, x in enumerate(xs_idx)}
        ct_ys_idx = [o - nk for o in split.cts_used if o >= nk and cts_out[o] is not None]
        ct_ys_pos = {y: i for i, y in enumerate(ct_ys_idx)}
        full = ([ys[y] for y in ys_idx], [xs[x] for x in xs_idx],
                [cts_out[nk + y] for y in ct_ys_idx])

        def step(ct_carry, accs, res_t, ys_t, xs_t, ct_ys_t):
            saved = []
            for src, i in plan:
                if src == "const":
                    saved.append(consts[i])
                elif src == "res":
                    saved.append(res_t[i])
                elif src == "ys":
                    saved.append(ys_t[ys_pos[i]])
                else:
                    saved.append(xs_t[xs_pos[i]])
            cts = []
            for o in split.cts_used:
                if o < nk:
                    cts.append(ct_carry[carry_pos[o]])
                elif (o - nk) in ct_ys_pos:
                    cts.append(ct_ys_t[ct_ys_pos[o - nk]])
                else:
                    cts.append(_zeros(out_avals[o]))
            cts_in = dict(zip(nonzero, residuals.eval_jaxpr(
                split.bwd, split.consts, *saved, *cts)))
            new_carry = [_strong(cts_in[nc + k]) if nc + k in cts_in
                         else _zeros(in_avals[nc + k]) for k in act_carry]
            new_accs = [lax.add(acc, cts_in[i]) for acc, i in zip(accs, const_nz)]
            ct_xs = [cts_in[nc + nk + j] for j in xs_nz]
            return new_carry, new_accs, ct_xs

        n_c, n_a = len(act_carry), len(const_nz)
        direct = None
        if window is None and reverse.sweeps_unwatched():
            direct = _backward_body_jaxpr(
                split, plan, ys_pos, xs_pos, ct_ys_pos, carry_pos, act_carry, const_nz,
                xs_nz, nc, nk, in_avals, len(ys_idx), len(xs_idx), len(ct_ys_idx),
                len(res))
        if direct is not None:
            # The backward loop's body is the split's backward part and a few
            # equations around it, built directly: nothing to trace.
            body_jaxpr, const_idx = direct
            with compat.user_context(eqn):
                final_and_xs = compat.bind_scan(
                    p, body_jaxpr, list(split.consts), len(const_idx),
                    [consts[i] for i in const_idx] + ct_carry0 + accs0 + list(res)
                    + full[0] + full[1] + full[2],
                    reverse=not p["reverse"], num_carry=n_c + n_a)
            final, ct_xs = final_and_xs[:n_c + n_a], final_and_xs[n_c + n_a:]
            ct_bufs_out = None
        elif window is None:
            def bwd_body(carry, x):
                res_t, ys_t, xs_t, ct_ys_t = x
                new_carry, new_accs, ct_xs = step(carry[:n_c], carry[n_c:], res_t, ys_t,
                                                  xs_t, ct_ys_t)
                return new_carry + new_accs, ct_xs

            with compat.user_context(eqn):
                final, ct_xs = lax.scan(bwd_body, ct_carry0 + accs0, (list(res),) + full,
                                        length=p["length"], reverse=not p["reverse"],
                                        unroll=p["unroll"])
            ct_bufs_out = None
        else:
            offset, n = window
            ct_bufs = dict(ct_bufs or {})
            bufs0 = [ct_bufs[j] if j in ct_bufs else
                     jnp.zeros(xs[j].shape, in_avals[nc + nk + j].dtype) for j in xs_nz]

            def bwd_body(carry, x):
                res_t, t = x
                ys_t, xs_t, ct_ys_t = ([_index(a, t) for a in group] for group in full)
                new_carry, new_accs, ct_xs = step(carry[:n_c], carry[n_c:n_c + n_a], res_t,
                                                  ys_t, xs_t, ct_ys_t)
                bufs = [_update(b, c, t) for b, c in zip(carry[n_c + n_a:], ct_xs)]
                return new_carry + new_accs + bufs, None

            steps = jnp.arange(offset, offset + n, dtype=jnp.int32)
            with compat.user_context(eqn):
                final, _ = lax.scan(bwd_body, ct_carry0 + accs0 + bufs0, (list(res), steps),
                                    length=n, reverse=not p["reverse"], unroll=p["unroll"])
            ct_xs = final[n_c + n_a:]
            ct_bufs.update(zip(xs_nz, ct_xs))
            ct_bufs_out = ct_bufs
        result = [None] * len(record.invals)
        for k in act_carry:
            result[nc + k] = final[carry_pos[k]]
        for i, acc in zip(const_nz, final[n_c:n_c + n_a]):
            result[i] = acc
        for j, ct in zip(xs_nz, ct_xs):
            result[nc + nk + j] = ct
        return [c if a else None for c, a in zip(result, record.active)], ct_bufs_out


call_handlers_reverse["scan"] = ScanCall()


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


def _scan_jvp(eqn, invals, tangents):
    """Forward mode of ``lax.scan``: a scan carrying primals and tangents."""
    p = eqn.params
    closed = p["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    body = closed.jaxpr
    in_avals = [v.aval for v in body.invars]
    out_avals = [v.aval for v in body.outvars]
    nz = [t is not None and _differentiable(a) for t, a in zip(tangents, in_avals)]
    while True:
        out_nz = _jvp_out_nonzero(body, closed.consts, in_avals, nz)
        new = nz[:nc] + [a or b for a, b in zip(nz[nc:nc + nk], out_nz[:nk])] + nz[nc + nk:]
        if new == nz:
            break
        nz = new
    carry_nz = [k for k in range(nk) if nz[nc + k]]
    ys_nz = [y for y in range(len(out_avals) - nk) if out_nz[nk + y]]
    consts = list(invals[:nc])
    const_t = [tangents[i] if nz[i] else None for i in range(nc)]
    xs_nz = [j for j in range(len(invals) - nc - nk) if nz[nc + nk + j]]
    init_t = [_strong(tangents[nc + k]) if tangents[nc + k] is not None
              else _zeros(in_avals[nc + k]) for k in carry_nz]

    def body_fn(carry, x):
        c, ct = carry
        xv, xt = x
        t_carry = [None] * nk
        for k, t in zip(carry_nz, ct):
            t_carry[k] = t
        t_xs = [None] * len(xv)
        for j, t in zip(xs_nz, xt):
            t_xs[j] = t
        outs, touts = _forward.jvp_jaxpr(body, closed.consts, consts + list(c) + list(xv),
                                         const_t + t_carry + t_xs)
        new_t = [_strong(touts[k]) if touts[k] is not None else _zeros(out_avals[k])
                 for k in carry_nz]
        ys_t = [touts[nk + y] for y in ys_nz]
        return (list(outs[:nk]), new_t), (list(outs[nk:]), ys_t)

    xs = list(invals[nc + nk:])
    with compat.user_context(eqn):
        (carry, carry_t), (ys, ys_t) = lax.scan(
            body_fn, (list(invals[nc:nc + nk]), init_t),
            (xs, [tangents[nc + nk + j] for j in xs_nz]),
            length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    touts = [None] * len(eqn.outvars)
    for k, t in zip(carry_nz, carry_t):
        touts[k] = t
    for y, t in zip(ys_nz, ys_t):
        touts[nk + y] = t
    return list(carry) + list(ys), touts


call_handlers_forward["scan"] = _scan_jvp


# ================================================================ cond / switch
class CondCall:
    """Reverse mode of ``lax.cond``/``lax.switch``: the index is a residual and
    the backward runs only the taken branch's backward part."""

    def forward(self, eqn, invals, active):
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
