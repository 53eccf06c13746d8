"""From a Python function over pytrees to a closed jaxpr over flat leaves (cached)."""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Callable

import jax
import numpy as np
from jax import tree_util

from . import compat
from . import context


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
    closed: Any            # ClosedJaxpr over the flat input leaves
    out_tree: Any          # treedef of the function's output
    out_avals: tuple

    @functools.cached_property
    def num_eqns(self) -> int:
        """Equations in the jaxpr, counting those inside sub-jaxprs."""
        return count_eqns(self.closed.jaxpr)


def sub_jaxprs(eqn):
    """The open jaxprs inside an equation's parameters (jit, scan, cond bodies...)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            inner = getattr(item, "jaxpr", item)
            if isinstance(inner, compat.Jaxpr):
                yield inner


def count_eqns(jaxpr) -> int:
    count, stack = 0, [jaxpr]
    while stack:
        j = stack.pop()
        count += len(j.eqns)
        for eqn in j.eqns:
            stack.extend(sub_jaxprs(eqn))
    return count


_cache: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()
trace_count = 0            # number of times a function was actually traced (for tests)


def clear_cache():
    """Forgets every cached jaxpr (e.g. after changing a global a function reads)."""
    _cache.clear()


aval_key = compat.aval_key


def check_leaf(x, where: str):
    """Raises TypeError (like JAX) for leaves that are not arrays or numbers."""
    if isinstance(x, (np.ndarray, np.generic)) and x.dtype == np.dtype(object):
        raise TypeError(
            f"{where}: a NumPy array of dtype object ({x!r:.60}) is not a valid JAX type. "
            f"Convert it to a numeric dtype (np.asarray(x, np.float32)) first.")
    if isinstance(x, (bool, int, float, complex, np.ndarray, np.generic, jax.Array)) \
            or compat.is_tracer(x):
        return
    raise TypeError(
        f"{where} {x!r:.60} of type {type(x)} is not a valid JAX type. "
        f"fbackprop differentiates functions of arrays: pass arrays or numbers, or make "
        f"this value a non-differentiated argument (not in `argnums`) or a closure.")


def _path_str(path) -> str:
    return tree_util.keystr(path) if path else ""


def check_outputs(out_tree, out_leaves: list, what: str):
    """Raises TypeError for an output leaf of ``what`` that is not an array or a
    number, naming its path."""
    for k, leaf in enumerate(out_leaves):
        if not (isinstance(leaf, (bool, int, float, complex, np.ndarray, np.generic,
                                  jax.Array)) or compat.is_tracer(leaf)):
            paths = [p for p, _ in tree_util.tree_flatten_with_path(
                tree_util.tree_unflatten(out_tree, list(range(len(out_leaves)))))[0]]
            raise TypeError(
                f"{what} returned a {type(leaf).__name__} at output{_path_str(paths[k])} "
                f"({leaf!r:.60}); differentiated functions must return arrays or "
                f"numbers (pytrees of them).")


def trace_flat(fun: Callable, in_tree, leaves: list, static: list | None = None, *,
               what: str = "fun") -> Traced:
    """Traces ``fun(*args, **kwargs)`` to a closed jaxpr, where ``(args, kwargs) =
    tree_unflatten(in_tree, leaves)``.

    Leaves with ``static[i]`` true are baked into the jaxpr as Python values (the
    way ``jax.grad`` closes over its non-differentiated arguments); the others
    become the jaxpr's inputs, in order. Cached per (function, input tree,
    shapes/dtypes/weak types, static values) unless the jaxpr captured tracers
    of an enclosing transformation or a static value is unhashable.
    """
    global trace_count
    static = static or [False] * len(leaves)
    dyn = [x for x, s in zip(leaves, static) if not s]
    static_vals = tuple((i, x) for i, (x, s) in enumerate(zip(leaves, static)) if s)
    key = (in_tree, tuple(aval_key(x) for x in dyn), static_vals)
    try:
        hash(key)
    except TypeError:
        key = None
    per_fun = None
    # Eager calls trace every time, like jax.grad: a function may read globals
    # (the current batch, a hyperparameter) whose values a cached trace would
    # freeze. Under a transformation (jit, vmap, an outer derivative) the
    # enclosing trace already fixes them, so the trace is cached there.
    if context.current().cache and key is not None and any(compat.is_tracer(x) for x in dyn):
        try:
            per_fun = _cache.get(fun)
            if per_fun is None:
                per_fun = {}
                _cache[fun] = per_fun
        except TypeError:
            per_fun = None
    if per_fun is not None:
        hit = per_fun.get(key)
        if hit is not None:
            return hit

    out_tree_cell = []

    def flat_fun(*flat):
        it = iter(flat)
        full = [x if s else next(it) for x, s in zip(leaves, static)]
        args, kwargs = tree_util.tree_unflatten(in_tree, full)
        out = fun(*args, **kwargs)
        out_leaves, out_tree = tree_util.tree_flatten(out)
        check_outputs(out_tree, out_leaves, what)
        out_tree_cell.append(out_tree)
        return out_leaves

    # JAX's error messages ("... while tracing the function f at model.py:3")
    # then name the user's function, not this wrapper.
    flat_fun.__wrapped__ = fun
    flat_fun.__name__ = getattr(fun, "__name__", "fun")
    flat_fun.__qualname__ = getattr(fun, "__qualname__", flat_fun.__name__)
    specs = [compat.spec_of(x) for x in dyn]
    closed = jax.make_jaxpr(flat_fun)(*specs)
    trace_count += 1
    traced = Traced(closed, out_tree_cell[0], tuple(v.aval for v in closed.jaxpr.outvars))
    if per_fun is not None and not any(compat.is_tracer(c) for c in closed.consts):
        per_fun[key] = traced
    return traced
