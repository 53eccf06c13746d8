"""Reverse mode: a forward sweep that records, a backward sweep that applies VJP rules.

The forward sweep evaluates a jaxpr equation by equation in the current trace
(eagerly, or into an enclosing ``jax.jit``/``vmap``/fbackprop trace) and records
each equation that depends on a differentiated input, with its input and output
values: that record is the tape. The backward sweep walks the tape in reverse
program order; for each equation, upstream cotangent x local rule = downstream
cotangent, added up where a value fans out. Zero cotangents stay ``None``.
Both sweeps are loops, so graph depth is bounded by memory, not by the stack.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import numpy as np
from jax import dtypes, lax, tree_util

from . import compat
from .registry import (MissingRuleError, call_handlers_linear, call_handlers_reverse,
                       foreign_rules, is_differentiable_dtype, linear_primitives,
                       missing_rule_error, nondiff_primitives, vjp_rules, with_call_site)


@dataclasses.dataclass
class Record:
    """One recorded equation: enough to run its VJP rule later."""
    eqn: Any
    invals: list
    outvals: list
    active: list          # per input: does it carry a cotangent?
    sub: Any = None       # call primitives: what their handler kept (e.g. a sub-tape)
    handler: Any = None   # call primitives: the handler whose backward runs


@dataclasses.dataclass
class Tape:
    jaxpr: Any
    records: list
    in_active: list
    out_active: list


def _aval_of_var(v):
    return v.aval


def _var_differentiable(v) -> bool:
    dtype = getattr(v.aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


_NO_RULE = object()   # marks a recorded equation whose primitive has no VJP rule


# A tape is a pytree whose leaves are the values it keeps (and a few static
# Python objects), so ``vjp_fn`` can carry it as a ``jax.tree_util.Partial``.
tree_util.register_pytree_node(
    Record,
    lambda r: ((r.invals, r.outvals, r.sub), (r.eqn, tuple(r.active), r.handler)),
    lambda aux, ch: Record(aux[0], ch[0], ch[1], list(aux[1]), ch[2], aux[2]))
tree_util.register_pytree_node(
    Tape,
    lambda t: ((t.records,), (t.jaxpr, tuple(t.in_active), tuple(t.out_active))),
    lambda aux, ch: Tape(aux[0], ch[0], list(aux[1]), list(aux[2])))


@dataclasses.dataclass
class _Residuals:
    """What a rule's own ``fwd`` kept for its backward."""
    values: Any


tree_util.register_pytree_node(_Residuals, lambda r: ((r.values,), None),
                               lambda _, ch: _Residuals(ch[0]))

# Hooks let debugging tools observe the sweeps without a second engine.
# on_forward(eqn, invals, outvals); on_backward(eqn, cts_out, cts_in, record)
_observers: list = []

def notify(method: str, *args):
    """Tells the observers that have ``method`` about a sweep they cannot see as
    equations (a step of a loop beginning, values sliced or stacked between steps)."""
    for obs in _observers:
        fn = getattr(obs, method, None)
        if fn is not None:
            fn(*args)


# Analyses that read the traced forward+backward program equation by equation
# (checkpoint policies, residual reports, memory plans) need nested jit calls
# swept in place rather than bound as one memoized call each.
_in_place: list = []


@contextlib.contextmanager
def sweeping_calls_in_place():
    """Nested ``jit`` calls are swept equation by equation while this is active."""
    _in_place.append(True)
    try:
        yield
    finally:
        _in_place.pop()


def sweeps_unwatched(linear_ok: bool = False) -> bool:
    """No tool watches or replaces the sweeps or reads the program they trace (they
    must then see every equation of a sub-jaxpr), and no linear sweep checks them
    (unless ``linear_ok``: the caller's cache tells linear sweeps apart, and the
    check runs when the sweep is traced): a sub-jaxpr's sweeps may then be traced
    once and bound as one call."""
    return not (_observers or (_linear_stack and not linear_ok) or handler_overrides
                or _in_place)


def in_linear_sweep() -> bool:
    return bool(_linear_stack)


# A debugging tool may replace a call primitive's reverse handler while it runs
# (fb.checked_grad sweeps each step of a scan in place so it can watch it); the
# replacement's ``evaluate(eqn, invals)`` also runs the equations nothing
# differentiates.
handler_overrides: dict = {}


def forward_eqn(eqn, invals: list, act: list, late_outvars: bool = False):
    """One equation of the forward sweep, in the current trace.

    Args:
      eqn: the equation (its ``outvars`` give the output avals).
      invals: its input values.
      act: per input, whether it carries a cotangent.
      late_outvars: the equation has no ``outvars`` yet (a define-by-run
        sweep, which learns the output avals from the values); new ones are
        made, and the record holds the completed equation.

    Returns:
      ``(outvals, record, out_active)``: ``record`` is ``None`` when nothing
      downstream can need this equation's backward, ``out_active`` says which
      outputs carry a cotangent (``None`` when none does).
    """
    name = eqn.primitive.name
    if not any(act):
        override = handler_overrides.get(name) if handler_overrides else None
        if override is not None:
            with compat.call_site(eqn):
                return override.evaluate(eqn, invals), None, None
        return compat.bind_eqn(eqn, invals), None, None
    linear = bool(_linear_stack)
    if linear:
        check_linear(eqn, act)
        handler = call_handlers_linear.get(name) or call_handlers_reverse.get(name)
    else:
        handler = handler_overrides.get(name) or call_handlers_reverse.get(name)
    if name in nondiff_primitives:
        return compat.bind_eqn(eqn, invals), None, None
    if handler is None and name not in vjp_rules:
        handler = foreign_rules["reverse_handler"](eqn.primitive, linear)
    assert not late_outvars or handler is None, name
    if handler is not None:
        try:
            with compat.rules_context(), compat.call_site(eqn):
                outvals, sub, out_act = handler.forward(eqn, invals, act)
        except MissingRuleError as err:
            raise with_call_site(err, eqn) from None
    else:
        # A primitive without a rule is only an error if a cotangent reaches it
        # (e.g. a max whose result goes through stop_gradient needs none).
        rule = vjp_rules.get(name)
        if rule is not None and rule.fwd is not None:
            with compat.user_context(eqn), compat.rules_context():
                outvals, residuals = rule.fwd(*invals, **eqn.params)
            outvals = list(outvals) if eqn.primitive.multiple_results else [outvals]
            sub = _Residuals(residuals)
        else:
            outvals = compat.bind_eqn(eqn, invals)
            sub = None if rule is not None else _NO_RULE
        if late_outvars:
            eqn = eqn.replace(outvars=[compat.Var(compat.typeof(x)) for x in outvals])
        out_act = [True] * len(eqn.outvars)
    out_act = [a and type(v) is not compat.DropVar and _var_differentiable(v)
               for v, a in zip(eqn.outvars, out_act)]
    if not any(out_act):
        return outvals, None, out_act
    return outvals, Record(eqn, invals, outvals, act, sub, handler), out_act


def forward(jaxpr, consts, args, in_active) -> tuple[list, Tape]:
    """Evaluates ``jaxpr`` on ``args``, recording equations downstream of active inputs.

    Args:
      jaxpr: an open jaxpr.
      consts: values for ``jaxpr.constvars`` (never differentiated).
      args: values for ``jaxpr.invars``.
      in_active: per input, whether it is differentiated.

    Returns:
      The output values and the tape for :func:`backward`.
    """
    env: dict = {}
    active: set = set()

    def read(v):
        return v.val if type(v) is compat.Literal else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, a in zip(jaxpr.invars, args, in_active):
        env[v] = x
        if a and _var_differentiable(v):
            active.add(v)

    records = []
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        act = [type(v) is not compat.Literal and v in active for v in eqn.invars]
        outvals, rec, out_act = forward_eqn(eqn, invals, act)
        for v, x in zip(eqn.outvars, outvals):
            if type(v) is not compat.DropVar:
                env[v] = x
        if rec is not None:
            active.update(v for v, a in zip(eqn.outvars, out_act) if a)
            records.append(rec)
        for obs in _observers:
            obs.on_forward(eqn, invals, outvals)

    outs = [read(v) for v in jaxpr.outvars]
    out_active = [type(v) is not compat.Literal and v in active for v in jaxpr.outvars]
    return outs, Tape(jaxpr, records, list(in_active), out_active)


# ------------------------------------------------------------- linear sweeps
# Reverse mode of a ``custom_jvp`` function transposes the user's JVP rule: our
# own sweeps run over the rule as a function of its tangents. That is only the
# transpose if the rule is linear in them, so while such a sweep runs every
# equation that reads a tangent is checked (``linear_primitives``), and a
# ``custom_jvp`` function applied to a tangent is differentiated through its
# own body (it is then part of a linear map, not a point to linearize at).
_linear_stack: list = []


@contextlib.contextmanager
def outside_linear_sweeps():
    """For a define-by-run trace's own records: an enclosing linear sweep's check
    is about the equations of that sweep, not about what an outer trace records
    when the sweep binds into it."""
    saved = _linear_stack[:]
    _linear_stack.clear()
    try:
        yield
    finally:
        _linear_stack[:] = saved


@contextlib.contextmanager
def linear_sweep(what: str):
    """For a define-by-run trace that records a JVP rule as a function of its
    tangents: every equation it records is checked for linearity in them, and
    ``what`` names the rule in the error."""
    saved = _linear_stack[:]
    _linear_stack[:] = [what]
    try:
        yield
    finally:
        _linear_stack[:] = saved


class NonLinearRuleError(ValueError):
    """A custom JVP rule is not linear in its tangents, so it cannot be transposed."""


def check_linear(eqn, act):
    name = eqn.primitive.name
    rule = linear_primitives.get(name)
    if rule is True or (rule is not None and rule(act, **eqn.params)):
        return
    if rule is None and name not in vjp_rules and foreign_rules["is_linear"](eqn.primitive):
        return
    what = _linear_stack[-1]
    if rule is None:
        how = (f"it applies '{name}', which is not linear, to a tangent")
    else:
        how = (f"it applies '{name}' to tangent values in a way that is not linear "
               f"(e.g. a product of two tangents, or a tangent in a denominator)")
    raise NonLinearRuleError(
        f"The JVP rule of {what} is not linear in its tangents: {how} at "
        f"{compat.source_line(eqn)}. Reverse mode (grad, vjp) transposes the JVP rule, "
        f"which is only correct for a rule whose tangent outputs are linear functions "
        f"of the input tangents (e.g. `cos(x) * t`). Fix the rule, or use forward mode "
        f"(fbackprop.jvp), which evaluates the rule as written.")


def ct_dtype_ok(primal_dtype, ct_dtype) -> bool:
    """Whether a cotangent of ``ct_dtype`` may stand for a primal of
    ``primal_dtype``: the same dtype, or another precision of the same kind of
    float. JAX lets a custom rule return a cotangent in more precision than its
    primal (a float32 cotangent for a bfloat16 value) and passes it on unchanged
    through the rules that follow; fbackprop does the same."""
    if ct_dtype == primal_dtype:
        return True
    if ct_dtype is None:
        return False
    return any(dtypes.issubdtype(primal_dtype, kind) and dtypes.issubdtype(ct_dtype, kind)
               for kind in (np.floating, np.complexfloating))


def _check_ct(eqn, i, v, ct):
    aval = v.aval
    shape = np.shape(ct)
    dtype = getattr(ct, "dtype", None)
    if tuple(shape) != tuple(aval.shape) or not ct_dtype_ok(aval.dtype, dtype):
        raise TypeError(
            f"The VJP rule for primitive '{eqn.primitive.name}' returned a cotangent of "
            f"shape/dtype {tuple(shape)}/{dtype} for input {i}, whose primal is "
            f"{tuple(aval.shape)}/{aval.dtype} (at {compat.source_line(eqn)}). "
            f"A cotangent must have its primal's shape and dtype; fix the rule.")


def accumulate(ct_env: dict, v, ct):
    prev = ct_env.get(v)
    if prev is None:
        ct_env[v] = ct
    elif prev.dtype == ct.dtype:
        ct_env[v] = lax.add(prev, ct)
    else:
        # Cotangents of one value in two float precisions (see ct_dtype_ok).
        dtype = dtypes.promote_types(prev.dtype, ct.dtype)
        ct_env[v] = lax.add(lax.convert_element_type(prev, dtype),
                            lax.convert_element_type(ct, dtype))


def apply_rule(rec: Record, cts_out: list) -> list:
    """Runs one recorded equation's VJP rule; one cotangent (or None) per input."""
    eqn = rec.eqn
    name = eqn.primitive.name
    if rec.handler is not None:
        try:
            with compat.call_site(eqn):
                return rec.handler.backward(rec, cts_out)
        except MissingRuleError as err:
            raise with_call_site(err, eqn) from None
    if rec.sub is _NO_RULE:
        raise missing_rule_error(eqn, "reverse")
    rule = vjp_rules[name]
    if eqn.primitive.multiple_results:
        ct_arg, out_arg = cts_out, rec.outvals
    else:
        ct_arg, out_arg = cts_out[0], rec.outvals[0]
    kwargs = dict(eqn.params)
    if rule.needs_active:
        kwargs["active"] = rec.active
    if rule.fwd is not None:
        kwargs["residuals"] = rec.sub.values
    with compat.user_context(eqn):
        return rule.fn(ct_arg, out_arg, *rec.invals, **kwargs)


def backward(tape: Tape, cts_out: list) -> list:
    """Propagates output cotangents (``None`` = zero) back to the jaxpr's inputs."""
    with compat.rules_context():
        return _backward(tape, cts_out)


def _backward(tape: Tape, cts_out: list) -> list:
    jaxpr = tape.jaxpr
    ct_env: dict = {}
    for v, ct, a in zip(jaxpr.outvars, cts_out, tape.out_active):
        if ct is not None and a:
            accumulate(ct_env, v, ct)

    for rec in reversed(tape.records):
        eqn = rec.eqn
        cts = [None if type(v) is compat.DropVar else ct_env.pop(v, None)
               for v in eqn.outvars]
        if all(c is None for c in cts):
            continue
        if not eqn.primitive.multiple_results and cts[0] is None:
            continue
        cts_in = apply_rule(rec, cts)
        assert len(cts_in) == len(eqn.invars), (eqn.primitive.name, len(cts_in))
        for i, (v, ct, a) in enumerate(zip(eqn.invars, cts_in, rec.active)):
            if ct is None or not a:
                continue
            _check_ct(eqn, i, v, ct)
            accumulate(ct_env, v, ct)
        for obs in _observers:
            obs.on_backward(eqn, cts, cts_in, rec)

    return [ct_env.get(v) if a else None for v, a in zip(jaxpr.invars, tape.in_active)]


def vjp_closed(closed_jaxpr, args, in_active) -> tuple[list, Callable, list]:
    """Forward sweep of a closed jaxpr; returns (outs, backward_fn, out_active)."""
    outs, tape = forward(closed_jaxpr.jaxpr, closed_jaxpr.consts, args, in_active)
    return outs, (lambda cts: backward(tape, cts)), tape.out_active
