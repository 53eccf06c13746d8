"""Define-by-run recording: the user's function runs on a trace of ours.

``fb.grad``, ``fb.value_and_grad`` and ``fb.vjp`` (and the tools that show what
they run) do not stage the function into a jaxpr first. They call it on
tracers of a :class:`RecordingTrace`, the way ``jax.grad`` calls it on its
tracers; every primitive the function binds reaches
:meth:`RecordingTrace.process_primitive`, which takes that one equation's
forward step (:func:`~fbackprop._src.engine.sweeps.forward_eqn`: bind it in the
enclosing trace, keep what its VJP rule will need) and appends the record to
the tape. The backward sweep is the same
:func:`~fbackprop._src.engine.sweeps.backward` that runs over sub-jaxprs.

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

Call-like primitives whose parameters are Python functions reach their one
handler (:mod:`fbackprop._src.rules.calls`) as an equation holding those
functions: ``custom_jvp`` (its JVP rule runs on the values, its tangent part is
recorded by a linear recording and transposed) and ``custom_vjp`` (the user's
``fwd`` runs on the values, ``bwd`` in the backward sweep). ``core.call`` and
``shard_map`` are staged into a small jaxpr and swept like any call, and so is a
``custom_jvp`` function when only the program is recorded (its equation must
then be replayable).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from .. import compat
from ..registry import is_differentiable_dtype, known_custom_jvp
from .. import context
from . import sweeps
from .tape import Tape

Var = compat.Var


def _differentiable(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


class ValueTracer(compat.Tracer):
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


class StagingCalls:
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


def stage_call(process: Callable, vals: list):
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


def _trace_rules(jaxpr, in_active) -> tuple[bool, list]:
    """Traces the JVP rule of the ``custom_jvp_call`` staged in ``jaxpr``
    (``in_active``: per input of ``jaxpr``, whether it is differentiated) for the
    zero tangents the backward sweep will give it (the trace is memoized), now,
    at the call, where JAX runs it: an error the rule raises (Equinox's
    ``nondifferentiable``) comes from the call, before what the function does
    next.

    Returns:
      ``(keeps_types, zero)``: whether the rule's primal outputs have the call's
      own shapes and dtypes; per output of ``jaxpr``, whether the rule gives its
      tangent as a symbolic zero (under ``jax.grad`` such an output is no JVP
      tracer: it is not differentiated).
    """
    active = dict(zip(jaxpr.invars, in_active))
    zero_vars: set = set()
    keeps_types = True
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != compat.CUSTOM_JVP_CALL:
            continue
        _, num_consts, jvp_jaxpr_of = compat.custom_jvp_parts(eqn.params)
        args = eqn.invars[num_consts:]
        if eqn.params.get("symbolic_zeros", False):
            zeros = [type(v) is compat.Literal or not active.get(v, False) for v in args]
        else:
            zeros = [False] * len(args)
        rule, _, out_zeros = jvp_jaxpr_of(zeros)
        rule_avals = [v.aval for v in rule.outvars[:len(eqn.outvars)]]
        if any((a.shape, a.dtype) != (v.aval.shape, v.aval.dtype)
               for a, v in zip(rule_avals, eqn.outvars)):
            keeps_types = False
        zero_vars.update(v for v, z in zip(eqn.outvars, out_zeros) if z)
    return keeps_types, [type(v) is not compat.Literal and v in zero_vars
                         for v in jaxpr.outvars]


class RecordingTracer(ValueTracer):
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


class RecordingTrace(StagingCalls, compat.Trace):
    """Runs each primitive in the enclosing trace and records its equation.

    Args:
      parent: the enclosing trace.
      tape_only: record the program only (see :func:`sweeps.forward_eqn`).
      linear: this trace records a custom JVP rule as a function of its
        tangents; ``linear`` names the rule (every equation is checked for
        linearity).
      bind: for an eager program-only recording, how an equation is bound
        (``bind(eqn, vals) -> outvals``; eager front ends run nested jits as
        cached compiled calls).
      stage_custom_vjp: (with ``tape_only``) the program is differentiated in
        forward mode (``fb.linearize``): a custom_vjp function is recorded as
        its staged call, rules and all, with its fwd rule's primal outputs as
        values (as under ``jax.linearize``), instead of running its fwd for a
        reverse sweep.
    """

    def __init__(self, parent, tape_only: bool = False, linear: str | None = None,
                 bind: Callable | None = None, stage_custom_vjp: bool = False):
        super().__init__()
        self.parent = parent
        self.linear = linear
        self.stage_custom_vjp = stage_custom_vjp
        self.records: list = []
        # Inputs added while recording (``new_input``): (variable, value).
        self.extra_inputs: list = []
        self.tape_only = tape_only
        # Hi-level primitives (remat3 checkpoints, custom_vjp3 functions) reach
        # us as they are, so their own semantics are kept.
        self.requires_low = False
        # An eager program-only recording: equations learn their output types
        # from the values.
        self.eager = tape_only and compat.is_eval_trace(parent)
        self._bind = (bind if self.eager else None) if tape_only else self._bind_in_parent

    def invalidate(self):
        # Recorded equations can refer back to this trace (a custom_jvp rule's
        # thunk closes over the trace it was staged in, whose parent this is);
        # dropping the records and the enclosing trace here keeps a returned
        # vjp_fn from keeping an enclosing jit's trace alive.
        super().invalidate()
        self.parent, self.records = None, []

    def new_input(self, value):
        """A differentiated input added while recording (e.g. a tool's
        perturbation of an intermediate value): its cotangent is returned by
        the backward sweep after those of the recording's own inputs."""
        v = Var(compat.typeof(value))
        self.extra_inputs.append((v, value))
        return RecordingTracer(self, value, v)

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

    def _bind_in_parent(self, eqn, vals):
        # We are in the user's call, so its source line is the current one.
        prim = eqn.primitive
        out = prim.bind_with_trace(self.parent, vals, tuple(compat.typeof(x) for x in vals),
                                   eqn.params)
        return list(out) if prim.multiple_results else [out]

    def _step(self, eqn, vals, act, late, bind: Callable | None = None):
        """The forward step of ``eqn`` in the enclosing trace, with this trace's
        linear check (or none: an enclosing linear sweep's check is about the
        equations of that sweep, not about what this trace records into it).
        ``bind``: how a program-only recording binds this equation (default:
        the trace's)."""
        ctx = context.current()
        bind = bind or self._bind
        with compat.set_current_trace(self.parent):
            if ctx.linear == self.linear:
                out = sweeps.forward_eqn(eqn, vals, act, late, self.tape_only, bind)
            else:
                with context.using(linear=self.linear):
                    out = sweeps.forward_eqn(eqn, vals, act, late, self.tape_only, bind)
            if ctx.observers:
                # Observers see the equation in the trace its values belong to.
                outvals, rec = out[0], out[1]
                shown = rec.eqn if rec is not None else (
                    eqn if not late else eqn.replace(
                        outvars=[Var(compat.typeof(x)) for x in outvals]))
                for obs in ctx.observers:
                    obs.on_forward(shown, vals, outvals)
        return out

    def _add(self, outvals, rec, out_act):
        if rec is None:
            return outvals
        self.records.append(rec)
        return self.wrap(outvals, rec.eqn.outvars, out_act)

    # -- the trace protocol
    def stage_value(self, val):
        (x,), (a,), (v,) = self.unpack([val])
        staged = self.parent.stage_value(x)
        return RecordingTracer(self, staged, v) if a else staged

    def _rewritten(self, prim, params, tracers):
        """What an observer's ``rewrite(trace, prim, params, tracers)`` binds in
        place of this primitive (a tool's change to one equation, e.g. a
        perturbation input for a tag inside a loop body), or None."""
        for obs in context.current().observers:
            rewrite = getattr(obs, "rewrite", None)
            outs = None if rewrite is None else rewrite(self, prim, params, tracers)
            if outs is not None:
                return outs
        return None

    def _unrecorded_call(self, prim, vals, invars, params, name):
        """A custom_jvp / custom_vjp call nothing differentiates, while observers
        watch: shown to them as one equation, and run by its handler's stepped
        path when a tool steps the sweeps (else bound as it is)."""
        eqn = compat.new_eqn(self._vars(vals, invars), [], prim, dict(params, name=name),
                             compat.no_effects, compat.current_source_info())
        return self._step(eqn, vals, [False] * len(vals), True)[0]

    def process_primitive(self, prim, tracers, params):
        vals, act, invars = self.unpack(tracers)
        observers = context.current().observers
        if observers:
            outs = self._rewritten(prim, params, tracers)
            if outs is not None:
                return outs
        elif not any(act):
            return prim.bind_with_trace(self.parent, vals,
                                        tuple(compat.typeof(x) for x in vals), params)
        invars = self._vars(vals, invars)
        source_info = compat.current_source_info()
        late = self.eager or not sweeps.needs_output_types(prim)
        if late:
            eqn = compat.new_eqn(invars, [], prim, params, compat.no_effects, source_info)
        else:
            eqn = compat.typed_eqn(prim, params, invars, source_info)
        outs = self._add(*self._step(eqn, vals, act, late))
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
        return self._record_staged(tracers, *stage_call(process, vals))

    def _record_staged(self, tracers, jaxpr, consts, restructure,
                       evaluate: Callable | None = None, not_differentiated=None):
        """Records a call staged by :func:`stage_call` as one ``closed_call``
        (``evaluate(jaxpr, vals, active) -> outvals``: how a program-only
        recording computes its values, default: it is bound;
        ``not_differentiated``: per output, whether it carries no cotangent
        whatever the handler says, e.g. a custom_jvp rule's symbolic zero,
        which a program-only recording runs no handler to learn)."""
        vals, act, invars = self.unpack(tracers)
        call = compat.ClosedJaxpr(jaxpr, [])
        c_vals, c_act, c_vars = self.unpack(consts)
        all_vals, all_act = c_vals + vals, c_act + act
        all_vars = self._vars(c_vals + vals, c_vars + invars)
        eqn = compat.new_eqn(all_vars, [Var(v.aval) for v in jaxpr.outvars],
                             compat.closed_call_p, dict(call_jaxpr=call),
                             compat.join_effects(jaxpr.eqns), compat.current_source_info())
        bind = None if evaluate is None else (
            lambda eqn, xs: evaluate(jaxpr, xs, all_act))
        outvals, rec, out_act = self._step(eqn, all_vals, all_act, False, bind)
        if rec is not None and not_differentiated is not None:
            out_act = [a and not n for a, n in zip(out_act, not_differentiated)]
            if not any(out_act):
                rec = None
        return restructure(self._add(outvals, rec, out_act))

    def process_custom_jvp_call(self, prim, fun, jvp, tracers, *, symbolic_zeros):
        params = dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros)
        vals, act, invars = self.unpack(tracers)
        observed = bool(context.current().observers)
        if observed:
            outs = self._rewritten(prim, params, tracers)
            if outs is not None:
                return outs
        if not any(act):
            if observed:
                return self._unrecorded_call(prim, vals, invars, params,
                                             compat.function_name(fun))
            with compat.set_current_trace(self.parent):
                return compat.bind_in(self.parent, prim, vals, params)
        if self.linear is not None:
            # Applied to a tangent inside a rule being transposed, a custom_jvp
            # function is part of a linear map: differentiated through its body.
            with compat.set_current_trace(self):
                return fun.call_wrapped(*tracers)
        if (self.tape_only or compat.is_eval_trace(self.parent)) and \
                known_custom_jvp(fun, jvp) is None:
            # Eagerly the recorded equation must be one an eager compiled program
            # can key and bind again (``eager.tape_key``): the call is staged as
            # JAX stages it (a known function's call is keyed by its rule).
            staged = stage_call(
                lambda t, xs: t.process_custom_jvp_call(prim, fun, jvp, xs,
                                                        symbolic_zeros=symbolic_zeros), vals)
            keeps_types, zero = _trace_rules(staged[0], self.unpack(staged[1])[1] + act)
            if keeps_types:
                out = self._record_staged(tracers, *staged, not_differentiated=zero)
                # The staged function was traced; if an enclosing forward-mode
                # trace also ran the rule, custom_jvp expects only one of the two
                # to report its output structure.
                compat.reset_stores(jvp)
                return out
            # A vmap of a custom_jvp function whose output does not depend on the
            # batched input: the function's output is unbatched, its rule's
            # primal and tangent outputs are batched. Differentiated as JAX does
            # (the rule's outputs are the values, below), the batch survives; the
            # function's unbatched output could only carry a cotangent summed over
            # the batch. Only the rule reports the output batching then (and the
            # recorded call cannot be compiled into an eager program).
            compat.reset_stores(fun)
            compat.reset_stores(jvp)
        name = compat.function_name(fun)
        eqn = compat.new_eqn(self._vars(vals, invars), [], prim,
                             dict(params, name=name), compat.no_effects,
                             compat.current_source_info())
        return self._add(*self._step(eqn, vals, act, True))

    def process_custom_vjp_call(self, prim, fun, fwd, bwd, tracers, *, out_trees,
                                symbolic_zeros):
        vals, act, invars = self.unpack(tracers)
        params = dict(subfuns=(fun, fwd, bwd), out_trees=out_trees,
                      symbolic_zeros=symbolic_zeros)
        observed = bool(context.current().observers)
        if observed:
            outs = self._rewritten(prim, params, tracers)
            if outs is not None:
                return outs
        if not any(act):
            if observed:
                return self._unrecorded_call(prim, vals, invars, params,
                                             compat.function_name(fun))
            return compat.bind_in(self.parent, prim, vals, params)
        if self.stage_custom_vjp and self.tape_only:
            return self._record_custom_vjp_call(tracers, lambda t, xs: t.process_custom_vjp_call(
                prim, fun, fwd, bwd, xs, out_trees=out_trees, symbolic_zeros=symbolic_zeros),
                fun)
        # The user's fwd runs on the values themselves (Python control flow on
        # them works, as in jax.grad); bwd runs in the backward sweep.
        n_records = len(self.records)
        eqn = compat.new_eqn(self._vars(vals, invars), [], prim,
                             dict(params, name=compat.function_name(fun)),
                             compat.no_effects, compat.current_source_info())
        out = self._step(eqn, vals, act, True)
        if len(self.records) != n_records:
            raise compat.custom_vjp_closure_error()
        return self._add(*out)

    def _record_custom_vjp_call(self, tracers, process: Callable, fun):
        """A custom_vjp call in a program for a forward sweep (``fb.linearize``):
        recorded as JAX stages it (its rules in its parameters); its values are
        its fwd rule's primal outputs, as under ``jax.linearize``."""
        vals = self.unpack(tracers)[0]
        jaxpr, consts, restructure = stage_call(process, vals)
        # custom_vjp expects its output structure from the function or from its
        # fwd rule, not both: the fwd rule's (run when the values are made) is
        # the one kept.
        compat.reset_stores(fun)
        # The staged equation's traceback ends in our staging code: it is the
        # user's call, made here.
        source_info = compat.current_source_info()
        jaxpr = jaxpr.replace(eqns=[e.replace(source_info=source_info) for e in jaxpr.eqns])
        return self._record_staged(tracers, jaxpr, consts, restructure,
                                   evaluate=_eval_with_custom_vjp_fwd)


def _eval_with_custom_vjp_fwd(jaxpr, vals: list, active: list) -> list:
    """Evaluates ``jaxpr`` with every custom_vjp call that reads an active value
    replaced by its fwd rule (its primal outputs, as a JVP of it computes them)."""
    env = dict(zip(jaxpr.invars, vals))
    perturbed = {v for v, a in zip(jaxpr.invars, active) if a}
    read = lambda v: v.val if type(v) is compat.Literal else env[v]  # noqa: E731
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        nonzeros = [type(v) is not compat.Literal and v in perturbed for v in eqn.invars]
        if eqn.primitive.name == compat.CUSTOM_VJP_CALL and any(nonzeros):
            _, fwd, _ = compat.custom_vjp_parts(eqn.params)
            with compat.user_context(eqn):
                _, outs = fwd(invals, nonzeros)
        else:
            outs = compat.bind_eqn(eqn, invals)
        env.update(zip(eqn.outvars, outs))
        if any(nonzeros):
            perturbed.update(eqn.outvars)
    return [read(v) for v in jaxpr.outvars]


def custom_vjp_forward_error(name, where):
    return TypeError(
        f"can't apply forward-mode autodiff (jvp) to a custom_vjp function "
        f"('{name}' at {where}): its custom rule only defines reverse mode, and pushing "
        f"tangents through its primal code could disagree with that rule (e.g. a "
        f"straight-through estimator). Use reverse mode (fbackprop.grad / vjp / jacrev), "
        f"or define the function with jax.custom_jvp.")


class Recording:
    """The result of :func:`record`: outputs, their activity, and the tape
    (whose inputs are the leaves, then the inputs added while recording, whose
    values are ``extra_inputs``)."""

    def __init__(self, out_vals, out_tree, out_active, tape, extra_inputs=()):
        self.out_vals, self.out_tree = out_vals, out_tree
        self.out_active, self.tape = out_active, tape
        self.extra_inputs = list(extra_inputs)


class Frame:
    """The top-level 'jaxpr' of a recording: just its input and output variables."""
    __slots__ = ["invars", "outvars"]

    def __init__(self, invars, outvars):
        self.invars, self.outvars = invars, outvars


def _is_value(x) -> bool:
    try:
        compat.typeof(x)
        return True
    except TypeError:
        return False


def record(fun: Callable, args_tree, leaves: list, active: list,
           tape_only: bool = False, linear: str | None = None,
           bind: Callable | None = None, stage_custom_vjp: bool = False) -> Recording:
    """Runs ``fun`` on ``tree_unflatten(args_tree, leaves)`` with the active leaves
    as recording tracers; returns the flat outputs and the tape.

    ``args_tree`` flattens ``(args, kwargs)``. Leaves that are not active are
    passed as they are (Python scalars, NumPy arrays, strings...). ``tape_only``,
    ``linear``, ``bind`` and ``stage_custom_vjp`` are :class:`RecordingTrace`'s.
    """
    from jax import tree_util
    with compat.take_current_trace() as parent:
        trace = RecordingTrace(parent, tape_only, linear, bind, stage_custom_vjp)
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
        records, extra = trace.records, trace.extra_inputs
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
    invars += [v for v, _ in extra]
    tape = Tape(Frame(invars, outvars), records, list(active) + [True] * len(extra),
                out_active)
    return Recording(out_vals, out_tree, out_active, tape, [x for _, x in extra])


def recorded_jaxpr(run: Recording, eqns: list | None = None):
    """The program a recording ran, as a closed jaxpr over all input leaves.

    Its equations are the recorded ones (those that depend on an active input),
    or ``eqns`` (one per record, e.g. made replayable by the caller); every
    other value they read is a constant of the jaxpr.
    """
    tape = run.tape
    defined = {v for v in tape.jaxpr.invars if v is not None}
    constvars, consts = [], []

    def const(v, x):
        if v not in defined:
            defined.add(v)
            constvars.append(v)
            consts.append(x)

    given, eqns = eqns, []
    for k, rec in enumerate(tape.records):
        eqn = rec.eqn if given is None else given[k]
        if eqn.primitive.name == compat.CUSTOM_VJP_CALL and "call_jaxpr" not in eqn.params:
            raise custom_vjp_forward_error(eqn.params.get("name", "?"), compat.source_line(eqn))
        for v, x in zip(eqn.invars, rec.invals):
            const(v, x)
        eqns.append(eqn)
        defined.update(eqn.outvars)
    outvars = []
    for v, x in zip(tape.jaxpr.outvars, run.out_vals):
        if v is None:
            v = Var(compat.typeof(x))
            const(v, x)
        outvars.append(v)
    invars = [v for v in tape.jaxpr.invars]
    jaxpr = compat.new_jaxpr(constvars, invars, outvars, eqns)
    return compat.ClosedJaxpr(jaxpr, consts)
