"""Staged functions: fbackprop's own sweeps bound as calls, traced once per types.

A nested ``jit``'s forward and backward sweeps, a scan body's tangent sweep, a
checkpointed region's parts: each is a function of a flat list of arrays that
fbackprop traces once per input types and then binds like a call to a jitted
function, copied into an enclosing ``jit`` trace as ``jit(..., inline=True)``
would (:class:`StagedFunction`), or, for a jaxpr fbackprop built itself, bound
as one ``jit`` equation with nothing traced (:class:`JaxprFunction`). Part of
the JAX shim: it reads JAX's tracing internals, which change between versions.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax._src import core as jcore
from jax._src import source_info_util

from .compat import ClosedJaxpr, Jaxpr, Literal, is_plain_jit, spec_of, typeof

from jax._src.interpreters import partial_eval as _pe  # noqa: E402
from jax._src import mesh as _mesh_lib  # noqa: E402
from jax._src.pjit import jit_p as _jit_p  # noqa: E402

from jax._src.interpreters import batching as _batching  # noqa: E402

_DynamicJaxprTrace = _pe.DynamicJaxprTrace
_BatchTrace = _batching.BatchTrace


_BATCH_TRACER_SLOTS = ("val", "batch_dim", "source_info")


def _batch_tracer(trace, val, dim, aval, src):
    """A vmap tracer of ``val`` batched along ``dim`` whose per-example type
    ``aval`` is already known (the unbatched jaxpr's output type), so it is not
    derived again from ``val``'s type."""
    if tuple(_batching.BatchTracer.__slots__) != _BATCH_TRACER_SLOTS:  # pragma: no cover
        return _batching.BatchTracer(trace, val, dim, src)
    t = object.__new__(_batching.BatchTracer)
    jcore.Tracer.__init__(t, trace, aval)
    t.val, t.batch_dim, t.source_info = val, dim, src
    return t


class _InlinePlan:
    """A closed jaxpr laid out for copying into a jit trace again and again: what
    ``jit(..., inline=True)`` does with its jaxpr (JAX's ``inline_jaxpr_into_trace``,
    the same equations in the same order), with the variables numbered once
    instead of looked up by name on every copy."""

    def __init__(self, closed: ClosedJaxpr):
        jaxpr = closed.jaxpr
        index: dict = {}
        for v in jaxpr.invars:
            index[v] = len(index)
        self.consts = list(closed.consts)
        for v in jaxpr.constvars:
            index[v] = len(index)
        atom = lambda v: v if type(v) is Literal else index[v]  # noqa: E731
        self.steps = []
        self.has_effects = False
        for eqn in jaxpr.eqns:
            ins = tuple(atom(v) for v in eqn.invars)
            for v in eqn.outvars:
                index[v] = len(index)
            self.has_effects |= bool(eqn.effects)
            self.steps.append((ins, [v.aval for v in eqn.outvars], eqn.primitive,
                               eqn.params, eqn.effects, eqn.ctx,
                               eqn.source_info.name_stack,
                               eqn.primitive in _pe.const_fold_rules))
        self.outs = tuple(atom(v) for v in jaxpr.outvars)
        self.closed = closed

    def __call__(self, trace, args) -> list:
        src = source_info_util.current()
        if self.has_effects:
            tracers = [trace.to_jaxpr_tracer(x, src) for x in args]
            outs = _pe.inline_jaxpr_into_trace(trace, src, self.closed.jaxpr,
                                               self.closed.consts, *tracers)
            return [trace.to_jaxpr_tracer(x, src) for x in outs]
        to_tracer = trace.to_jaxpr_tracer
        env = [to_tracer(x, src) for x in args]
        env.extend(trace.new_const(c, src) for c in self.consts)
        emit = trace.emit_eqn
        sources: dict = {}     # an equation's name stack -> its source info
        for ins, out_avals, prim, params, effects, ctx, name_stack, folds in self.steps:
            if not name_stack:
                src_ = src
            else:
                src_ = sources.get(name_stack)
                if src_ is None:
                    src_ = sources[name_stack] = src.replace(
                        name_stack=src.name_stack + name_stack)
            in_tracers = [env[i] if type(i) is int else
                          _pe.DynamicJaxprTracer(trace, i.aval, i, src_) for i in ins]
            if folds:
                folded = _pe.try_constant_folding(prim, in_tracers, params, out_avals)
                if folded is not None:
                    env.extend(trace.new_const(c, source_info=src_, aval=a)
                               for c, a in zip(folded, out_avals))
                    continue
            env.extend(emit(in_tracers, out_avals, prim, params, effects, src_, ctx))
        return [env[i] if type(i) is int else
                to_tracer(_pe.DynamicJaxprTracer(trace, i.aval, i, src), src)
                for i in self.outs]


def _inline(trace, closed: ClosedJaxpr, args, plans: dict) -> list:
    """Copies ``closed`` applied to ``args`` into a jit trace; ``plans`` caches
    the copying plan per jaxpr."""
    hit = plans.get(id(closed))
    if hit is None or hit.closed is not closed:
        hit = plans[id(closed)] = _InlinePlan(closed)
    return hit(trace, args)


class StagedFunction:
    """A function of a flat list of arrays, traced once per input types and bound
    like a call to a jitted function, without jax.jit's argument handling.

    ``fn(args) -> outs`` takes a list of arrays and returns a list whose entries
    are arrays or ``None`` (a ``None`` stays ``None``; it must not depend on the
    values). Inside an enclosing ``jit`` trace an ``inline`` function's jaxpr is
    copied into the trace directly (what ``jit(..., inline=True)`` does after its
    argument handling, which costs more than the copy for a small function);
    otherwise, and in any other trace, a ``jit`` equation is bound. JAX's own
    transposes of nested jits are cached the same way.
    """

    def __init__(self, fn: Callable, inline: bool, name: str):
        self.fn, self.inline, self.name = fn, inline, name
        self._staged: dict = {}
        self._plans: dict = {}
        self._batched: dict = {}
        # Staged functions derived from this one (its tangent sweep...), kept by
        # the trace hooks that bind it (see STAGED_CALL_HOOKS).
        self.derived: dict = {}

    def _stage(self, args):
        mask: list = []

        def flat(*xs):
            outs = self.fn(list(xs))
            mask[:] = [o is not None for o in outs]
            return [o for o in outs if o is not None]
        flat.__name__ = flat.__qualname__ = self.name
        closed = jax.make_jaxpr(jax.jit(flat, inline=False))(*[spec_of(x) for x in args])
        eqns = closed.jaxpr.eqns
        assert (len(eqns) == 1 and eqns[0].primitive is _jit_p and not closed.consts
                and eqns[0].invars == closed.jaxpr.invars
                and eqns[0].outvars == closed.jaxpr.outvars), closed
        params = dict(eqns[0].params, inline=self.inline)
        direct = self.inline and is_plain_jit(params) and not params["jaxpr"].jaxpr.is_high
        return params, tuple(mask), direct

    def __call__(self, args: list, types: tuple | None = None) -> list:
        """Binds the function on ``args``; ``types``, when the caller has it, is
        ``tuple(map(typeof, args))``."""
        key = (tuple(map(typeof, args)) if types is None else types,
               _mesh_lib.get_abstract_mesh())
        hit = self._staged.get(key)
        if hit is None:
            hit = self._staged[key] = self._stage(args)
        params, mask, direct = hit
        trace = jcore.trace_ctx.trace
        if direct and type(trace) is _DynamicJaxprTrace:
            outs = _inline(trace, params["jaxpr"], args, self._plans)
        elif (direct and type(trace) is _BatchTrace
              and type(trace.parent_trace) is _DynamicJaxprTrace
              and trace.axis_data.spmd_name is None):
            # Under vmap: batch the jaxpr (cached per jaxpr and batch dims, as
            # jit's batching rule does) and copy it into the enclosing jit trace.
            vals, dims = zip(*map(trace.to_batch_info, args)) if args else ((), ())
            bkey = (key, dims, trace.axis_data)
            hit = self._batched.get(bkey)
            if hit is None:
                hit = self._batched[bkey] = _batching.batch_jaxpr2(
                    params["jaxpr"], trace.axis_data, tuple(dims))
            batched, out_dims = hit
            src = source_info_util.current()
            outs = [x if d is None else _batch_tracer(trace, x, d, aval, src)
                    for x, d, aval in zip(_inline(trace.parent_trace, batched, vals,
                                                  self._plans),
                                          out_dims, params["jaxpr"].out_avals)]
        else:
            hook = STAGED_CALL_HOOKS.get(type(trace))
            outs = None if hook is None else hook(self, trace, args, params)
            if outs is None:
                outs = _jit_p.bind_with_trace(trace, args, tuple(map(typeof, args)), params)
        it = iter(outs)
        return [next(it) if m else None for m in mask]


# trace type -> hook(staged_function, trace, args, jit_params): the function's
# outputs bound in that trace by a shorter path than its jit equation's rule
# there (``None``: bind the jit equation). fbackprop's forward-mode trace
# registers one that binds the function's memoized tangent sweep.
STAGED_CALL_HOOKS: dict = {}


_JIT_TEMPLATE: dict = {}


def _jit_params(closed: ClosedJaxpr, name: str) -> dict:
    """The parameters of a plain ``jit`` equation (no shardings, layouts or
    donation) calling ``closed``, in the current mesh context, as ``jax.jit``
    makes them."""
    from jax._src import pjit as _pjit
    if not _JIT_TEMPLATE:
        probe = jax.make_jaxpr(jax.jit(lambda x: x))(np.float32(0)).jaxpr.eqns[0]
        _JIT_TEMPLATE.update(probe.params)
    n_in, n_out = len(closed.jaxpr.invars), len(closed.jaxpr.outvars)
    unspecified = _JIT_TEMPLATE["in_shardings"][0]
    return dict(_JIT_TEMPLATE, jaxpr=closed, in_shardings=(unspecified,) * n_in,
                out_shardings=(unspecified,) * n_out, in_layouts=(None,) * n_in,
                out_layouts=(None,) * n_out, donated_invars=(False,) * n_in,
                ctx_mesh=_pjit.get_ctx_mesh(False), name=name, keep_unused=False,
                inline=False)


class JaxprFunction:
    """An existing jaxpr bound as one ``jit`` equation, with nothing traced: the
    staged form of a jaxpr fbackprop built itself (a checkpointed region's
    forward or backward part). Its arguments must have exactly the types of
    the jaxpr's inputs (weak types included), or ``__call__`` returns ``None``."""

    def __init__(self, jaxpr: Jaxpr, consts, name: str):
        self.in_avals = [v.aval for v in jaxpr.invars]
        self._closed = ClosedJaxpr(jaxpr, list(consts))
        self._name = name
        self._params: dict = {}

    def __call__(self, args: list):
        avals = tuple(map(typeof, args))
        if len(avals) != len(self.in_avals) or any(
                a != b for a, b in zip(avals, self.in_avals)):
            return None
        mesh = _mesh_lib.get_abstract_mesh()
        params = self._params.get(mesh)
        if params is None:
            params = self._params[mesh] = _jit_params(self._closed, self._name)
        return _jit_p.bind_with_trace(jcore.trace_ctx.trace, args, avals, params)


