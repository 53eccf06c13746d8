"""``fb.linearize``'s program: the tangent sweep split into a primal and a linear part."""

from __future__ import annotations

import jax

from . import compat, context
from . import trace as trace_mod
from .engine.recording import custom_vjp_forward_error
from .engine.tangents import jvp_jaxpr
from .rules.calls import custom_vjp_tangent_p


# fb.linearize traces the tangent sweep once, over abstract primals and
# tangents, and splits the resulting jaxpr by dependency: equations that do not
# read a tangent (the primal computation and the primal-only parts of the rules,
# e.g. ``cos x`` in the rule of ``sin``) are evaluated once at linearization
# time; the others form a jaxpr over (residuals, tangents) that ``jvp_fn``
# evaluates on every call. This is partial evaluation with "known" = primal and
# "unknown" = tangent, written out for flat first-order jaxprs: a control-flow
# equation that mixes both is kept whole on the tangent side (correct, merely
# recomputing its primal part).


def _outputs_independent_of(eqn, unknown) -> list:
    """Per output of ``eqn``: computable without any variable in ``unknown``."""
    out = []
    for j, v in enumerate(eqn.outvars):
        if type(v) is compat.DropVar:
            out.append(False)
            continue
        used_inputs = compat.eqn_inputs_used(eqn, [i == j for i in range(len(eqn.outvars))])
        out.append(not any(u and type(x) is not compat.Literal and x in unknown
                           for x, u in zip(eqn.invars, used_inputs)))
    return out


def _deferred_error(jaxpr):
    """``(name, where)`` of the first custom_vjp tangent left in ``jaxpr``, or None."""
    stack = [jaxpr]
    while stack:
        j = stack.pop()
        for eqn in j.eqns:
            if eqn.primitive is custom_vjp_tangent_p:
                return eqn.params["name"], eqn.params["where"]
            stack.extend(trace_mod.sub_jaxprs(eqn))
    return None


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
        # A custom_vjp function's tangents are a deferred error (see rules/calls.py).
        with context.using(linearizing=True):
            full = jax.make_jaxpr(jvp_flat)(*specs, *tspecs)
        self.out_tangent_nonzero = nonzero_cell[0]
        self._split(full.jaxpr, full.consts, n_in, n_out)
        # Primal outputs that the tangent program computes together with
        # tangents (a while_loop carrying both) come from the function itself.
        if any(self._from_original):
            orig, _ = compat.dce_jaxpr(jaxpr, self._from_original, instantiate=True)
            self._original = (orig, list(consts))

    def _split(self, jaxpr, consts, n_in, n_out):
        Literal = compat.Literal
        tangent_vars = jaxpr.invars[n_in:]
        unknown = set(tangent_vars)
        known_eqns, tangent_eqns = [], []
        for eqn in jaxpr.eqns:
            if not any(type(v) is not Literal and v in unknown for v in eqn.invars):
                known_eqns.append(eqn)
                continue
            # A loop or branch carries primals and tangents together; its primal
            # outputs are split off (by dead-code elimination of the equation)
            # so that they are known, and the tangent side keeps the rest.
            known_out = _outputs_independent_of(eqn, unknown) \
                if any(True for _ in trace_mod.sub_jaxprs(eqn)) else None
            if known_out is not None and any(known_out):
                known_eqns.extend(compat.dce_eqn(eqn, known_out))
                tangent_out = [not k for k in known_out]
                tangent_eqns.extend(compat.dce_eqn(eqn, tangent_out))
                unknown.update(v for v, t in zip(eqn.outvars, tangent_out)
                               if t and type(v) is not compat.DropVar)
            else:
                tangent_eqns.append(eqn)
                unknown.update(v for v in eqn.outvars if type(v) is not compat.DropVar)
        tangent_outvars = jaxpr.outvars[n_out:]
        self._from_original = [type(v) is not Literal and v in unknown
                               for v in jaxpr.outvars[:n_out]]
        primal_outvars = [v for v, o in zip(jaxpr.outvars[:n_out], self._from_original)
                          if not o]

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
        tangent_jaxpr = jax.make_jaxpr(tangent_fn)(*specs)
        # A custom_vjp's tangent that reaches no output is dropped here, as JAX's
        # linearize drops it; one that does makes the linear map an error.
        dced, _ = compat.dce_jaxpr(tangent_jaxpr.jaxpr, [True] * len(tangent_outvars),
                                   instantiate=True)
        self.tangent_jaxpr = compat.ClosedJaxpr(dced, tangent_jaxpr.consts)
        self._deferred_error = _deferred_error(dced)

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
        outs = iter([read(v) for v in self._primal_outvars])
        if any(self._from_original):
            orig, consts = self._original
            from_orig = iter(compat.eval_jaxpr(orig, consts, *primals))
        else:
            from_orig = iter(())
        return ([next(from_orig) if o else next(outs) for o in self._from_original],
                [read(v) for v in self._residual_vars])

    def eval_tangent(self, residuals, tangents) -> list:
        """Applies the linear map: nonzero output tangents from input tangents.

        ``tangents`` holds one array per input with ``tangent_mask`` set.
        """
        if self._deferred_error is not None:
            raise custom_vjp_forward_error(*self._deferred_error)
        closed = self.tangent_jaxpr
        return compat.eval_jaxpr(closed.jaxpr, closed.consts, *residuals, *tangents)
