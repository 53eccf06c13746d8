"""Forward mode: one tangent sweep over a jaxpr with the ``jvp_rules`` table.

Tangents are ``None`` (symbolic zero) until an equation depending on a
perturbed input produces one.
"""

from __future__ import annotations

import jax

from . import compat
from . import trace as trace_mod
from .registry import call_handlers_forward, foreign_rules, jvp_rules, missing_rule_error, \
    nondiff_primitives, is_differentiable_dtype


def _check_tangent(eqn, v, t):
    _check_tangent_aval(eqn.primitive.name, eqn.source_info, v.aval, t)


def _check_tangent_aval(name, source_info, aval, t):
    import numpy as np
    if tuple(np.shape(t)) != tuple(aval.shape) or getattr(t, "dtype", None) != aval.dtype:
        raise TypeError(
            f"The JVP rule for primitive '{name}' returned a tangent of "
            f"shape/dtype {tuple(np.shape(t))}/{getattr(t, 'dtype', None)} for an output "
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


def zero_tangent(x):
    """A materialized zero tangent for a primal (float0 for integer primals)."""
    aval = compat.typeof(x)
    if is_differentiable_dtype(aval.dtype):
        return compat.zeros_like_aval(aval)
    import numpy as np
    from .registry import jax_float0
    return np.zeros(aval.shape, jax_float0)


def custom_vjp_forward_error(name, where):
    return TypeError(
        f"can't apply forward-mode autodiff (jvp) to a custom_vjp function "
        f"('{name}' at {where}): its custom rule only defines reverse mode, and pushing "
        f"tangents through its primal code could disagree with that rule (e.g. a "
        f"straight-through estimator). Use reverse mode (fbackprop.grad / vjp / jacrev), "
        f"or define the function with jax.custom_jvp.")


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
        closed = self.tangent_jaxpr
        return compat.eval_jaxpr(closed.jaxpr, closed.consts, *residuals, *tangents)
