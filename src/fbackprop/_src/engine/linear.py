"""Linear sweeps: our sweeps over a custom JVP rule, checked for linearity.

Reverse mode of a ``custom_jvp`` function (or of a library primitive with a
JVP rule) transposes the rule: our own sweeps run over it as a function of its
tangents. That is only the transpose if the rule is linear in them, so while
such a sweep runs (the sweep context's ``linear`` names the rule) every
equation that reads a tangent is checked against ``linear_primitives``, and a
``custom_jvp`` function applied to a tangent is differentiated through its own
body (it is then part of a linear map, not a point to linearize at).
"""

from __future__ import annotations

import contextlib

from .. import compat
from ..registry import foreign_rules, linear_primitives, vjp_rules
from .. import context


class NonLinearRuleError(ValueError):
    """A custom JVP rule is not linear in its tangents, so it cannot be transposed."""


@contextlib.contextmanager
def linear_sweep(what: str | None):
    """The block's sweeps run over the JVP rule ``what`` as a function of its
    tangents (``None``: outside any linear sweep, e.g. for what a define-by-run
    trace records into an enclosing one)."""
    with context.using(linear=what):
        yield


def check_linear(eqn, act, what: str):
    name = eqn.primitive.name
    rule = linear_primitives.get(name)
    if rule is True or (rule is not None and rule(act, **eqn.params)):
        return
    if rule is None and name not in vjp_rules and foreign_rules["is_linear"](eqn.primitive):
        return
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
