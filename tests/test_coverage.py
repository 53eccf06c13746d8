"""Every registered rule is exercised by at least one spec."""

import jax

from fbackprop._src import registry
from specs import ALL_SPECS


def _primitives(jaxpr, acc):
    for eqn in jaxpr.eqns:
        acc.add(eqn.primitive.name)
        for sub in jax.core.subjaxprs(jaxpr) if False else []:
            pass
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else [v]):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    _primitives(inner, acc)
    return acc


def covered_primitives():
    acc = set()
    for spec in ALL_SPECS:
        for dtype in spec.dtypes[:1]:
            _primitives(jax.make_jaxpr(spec.fn)(*spec.args(dtype)).jaxpr, acc)
    return acc


def test_every_rule_has_a_spec():
    registered = set(registry.vjp_rules) | set(registry.jvp_rules) | \
        set(registry.nondiff_primitives)
    missing = sorted(registered - covered_primitives())
    assert not missing, f"rules without a spec in tests/specs: {missing}"


def test_every_vjp_rule_has_a_jvp_rule():
    rev = set(registry.vjp_rules) | set(registry.call_handlers_reverse)
    fwd = set(registry.jvp_rules) | set(registry.call_handlers_forward)
    assert sorted(rev - fwd) == []
