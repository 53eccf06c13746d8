"""The per-example sweep's handlers of ``lax.scan`` and checkpointed regions, which
keep parameter-side cotangents factored through them, and the entry point that
installs them: :func:`per_example_sweep` (see sweep.py for the sweep itself)."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .. import compat, context
from ..engine import sweeps
from ..registry import call_handlers_reverse
from ..rules import while_loop
from . import factored
from .factored import Factored, materialize
from .sweep import Delegated, Sweep, _carry_fixpoint, _differentiable, _is_var, dependent_vars


def _strong(x):
    return compat.with_weak_type(x, False)


def _zeros(aval):
    return jnp.zeros(aval.shape, aval.dtype)


class _Handler:
    """A handler of the per-example sweep in place of the engine's ``original``
    one, which it runs where the sweep does not factor (outside the trace the
    sweep was entered for)."""

    def __init__(self, original):
        self.original = original

    def evaluate(self, eqn, invals):
        return compat.bind_eqn(eqn, invals)

    def _factoring(self, eqn, invals, active):
        """``(sweep, None)`` where the sweep factors; else ``(None, forward)``,
        the engine's own forward, whose record the backward hands back to it."""
        sweep = context.current().per_example
        if sweep is None or not sweep.factoring_here():
            outs, sub, out_active = self.original.forward(eqn, invals, active)
            return None, (outs, Delegated(sub), out_active)
        return sweep, None

    def _delegated(self, record, cts_out):
        """The engine's own backward of a record its forward made, or None."""
        if not isinstance(record.sub, Delegated):
            return None
        return self.original.backward(dataclasses.replace(record, sub=record.sub.sub),
                                      [materialize(c) for c in cts_out])


@dataclasses.dataclass
class _ScanState:
    example: list      # per body input: example-dependent
    active: list       # per body input: differentiated
    carries: list      # each carry's value at the start of each step, stacked


# The stacked carries are forward values the tape keeps (a pytree leaf each).
jax.tree_util.register_pytree_node(
    _ScanState, lambda s: ((s.carries,), (tuple(s.example), tuple(s.active))),
    lambda aux, ch: _ScanState(list(aux[0]), list(aux[1]), list(ch[0])))


class ScanHandler(_Handler):
    """``lax.scan`` in a per-example sweep: the forward scan keeps each step's
    carries; the backward scan recomputes a step's forward sweep from them and
    runs our backward sweep over it (the body checkpointed, as
    ``lax.scan(jax.checkpoint(body))``), which keeps the cotangents of
    parameter-side constants factored. Their per-step factors are the backward
    scan's per-step outputs: stacked over the steps they are the factors of the
    whole loop (the steps join K, the rows), so a weight used at every step gets
    its exact norm with all cross terms. Per-step inputs' factors keep the step
    as a P dimension (a scan over stacked layers)."""

    def forward(self, eqn, invals, active):
        sweep, delegated = self._factoring(eqn, invals, active)
        if delegated is not None:
            return delegated
        p = eqn.params
        closed = p["jaxpr"]
        body = closed.jaxpr
        nc, nk = p["num_consts"], p["num_carry"]
        example = _carry_fixpoint(body, [sweep.example_dependent(x, v)
                                         for x, v in zip(invals, eqn.invars)], nc, nk)
        act = _carry_fixpoint(body, [bool(a) and _differentiable(v.aval)
                                     for a, v in zip(active, body.invars)], nc, nk)
        outs_dep = dependent_vars(body, act, set())
        out_active = [a and _differentiable(v.aval) for a, v in
                      zip(act[nc:nc + nk] + outs_dep[nk:], body.outvars)]
        consts, init, xs = list(invals[:nc]), list(invals[nc:nc + nk]), list(invals[nc + nk:])

        def fwd_body(carry, x):
            outs = compat.eval_jaxpr(body, closed.consts, *consts, *carry, *x)
            return list(outs[:nk]), (list(outs[nk:]), list(carry))

        with compat.user_context(eqn):
            carry_out, (ys, carries) = lax.scan(fwd_body, init, xs, length=p["length"],
                                                reverse=p["reverse"], unroll=p["unroll"])
        return list(carry_out) + list(ys), _ScanState(example, act, carries), out_active

    def backward(self, record, cts_out):
        delegated = self._delegated(record, cts_out)
        if delegated is not None:
            return delegated
        sweep = context.current().per_example
        st = record.sub
        eqn = record.eqn
        p = eqn.params
        closed = p["jaxpr"]
        body = closed.jaxpr
        nc, nk = p["num_consts"], p["num_carry"]
        n_ys = len(body.outvars) - nk
        n_in = len(body.invars)
        invals = record.invals
        consts, xs = list(invals[:nc]), list(invals[nc + nk:])
        act = st.active
        example_vars: set = set()
        dependent_vars(body, st.example, example_vars)
        cts_out = [materialize(c) for c in cts_out]
        act_carry = [k for k in range(nk) if act[nc + k]]
        carry_avals = [body.invars[nc + k].aval for k in act_carry]
        ys_present = [j for j in range(n_ys) if cts_out[nk + j] is not None]
        ct_carry0 = [_strong(cts_out[k]) if cts_out[k] is not None else _zeros(a)
                     for k, a in zip(act_carry, carry_avals)]
        ct_ys = [cts_out[nk + j] for j in ys_present]
        n_c, n_x = len(act_carry), len(xs)
        cell = {}

        def step(*flat):
            flat = list(flat)
            consts_, carry_t = flat[:nc], flat[nc:nc + nk]
            x_t = flat[nc + nk:nc + nk + n_x]
            ct_c = flat[nc + nk + n_x:nc + nk + n_x + n_c]
            ct_y = flat[nc + nk + n_x + n_c:]
            with sweep.scope(compat.current_trace(), example_vars):
                _, tape = sweeps.forward(body, closed.consts, consts_ + carry_t + x_t, act)
                cts = [None] * len(body.outvars)
                for k, c in zip(act_carry, ct_c):
                    cts[k] = c
                for j, c in zip(ys_present, ct_y):
                    cts[nk + j] = c
                cts_in = sweeps.backward(tape, cts)
            out = [_strong(materialize(cts_in[nc + k])) if cts_in[nc + k] is not None
                   else _zeros(a) for k, a in zip(act_carry, carry_avals)]
            specs = []
            for i in list(range(nc)) + list(range(nc + nk, n_in)):
                spec, arrays = factored.flatten(cts_in[i] if act[i] else None)
                if spec[0] == "dense":
                    arrays = [_strong(a) for a in arrays]
                specs.append(spec)
                out += arrays
            cell["specs"] = specs
            return out

        def spec(aval):
            return jax.ShapeDtypeStruct(aval.shape, aval.dtype,
                                        weak_type=bool(getattr(aval, "weak_type", False)))
        in_specs = ([spec(v.aval) for v in body.invars]
                    + [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in carry_avals]
                    + [jax.ShapeDtypeStruct(body.outvars[nk + j].aval.shape,
                                            body.outvars[nk + j].aval.dtype)
                       for j in ys_present])
        closed_step = jax.make_jaxpr(step)(*in_specs)
        out_avals = closed_step.out_avals
        specs = cell["specs"]
        const_specs, xs_specs = specs[:nc], specs[nc:]

        # Positions of each input's arrays among the step's outputs.
        layout, pos = [], n_c
        for sp in specs:
            count = factored.spec_count(sp)
            layout.append(list(range(pos, pos + count)))
            pos += count
        acc_pos = [layout[i][-1] for i, sp in enumerate(const_specs)
                   if sp[0] == "dense" or (sp[0] == "factored" and sp[2])]
        accs0 = [_zeros(out_avals[j]) for j in acc_pos]
        per_step = [j for i, sp in enumerate(const_specs) if sp[0] == "factored"
                    for j in layout[i][:2 * len(sp[1])]]
        per_step += [j for i in range(nc, len(specs)) for j in layout[i]]
        # A per-step factor that is a view of a step's input (the carry or the
        # ``xs`` slice a weight multiplies) is taken from the stacked inputs, and
        # factors that are the same view of one value are stacked once.
        stacked_inputs = [None] * nc + list(st.carries) + xs
        sources = _per_step_sources(closed_step.jaxpr, per_step)
        emitted, from_input = [], {}
        for j in per_step:
            src = sources[j]
            if src[0] == "input" and stacked_inputs[src[1]] is not None:
                from_input[j] = src
            elif src not in emitted:
                emitted.append(src)
        emit_pos = [src[1] for src in emitted]

        def bwd_body(carry, x):
            ct_c, accs = carry
            carry_t, x_t, ct_y = x
            flat = compat.eval_jaxpr(closed_step.jaxpr, closed_step.consts,
                                     *consts, *carry_t, *x_t, *ct_c, *ct_y)
            new_accs = [lax.add(a, flat[j]) for a, j in zip(accs, acc_pos)]
            return (list(flat[:n_c]), new_accs), [flat[j] for j in emit_pos]

        with compat.user_context(eqn):
            (ct_c, accs), stacked = lax.scan(
                bwd_body, (ct_carry0, accs0), (list(st.carries), xs, ct_ys),
                length=p["length"], reverse=not p["reverse"], unroll=p["unroll"])
            stacked_of = {}
            for j in per_step:
                if j in from_input:
                    _, i, chain = from_input[j]
                    stacked_of[j] = jax.vmap(lambda x, chain=chain: _apply_chain(chain, x))(
                        stacked_inputs[i])
                else:
                    stacked_of[j] = stacked[emitted.index(sources[j])]

        result = [None] * len(invals)
        for k, c in zip(act_carry, ct_c):
            result[nc + k] = c
        acc_of = dict(zip(acc_pos, accs))
        for i, sp in enumerate(const_specs):
            aval = body.invars[i].aval
            if sp[0] == "dense":
                result[i] = acc_of[layout[i][0]]
            elif sp[0] == "factored":
                uses = []
                for g, (key, lk, rk) in enumerate(sp[1]):
                    L, R = (_steps_into_rows(factored._unflat_factor(
                        kind, stacked_of[layout[i][2 * g + h]]), len(key[0]))
                        for h, kind in ((0, lk), (1, rk)))
                    uses.append((key, L, R))
                dense = acc_of.get(layout[i][-1]) if sp[2] else None
                result[i] = factored.with_norm(Factored(aval.shape, aval.dtype, uses, dense))
                sweep.loop_factors.update(id(getattr(x, "idx", x)) for _, L, R in uses
                                          for x in (L, R))
        for j, sp in enumerate(xs_specs):
            i = nc + nk + j
            lay = layout[nc + j]
            if sp[0] == "dense":
                result[i] = stacked_of[lay[0]]
            elif sp[0] == "factored":
                uses = []
                for g, ((pd, md, nd), lk, rk) in enumerate(sp[1]):
                    key = ((0,) + tuple(d + 1 for d in pd), tuple(d + 1 for d in md),
                           tuple(d + 1 for d in nd))
                    L, R = (factored._dense_factor(factored._unflat_factor(
                        kind, stacked_of[lay[2 * g + h]])) for h, kind in ((0, lk), (1, rk)))
                    uses.append((key, L, R))
                dense = stacked_of[lay[-1]] if sp[2] else None
                aval = compat.typeof(invals[i])
                result[i] = factored.with_norm(Factored(aval.shape, aval.dtype, uses, dense))
                sweep.loop_factors.update(id(getattr(x, "idx", x)) for _, L, R in uses
                                          for x in (L, R))
        return [c if a else None for c, a in zip(result, record.active)]


# Primitives that only rearrange or relabel one array.
_VIEWS = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
                    "convert_element_type", "copy", "copy_p"})


def _per_step_sources(jaxpr, positions):
    """Per output position, where its value comes from: ``("input", i, chain)``
    (input ``i`` through a chain of view equations) or ``("value", j, chain)``
    where ``j`` is the first output position of the same view of the same value."""
    producer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producer[v] = eqn
    invar_pos = {v: i for i, v in enumerate(jaxpr.invars)}
    out, first = {}, {}
    for j in positions:
        v = jaxpr.outvars[j]
        chain = []
        while _is_var(v) and v in producer:
            e = producer[v]
            if e.primitive.name not in _VIEWS or len(e.invars) != 1:
                break
            chain.append(e)
            v = e.invars[0]
        chain = tuple(reversed(chain))
        if _is_var(v) and v in invar_pos:
            out[j] = ("input", invar_pos[v], chain)
            continue
        signature = (v, tuple((e.primitive.name, repr(sorted(e.params.items()))) for e in chain))
        out[j] = ("value", first.setdefault(signature, j), ())
    return out


def _apply_chain(chain, x):
    for e in chain:
        x, = compat.bind_eqn(e, [x])
    return x


def _steps_into_rows(x, n_p):
    """``[T, P..., K, ...] -> [P..., T*K, ...]``: a loop's steps become rows."""
    if type(x) is factored.OneHot:
        return factored.OneHot(lax.reshape(x.idx, (factored._prod(x.idx.shape),)), x.depth,
                               x.dtype)
    if n_p == 0 and x.shape[1] == 1:
        # One row a step: dropping the unit axis keeps the vmap's layout (a
        # reshape would move the examples' axis to the front, a copy).
        return lax.squeeze(x, (1,))
    perm = list(range(1, n_p + 1)) + [0] + list(range(n_p + 1, x.ndim))
    x = lax.transpose(x, tuple(perm))
    shape = list(x.shape)
    shape[n_p:n_p + 2] = [shape[n_p] * shape[n_p + 1]]
    return lax.reshape(x, tuple(shape))


@dataclasses.dataclass
class _Recompute:
    jaxpr: object
    consts: list
    prevent_cse: bool
    active: list
    while_slots: tuple | None     # the region's request for its while loops


class RematHandler(_Handler):
    """A checkpointed region (``fb.checkpoint`` / ``jax.checkpoint``, with a
    policy or a memory budget) in a per-example sweep: the forward evaluates it
    keeping only its inputs; the backward recomputes it with our own forward
    sweep (behind ``lax.optimization_barrier``) and sweeps it back, keeping
    factored cotangents. A policy's or plan's saved values are recomputed too:
    the result is the same, the memory the least."""

    # Its backward is our own sweep over the region's body (unless delegated),
    # which takes factored or summed cotangents as they are (sweep.py).
    sweeps_body_here = True

    def forward(self, eqn, invals, active):
        sweep, delegated = self._factoring(eqn, invals, active)
        if delegated is not None:
            return delegated
        jaxpr, opts = compat.remat_inner(eqn.params)
        consts = list(getattr(jaxpr, "consts", []))
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        prevent_cse = opts["prevent_cse"]
        if not isinstance(prevent_cse, bool):
            prevent_cse = any(prevent_cse)
        request, _ = while_loop.unwrap_policy(opts["policy"])
        with compat.user_context(eqn):
            outs = compat.eval_jaxpr(jaxpr, consts, *invals)
        act = [bool(a) and _differentiable(v.aval) for a, v in zip(active, jaxpr.invars)]
        out_active = [a and _differentiable(v.aval)
                      for a, v in zip(dependent_vars(jaxpr, act, set()), jaxpr.outvars)]
        return list(outs), _Recompute(jaxpr, consts, prevent_cse, act, request), out_active

    def backward(self, record, cts_out):
        delegated = self._delegated(record, cts_out)
        if delegated is not None:
            return delegated
        sub = record.sub
        invals = list(record.invals)
        cts = list(cts_out)
        if sub.prevent_cse:
            # The recomputation waits for the cotangents and cannot be merged
            # with the forward computation.
            idx = [i for i, x in enumerate(invals)
                   if compat.is_tracer(x) or isinstance(x, jax.Array)]
            cidx = [i for i, c in enumerate(cts)
                    if c is not None and type(c) not in factored.SYMBOLIC]
            barred = lax.optimization_barrier([invals[i] for i in idx] + [cts[i] for i in cidx])
            for i, x in zip(idx, barred[:len(idx)]):
                invals[i] = x
            for i, c in zip(cidx, barred[len(idx):]):
                cts[i] = c
        # The region's request for the while loops in it (while_loop_checkpoints,
        # a memory budget) holds while it is recomputed and swept, as in the
        # engine's own checkpoint handler.
        slots = context.current().while_slots if sub.while_slots is None else sub.while_slots
        with compat.user_context(record.eqn), context.using(while_slots=slots):
            _, tape = sweeps.forward(sub.jaxpr, sub.consts, invals, sub.active)
            return sweeps.backward(tape, cts)


@contextlib.contextmanager
def per_example_sweep(batch_trace):
    """Runs the enclosed forward and backward sweeps as a per-example sweep of
    the ``vmap`` whose trace is ``batch_trace``: the sweep is the sweep context's
    ``per_example``, and nested calls are swept in place (their equations are
    then the vmap's, so the example dependence of their values is visible)."""
    handlers = {"scan": ScanHandler(call_handlers_reverse["scan"])}
    for name in compat.REMAT_NAMES:
        handlers[name] = RematHandler(call_handlers_reverse[name])
    sweep = Sweep(batch_trace, handlers)
    with context.using(per_example=sweep, in_place=True):
        yield sweep
