"""Forward mode: the tangent sweep, over a jaxpr or define-by-run.

:func:`jvp_jaxpr` pushes tangents through a jaxpr's equations with the
``jvp_rules`` table; :func:`jvp_eqn` is one equation of it for the
define-by-run :class:`TangentTrace`, whose tracers carry a primal and a tangent
(``fb.jvp`` runs the user's function on them, as ``jax.jvp`` does). Tangents
are ``None`` (symbolic zero) until an equation depending on a perturbed input
produces one. Call-like primitives go to their one forward handler
(``call_handlers_forward``), whichever sweep reaches them.
"""

from __future__ import annotations

from typing import Callable


from .. import compat, staging
from ..registry import call_handlers_forward, foreign_rules, jvp_rules, missing_rule_error, \
    nondiff_primitives, is_differentiable_dtype
from .. import context
from .recording import StagingCalls, ValueTracer, stage_call


def _check_tangent(eqn, v, t):
    _check_tangent_aval(eqn.primitive.name, eqn.source_info, v.aval, t)


def _check_tangent_aval(name, source_info, aval, t):
    # The tangent's type as JAX reads it: a Python scalar a rule returns (``2.``)
    # has the default dtype of its kind, as in JAX's own check.
    t_aval = compat.typeof(t)
    shape, dtype = tuple(t_aval.shape), t_aval.dtype
    if shape != tuple(aval.shape) or dtype != aval.dtype:
        raise TypeError(
            f"The JVP rule for primitive '{name}' returned a tangent of "
            f"shape/dtype {shape}/{dtype} for an output "
            f"whose primal is {tuple(aval.shape)}/{aval.dtype} (at "
            f"{compat.source_line_of(source_info)}). A tangent must have its primal's "
            f"shape and dtype.")


def jvp_jaxpr(jaxpr, consts, primals, tangents):
    """Evaluates ``jaxpr`` and pushes ``tangents`` (``None`` = zero) forward.

    Returns:
      ``(outs, out_tangents)``, with ``None`` for outputs whose tangent is zero.
    """
    env: dict = {}
    tenv: dict = {}

    def read(v):
        return v.val if type(v) is compat.Literal else env[v]

    def read_t(v):
        return None if type(v) is compat.Literal else tenv.get(v)

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, t in zip(jaxpr.invars, primals, tangents):
        env[v] = x
        if t is not None and is_differentiable_dtype(v.aval.dtype):
            tenv[v] = t

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        tin = [read_t(v) for v in eqn.invars]
        if all(t is None for t in tin):
            outs, touts = compat.bind_eqn(eqn, invals), None
        else:
            outs, touts = _jvp_step(eqn.primitive, eqn.params, invals, tin, lambda: eqn)
        for i, (v, x) in enumerate(zip(eqn.outvars, outs)):
            if type(v) is compat.DropVar:
                continue
            env[v] = x
            t = None if touts is None else touts[i]
            if t is not None and is_differentiable_dtype(v.aval.dtype):
                _check_tangent(eqn, v, t)
                tenv[v] = t

    return [read(v) for v in jaxpr.outvars], [read_t(v) for v in jaxpr.outvars]


def _jvp_step(prim, params, invals, tin, get_eqn):
    """One equation's JVP (some tangent nonzero): ``(outs, out_tangents)`` as lists.

    ``get_eqn()`` gives the equation, for call handlers and error messages.
    """
    name = prim.name
    if name in nondiff_primitives:
        eqn = get_eqn()
        return compat.bind_eqn(eqn, invals), None
    handler = call_handlers_forward.get(name)
    if handler is not None:
        with compat.rules_context():
            return handler(get_eqn(), invals, tin)
    rule = jvp_rules.get(name)
    if rule is None:
        foreign = foreign_rules["forward_rule"](prim)
        if foreign is None:
            raise missing_rule_error(get_eqn(), "forward")
        with compat.rules_context():
            return foreign_rules["jvp"](foreign, params, invals, tin)
    with compat.rules_context():
        outs, touts = rule(invals, tin, **params)
    if not prim.multiple_results:
        return [outs], [touts]
    return list(outs), list(touts)


def jvp_eqn(prim, params, primals, tangents, source_info):
    """The JVP of binding ``prim`` (define-by-run forward mode, in the current
    trace): ``(outs, out_tangents)`` as lists, ``None`` for zero tangents."""

    def get_eqn():
        invars = [compat.Var(compat.typeof(x)) for x in primals]
        if "subfuns" in params:      # a call holding Python functions: no types yet
            return compat.new_eqn(invars, [], prim, params, compat.no_effects, source_info)
        return compat.typed_eqn(prim, params, invars, source_info)

    outs, touts = _jvp_step(prim, params, primals, tangents, get_eqn)
    if touts is None:
        return outs, [None] * len(outs)
    checked = []
    for x, t in zip(outs, touts):
        aval = compat.typeof(x)
        if t is not None and not is_differentiable_dtype(aval.dtype):
            t = None
        if t is not None:
            _check_tangent_aval(prim.name, source_info, aval, t)
        checked.append(t)
    return outs, checked


zero_tangent = compat.zero_tangent


# ------------------------------------------------------- define-by-run forward mode
class TangentTracer(ValueTracer, compat.JVPTracer):
    """A primal value with a nonzero tangent.

    A JAX ``JVPTracer`` to code that inspects tracer types (see compat): library
    code written for ``jax.jvp`` (``eqx.filter_jvp``) sees its tangents, and
    ``lax.stop_gradient`` / ``jax.closure_convert`` treat it as JAX's. Its own
    fields are ``_fb_primal``/``_fb_tangent``; ``primal``/``tangent`` (JAX's
    names, which no ``jax.Array`` attribute has) read them."""
    __slots__ = ["_fb_primal", "_fb_tangent"]

    def __init__(self, trace, primal, tangent):
        # JAX's base Tracer.__init__: JVPTracer's would set its own slots.
        compat.init_tracer(self, trace, compat.typeof(primal))
        self._fb_primal = primal
        self._fb_tangent = tangent

    # What code written for JAX's JVPTracer reads.
    primal = property(lambda self: self._fb_primal)
    tangent = property(lambda self: self._fb_tangent)

    def _fb_value(self):
        return self._fb_primal

    def _short_repr(self):
        return f"TangentTracer(primal={self._fb_primal!r}, tangent={self._fb_tangent!r})"


class TangentTrace(StagingCalls, compat.Trace):
    """Runs each primitive's JVP rule in the enclosing trace."""

    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.requires_low = False
        # What identifies this trace to code that checks ``x._trace.main``.
        self.tag = compat.TraceTag()

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
            outs, touts = jvp_eqn(prim, params, primals, tangents,
                                          compat.current_source_info())
        out = self.wrap(outs, touts)
        return out if prim.multiple_results else out[0]

    def process_custom_jvp_call(self, prim, fun, jvp, tracers, *, symbolic_zeros):
        params = dict(subfuns=(fun, jvp), symbolic_zeros=symbolic_zeros)
        return self._call_with_functions(prim, params, fun, tracers)

    def process_custom_vjp_call(self, prim, fun, fwd, bwd, tracers, *, out_trees,
                                symbolic_zeros):
        params = dict(subfuns=(fun, fwd, bwd), out_trees=out_trees,
                      symbolic_zeros=symbolic_zeros)
        return self._call_with_functions(prim, params, fun, tracers)

    def _call_with_functions(self, prim, params, fun, tracers):
        """A call whose parameters are Python functions (custom_jvp, custom_vjp):
        its forward handler runs on the values, as in jax.jvp."""
        primals, tangents = self.unpack(tracers)
        if all(t is None for t in tangents):
            return compat.bind_in(self.parent, prim, primals, params)
        with compat.set_current_trace(self.parent):
            outs, touts = jvp_eqn(prim, dict(params, name=compat.function_name(fun)),
                                  primals, tangents, compat.current_source_info())
        return self.wrap(outs, touts)

    def _stage(self, tracers, process: Callable, prim_for_parent: Callable):
        primals, tangents = self.unpack(tracers)
        if all(t is None for t in tangents):
            with compat.set_current_trace(self.parent):
                return prim_for_parent(primals)
        jaxpr, consts, restructure = stage_call(process, primals)
        c_primals, c_tangents = self.unpack(consts)
        with compat.set_current_trace(self.parent):
            outs, touts = jvp_jaxpr(jaxpr, [], c_primals + primals,
                                            c_tangents + tangents)
        return restructure(self.wrap(outs, touts))



def _staged_call_in_tangent_trace(fn, trace, args, params):
    """A staged function (a nested jit's sweep) bound in a :class:`TangentTrace`:
    its memoized tangent sweep bound in the enclosing trace, what the forward-mode
    rule of its jit equation does, without building the equation."""
    if compat.is_eval_trace(trace.parent) or not context.unwatched(linear_ok=True):
        return None
    primals, tangents = trace.unpack(args)
    present = tuple(t is not None for t in tangents)
    closed = params["jaxpr"]
    key = (id(closed), present, context.in_linear_sweep())
    hit = fn.derived.get(key)
    if hit is None or hit[0] is not closed:
        n = len(primals)

        def jvp_flat(flat):
            ts = iter(flat[n:])
            outs, touts = jvp_jaxpr(closed.jaxpr, closed.consts, flat[:n],
                                            [next(ts) if p else None for p in present])
            return list(outs) + list(touts)
        hit = fn.derived[key] = (closed, staging.StagedFunction(jvp_flat, fn.inline,
                                                               "jvp_" + fn.name))
    with compat.set_current_trace(trace.parent):
        flat = hit[1](primals + [t for t in tangents if t is not None])
    n_out = len(closed.jaxpr.outvars)
    return trace.wrap(flat[:n_out], flat[n_out:])


staging.STAGED_CALL_HOOKS[TangentTrace] = _staged_call_in_tangent_trace


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
            # fb.jvp's sweep is never fb.linearize's, even inside a rule it runs.
            with compat.set_current_trace(trace), context.using(linearizing=False):
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

