"""Reverse and forward mode of ``lax.scan`` (see :mod:`.control` for the strategy).
"""

from __future__ import annotations

import contextlib
import jax.numpy as jnp
from jax import lax

from .. import compat, residuals
from ..planning import frames
from .. import context
from ..engine import sweeps
from ..engine import tangents as _forward
from ..registry import call_handlers_forward, call_handlers_reverse
from . import control
from .control import _differentiable, _jvp_out_nonzero, _strong, _zeros, short_where
from .scan_bodies import (_backward_body_jaxpr, _forward_body_jaxpr, _index,
                          _loop_invariant, _scan_joint, _scan_splits, _SegmentCall,
                          _Segments, _update)


class ScanCall:
    """Reverse mode of ``lax.scan``: a forward scan that stacks the per-step
    residuals, a backward scan in the opposite direction that consumes them.

    A memory-budget plan may split the steps into segments planned
    differently (:mod:`fbackprop._src.planning.memplan`): each segment is then a scan
    over its step numbers that reads ``xs`` (and ``ys``, and their
    cotangents) from the full arrays and writes ``ys`` (and the ``xs``
    cotangents) into full-length buffers carried from segment to segment, so
    nothing is sliced or concatenated.
    """

    def forward(self, eqn, invals, active):
        if context.steps("scan") and _steppable(eqn):
            return self._forward_steps(eqn, invals, active)
        # Inside a region planned for a memory budget the plan decides which
        # per-step values the loop stacks (see fbackprop._src.planning.memplan).
        hook = frames.scan_hook(eqn)
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
            # What _backward reads of a record, for this segment of the steps.
            records[j] = _SegmentCall(sub_eqn, sub_in, list(outs), sub_active, state)
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
        if window is None and hook is None and context.unwatched():
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
        if isinstance(record.sub, _Steps):
            return self._backward_steps(record, cts_out)
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
        if window is None and context.unwatched():
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

    # --------------------------------------------------- observed path (tools)
    # While a tool steps the sweeps (``context.steps("scan")``), a scan runs as
    # one in-place sweep of its body per step, forward and backward (the same
    # numbers as the loops above), and observers are told each step's context
    # and how the steps' values make the scan's (``context.notify``).
    def evaluate(self, eqn, invals):
        """The stepped forward of a scan nothing differentiates (``None``: bound
        as a whole)."""
        if not (context.steps("scan", linear_ok=True) and _steppable(eqn)):
            return None
        return self._forward_steps(eqn, invals, [False] * len(invals))[0]

    def _forward_steps(self, eqn, invals, active):
        p = eqn.params
        body = p["jaxpr"]
        nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
        consts, carry, xs = list(invals[:nc]), list(invals[nc:nc + nk]), list(invals[nc + nk:])
        c_act, k_act, x_act = list(active[:nc]), list(active[nc:nc + nk]), \
            list(active[nc + nk:])
        n_ys = len(eqn.outvars) - nk
        where = short_where(eqn)
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        steps, ys_at, y_act = [], {}, [False] * n_ys
        for t in order:
            with compat.user_context(eqn):
                x_t = [lax.index_in_dim(x, t, keepdims=False) for x in xs]
            for x, xt in zip(xs, x_t):
                context.notify("link", xt, [x])
            context.notify("enter", "scan", t, where)
            try:
                outs, tape = sweeps.forward(body.jaxpr, body.consts, consts + carry + x_t,
                                            c_act + k_act + x_act)
            finally:
                context.notify("exit")
            carry = list(outs[:nk])
            k_act = list(tape.out_active[:nk])
            y_act = [a or b for a, b in zip(y_act, tape.out_active[nk:])]
            ys_at[t] = list(outs[nk:])
            steps.append((t, tape))
        ys = []
        for j in range(n_ys):
            parts = [ys_at[t][j] for t in range(length)]
            with compat.user_context(eqn):
                y = jnp.stack(parts)
            context.notify("link", y, parts)
            ys.append(y)
        return carry + ys, _Steps(steps, where), k_act + y_act

    def _backward_steps(self, record, cts_out):
        steps, where = record.sub.steps, record.sub.where
        p = record.eqn.params
        body = p["jaxpr"].jaxpr
        nc, nk = p["num_consts"], p["num_carry"]
        n_xs = len(record.invals) - nc - nk
        ct_carry, ct_ys = list(cts_out[:nk]), list(cts_out[nk:])
        const_parts = [[] for _ in range(nc)]
        xs_ct: dict = {}
        for t, tape in reversed(steps):
            cts_y = []
            for y in ct_ys:
                if y is None:
                    cts_y.append(None)
                    continue
                with compat.user_context(record.eqn):
                    yt = lax.index_in_dim(y, t, keepdims=False)
                context.notify("link", yt, [y])
                cts_y.append(yt)
            context.notify("enter", "scan", t, where)
            try:
                cts = ct_carry + cts_y
                context.notify("seed", body.outvars, cts)
                cts_in = sweeps.backward(tape, cts)
                context.notify("end_sweep", body, cts_in)
            finally:
                context.notify("exit")
            for i in range(nc):
                if cts_in[i] is not None:
                    const_parts[i].append(cts_in[i])
            ct_carry = list(cts_in[nc:nc + nk])
            xs_ct[t] = cts_in[nc + nk:]
        result = []
        for parts in const_parts:
            total = None
            for c in parts:
                total = c if total is None else lax.add(total, c)
            if len(parts) > 1:
                context.notify("link", total, parts)
            result.append(total)
        result += ct_carry
        in_avals = [v.aval for v in body.invars]
        for j in range(n_xs):
            per = [xs_ct[t][j] for t in range(len(steps))]
            if all(c is None for c in per):
                result.append(None)
                continue
            aval = in_avals[nc + nk + j]
            parts = [c if c is not None else jnp.zeros(aval.shape, aval.dtype) for c in per]
            stacked = jnp.stack(parts)
            context.notify("link", stacked, parts)
            result.append(stacked)
        return [c if a else None for c, a in zip(result, record.active)]


class _Steps:
    """What a stepped scan keeps: per step, in run order, ``(t, tape)``."""

    def __init__(self, steps, where):
        self.steps, self.where = steps, where


def _steppable(eqn) -> bool:
    """A scan small enough to run step by step for a tool (``control.UNROLL_LIMIT``)."""
    p = eqn.params
    return p["length"] > 0 and \
        p["length"] * control.unrolled_size(p["jaxpr"].jaxpr) <= control.UNROLL_LIMIT


call_handlers_reverse["scan"] = ScanCall()


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
