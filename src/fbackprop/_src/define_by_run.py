"""Define-by-run sweeps: the user's function runs on fbackprop's own traces.

``fb.grad``, ``fb.value_and_grad``, ``fb.vjp`` and ``fb.jvp`` do not stage the
function into a jaxpr first. They call it on tracers of a trace of our own,
the way ``jax.grad`` calls it on its tracers; every primitive the function
binds reaches :meth:`RecordingTrace.process_primitive`, which runs that one
equation's forward step (:func:`reverse.forward_eqn`: bind it in the enclosing
trace, keep what its VJP rule will need) and appends the record to the tape.
The backward sweep is the same :func:`reverse.backward` that runs over staged
jaxprs.

Consequences, all as with ``jax.grad``:

- Eagerly the values are concrete, so ``if x > 0:`` on a differentiated value,
  ``int(n)`` or NumPy on a non-differentiated argument, lists indexed by
  concrete ints, a ``fori_loop`` with a concrete trip count, try/except
  fallbacks all work.
- Under ``jax.jit`` / ``vmap`` / an outer derivative the enclosing trace simply
  receives the primitives (no separate staging step, and errors name the
  user's function, not ours).
- Only values that depend on a differentiated input are tracers; everything
  else is what it would be without fbackprop.

Call-like primitives whose parameters are Python functions (``custom_jvp``,
``custom_vjp`` under forward mode, ``core.call``, ``shard_map``) are staged
into a small jaxpr with JAX's tracing and swept like any call. ``custom_vjp``
in reverse mode runs the user's ``fwd`` on the concrete values, as JAX does.

Forward mode uses :class:`TangentTrace`, whose tracers carry a primal and a
tangent and whose equations go through :func:`forward.jvp_eqn`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from . import compat, eager, forward, reverse
from .registry import (call_handlers_reverse, vjp_rules, is_differentiable_dtype,
                       nondiff_primitives, foreign_rules, known_custom_jvp)

Var = compat.Var


def _differentiable(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


# ================================================================ reverse mode
class _ValueTracer(compat.Tracer):
    """A tracer of ours standing for a value of the enclosing trace (``_fb_value()``):
    concrete eagerly, so Python control flow on it works.

    Besides the methods of JAX's tracer protocol it overrides, its attributes
    are named ``_fb_*``, which no ``jax.Array`` or ``Tracer`` attribute is: a
    tracer attribute named like an array method would hide it from the user's
    code (a slot ``var`` made ``x.var()`` fail). tests/test_array_surface.py
    checks it."""
    __slots__ = ()

    def _fb_value(self):
        raise NotImplementedError

    def to_concrete_value(self):
        return compat.to_concrete_value(self._fb_value())

    def get_referent(self):
        return compat.get_referent(self._fb_value())

    def full_lower(self):
        return self

    def cur_qdd(self):
        return self._fb_value().cur_qdd()


class _StagingCalls:
    """``core.call`` and ``shard_map`` binds, staged by the trace's ``_stage``."""

    def process_call(self, prim, f, tracers, params):
        return self._stage(
            tracers,
            lambda t, xs: t.process_call(prim, f, xs, params),
            lambda xs: prim.bind_with_trace(self.parent, xs,
                                            tuple(compat.typeof(x) for x in xs),
                                            dict(params, subfuns=(f,))))

    def process_shard_map(self, prim, fun, args, **params):
        return self._stage(
            args,
            lambda t, xs: t.process_shard_map(prim, fun, xs, **params),
            lambda xs: self.parent.process_shard_map(prim, fun, xs, **params))

    def cur_qdd(self, x):
        value = self.unpack([x])[0][0]
        with compat.set_current_trace(self.parent):
            return compat.cur_qdd(value)


def _stage_call(process: Callable, vals: list):
    """Stages a call-like bind (``process(trace, args)``) into a jaxpr over ``vals``'
    types. Returns ``(jaxpr, consts, restructure)``: the jaxpr takes the consts
    first; ``restructure(outs)`` gives the call's outputs the structure the bind
    returned (a plain list, or JAX's object with ``vals``/``update``)."""
    import jax
    structure: list = []

    def staged(*xs):
        out = process(compat.current_trace(), xs)
        structure.append(out)
        return list(getattr(out, "vals", out))

    closed = jax.make_jaxpr(staged)(*[compat.spec_of(x) for x in vals])
    jaxpr, consts = compat.constvars_to_invars(closed)

    def restructure(outs):
        out = structure[0]
        return out.update(outs) if hasattr(out, "update") and hasattr(out, "vals") else outs
    return jaxpr, consts, restructure


def _rule_keeps_types(jaxpr, in_active) -> bool:
    """Whether the ``custom_jvp_call`` staged in ``jaxpr`` (``in_active``: per
    input of ``jaxpr``, whether it is differentiated) has a JVP rule whose primal
    outputs have the call's own shapes and dtypes. The rule is traced for the
    zero tangents the backward sweep will give it (the trace is memoized)."""
    active = dict(zip(jaxpr.invars, in_active))
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != compat.CUSTOM_JVP_CALL:
            continue
        _, num_consts, jvp_jaxpr_of = compat.custom_jvp_parts(eqn.params)
        args = eqn.invars[num_consts:]
        if eqn.params.get("symbolic_zeros", False):
            zeros = [type(v) is compat.Literal or not active.get(v, False) for v in args]
        else:
            zeros = [False] * len(args)
        rule, _, _ = jvp_jaxpr_of(zeros)
        rule_avals = [v.aval for v in rule.outvars[:len(eqn.outvars)]]
        if any((a.shape, a.dtype) != (v.aval.shape, v.aval.dtype)
               for a, v in zip(rule_avals, eqn.outvars)):
            return False
    return True


class RecordingTracer(_ValueTracer):
    """A value that depends on a differentiated input: its value and its variable."""
    __slots__ = ["_fb_val", "_fb_var"]

    def __init__(self, trace, val, var, aval=None):
        super().__init__(trace, compat.typeof(val) if aval is None else aval)
        self._fb_val = val
        self._fb_var = var

    def _fb_value(self):
        return self._fb_val

    def _short_repr(self):
        return f"RecordingTracer({self._fb_val!r})"

    def _contents(self):
        # Marks this value as differentiated for jax.closure_convert (see compat).
        return [("val", self._fb_val), ("differentiated", compat.DIFFERENTIATED)]


def _needs_avals_first(prim) -> bool:
    """Handlers and rules with their own forward read the output avals first."""
    name = prim.name
    if name in call_handlers_reverse:
        return True
    rule = vjp_rules.get(name)
    if rule is not None:
        return rule.fwd is not None
    # A library primitive differentiated with the library's own rules.
    return (name not in nondiff_primitives
            and foreign_rules["reverse_handler"](prim, False) is not None)


def _binds_as_is(prim) -> bool:
    """The primitive has a VJP rule of its own with no forward half, no handler
    replaces it and it is differentiable: its forward sweep is binding it."""
    name = prim.name
    rule = vjp_rules.get(name)
    return (rule is not None and rule.fwd is None and name not in call_handlers_reverse
            and name not in nondiff_primitives and not reverse.handler_overrides)


class RecordingTrace(_StagingCalls, compat.Trace):
    """Runs each primitive in the enclosing trace and records its equation."""

    def __init__(self, parent, tape_only: bool = False, linear: str | None = None):
        super().__init__()
        self.parent = parent
        # linear: this trace records a custom_jvp rule as a function of its
        # tangents (see _linearize_custom_jvp); ``linear`` names the rule.
        self.linear = linear
        self.records: list = []
        # tape_only: record the program only (fbackprop.linearize differentiates
        # the recorded jaxpr in forward mode), without the reverse rules'
        # forward halves, which would build backward programs nothing runs.
        self.tape_only = tape_only
        # Hi-level primitives (remat3 checkpoints, custom_vjp3 functions) reach
        # us as they are, so their own semantics are kept.
        self.requires_low = False
        # An eager program-only recording (see eager.py): equations learn their
        # output types from the values, and calls run as cached jitted calls.
        self.eager = tape_only and compat.is_eager()

    def invalidate(self):
        # Recorded equations can refer back to this trace (a custom_jvp rule's
        # thunk closes over the trace it was staged in, whose parent this is);
        # dropping the records and the enclosing trace here keeps a returned
        # vjp_fn from keeping an enclosing jit's trace alive.
        super().invalidate()
        self.parent, self.records = None, []

    # -- helpers
    def unpack(self, tracers):
        vals, act, invars = [], [], []
        for x in tracers:
            if type(x) is RecordingTracer and x._trace is self:
                vals.append(x._fb_val)
                act.append(True)
                invars.append(x._fb_var)
            else:
                vals.append(x)
                act.append(False)
                invars.append(None)
        return vals, act, invars

    def wrap(self, outvals, outvars, out_act):
        return [RecordingTracer(self, x, v, v.aval) if a else x
                for x, v, a in zip(outvals, outvars, out_act)]

    @staticmethod
    def _vars(vals, invars):
        return [v if v is not None else Var(compat.typeof(x)) for x, v in zip(vals, invars)]

    def _forward_eqn(self, eqn, vals, act, late):
        if not self.tape_only:
            return reverse.forward_eqn(eqn, vals, act, late_outvars=late)
        outvals = eager.bind(eqn, vals) if self.eager else compat.bind_eqn(eqn, vals)
        if late:
            eqn = eqn.replace(outvars=[Var(compat.typeof(x)) for x in outvals])
        if eqn.primitive.name in nondiff_primitives:
            return outvals, None, None
        out_act = [_differentiable(v.aval) for v in eqn.outvars]
        if not any(out_act):
            return outvals, None, out_act
        return outvals, reverse.Record(eqn, vals, outvals, act, None, None), out_act

    def _sweep_context(self):
        # An enclosing linear sweep's check is about the equations of that sweep,
        # not about what this trace records when the sweep binds into it.
        if self.linear is None:
            return reverse.outside_linear_sweeps()
        return reverse.linear_sweep(self.linear)

    # -- the trace protocol
    def stage_value(self, val):
        (x,), (a,), (v,) = self.unpack([val])
        staged = self.parent.stage_value(x)
        return RecordingTracer(self, staged, v) if a else staged

    def process_primitive(self, prim, tracers, params):
        vals, act, invars = self.unpack(tracers)
        if not any(act):
            return prim.bind_with_trace(self.parent, vals,
                                        tuple(compat.typeof(x) for x in vals), params)
        invars = self._vars(vals, invars)
        source_info = compat.current_source_info()
        plain = self.linear is None and not reverse.in_linear_sweep()
        if plain and not self.tape_only and _binds_as_is(prim):
            return self._record_as_is(prim, params, vals, act, invars, source_info)
        if not self.eager and _needs_avals_first(prim):
            eqn = compat.typed_eqn(prim, params, invars, source_info)
            late = False
        else:
            eqn = compat.new_eqn(invars, [], prim, params, compat.no_effects, source_info)
            late = True
        if plain:
            with compat.set_current_trace(self.parent):
                outvals, rec, out_act = self._forward_eqn(eqn, vals, act, late)
        else:
            with compat.set_current_trace(self.parent), self._sweep_context():
                outvals, rec, out_act = self._forward_eqn(eqn, vals, act, late)
        if rec is None:
            outs = outvals
        else:
            self.records.append(rec)
            outs = self.wrap(outvals, rec.eqn.outvars, out_act)
        return outs if prim.multiple_results else outs[0]

    def _record_as_is(self, prim, params, vals, act, invars, source_info):
        """A primitive whose VJP rule needs nothing from the forward sweep but its
        inputs and outputs: bound in the enclosing trace (we are in the user's
        call, so its source line is the current one) and recorded."""
        with compat.set_current_trace(self.parent):
            out = prim.bind_with_trace(self.parent, vals,
                                       tuple(compat.typeof(x) for x in vals), params)
        outvals = list(out) if prim.multiple_results else [out]
        outvars = [Var(compat.typeof(x)) for x in outvals]
        out_act = [_differentiable(v.aval) for v in outvars]
        if not any(out_act):
            return out
        eqn = compat.new_eqn(invars, outvars, prim, params, compat.no_effects, source_info)
        self.records.append(reverse.Record(eqn, vals, outvals, act, None, None))
        outs = self.wrap(outvals, outvars, out_act)
        return outs if prim.multiple_results else outs[0]

    def _stage(self, tracers, process: Callable, prim_for_parent: Callable):
        """Stages a call-like bind into a jaxpr and records it as one call.

        ``process(trace, args)`` performs the bind on a staging trace;
        ``prim_for_parent(args)`` performs it in the enclosing trace when no
        input is differentiated.
        """
        vals, act, _ = self.unpack(tracers)
        if not any(act):
            with compat.set_current_trace(self.parent):
                return prim_for_parent(vals)
        return self._record_staged(tracers, *_stage_call(process, vals))

    def _record_staged(self, tracers, jaxpr, consts, restructure):
        """Records a call staged by :func:`_stage_call` as one ``closed_call``."""
        vals, act, invars = self.unpack(tracers)
        call = compat.ClosedJaxpr(jaxpr, [])
        c_vals, c_act, c_vars = self.unpack(consts)
        all_vals, all_act = c_vals + vals, c_act + act
        all_vars = self._vars(c_vals + vals, c_vars + invars)
        eqn = compat.new_eqn(all_vars, [Var(v.aval) for v in jaxpr.outvars],
                             compat.closed_call_p, dict(call_jaxpr=call),
                             compat.join_effects(jaxpr.eqns), compat.current_source_info())
        with compat.set_current_trace(self.parent), self._sweep_context():
            outvals, rec, out_act = self._forward_eqn(eqn, all_vals, all_act, False)
        if rec is None:
            outs = outvals
        else:
            self.records.append(rec)
            outs = self.wrap(outvals, eqn.outvars, out_act)
        return restructure(outs)

    def process_custom_jvp_call(self, prim, fun, jvp, tracers, *, symbolic_zeros):
        params = dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros)
        vals, act, _ = self.unpack(tracers)
        if not any(act):
            with compat.set_current_trace(self.parent):
                return compat.bind_in(self.parent, prim, vals, params)
        if self.linear is not None:
            # Applied to a tangent inside a rule being transposed, a custom_jvp
            # function is part of a linear map: differentiated through its body.
            with compat.set_current_trace(self):
                return fun.call_wrapped(*tracers)
        if reverse.sweeps_unwatched():
            known = known_custom_jvp(fun, jvp)
            if known is not None:
                return self._known_custom_jvp(prim, params, known, tracers)
            if not self.tape_only and not compat.is_eval_trace(self.parent):
                return self._linearize_custom_jvp(prim, fun, jvp, tracers, symbolic_zeros)
        staged = _stage_call(
            lambda t, xs: t.process_custom_jvp_call(prim, fun, jvp, xs,
                                                    symbolic_zeros=symbolic_zeros), vals)
        if not _rule_keeps_types(staged[0], self.unpack(staged[1])[1] + act):
            # A vmap of a custom_jvp function whose output does not depend on the
            # batched input: the function's output is unbatched, its rule's
            # primal and tangent outputs are batched. Differentiated as JAX does
            # (the rule's outputs are the values), the batch survives; the
            # function's unbatched output could only carry a cotangent summed
            # over the batch. Only the rule reports the output batching then.
            compat.reset_stores(fun)
            compat.reset_stores(jvp)
            return self._linearize_custom_jvp(prim, fun, jvp, tracers, symbolic_zeros)
        out = self._record_staged(tracers, *staged)
        # The staged function was traced; if an enclosing forward-mode trace
        # also ran the rule, custom_jvp expects only one of the two to report
        # its output structure.
        compat.reset_stores(jvp)
        return out

    def _known_custom_jvp(self, prim, params, handler, tracers):
        """Reverse mode of one of JAX's own custom_jvp functions whose derivative
        fbackprop knows (``jax.nn.relu``...): the call is bound as it is (eagerly,
        the function just runs), and the backward sweep applies fbackprop's rule,
        the transpose of JAX's rule, without running the rule in the forward sweep.

        Eagerly the recorded equation is a whole ``custom_jvp_call`` (its
        parameters traced once per input types), so a compiled eager program can
        key and evaluate it; under a transformation only the backward sweep
        reads it."""
        vals, act, invars = self.unpack(tracers)
        with compat.set_current_trace(self.parent):
            outs = compat.bind_in(self.parent, prim, vals, params)
        outvars = [Var(compat.typeof(x)) for x in outs]
        out_act = [_differentiable(v.aval) for v in outvars]
        if not any(out_act):
            return outs
        if compat.is_eval_trace(self.parent):
            eqn_params = handler.call_params(vals)
        else:
            eqn_params = dict(name=handler.name, symbolic_zeros=params["symbolic_zeros"])
        eqn = compat.new_eqn(self._vars(vals, invars), outvars, prim, eqn_params,
                             compat.no_effects, compat.current_source_info())
        self.records.append(reverse.Record(eqn, vals, outs, act, None, handler))
        return self.wrap(outs, outvars, out_act)

    def _linearize_custom_jvp(self, prim, fun, jvp, tracers, symbolic_zeros):
        """Reverse mode of a ``custom_jvp`` function under a transformation, as
        JAX linearizes it: the user's JVP rule runs once, on the primal values and
        on tangents that an inner trace records. The primal outputs are the
        rule's; the recorded equations, which must be linear in the tangents, are
        the map whose transpose (our backward sweep over them) gives the inputs'
        cotangents. The function itself is not traced.

        The recorded tangent equations are also bound in the enclosing trace, on
        the primal values standing in for the tangents (the transpose of a linear
        map does not read the value it is applied to); nothing uses their results,
        so the compiled program drops them.
        """
        from jax import tree_util
        vals, act, invars = self.unpack(tracers)
        name = getattr(fun, "__name__", None) or getattr(
            getattr(fun, "debug_info", None), "func_name", "?")
        source_info = compat.current_source_info()
        what = (f"the custom_jvp function '{name}' (called at "
                f"{compat.source_line_of(source_info)})")
        with compat.set_current_trace(self.parent):
            tangents = []
            for x, a in zip(vals, act):
                if a:
                    tangents.append(x)
                elif symbolic_zeros:
                    tangents.append(compat.symbolic_zero(compat.typeof(x)))
                else:
                    tangents.append(forward.zero_tangent(x))
            n = len(vals)
            leaves = list(vals) + tangents
            tree = tree_util.tree_structure((tuple(range(len(leaves))), {}))
            run = record(lambda *xs: jvp.call_wrapped(*xs), tree, leaves,
                         [False] * n + list(act), linear=what)
        n_out = len(run.out_vals) // 2
        primal_outs = run.out_vals[:n_out]
        outvars = [Var(compat.typeof(x)) for x in primal_outs]
        out_act = [a and _differentiable(v.aval)
                   for a, v in zip(run.out_active[n_out:], outvars)]
        if not any(out_act):
            return primal_outs
        eqn = compat.new_eqn(self._vars(vals, invars), outvars, prim,
                             dict(name=name, symbolic_zeros=symbolic_zeros),
                             compat.no_effects, source_info)
        rec = reverse.Record(eqn, vals, primal_outs, act, run.tape, _LINEARIZED)
        self.records.append(rec)
        return self.wrap(primal_outs, outvars, out_act)

    def process_custom_vjp_call(self, prim, fun, fwd, bwd, tracers, *, out_trees,
                                symbolic_zeros):
        vals, act, invars = self.unpack(tracers)
        params = dict(subfuns=(fun, fwd, bwd), out_trees=out_trees,
                      symbolic_zeros=symbolic_zeros)
        if not any(act):
            return compat.bind_in(self.parent, prim, vals, params)
        # The user's fwd runs on the values themselves (Python control flow on
        # them works, as in jax.grad); bwd runs in the backward sweep.
        n_records = len(self.records)
        fwd_in = [y for x, a in zip(vals, act) for y in (x, a)]
        with compat.set_current_trace(self.parent), self._sweep_context():
            res_and_outs = fwd.call_wrapped(*fwd_in)
        if len(self.records) != n_records:
            raise compat.custom_vjp_closure_error()
        res, outs = compat.split_custom_vjp_fwd_outputs(res_and_outs, vals, out_trees)
        invars = self._vars(vals, invars)
        outvars = [Var(compat.typeof(x)) for x in outs]
        name = getattr(fun, "__name__", None) or getattr(
            getattr(fun, "debug_info", None), "func_name", "?")
        eqn = compat.new_eqn(invars, outvars, prim, dict(name=name, symbolic_zeros=symbolic_zeros),
                             compat.no_effects, compat.current_source_info())
        run_bwd = compat.custom_vjp_bwd_runner(bwd, 0, symbolic_zeros)
        handler = call_handlers_reverse[compat.CUSTOM_VJP_CALL]
        rec = reverse.Record(eqn, vals, outs, act, (res, run_bwd, [v.aval for v in outvars]),
                             handler)
        out_act = [_differentiable(v.aval) for v in outvars]
        self.records.append(rec)
        return self.wrap(outs, outvars, out_act)



class _LinearizedCall:
    """The backward half of a custom_jvp function linearized by
    :meth:`RecordingTrace._linearize_custom_jvp`: the transpose of its recorded
    tangent equations."""

    def backward(self, record, cts_out):
        n = len(record.invals)
        cts = reverse.backward(record.sub, [None] * len(cts_out) + list(cts_out))
        return [ct if a else None for ct, a in zip(cts[n:], record.active)]


_LINEARIZED = _LinearizedCall()


class Recording:
    """The result of :func:`record`: outputs, their activity, and the tape."""

    def __init__(self, out_vals, out_tree, out_active, tape):
        self.out_vals, self.out_tree = out_vals, out_tree
        self.out_active, self.tape = out_active, tape


class _Frame:
    """The top-level 'jaxpr' of a recording: just its input and output variables."""
    __slots__ = ["invars", "outvars"]

    def __init__(self, invars, outvars):
        self.invars, self.outvars = invars, outvars


def record(fun: Callable, args_tree, leaves: list, active: list,
           tape_only: bool = False, linear: str | None = None) -> Recording:
    """Runs ``fun`` on ``tree_unflatten(args_tree, leaves)`` with the active leaves
    as recording tracers; returns the flat outputs and the tape.

    ``args_tree`` flattens ``(args, kwargs)``. Leaves that are not active are
    passed as they are (Python scalars, NumPy arrays, strings...).
    """
    from jax import tree_util
    with compat.take_current_trace() as parent:
        trace = RecordingTrace(parent, tape_only, linear)
        invars = []
        in_leaves = []
        for x, a in zip(leaves, active):
            if a:
                if isinstance(x, (np.ndarray, np.generic)):
                    # As JAX does for a differentiated argument: a JAX array of the
                    # canonical dtype (library code may index it with a traced value).
                    x = jnp.asarray(x)
                v = Var(compat.typeof(x))
                invars.append(v)
                in_leaves.append(RecordingTracer(trace, x, v))
            else:
                invars.append(Var(compat.typeof(x)) if _is_value(x) else None)
                in_leaves.append(x)
        args, kwargs = tree_util.tree_unflatten(args_tree, in_leaves)
        records = trace.records
        try:
            with compat.set_current_trace(trace):
                out = fun(*args, **kwargs)
            out_leaves, out_tree = tree_util.tree_flatten(out)
        finally:
            trace.invalidate()
    out_vals, outvars, out_active = [], [], []
    for x in out_leaves:
        if type(x) is RecordingTracer and x._trace is trace:
            out_vals.append(x._fb_val)
            outvars.append(x._fb_var)
            out_active.append(True)
        else:
            out_vals.append(x)
            outvars.append(None)
            out_active.append(False)
    tape = reverse.Tape(_Frame(invars, outvars), records, list(active), out_active)
    return Recording(out_vals, out_tree, out_active, tape)


def recorded_jaxpr(run: Recording):
    """The program a recording ran, as a closed jaxpr over all input leaves.

    Its equations are the recorded ones (those that depend on an active input);
    every other value they read is a constant of the jaxpr.
    """
    tape = run.tape
    defined = {v for v in tape.jaxpr.invars if v is not None}
    constvars, consts = [], []

    def const(v, x):
        if v not in defined:
            defined.add(v)
            constvars.append(v)
            consts.append(x)

    eqns = []
    for rec in tape.records:
        if rec.eqn.primitive.name == compat.CUSTOM_VJP_CALL and "call_jaxpr" not in rec.eqn.params:
            raise forward.custom_vjp_forward_error(rec.eqn.params.get("name", "?"),
                                                   compat.source_line(rec.eqn))
        for v, x in zip(rec.eqn.invars, rec.invals):
            const(v, x)
        eqns.append(rec.eqn)
        defined.update(rec.eqn.outvars)
    outvars = []
    for v, x in zip(tape.jaxpr.outvars, run.out_vals):
        if v is None:
            v = Var(compat.typeof(x))
            const(v, x)
        outvars.append(v)
    invars = [v for v in tape.jaxpr.invars]
    jaxpr = compat.new_jaxpr(constvars, invars, outvars, eqns)
    return compat.ClosedJaxpr(jaxpr, consts)


def _is_value(x) -> bool:
    try:
        compat.typeof(x)
        return True
    except TypeError:
        return False


# ================================================================ forward mode
class TangentTracer(_ValueTracer):
    """A primal value with a nonzero tangent."""
    __slots__ = ["_fb_primal", "_fb_tangent"]

    def __init__(self, trace, primal, tangent):
        super().__init__(trace, compat.typeof(primal))
        self._fb_primal = primal
        self._fb_tangent = tangent

    def _fb_value(self):
        return self._fb_primal

    def _contents(self):
        # Marks this value as differentiated for jax.closure_convert (see compat).
        return [("primal", self._fb_primal), ("differentiated", compat.DIFFERENTIATED)]


class TangentTrace(_StagingCalls, compat.Trace):
    """Runs each primitive's JVP rule in the enclosing trace."""

    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.requires_low = False

    def unpack(self, tracers):
        primals, tangents = [], []
        for x in tracers:
            if type(x) is TangentTracer and x._trace is self:
                primals.append(x._fb_primal)
                tangents.append(x._fb_tangent)
            else:
                primals.append(x)
                tangents.append(None)
        return primals, tangents

    def wrap(self, outs, touts):
        return [x if t is None else TangentTracer(self, x, t) for x, t in zip(outs, touts)]

    def stage_value(self, val):
        (x,), (t,) = self.unpack([val])
        staged = self.parent.stage_value(x)
        return staged if t is None else TangentTracer(self, staged,
                                                      self.parent.stage_value(t))

    def process_primitive(self, prim, tracers, params):
        primals, tangents = self.unpack(tracers)
        if all(t is None for t in tangents):
            return prim.bind_with_trace(self.parent, primals,
                                        tuple(compat.typeof(x) for x in primals), params)
        with compat.set_current_trace(self.parent):
            outs, touts = forward.jvp_eqn(prim, params, primals, tangents,
                                          compat.current_source_info())
        out = self.wrap(outs, touts)
        return out if prim.multiple_results else out[0]

    def process_custom_jvp_call(self, prim, fun, jvp, tracers, *, symbolic_zeros):
        primals, tangents = self.unpack(tracers)
        if all(t is None for t in tangents):
            return compat.bind_in(self.parent, prim, primals,
                                  dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros))
        # The user's rule runs on the values themselves, as in jax.jvp.
        with compat.set_current_trace(self.parent):
            if symbolic_zeros:
                ts = [compat.symbolic_zero(compat.typeof(x)) if t is None else t
                      for x, t in zip(primals, tangents)]
            else:
                ts = [forward.zero_tangent(x) if t is None else t
                      for x, t in zip(primals, tangents)]
            outs = jvp.call_wrapped(*primals, *ts)
        n = len(outs) // 2
        primal_outs = list(outs[:n])
        touts = [None if isinstance(t, (compat.SymbolicZero, compat.Zero)) else t
                 for t in outs[n:]]
        return self.wrap(primal_outs, touts)

    def process_custom_vjp_call(self, prim, fun, fwd, bwd, tracers, *, out_trees,
                                symbolic_zeros):
        primals, tangents = self.unpack(tracers)
        if all(t is None for t in tangents):
            return compat.bind_in(self.parent, prim, primals, dict(
                subfuns=(fun, fwd, bwd), out_trees=out_trees, symbolic_zeros=symbolic_zeros))
        raise forward.custom_vjp_forward_error(
            getattr(fun, "__name__", "?"), compat.source_line_of(compat.current_source_info()))

    def _stage(self, tracers, process: Callable, prim_for_parent: Callable):
        primals, tangents = self.unpack(tracers)
        if all(t is None for t in tangents):
            with compat.set_current_trace(self.parent):
                return prim_for_parent(primals)
        jaxpr, consts, restructure = _stage_call(process, primals)
        c_primals, c_tangents = self.unpack(consts)
        with compat.set_current_trace(self.parent):
            outs, touts = forward.jvp_jaxpr(jaxpr, [], c_primals + primals,
                                            c_tangents + tangents)
        return restructure(self.wrap(outs, touts))



def _staged_call_in_tangent_trace(fn, trace, args, params):
    """A staged function (a nested jit's sweep) bound in a :class:`TangentTrace`:
    its memoized tangent sweep bound in the enclosing trace, what the forward-mode
    rule of its jit equation does, without building the equation."""
    if compat.is_eval_trace(trace.parent) or not reverse.sweeps_unwatched(linear_ok=True):
        return None
    primals, tangents = trace.unpack(args)
    present = tuple(t is not None for t in tangents)
    closed = params["jaxpr"]
    key = (id(closed), present, reverse.in_linear_sweep())
    hit = fn.derived.get(key)
    if hit is None or hit[0] is not closed:
        n = len(primals)

        def jvp_flat(flat):
            ts = iter(flat[n:])
            outs, touts = forward.jvp_jaxpr(closed.jaxpr, closed.consts, flat[:n],
                                            [next(ts) if p else None for p in present])
            return list(outs) + list(touts)
        hit = fn.derived[key] = (closed, compat.StagedFunction(jvp_flat, fn.inline,
                                                               "jvp_" + fn.name))
    with compat.set_current_trace(trace.parent):
        flat = hit[1](primals + [t for t in tangents if t is not None])
    n_out = len(closed.jaxpr.outvars)
    return trace.wrap(flat[:n_out], flat[n_out:])


compat.STAGED_CALL_HOOKS[TangentTrace] = _staged_call_in_tangent_trace


def push_tangents(fun: Callable, args_tree, primals: list, tangents: list) -> tuple:
    """Runs ``fun`` with tangents attached to the primals that have one.

    Returns ``(out_leaves, out_tree, out_tangents)`` with ``None`` for zero tangents.
    """
    from jax import tree_util
    with compat.take_current_trace() as parent:
        trace = TangentTrace(parent)
        in_leaves = [x if t is None else TangentTracer(trace, x, t)
                     for x, t in zip(primals, tangents)]
        args, kwargs = tree_util.tree_unflatten(args_tree, in_leaves)
        try:
            with compat.set_current_trace(trace):
                out = fun(*args, **kwargs)
            out_leaves, out_tree = tree_util.tree_flatten(out)
        finally:
            trace.invalidate()
    outs, touts = [], []
    for x in out_leaves:
        if type(x) is TangentTracer and x._trace is trace:
            outs.append(x._fb_primal)
            touts.append(x._fb_tangent)
        else:
            outs.append(x)
            touts.append(None)
    return outs, out_tree, touts

