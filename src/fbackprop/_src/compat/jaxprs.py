"""Building, binding and pruning equations and jaxprs: what fbackprop's sweeps stage
(typed equations, a scan with a body built directly, the glue equations of zeros,
weak-type changes and sums), what JAX's staging would fold away, and dead-code
elimination of single equations."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax._src import core as jcore
from jax._src import source_info_util

from .core import (JIT_NAMES, ClosedJaxpr, DropVar, Jaxpr, JaxprEqn, Literal, Var, current_trace,
                   is_tracer, jit_inner, join_effects, typeof)
from .source import user_context
from .custom_calls import with_weak_type

def bind_eqn(eqn: JaxprEqn, invals: list) -> list:
    """Apply an equation's primitive to values in the current trace; always a list.

    Also for a custom_jvp / custom_vjp call recorded define-by-run, whose
    parameters hold the bind's Python functions (``subfuns``)."""
    if "subfuns" in eqn.params:
        params = {k: v for k, v in eqn.params.items() if k != "name"}
        return bind_in(current_trace(), eqn.primitive, list(invals), params)
    params = eqn.primitive.get_bind_params(eqn.params)
    with user_context(eqn):
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def staged_away(eqn: JaxprEqn, invals: list) -> list | None:
    """What JAX's staging (``jax.make_jaxpr``) makes of an equation it does not
    keep, so a tool reading a define-by-run recording shows what a staged
    program shows: ``None`` when staging keeps the equation; otherwise, per
    output, the index of the input it passes on (a no-op conversion), or
    ``None`` for a constant it computes (a Python scalar converted to an array).
    """
    from jax._src.interpreters import partial_eval as pe
    prim = eqn.primitive
    fold = pe.const_fold_rules.get(prim)
    if fold is not None and not any(is_tracer(x) for x in invals):
        try:
            out = fold(list(invals), eqn.params, [v.aval for v in eqn.outvars])
        except Exception:  # noqa: BLE001 - a rule that cannot fold these keeps the eqn
            out = None
        if out is not None:
            return [None] * len(eqn.outvars)
    forward = pe.forwarding_rules.get(prim)
    if forward is not None and prim.name not in JIT_NAMES:
        index, kept = forward(eqn)
        if kept is None:
            return list(index)
    return None


def current_source_info():
    return source_info_util.current()


def new_eqn(invars, outvars, prim, params, effects, source_info) -> JaxprEqn:
    return jcore.new_jaxpr_eqn(invars, outvars, prim, params, effects, source_info)


def abstract_eval(prim, avals, params) -> tuple[list, Any]:
    """(output avals as a list, effects) of binding ``prim`` on ``avals``."""
    out, effects = prim.abstract_eval(*avals, **params)
    return (list(out) if prim.multiple_results else [out]), effects


def typed_eqn(prim, params, invars, source_info) -> JaxprEqn:
    """An equation of ``prim`` on ``invars`` with its output types and effects: a
    nested jit's from its jaxpr, any other primitive's by abstract evaluation."""
    if prim.name in JIT_NAMES:
        closed = jit_inner(params)
        out_avals, effects = closed.out_avals, closed.effects
    else:
        out_avals, effects = abstract_eval(prim, [v.aval for v in invars], params)
    return new_eqn(invars, [Var(a) for a in out_avals], prim, params, effects, source_info)


def bind_in(trace, prim, args, params):
    """Binds ``prim`` in ``trace`` (not the current one); always a list."""
    out = prim.bind_with_trace(trace, args, tuple(typeof(a) for a in args), params)
    return list(out) if prim.multiple_results else [out]


def constvars_to_invars(closed: ClosedJaxpr) -> tuple[Jaxpr, list]:
    """A closed jaxpr as an open one taking its constants as leading inputs."""
    from jax._src.interpreters import partial_eval as pe
    jaxpr = closed.jaxpr
    if jaxpr.constvars:
        jaxpr = pe.convert_constvars_jaxpr(jaxpr)
    return jaxpr, list(closed.consts)


def open_jaxpr_taking_consts(jaxpr: Jaxpr) -> Jaxpr:
    """``jaxpr`` with its constvars turned into leading inputs."""
    from jax._src.interpreters import partial_eval as pe
    return pe.convert_constvars_jaxpr(jaxpr) if jaxpr.constvars else jaxpr


def make_jaxpr_of_bind(prim, specs, params) -> ClosedJaxpr:
    """Stages one ``prim.bind(*args, **params)`` into a closed jaxpr (used for
    call-like primitives whose bind parameters are functions, e.g. custom_jvp)."""
    return jax.make_jaxpr(lambda *xs: prim.bind(*xs, **params))(*specs)


def _single_eqn_jaxpr(eqn) -> Jaxpr:
    invars, seen = [], set()
    for v in eqn.invars:
        if type(v) is not Literal and v not in seen:
            seen.add(v)
            invars.append(v)
    return new_jaxpr([], invars, list(eqn.outvars), [eqn]), invars


def eqn_inputs_used(eqn, used_outputs) -> list:
    """Per input of ``eqn``: whether the used outputs depend on it (JAX's
    dead-code elimination rules for loops and branches)."""
    from jax._src.interpreters import partial_eval as pe
    if any(type(v) is DropVar for v in eqn.outvars):
        eqn = eqn.replace(outvars=[Var(v.aval) if type(v) is DropVar else v
                                   for v in eqn.outvars])
    jaxpr, invars = _single_eqn_jaxpr(eqn)
    _, used = pe.dce_jaxpr(jaxpr, list(used_outputs), instantiate=False)
    by_var = dict(zip(invars, used))
    return [type(v) is not Literal and by_var[v] for v in eqn.invars]


def dce_eqn(eqn, used_outputs) -> list:
    """``eqn`` pruned to the outputs in ``used_outputs`` (the others are dropped):
    a list of equations (possibly empty)."""
    from jax._src.interpreters import partial_eval as pe
    eqn = eqn.replace(outvars=[v if u else DropVar(v.aval)
                               for v, u in zip(eqn.outvars, used_outputs)])
    jaxpr, _ = _single_eqn_jaxpr(eqn)
    jaxpr = jaxpr.replace(outvars=[v for v in eqn.outvars if type(v) is not DropVar])
    new, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
    return list(new.eqns)


def reset_stores(wrapped_fun):
    """Empties the auxiliary-output stores of a ``lu.WrappedFun``."""
    for store in wrapped_fun.stores:
        store = getattr(store, "_store", store)      # an EqualStore wraps a Store
        if store is not None:
            store.reset()


def _is_high(eqn) -> bool:
    try:
        return eqn.primitive.is_high(*[v.aval for v in eqn.invars], **eqn.params)
    except TypeError:
        # A call recorded define-by-run (a custom_jvp call holding its Python
        # functions, not its jaxpr) has no staged parameters to ask: it is
        # bound again as recorded, never lowered from this jaxpr.
        return False


def new_jaxpr(constvars, invars, outvars, eqns, fun_name: str = "fun") -> Jaxpr:
    """A jaxpr built by fbackprop (e.g. from a define-by-run recording)."""
    from jax._src import linear_util as lu
    debug = lu.DebugInfo("fbackprop", fun_name, None, None)
    # A jaxpr holding a hi-level equation (a remat3 checkpoint, a custom_vjp3
    # function) says so, as JAX's own tracing does: a primitive whose body it
    # is (a scan) is then lowered to low-level JAX before compilation.
    is_high = any(_is_high(eqn) for eqn in eqns)
    return Jaxpr(constvars, invars, outvars, eqns, join_effects(eqns), debug_info=debug,
                 is_high=is_high)


# -------------------------------------------------------------------- scan
def bind_scan(params, jaxpr: Jaxpr, consts: list, num_consts: int, args: list,
              **overrides) -> list:
    """Binds ``lax.scan``'s primitive with the parameters of another scan equation
    (``params``: length, reverse, unroll...; ``overrides`` replace some, e.g.
    ``reverse`` or ``num_carry``) and a body ``jaxpr`` built directly (its
    constvars fed by ``consts``, then ``num_consts`` loop-invariant inputs, the
    carries and the per-step inputs in ``args``)."""
    from jax._src.lax.control_flow.loops import scan_p
    from jax._src.interpreters import partial_eval as pe
    body = pe.convert_constvars_jaxpr(jaxpr) if jaxpr.constvars else jaxpr
    new_params = dict(params, jaxpr=ClosedJaxpr(body, ()), num_consts=len(consts) + num_consts,
                      **overrides)
    if "linear" in params:     # the parameter of earlier JAX versions
        new_params["linear"] = (False,) * (len(consts) + len(args))
    return scan_p.bind(*consts, *args, **new_params)


# ------------------------------------------------- equations built directly
_glue_templates: dict = {}


def _glue_template(kind: str, aval, weak: bool = False) -> JaxprEqn:
    key = (kind, aval, weak)
    eqn = _glue_templates.get(key)
    if eqn is None:
        lax = jax.lax
        spec = jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=weak)
        if kind == "zeros":
            fn = lambda: lax.broadcast_in_dim(np.zeros((), aval.dtype), tuple(aval.shape), ())  # noqa: E731
            closed = jax.make_jaxpr(fn)()
        elif kind == "strong":
            closed = jax.make_jaxpr(lambda x: with_weak_type(x, False))(spec)
        else:
            closed = jax.make_jaxpr(lax.add)(spec, spec)
        eqns = closed.jaxpr.eqns
        assert len(eqns) == 1 and not closed.consts, (kind, closed)
        eqn = _glue_templates[key] = eqns[0]
    return eqn


def zeros_eqn(outvar: Var) -> JaxprEqn:
    """An equation defining ``outvar`` as zeros of its type (no weak type)."""
    aval = outvar.aval
    if aval.shape:
        return _glue_template("zeros", aval).replace(outvars=[outvar])
    # A scalar: jax.numpy stages no equation for it (the literal is the value);
    # the broadcast of a one-element template to shape () defines the variable.
    template = _glue_template("zeros", aval.update(shape=(1,)))
    return template.replace(params=dict(template.params, shape=()), outvars=[outvar])


def strong_eqn(invar, outvar: Var) -> JaxprEqn:
    """An equation defining ``outvar`` as the weakly typed ``invar`` without its
    weak type (same shape and dtype)."""
    template = _glue_template("strong", outvar.aval, weak=True)
    return template.replace(invars=[invar], outvars=[outvar])


def add_eqn(x, y, outvar: Var) -> JaxprEqn:
    """An equation defining ``outvar = x + y`` (all of ``outvar``'s type)."""
    template = _glue_template("add", outvar.aval)
    return template.replace(invars=[x, y], outvars=[outvar])


__all__ = [
    'bind_eqn',
    'staged_away',
    'current_source_info',
    'new_eqn',
    'abstract_eval',
    'typed_eqn',
    'bind_in',
    'constvars_to_invars',
    'open_jaxpr_taking_consts',
    'make_jaxpr_of_bind',
    'eqn_inputs_used',
    'dce_eqn',
    'reset_stores',
    'new_jaxpr',
    'bind_scan',
    'zeros_eqn',
    'strong_eqn',
    'add_eqn',
]
