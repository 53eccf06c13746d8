"""The forward sweep that records and the backward sweep that applies VJP rules.

:func:`forward_eqn` is the one step every front end takes for one equation:
bind it in the current trace (eagerly, or into an enclosing ``jax.jit`` /
``vmap`` / fbackprop trace) and, when it depends on a differentiated input,
make its :class:`~fbackprop._src.engine.tape.Record` - with the output values,
and what a call handler or a rule's own forward half keeps. It is the only code
that makes records. :func:`forward` runs it over a jaxpr's equations (the
sub-jaxprs of calls, loops and branches); the define-by-run trace
(:mod:`fbackprop._src.engine.recording`) runs it for each primitive the user's
function binds.

:func:`backward` walks a tape in reverse program order; for each record,
upstream cotangent x local rule = downstream cotangent, added up where a value
fans out. Zero cotangents stay ``None``. Both sweeps are loops, so graph depth
is bounded by memory, not by the stack.

Which path a step takes (a handler's memoized sweeps or an in-place sweep, a
linear check, a handler's stepped path for a tool, a per-example sweep's handlers
and rule application) is read from the sweep context (:mod:`fbackprop._src.context`);
observers attached there see every equation on the way forward and every rule
application on the way back.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from jax import dtypes, lax

from .. import compat
from ..registry import (MissingRuleError, call_handlers_linear, call_handlers_reverse,
                        foreign_rules, is_differentiable_dtype, missing_rule_error,
                        nondiff_primitives, vjp_rules, with_call_site)
from .. import context
from .linear import check_linear
from .tape import NO_RULE, Record, Residuals, Tape


def _var_differentiable(v) -> bool:
    dtype = getattr(v.aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


def binds_as_is(name: str) -> bool:
    """The primitive has a VJP rule of its own with no forward half, no handler
    replaces it and it is differentiable: its forward step is binding it and
    recording its inputs and outputs."""
    rule = vjp_rules.get(name)
    return (rule is not None and rule.fwd is None and name not in call_handlers_reverse
            and name not in nondiff_primitives)


def needs_output_types(prim) -> bool:
    """A handler or a rule's forward half reads the output types before it runs
    (the others learn them from the values they bind)."""
    name = prim.name
    if name in call_handlers_reverse:
        return True
    rule = vjp_rules.get(name)
    if rule is not None:
        return rule.fwd is not None
    # A library primitive differentiated with the library's own rules.
    return (name not in nondiff_primitives
            and foreign_rules["reverse_handler"](prim, False) is not None)


def forward_eqn(eqn, invals: list, act: list, late_outvars: bool = False,
                tape_only: bool = False, bind: Callable | None = None):
    """One equation of the forward sweep, in the current trace.

    Args:
      eqn: the equation (its ``outvars`` give the output avals).
      invals: its input values.
      act: per input, whether it carries a cotangent.
      late_outvars: the equation has no ``outvars`` yet (a define-by-run
        sweep, which learns the output types from the values); new ones are
        made, and the record holds the completed equation.
      tape_only: record the program only: bind the primitive (with ``bind``
        when given) and keep its inputs, without a handler's or a rule's
        forward half (an eager recording whose backward runs as a compiled
        program, or ``fb.linearize``, which differentiates the recorded program
        in forward mode).
      bind: ``bind(eqn, invals) -> outvals`` for ``tape_only`` (default:
        ``compat.bind_eqn``).

    Returns:
      ``(outvals, record, out_active)``: ``record`` is ``None`` when nothing
      downstream can need this equation's backward, ``out_active`` says which
      outputs carry a cotangent (``None`` when none does).
    """
    name = eqn.primitive.name
    ctx = context.current()
    if not any(act):
        if ctx.stepping is not None:
            # A tool steps calls nothing differentiates too: the handler's
            # observed path runs them in place (``None``: bound as they are).
            evaluate = getattr(call_handlers_reverse.get(name), "evaluate", None)
            if evaluate is not None:
                with compat.call_site(eqn):
                    outvals = evaluate(eqn, invals)
                if outvals is not None:
                    return outvals, None, None
        return compat.bind_eqn(eqn, invals), None, None
    if ctx.linear is not None and not tape_only:
        check_linear(eqn, act, ctx.linear)
    if name in nondiff_primitives and not (
            ctx.linear is not None and foreign_rules["is_linear"](eqn.primitive)):
        # (In a linear sweep, a library's transpose rule for one of JAX's
        # non-differentiable primitives makes it linear: see rules/foreign.py.)
        return (bind or compat.bind_eqn)(eqn, invals), None, None
    if tape_only and "subfuns" not in eqn.params:
        outvals = (bind or compat.bind_eqn)(eqn, invals)
        if late_outvars:
            eqn = eqn.replace(outvars=[compat.Var(compat.typeof(x)) for x in outvals])
        sub = handler = None
        out_act = [True] * len(outvals)
    else:
        if ctx.linear is not None:
            handler = call_handlers_linear.get(name) or call_handlers_reverse.get(name)
        else:
            handler = ((ctx.per_example is not None and ctx.per_example.handler(name))
                       or call_handlers_reverse.get(name))
        if handler is None and name not in vjp_rules:
            handler = foreign_rules["reverse_handler"](eqn.primitive, ctx.linear is not None)
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
                sub = Residuals(residuals)
            else:
                outvals = (bind or compat.bind_eqn)(eqn, invals)
                sub = None if rule is not None else NO_RULE
            out_act = [True] * len(outvals)
        if late_outvars:
            eqn = eqn.replace(outvars=[compat.Var(compat.typeof(x)) for x in outvals])
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
    Literal, DropVar = compat.Literal, compat.DropVar

    def read(v):
        return v.val if type(v) is Literal else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, a in zip(jaxpr.invars, args, in_active):
        env[v] = x
        if a and _var_differentiable(v):
            active.add(v)

    observers = context.current().observers
    records = []
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        act = [type(v) is not Literal and v in active for v in eqn.invars]
        outvals, rec, out_act = forward_eqn(eqn, invals, act)
        for v, x in zip(eqn.outvars, outvals):
            if type(v) is not DropVar:
                env[v] = x
        if rec is not None:
            active.update(v for v, a in zip(eqn.outvars, out_act) if a)
            records.append(rec)
        for obs in observers:
            obs.on_forward(eqn, invals, outvals)

    outs = [read(v) for v in jaxpr.outvars]
    out_active = [type(v) is not Literal and v in active for v in jaxpr.outvars]
    return outs, Tape(jaxpr, records, list(in_active), out_active)


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


def accumulate(ct_env: dict, v, ct, per_example=None):
    """Adds ``ct`` to the cotangent of ``v`` in ``ct_env``. ``per_example``: the
    per-example sweep running now (``context.current().per_example``), which adds
    the cotangents it keeps in a form of its own (factors, sums over examples)."""
    prev = ct_env.get(v)
    if prev is None:
        ct_env[v] = ct
    elif per_example is not None and (per_example.symbolic(prev) or per_example.symbolic(ct)):
        ct_env[v] = per_example.add(prev, ct)
    elif prev.dtype == ct.dtype:
        ct_env[v] = lax.add(prev, ct)
    else:
        # Cotangents of one value in two float precisions (see ct_dtype_ok).
        dtype = dtypes.promote_types(prev.dtype, ct.dtype)
        ct_env[v] = lax.add(lax.convert_element_type(prev, dtype),
                            lax.convert_element_type(ct, dtype))


def apply_rule(rec: Record, cts_out: list) -> list:
    """Runs one recorded equation's VJP rule; one cotangent (or None) per input."""
    per_example = context.current().per_example
    if per_example is not None:
        # A per-example sweep makes, passes on or materializes the cotangents it
        # keeps in a form of its own around the rule.
        return per_example.apply_rule(rec, cts_out, _apply_rule)
    return _apply_rule(rec, cts_out)


def _apply_rule(rec: Record, cts_out: list) -> list:
    eqn = rec.eqn
    if rec.handler is not None:
        try:
            with compat.call_site(eqn):
                return rec.handler.backward(rec, cts_out)
        except MissingRuleError as err:
            raise with_call_site(err, eqn) from None
    if rec.sub is NO_RULE:
        raise missing_rule_error(eqn, "reverse")
    return rule_cotangents(eqn, rec.invals, rec.outvals, rec.active, cts_out, rec.sub)


def rule_cotangents(eqn, invals, outvals, active, cts_out, sub=None) -> list:
    """The VJP rule of ``eqn``'s primitive applied to ``cts_out`` at these values
    (``sub``: what the rule's own forward half kept, if it has one)."""
    rule = vjp_rules[eqn.primitive.name]
    if eqn.primitive.multiple_results:
        ct_arg, out_arg = cts_out, outvals
    else:
        ct_arg, out_arg = cts_out[0], outvals[0]
    kwargs = dict(eqn.params)
    if rule.needs_active:
        kwargs["active"] = active
    if rule.fwd is not None:
        kwargs["residuals"] = sub.values
    with compat.user_context(eqn):
        return rule.fn(ct_arg, out_arg, *invals, **kwargs)


def backward(tape: Tape, cts_out: list) -> list:
    """Propagates output cotangents (``None`` = zero) back to the tape's inputs."""
    with compat.rules_context():
        return _backward(tape, cts_out)


def _backward(tape: Tape, cts_out: list) -> list:
    jaxpr = tape.jaxpr
    ctx = context.current()
    per_example = ctx.per_example
    ct_env: dict = {}
    for v, ct, a in zip(jaxpr.outvars, cts_out, tape.out_active):
        if ct is not None and a:
            accumulate(ct_env, v, ct, per_example)

    observers = ctx.observers
    DropVar = compat.DropVar
    for rec in reversed(tape.records):
        eqn = rec.eqn
        cts = [None if type(v) is DropVar else ct_env.pop(v, None) for v in eqn.outvars]
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
            accumulate(ct_env, v, ct, per_example)
        for obs in observers:
            obs.on_backward(eqn, cts, cts_in, rec)

    return [ct_env.get(v) if a else None for v, a in zip(jaxpr.invars, tape.in_active)]

