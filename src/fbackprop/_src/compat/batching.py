"""``vmap`` as fbackprop meets it: ``custom_vmap`` functions (their batching rules,
run and differentiated) and the values of a ``vmap`` that per-example sweeps read."""

from __future__ import annotations

from typing import Callable

from jax._src import core as jcore

from .core import ClosedJaxpr

# ---------------------------------------------------------------- custom_vmap
# ``jax.custom_batching.custom_vmap`` binds ``custom_vmap_call`` with the
# function's jaxpr (``call``, run where nothing batches it) and its batching rule
# (``rule``, run by ``vmap``), which takes and returns pytrees (``in_tree``,
# ``out_tree``). fbackprop's derivatives are ``custom_vmap_call`` equations
# again, whose rules take flat lists.
def custom_vmap_parts(params) -> tuple:
    """``(call, rule, in_tree, out_tree)`` of a ``custom_vmap_call`` equation."""
    return params["call"], params["rule"], params["in_tree"], params["out_tree"]


def call_vmap_rule(rule, in_tree, out_tree, axis_size, batched: list, args: list) -> tuple:
    """Runs a ``custom_vmap_call``'s batching rule as JAX's ``vmap`` runs it
    (batched arguments have their batch axis in front, ``batched`` says which),
    on flat lists: ``(outs, out_batched)`` as flat lists, checked as JAX checks
    them."""
    from jax import tree_util as _tu
    from jax._src import custom_batching as _cb
    out, out_batched = _cb.call_rule(rule, axis_size, _tu.tree_unflatten(in_tree, batched),
                                     _tu.tree_unflatten(in_tree, list(args)))
    outs, tree = _tu.tree_flatten(out)
    flags, flags_tree = _tu.tree_flatten(out_batched)
    _cb.check_vmap_rule_trees(rule, out_tree, tree, flags_tree)
    return outs, [bool(b) for b in flags]


def bind_custom_vmap(args: list, call: ClosedJaxpr, rule: Callable, n_out: int) -> list:
    """Binds ``custom_vmap_call`` with a ``rule(axis_size, batched, *args)`` over
    flat lists that returns ``(outs, out_batched)`` as tuples."""
    from jax import tree_util as _tu
    from jax._src import custom_batching as _cb
    return _cb.custom_vmap_p.bind(*args, call=call, rule=rule,
                                  in_tree=_tu.tree_structure((0,) * len(args)),
                                  out_tree=_tu.tree_structure((0,) * n_out))


def vmap_unrestricted(fun: Callable, args: list, in_axes: list, axis_size: int) -> tuple:
    """``jax.vmap`` of ``fun`` (flat list in, flat list out) that infers its
    output axes instead of being told them: ``(outs, out_axes)`` (``None`` for
    an unbatched output), as JAX batches the JVP of a custom batching rule."""
    from jax._src import linear_util as lu
    from jax._src import api_util
    from jax._src import custom_batching as _cb
    debug = api_util.debug_info("custom_vmap rule", fun, tuple(args), {})
    wrapped = lu.wrap_init(lambda *xs: list(fun(*xs)), debug_info=debug)
    return _cb.vmap_unrestricted(wrapped, *args, in_axes=list(in_axes),
                                 axis_name=jcore.no_axis_name, axis_size=axis_size)


# ------------------------------------------------------ per-example sweeps
def mapped_by(trace, x) -> bool:
    """``x`` is a value of the ``vmap`` whose trace is ``trace``, batched along an
    axis (a value the vmap does not batch is the same for every example)."""
    from jax._src.interpreters import batching as _batching
    return isinstance(trace, _batching.BatchTrace) and trace.to_batch_info(x)[1] is not None


def batched_value(trace, x) -> tuple:
    """``(value, axis)``: a value of the ``vmap`` whose trace is ``trace``, as the
    array of all examples in the enclosing trace (``vmap_parent(trace)``) and its
    examples' axis (``None``: the same for every example, ``value`` is ``x``)."""
    return trace.to_batch_info(x)


def vmap_parent(trace):
    """The trace enclosing a ``vmap``'s and its number of examples."""
    return trace.parent_trace, trace.axis_data.size


__all__ = [
    'custom_vmap_parts',
    'call_vmap_rule',
    'bind_custom_vmap',
    'vmap_unrestricted',
    'mapped_by',
    'batched_value',
    'vmap_parent',
]
