"""``fbackprop.saved_residuals``: what the forward sweep of ``fb.grad`` keeps for its
backward sweep, one row per value (:mod:`fbackprop._src.residuals` splits the joint
program; :mod:`fbackprop._src.planning.residual_rows` describes each value)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import tree_util

from .. import compat, trace
from .. import context
from ..engine import recording, sweeps
from ..planning import frames
from ..planning.residual_rows import report_split
from ..residuals import Joint, _differentiable, spec_of, split_joint


class SavedResiduals(tuple):
    """The residuals of a function, as a tuple of :class:`Residual` rows.

    ``str()`` gives a table with a total; ``total_bytes`` counts every row and
    ``intermediate_bytes`` leaves out arguments and constants (which exist
    whether or not a backward sweep follows). ``plans`` holds one
    :class:`fbackprop.BudgetPlan` per ``fb.checkpoint(..., memory_budget=...)``
    region met (what it keeps, what it recomputes, the budget and the
    recompute FLOPs); ``str()`` prints them below the table.
    """

    def __new__(cls, rows=(), plans=()):
        self = super().__new__(cls, rows)
        unique = {id(p): p for p in plans}      # a body traced twice reports its plan twice
        self.plans = tuple(unique.values())
        return self

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self)

    @property
    def intermediate_bytes(self) -> int:
        return sum(r.nbytes for r in self if r.kind == "intermediate")

    def as_dicts(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self]

    def __str__(self) -> str:
        header = ("shape", "dtype", "bytes", "kind", "produced by")
        rows = [(str(list(r.shape)), np.dtype(r.dtype).name, f"{r.nbytes:,}", r.kind,
                 r.describe()) for r in self]
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in
                  enumerate(header[:-1])]

        def line(cells):
            return "  ".join(c.rjust(w) if i == 2 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))) \
                + "  " + cells[-1]

        out = [line(header), line(tuple("-" * w for w in widths) + ("-" * 11,))]
        out += [line(row) for row in rows]
        out.append(f"total: {len(self)} residuals, {self.total_bytes:,} bytes "
                   f"({self.intermediate_bytes:,} bytes of intermediates, the rest "
                   f"arguments/constants)")
        for plan in self.plans:
            out.append("")
            out.append(plan.describe())
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"SavedResiduals({len(self)} rows, {self.total_bytes} bytes)"



def record_joint(fun: Callable, in_tree, leaves: list, static: Sequence[bool], *,
                 what: str = "fun") -> tuple[Joint, Any]:
    """Traces what ``fb.grad`` runs for a whole function into one joint jaxpr.

    Like :func:`trace_joint`, but the forward sweep is the define-by-run
    recording (:func:`engine.recording.record`) of ``fun(*args, **kwargs)``,
    ``(args, kwargs) = tree_unflatten(in_tree, leaves)``, followed by the
    backward sweep over its tape, traced together with ``jax.make_jaxpr``.
    The jaxpr's primal inputs are the leaves that are not ``static`` (every
    float one differentiated); its cotangent inputs, those of the float
    outputs.

    Returns:
      ``(joint, recorded)``: the :class:`Joint`, and a jaxpr holding the
      recorded equations (calls with their bodies, for ``compat.calls_in``: the
      joint holds the bodies' equations swept in place).
    """
    dyn_avals = [compat.typeof(x) for x, s in zip(leaves, static) if not s]
    in_active = tuple(_differentiable(a) for a in dyn_avals)

    def call(*dyn):
        it = iter(dyn)
        full = [x if s else next(it) for x, s in zip(leaves, static)]
        args, kwargs = tree_util.tree_unflatten(in_tree, full)
        out = fun(*args, **kwargs)
        out_leaves, out_tree = tree_util.tree_flatten(out)
        trace.check_outputs(out_tree, out_leaves, what)
        return out

    # The cotangent inputs need the outputs' types before the joint is traced.
    out_avals = [compat.typeof(x) for x in tree_util.tree_leaves(
        jax.eval_shape(call, *[spec_of(a) for a in dyn_avals]))]
    ct_outputs = tuple(i for i, a in enumerate(out_avals) if _differentiable(a))
    n_in, n_out = len(dyn_avals), len(out_avals)
    cell: dict = {}

    def joint(*args):
        primals, cts = list(args[:n_in]), args[n_in:]
        run = recording.record(lambda *xs: call(*xs), tree_util.tree_structure(
            (tuple(primals), {})), primals, list(in_active))
        full = [None] * n_out
        for i, ct in zip(ct_outputs, cts):
            if run.out_active[i]:
                full[i] = ct
        cts_in = sweeps.backward(run.tape, full)
        nonzero = tuple(i for i, c in enumerate(cts_in) if c is not None and in_active[i])
        cell["out_active"] = tuple(run.out_active)
        cell["nonzero"] = nonzero
        cell["eqns"] = [rec.eqn for rec in run.tape.records]
        return list(run.out_vals) + [cts_in[i] for i in nonzero]

    specs = [spec_of(a) for a in dyn_avals] + [spec_of(out_avals[i], False)
                                                for i in ct_outputs]
    with context.using(in_place=True):
        closed = jax.make_jaxpr(joint)(*specs)
    return (Joint(closed.jaxpr, list(closed.consts), n_in, n_out, in_active,
                  cell["out_active"], ct_outputs, cell["nonzero"]),
            compat.new_jaxpr([], [], [], cell["eqns"]))



def _param_names(fun, nargs: int) -> list:
    """The names of ``fun``'s first ``nargs`` positional parameters (best effort)."""
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return []
    names = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            names += [None] * (nargs - len(names))
            break
    return names[:nargs]


def saved_residuals(fun: Callable, *args, **kwargs) -> SavedResiduals:
    """Lists what the forward sweep keeps for the backward sweep of ``fun``.

    Every float argument leaf is differentiated (like
    ``jax.ad_checkpoint.saved_residuals``). A residual is a value computed (or
    received) in the forward sweep and read by the backward sweep, after
    checkpoint policies and scan bookkeeping have decided what to keep. Values
    kept per step of a ``lax.scan`` appear once, with the steps axis in front.

    Args:
      fun: the function (pytrees of arrays in, pytree of arrays out).
      *args: positional arguments to trace it with.
      **kwargs: keyword arguments to trace it with.

    Returns:
      A :class:`SavedResiduals`: a tuple of :class:`Residual` rows (shape,
      dtype, nbytes, kind, primitive, source line) whose ``str()`` is a table with
      the total, and whose ``total_bytes`` / ``intermediate_bytes`` give sums;
      ``plans`` describes each memory-budget checkpoint region (kept and
      recomputed values, budget, recompute FLOPs).

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> res = fb.saved_residuals(lambda x: jnp.sum(jnp.sin(jnp.sin(x))), jnp.ones(3))
      >>> [(r.kind, r.primitive, r.shape) for r in res]
      [('argument', None, (3,)), ('intermediate', 'sin', (3,))]
      >>> res.total_bytes
      24
    """
    leaves_with_path, in_tree = tree_util.tree_flatten_with_path((args, kwargs))
    leaves = [x for _, x in leaves_with_path]
    static = [not (isinstance(x, (np.ndarray, np.generic, jax.Array))
                   or compat.is_tracer(x) or isinstance(x, (bool, int, float, complex)))
              for x in leaves]
    for (path, x), s in zip(leaves_with_path, static):
        if not s:
            trace.check_leaf(x, f"saved_residuals: argument {tree_util.keystr(path)}")
    params = _param_names(fun, len(args))
    names = []
    for (path, x), s in zip(leaves_with_path, static):
        if s:
            continue
        if path[0].idx == 0:
            name = "args" + tree_util.keystr(path[1:])
            param = params[path[1].idx] if path[1].idx < len(params) else None
            names.append(f"{name} ({param})" if param else name)
        else:
            names.append("kwargs" + tree_util.keystr(path[1:]))
    with frames.collecting() as plans:
        joint, recorded = record_joint(fun, in_tree, leaves, static,
                                       what=getattr(fun, "__name__", "fun"))
    with compat.calls_in(recorded):      # a library helper's values: its call's line
        return SavedResiduals(report_split(split_joint(joint), names), plans)
