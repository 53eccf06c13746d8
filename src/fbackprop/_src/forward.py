"""Forward mode: one tangent sweep over a jaxpr with the ``jvp_rules`` table.

Tangents are ``None`` (symbolic zero) until an equation depending on a
perturbed input produces one.
"""

from __future__ import annotations

from . import compat
from .registry import call_handlers_forward, jvp_rules, missing_rule_error, \
    nondiff_primitives, is_differentiable_dtype


def _check_tangent(eqn, v, t):
    import numpy as np
    aval = v.aval
    if tuple(np.shape(t)) != tuple(aval.shape) or getattr(t, "dtype", None) != aval.dtype:
        raise TypeError(
            f"The JVP rule for primitive '{eqn.primitive.name}' returned a tangent of "
            f"shape/dtype {tuple(np.shape(t))}/{getattr(t, 'dtype', None)} for an output "
            f"whose primal is {tuple(aval.shape)}/{aval.dtype} (at "
            f"{compat.source_line(eqn)}). A tangent must have its primal's shape and dtype.")


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
        name = eqn.primitive.name
        if all(t is None for t in tin) or name in nondiff_primitives:
            outs = compat.bind_eqn(eqn, invals)
            touts = [None] * len(outs)
        elif name in call_handlers_forward:
            outs, touts = call_handlers_forward[name](eqn, invals, tin)
        elif name in jvp_rules:
            with compat.user_context(eqn):
                outs, touts = jvp_rules[name](invals, tin, **eqn.params)
            if not eqn.primitive.multiple_results:
                outs, touts = [outs], [touts]
            outs, touts = list(outs), list(touts)
        else:
            raise missing_rule_error(eqn, "forward")
        for v, x, t in zip(eqn.outvars, outs, touts):
            if type(v) is compat.DropVar:
                continue
            env[v] = x
            if t is not None and is_differentiable_dtype(v.aval.dtype):
                _check_tangent(eqn, v, t)
                tenv[v] = t

    return [read(v) for v in jaxpr.outvars], [read_t(v) for v in jaxpr.outvars]
