"""Forward mode: one tangent sweep over a jaxpr with the ``jvp_rules`` table.

Tangents are ``None`` (symbolic zero) until an equation depending on a
perturbed input produces one.
"""

from __future__ import annotations

import jax

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


# ------------------------------------------------------------------ linearize
# fb.linearize traces the tangent sweep once, over abstract primals and
# tangents, and splits the resulting jaxpr by dependency: equations that do not
# read a tangent (the primal computation and the primal-only parts of the rules,
# e.g. ``cos x`` in the rule of ``sin``) are evaluated once at linearization
# time; the others form a jaxpr over (residuals, tangents) that ``jvp_fn``
# evaluates on every call. This is partial evaluation with "known" = primal and
# "unknown" = tangent, written out for flat first-order jaxprs: a control-flow
# equation that mixes both is kept whole on the tangent side (correct, merely
# recomputing its primal part).


class LinearizedProgram:
    """The tangent sweep of one jaxpr, split into a primal part and a linear part.

    Built once per (jaxpr, which inputs carry tangents); evaluating it at a point
    is :meth:`eval_primal`, applying the linear map is :meth:`eval_tangent`.

    Attributes:
      tangent_jaxpr: closed jaxpr over ``(*residuals, *tangents)`` returning the
        nonzero output tangents (a debugging aid: print it to see what ``jvp_fn`` runs).
      out_tangent_nonzero: per output of the original jaxpr, whether its tangent
        can be nonzero (the others are zero whatever the input tangents).
    """

    def __init__(self, jaxpr, consts, in_avals, tangent_mask):
        self.tangent_mask = list(tangent_mask)
        n_in = len(in_avals)
        n_out = len(jaxpr.outvars)
        nonzero_cell: list = []

        def jvp_flat(*args):
            primals, nz = args[:n_in], iter(args[n_in:])
            tangents = [next(nz) if m else None for m in self.tangent_mask]
            outs, touts = jvp_jaxpr(jaxpr, consts, list(primals), tangents)
            nonzero_cell.append([t is not None for t in touts])
            return list(outs) + [t for t in touts if t is not None]

        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
                 for a in in_avals]
        tspecs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
                  for a, m in zip(in_avals, self.tangent_mask) if m]
        full = jax.make_jaxpr(jvp_flat)(*specs, *tspecs)
        self.out_tangent_nonzero = nonzero_cell[0]
        self._split(full.jaxpr, full.consts, n_in, n_out)

    def _split(self, jaxpr, consts, n_in, n_out):
        Literal = compat.Literal
        tangent_vars = jaxpr.invars[n_in:]
        unknown = set(tangent_vars)
        known_eqns, tangent_eqns = [], []
        for eqn in jaxpr.eqns:
            if any(type(v) is not Literal and v in unknown for v in eqn.invars):
                tangent_eqns.append(eqn)
                unknown.update(v for v in eqn.outvars if type(v) is not compat.DropVar)
            else:
                known_eqns.append(eqn)
        primal_outvars = jaxpr.outvars[:n_out]
        tangent_outvars = jaxpr.outvars[n_out:]
        assert not any(type(v) is not Literal and v in unknown for v in primal_outvars), \
            "a JVP rule made a primal output depend on a tangent"

        # Residuals: known values the tangent side reads (including known tangent outputs).
        residuals, seen = [], set()
        for v in [v for e in tangent_eqns for v in e.invars] + list(tangent_outvars):
            if type(v) is not Literal and v not in unknown and v not in seen:
                seen.add(v)
                residuals.append(v)

        # Keep only the known equations something downstream needs (or that have effects).
        needed = {v for v in list(primal_outvars) + residuals if type(v) is not Literal}
        kept = []
        for eqn in reversed(known_eqns):
            if eqn.effects or any(v in needed for v in eqn.outvars):
                kept.append(eqn)
                needed.update(v for v in eqn.invars if type(v) is not Literal)
        kept.reverse()

        self._constvars, self._consts = list(jaxpr.constvars), list(consts)
        self._primal_invars = list(jaxpr.invars[:n_in])
        self._known_eqns = kept
        self._primal_outvars = list(primal_outvars)
        self._residual_vars = residuals
        # Re-trace the tangent equations alone into a well-formed jaxpr over
        # (residuals, tangents): what jvp_fn evaluates, and what a user can print.
        tangent_in = residuals + list(tangent_vars)

        def tangent_fn(*vals):
            read = self._run(tangent_eqns, dict(zip(tangent_in, vals)))
            return [read(v) for v in tangent_outvars]

        specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype,
                                      weak_type=getattr(v.aval, "weak_type", False))
                 for v in tangent_in]
        self.tangent_jaxpr = jax.make_jaxpr(tangent_fn)(*specs)

    @staticmethod
    def _run(eqns, env):
        Literal = compat.Literal

        def read(v):
            return v.val if type(v) is Literal else env[v]

        for eqn in eqns:
            outs = compat.bind_eqn(eqn, [read(v) for v in eqn.invars])
            for v, x in zip(eqn.outvars, outs):
                if type(v) is not compat.DropVar:
                    env[v] = x
        return read

    def eval_primal(self, primals) -> tuple[list, list]:
        """Evaluates the primal side at ``primals``: ``(outs, residuals)``."""
        env = dict(zip(self._constvars, self._consts))
        env.update(zip(self._primal_invars, primals))
        read = self._run(self._known_eqns, env)
        return [read(v) for v in self._primal_outvars], [read(v) for v in self._residual_vars]

    def eval_tangent(self, residuals, tangents) -> list:
        """Applies the linear map: nonzero output tangents from input tangents.

        ``tangents`` holds one array per input with ``tangent_mask`` set.
        """
        closed = self.tangent_jaxpr
        return compat.eval_jaxpr(closed.jaxpr, closed.consts, *residuals, *tangents)
