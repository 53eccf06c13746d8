"""The tape: one :class:`Record` per recorded equation, in program order.

A record holds what the equation's VJP rule needs later: the equation, its
input and output values, which inputs carry a cotangent, and what a call
handler or a rule's own forward half kept. Records are made in one place,
:func:`fbackprop._src.engine.sweeps.forward_eqn`.

A tape is a pytree whose leaves are the values it keeps (and a few static
Python objects), so ``vjp_fn`` can carry it as a ``jax.tree_util.Partial`` and
a compiled sweep can return it as arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax import tree_util


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
    """The records of one sweep and the frame they ran in.

    ``jaxpr`` is the swept jaxpr, or for a define-by-run recording any object
    with ``invars``/``outvars`` (the recording's inputs and outputs; ``None``
    for a value that is not a variable of the recording).
    """
    jaxpr: Any
    records: list
    in_active: list
    out_active: list

    def program(self):
        """The swept program's inputs, outputs and recorded equations (what an
        observer's ``end_sweep`` reads)."""
        return _Program(self.jaxpr.invars, self.jaxpr.outvars,
                        [rec.eqn for rec in self.records])


@dataclasses.dataclass
class _Program:
    invars: list
    outvars: list
    eqns: list


class Residuals:
    """What a rule's own ``fwd`` kept for its backward (``rule.fn(residuals=...)``)."""

    def __init__(self, values):
        self.values = values


# Marks a recorded equation whose primitive has no VJP rule: an error only if a
# cotangent reaches it.
NO_RULE = type("NoRule", (), {"__repr__": lambda self: "NO_RULE"})()


tree_util.register_pytree_node(
    Record,
    lambda r: ((r.invals, r.outvals, r.sub), (r.eqn, tuple(r.active), r.handler)),
    lambda aux, ch: Record(aux[0], ch[0], ch[1], list(aux[1]), ch[2], aux[2]))
tree_util.register_pytree_node(
    Tape,
    lambda t: ((t.records,), (t.jaxpr, tuple(t.in_active), tuple(t.out_active))),
    lambda aux, ch: Tape(aux[0], ch[0], list(aux[1]), list(aux[2])))
tree_util.register_pytree_node(Residuals, lambda r: ((r.values,), None),
                               lambda _, ch: Residuals(ch[0]))
