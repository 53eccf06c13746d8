"""Primitives other libraries define: differentiated with those libraries' own rules.

lineax's ``linear_solve``, equinox's ``select_if_vmap`` / ``noinline`` /
``nondifferentiable_backward``, diffrax's helpers... are primitives whose
libraries register a JVP rule (and, for the linear ones, a transpose rule)
with JAX, exactly as a user does with ``jax.custom_jvp``. fbackprop honors
them the same way it honors a ``custom_jvp`` function:

- forward mode runs the library's JVP rule;
- reverse mode traces that JVP rule as a function of the tangents and
  transposes it with fbackprop's own sweep, checked for linearity like a
  ``custom_jvp`` rule; inside it, the library's own linear primitives (e.g.
  ``linear_solve`` applied to a tangent right-hand side) are transposed with
  the library's transpose rule.

Only primitives fbackprop has no rule for take this path, and never JAX's own
primitives (a rule registered by a ``jax`` module): those keep fbackprop's own
rules or are a missing-rule error. :func:`registry.rules_for` is the one place
that decides; the next library needs no change anywhere else.
"""

from __future__ import annotations


import jax

from .. import compat
from .. import registry
from .. import context
from ..engine import sweeps
from ..registry import ForeignRules, MissingRuleError, rules_for

# The tables JAX keeps of other libraries' rules (read, never written here).
from jax._src.interpreters import ad as _jax_ad  # noqa: E402


def _zero(aval):
    return _jax_ad.Zero(aval.to_tangent_aval())


def _is_zero(t) -> bool:
    return t is None or isinstance(t, (_jax_ad.Zero, compat.SymbolicZero))


def _as_traced(record):
    """The recorded inputs typed as the jaxpr typed them (literals become arrays):
    library rules may compare them with what they saw when they were traced."""
    return [compat.as_array_like(x, v.aval) for x, v in zip(record.invals, record.eqn.invars)]


# ---------------------------------------------------------------- forward mode
def jvp(rules: ForeignRules, eqn_params, primals, tangents):
    """The library's JVP rule: ``(outs, out_tangents)`` as lists, None for zeros.

    The rule gets what JAX's JVP trace gives it: tuples of primals and tangents,
    JAX's ``Zero`` for a zero tangent (Equinox's rules pass them on to ``vmap``
    as a pytree, whose ``in_axes`` must then match container for container)."""
    prim = rules.prim
    ts = tuple(_zero(compat.typeof(x)) if t is None else t for x, t in zip(primals, tangents))
    outs, touts = rules.jvp(tuple(primals), ts, **eqn_params)
    if not prim.multiple_results:
        outs, touts = [outs], [touts]
    return list(outs), [None if _is_zero(t) else t for t in touts]


# ---------------------------------------------------------------- reverse mode
def _describe(rules) -> str:
    return f"primitive '{rules.prim.name}' (rule from {rules.owner})"


class _ForeignCall:
    """A library primitive in a reverse sweep: bound as it is, nothing extra kept."""

    def __init__(self, rules):
        self.rules = rules

    def forward(self, eqn, invals, active):
        outvals = compat.bind_eqn(eqn, invals)
        return outvals, None, [True] * len(outvals)


class _TangentProgram:
    """A library rule traced as a function of the active inputs' tangents: the
    jaxpr and which outputs have a nonzero tangent are static, its constants
    (the primal values it reads) are the tape's values."""

    def __init__(self, jaxpr, consts, nonzero):
        self.jaxpr, self.consts, self.nonzero = jaxpr, list(consts), nonzero


jax.tree_util.register_pytree_node(
    _TangentProgram, lambda p: ((p.consts,), (p.jaxpr, tuple(p.nonzero))),
    lambda aux, ch: _TangentProgram(aux[0], ch[0], list(aux[1])))


class ForeignJVPCall(_ForeignCall):
    """Reverse mode of a library primitive: its JVP rule, transposed by us.

    The rule is traced in the forward sweep, where JAX runs it: an error it
    raises (Equinox's ``nontraceable``) comes from the call, before what the
    function does next; the backward sweep transposes the traced rule."""

    def forward(self, eqn, invals, active):
        outvals, _, out_active = super().forward(eqn, invals, active)
        rules = self.rules
        if rules.jvp is None:
            return outvals, None, out_active
        primals = [compat.as_array_like(x, v.aval) for x, v in zip(invals, eqn.invars)]
        nonzero_cell: list = []

        def tangent_outputs(*nz_tangents):
            it = iter(nz_tangents)
            tangents = [next(it) if a else None for a in active]
            _, touts = jvp(rules, eqn.params, primals, tangents)
            nonzero_cell.append([t is not None for t in touts])
            return [t for t in touts if t is not None]

        specs = [compat.spec_of(x) for x, act in zip(primals, active) if act]
        with compat.user_context(eqn):
            closed = jax.make_jaxpr(tangent_outputs)(*specs)
        return outvals, _TangentProgram(closed.jaxpr, closed.consts, nonzero_cell[0]), \
            out_active

    def backward(self, record, cts_out):
        rules, eqn, program = self.rules, record.eqn, record.sub
        if rules.jvp is None:
            raise MissingRuleError(
                f"{_describe(rules)} at {compat.source_line(eqn)} has a transpose rule but "
                f"no JVP rule, and a cotangent reached it outside a linear map.")
        active = list(record.active)
        # Only the tangent outputs that receive a cotangent matter.
        cts = [ct for ct, nz in zip(cts_out, program.nonzero) if nz]
        jaxpr = compat.dce_keep_inputs(program.jaxpr, [ct is not None for ct in cts])
        n_consts = len(program.consts)
        zeros = [compat.zeros_like_aval(v.aval) for v in jaxpr.invars[n_consts:]]
        with context.using(linear=f"the {_describe(rules)} (at {compat.source_line(eqn)})"):
            _, tape = sweeps.forward(jaxpr, [], program.consts + zeros,
                                     [False] * n_consts + [True] * len(zeros))
        cts_in = iter(sweeps.backward(tape, [ct for ct in cts if ct is not None])[n_consts:])
        return [next(cts_in) if a else None for a in active]


class ForeignTransposeCall(_ForeignCall):
    """Inside a linear map being transposed: the library's own transpose rule."""

    def backward(self, record, cts_out):
        prim = self.rules.prim
        args = [_jax_ad.UndefinedPrimal(compat.typeof(x)) if a else x
                for x, a in zip(_as_traced(record), record.active)]
        out_avals = [v.aval for v in record.eqn.outvars]
        cts = [_zero(a) if c is None else c for c, a in zip(cts_out, out_avals)]
        with compat.user_context(record.eqn):
            cts_in = self.rules.transpose(cts if prim.multiple_results else cts[0], *args,
                                          **record.eqn.params)
        return [None if (not a or _is_zero(c)) else c
                for c, a in zip(cts_in, record.active)]


def reverse_handler(prim, linear: bool):
    """The reverse-mode handler for a library primitive, or None."""
    rules = rules_for(prim)
    if rules is None:
        return None
    if linear and rules.transpose is not None:
        return ForeignTransposeCall(rules)
    return ForeignJVPCall(rules)


def is_linear(prim) -> bool:
    """A library primitive the library itself can transpose."""
    rules = rules_for(prim)
    return rules is not None and rules.transpose is not None


def forward_rule(prim):
    rules = rules_for(prim)
    return rules if rules is not None and rules.jvp is not None else None



# The engine asks here for primitives none of its tables knows.
registry.foreign_rules.update(reverse_handler=reverse_handler, is_linear=is_linear,
                              forward_rule=forward_rule, jvp=jvp)
