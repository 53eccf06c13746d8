"""What the forward sweep keeps for the backward sweep.

Control flow (``scan``, ``cond``) and checkpointing (``remat``) need the backward
sweep of a sub-jaxpr as a *program* they can place elsewhere: inside a reverse
``lax.scan``, inside the taken branch of a ``lax.switch``, or after an
``optimization_barrier``. They get it in three steps:

1. **Joint trace.** :func:`trace_joint` traces, with ``jax.make_jaxpr``, one
   function that runs our own forward sweep (:func:`engine.sweeps.forward`) over the
   sub-jaxpr and then our own backward sweep (:func:`engine.sweeps.backward`) with
   cotangent inputs. The result is one jaxpr
   ``(*primals, *cts) -> (*outs, *cts_in)``: every equation of the forward
   sweep and every equation our VJP rules emitted.
2. **Split.** :func:`split_joint` cuts it in two by data dependence. The
   *forward part* is exactly what the primal outputs need. Everything else the
   cotangent outputs need is the *backward part* - including the
   cotangent-free pieces of VJP rules (``cos x`` for ``sin``, transposes of
   weights), which therefore run in the backward sweep, where they are used,
   instead of being computed early and kept alive. The **residuals** are the
   forward-part values (and inputs) that the backward part reads: no more is
   kept than the backward sweep actually uses.
3. **Recompute.** A predicate may mark forward equations whose outputs must not
   be kept (a checkpoint policy, a memory-budget plan; loop invariants of a scan). Their outputs are
   recomputed at the start of the backward part from what is kept, so the
   residuals move to their inputs.
4. **Fewest bytes.** Two local moves then shrink what is kept without adding
   work: a cotangent-free backward equation whose output is smaller than the
   kept inputs only it reads moves to the forward part (ReLU keeps a boolean
   mask ``x > 0``, not the float ``x``); a view or cast of a kept value
   (``transpose``, ``reshape``, ``name``, ...) is re-derived in the backward
   part instead of being kept twice.

:func:`saved_residuals` applies the same split to a whole function and reports
the residuals: one row per kept value with shape, dtype, bytes, producing
primitive and the user's source line.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import tree_util
from jax.ad_checkpoint import Offloadable, Recompute, Saveable

from . import compat, staging, trace
from . import context
from .engine import sweeps
from .registry import is_differentiable_dtype


def _is_var(v) -> bool:
    return type(v) is not compat.Literal and type(v) is not compat.DropVar


def _differentiable(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


def spec_of(aval, weak: bool | None = None):
    """A ``jax.ShapeDtypeStruct`` for an abstract value (keeping its weak type)."""
    if weak is None:
        weak = bool(getattr(aval, "weak_type", False))
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=weak)


# ------------------------------------------------------------------ joint trace
@dataclasses.dataclass(frozen=True, eq=False)
class Joint:
    """A sub-jaxpr's forward and backward sweeps, traced into one jaxpr.

    Attributes:
      jaxpr: ``(*primals, *cts) -> (*outs, *cts_in)``; its constvars take ``consts``.
      consts: values for ``jaxpr.constvars``.
      n_in: number of primal inputs.
      n_out: number of primal outputs.
      in_active: per primal input, whether it was differentiated.
      out_active: per output, whether it depends on an active input.
      ct_outputs: indices of the outputs that have a cotangent input (every
        output with a float dtype, active or not), in the order of the ``cts``.
      ct_in_nonzero: indices of the inputs whose cotangent is not a symbolic
        zero, in the order of the ``cts_in`` outputs.
    """
    jaxpr: Any
    consts: list
    n_in: int
    n_out: int
    in_active: tuple
    out_active: tuple
    ct_outputs: tuple
    ct_in_nonzero: tuple


# While a memory-budget plan is being made (fbackprop._src.memplan), joints are
# traced afresh and not cached (the sweep context's ``cache`` is off): the same
# jaxpr then gives different joints (its nested scans split by the plan), which
# must not leak into ordinary traces.
_joint_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _aval_key(aval) -> tuple:
    return (tuple(aval.shape), aval.dtype, bool(getattr(aval, "weak_type", False)))


def trace_joint(jaxpr, consts: Sequence, in_avals: Sequence, in_active: Sequence[bool]
                ) -> Joint:
    """Traces our forward and backward sweeps over ``jaxpr`` into one jaxpr.

    Cached per (jaxpr, consts, input avals, activity) when the consts are not
    tracers, so nested control flow is traced once per shape.

    Args:
      jaxpr: an open jaxpr (``consts`` feed its constvars).
      consts: values for its constvars.
      in_avals: abstract values of its inputs (shape, dtype, weak type).
      in_active: per input, whether it is differentiated.

    Returns:
      A :class:`Joint`.
    """
    in_active = tuple(bool(a) and _differentiable(av) for a, av in zip(in_active, in_avals))
    # The while loops in the jaxpr keep as many loop states as the enclosing
    # checkpoint region asks for: the joint depends on that request too.
    ctx = context.current()
    key = (tuple(_aval_key(a) for a in in_avals), in_active,
           bool(jax.config.jax_enable_x64), ctx.while_slots)
    cacheable = (ctx.cache
                 and not any(compat.is_tracer(c) for c in consts))
    per = None
    if cacheable:
        per = _joint_cache.get(jaxpr)
        if per is None:
            per = {}
            _joint_cache[jaxpr] = per
        hit = per.get(key)
        if hit is not None and len(hit[0]) == len(consts) and all(
                a is b for a, b in zip(hit[0], consts)):
            return hit[1]

    n_in, n_out = len(jaxpr.invars), len(jaxpr.outvars)
    out_avals = [v.aval for v in jaxpr.outvars]
    ct_outputs = tuple(i for i, a in enumerate(out_avals) if _differentiable(a))
    cell: dict = {}

    def joint(*args):
        primals, cts = list(args[:n_in]), args[n_in:]
        outs, tape = sweeps.forward(jaxpr, consts, primals, list(in_active))
        full = [None] * n_out
        for i, ct in zip(ct_outputs, cts):
            if tape.out_active[i]:
                full[i] = ct
        cts_in = sweeps.backward(tape, full)
        nonzero = tuple(i for i, c in enumerate(cts_in) if c is not None and in_active[i])
        cell["out_active"] = tuple(tape.out_active)
        cell["nonzero"] = nonzero
        return list(outs) + [cts_in[i] for i in nonzero]

    specs = [spec_of(a) for a in in_avals] + [spec_of(out_avals[i], False)
                                               for i in ct_outputs]
    with context.using(in_place=True):
        closed = jax.make_jaxpr(joint)(*specs)
    result = Joint(closed.jaxpr, list(closed.consts), n_in, n_out, in_active,
                   cell["out_active"], ct_outputs, cell["nonzero"])
    if per is not None and not any(compat.is_tracer(c) for c in closed.consts):
        per[key] = (list(consts), result)
    return result


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
    from .engine import recording
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


def policy_saves(policy, eqn) -> bool:
    """Whether a checkpoint ``policy`` saves ``eqn``'s outputs, called as JAX calls it."""
    decision = policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)
    if isinstance(decision, bool):
        return decision
    if decision is Saveable or isinstance(decision, Offloadable):
        return True
    if decision is Recompute:
        return False
    raise TypeError(
        f"checkpoint policy {policy!r} returned {decision!r} for primitive "
        f"'{eqn.primitive.name}'; a policy must return a bool or one of "
        f"jax.ad_checkpoint.Saveable / Recompute / Offloadable.")


# ------------------------------------------------------------------------ split
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A joint jaxpr cut into a forward part and a backward part.

    Attributes:
      joint: the :class:`Joint` it came from.
      fwd: jaxpr ``(*primals) -> (*outs, *computed)`` (constvars: the joint's).
      bwd: jaxpr ``(*saved, *cts_used) -> (*cts_in nonzero)`` (constvars: the joint's).
      saved: per residual, ``("input", i)`` (the i-th primal input) or
        ``("computed", j)`` (the j-th extra output of ``fwd``), in ``bwd``'s order.
      saved_vars: the joint-jaxpr variables of the residuals.
      computed_as_output: per computed residual, the index of a primal output
        that is the same value, or ``None``.
      cts_used: output indices whose cotangent ``bwd`` reads, in its order.
      recomputed: the forward equations the backward part recomputes because
        ``recompute`` asked for it (not counting views and casts of kept values,
        which are always re-derived rather than kept).
    """
    joint: Joint
    fwd: Any
    bwd: Any
    saved: tuple
    saved_vars: tuple
    computed_as_output: tuple
    cts_used: tuple
    recomputed: tuple

    @property
    def consts(self):
        return self.joint.consts


def _effects(eqns):
    return compat.join_effects(eqns)


# Forward equations whose output is as cheap to recompute as to read back: views
# and casts of a value that is kept anyway. (``name`` is the identity, so keeping
# both a value and its named alias would keep the same array twice; a static
# ``slice`` of an argument, e.g. the steps of a scan split in two, is re-taken.)
_CHEAP = frozenset({"name", "transpose", "reshape", "squeeze", "expand_dims",
                    "broadcast_in_dim", "convert_element_type", "copy", "rev",
                    "reduce_precision", "slice"})


def _nbytes_of(v) -> int:
    aval = v.aval
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _recompute_cheap(eqns, in_fwd, in_rec, need, primal_in, free):
    """Moves cheap forward equations into the backward part when their inputs are
    kept anyway or free (or are inputs no larger than the output): the residual
    becomes the input, and nothing new is kept. Constants (no variable inputs)
    are always recomputed. Updates ``in_rec`` and ``need`` in place."""
    available = need | free
    for i, e in enumerate(eqns):
        if not in_fwd[i] or in_rec[i] or e.effects:
            continue
        outs = [v for v in e.outvars if _is_var(v) and v in need]
        if not outs:
            continue
        ins = [v for v in e.invars if _is_var(v)]
        if ins and e.primitive.name not in _CHEAP:
            continue
        out_bytes = sum(_nbytes_of(v) for v in outs)
        if all(v in available or (v in primal_in and _nbytes_of(v) <= out_bytes)
               for v in ins):
            in_rec[i] = True
            need.difference_update(outs)
            need.update(ins)
            available.update(ins)


def _hoist_shrinking(eqns, in_fwd, in_bwd, in_rec, need, ct_in, ct_out, free):
    """Moves cotangent-free backward equations into the forward part when that
    keeps fewer bytes: e.g. ``x > 0`` in ReLU's VJP, where keeping the boolean
    mask beats keeping the float ``x`` that nothing else in the backward reads.
    Updates ``in_fwd``, ``in_bwd`` and ``need`` in place."""
    depends_on_ct = set(ct_in)
    for e in eqns:
        if any(_is_var(v) and v in depends_on_ct for v in e.invars):
            depends_on_ct.update(v for v in e.outvars if _is_var(v))
    uses: dict = {}
    for i, e in enumerate(eqns):
        if in_bwd[i] or in_rec[i]:
            for v in {v for v in e.invars if _is_var(v)}:
                uses[v] = uses.get(v, 0) + 1
    for v in ct_out:
        if _is_var(v):
            uses[v] = uses.get(v, 0) + 1
    for i, e in enumerate(eqns):
        if not in_bwd[i] or e.effects:
            continue
        ins = {v for v in e.invars if _is_var(v)}
        if not ins or any(v in depends_on_ct or not (v in need or v in free) for v in ins):
            continue
        freed = [v for v in ins if v in need and v not in free and uses.get(v) == 1]
        outs = [v for v in e.outvars if _is_var(v)]
        if sum(map(_nbytes_of, freed)) > sum(map(_nbytes_of, outs)):
            in_bwd[i], in_fwd[i] = False, True
            for v in ins:
                uses[v] -= 1
            need.difference_update(freed)
            need.update(outs)


def partition(joint: Joint) -> tuple[list, list, set]:
    """Steps 1-2 of the split: the forward part, the backward part, and what the
    backward part reads from outside itself.

    Returns:
      ``(in_fwd, in_bwd, need)``: per joint equation, whether it is in the
      forward part and whether it is in the backward part; and the set of
      variables the backward part reads that it does not compute (forward
      values, primal inputs, cotangent inputs, constants).
    """
    jaxpr = joint.jaxpr
    eqns = jaxpr.eqns
    primal_out = jaxpr.outvars[:joint.n_out]
    ct_out = jaxpr.outvars[joint.n_out:]
    ct_in_set = set(jaxpr.invars[joint.n_in:])

    # Forward part: what the primal outputs need, plus effects (kept in order).
    in_fwd = [False] * len(eqns)
    need = {v for v in primal_out if _is_var(v)}
    for i in range(len(eqns) - 1, -1, -1):
        e = eqns[i]
        if e.effects or any(_is_var(v) and v in need for v in e.outvars):
            in_fwd[i] = True
            need.update(v for v in e.invars if _is_var(v))
    assert not (need & ct_in_set), "a primal output depends on a cotangent input"

    # Backward part: what the cotangent outputs need beyond the forward part.
    in_bwd = [False] * len(eqns)
    need = {v for v in ct_out if _is_var(v)}
    for i in range(len(eqns) - 1, -1, -1):
        e = eqns[i]
        if not in_fwd[i] and any(_is_var(v) and v in need for v in e.outvars):
            in_bwd[i] = True
            need.difference_update(e.outvars)
            need.update(v for v in e.invars if _is_var(v))
    return in_fwd, in_bwd, need


@dataclasses.dataclass
class Decision:
    """Which joint equation goes where, before any jaxpr is built (see
    :func:`decide`)."""
    in_fwd: list
    in_bwd: list
    in_rec: list
    need: set
    recomputed: tuple


def decide(joint: Joint, recompute: Callable[[Any], bool] | None = None,
           costly_inputs: Sequence[int] = (), parts: tuple | None = None) -> Decision:
    """Steps 1-4 of the split, without building the jaxprs: see :func:`split_joint`.

    ``parts`` may pass a precomputed :func:`partition` (it is not modified).
    """
    jaxpr = joint.jaxpr
    eqns = jaxpr.eqns
    primal_in = jaxpr.invars[:joint.n_in]
    ct_in = jaxpr.invars[joint.n_in:]
    ct_out = jaxpr.outvars[joint.n_out:]
    in_fwd, in_bwd, need = parts if parts is not None else partition(joint)
    in_fwd, in_bwd, need = list(in_fwd), list(in_bwd), set(need)

    # Recompute what must not be kept: walk the forward part backwards, so a
    # recomputed equation's inputs are themselves considered.
    in_rec = [False] * len(eqns)
    if recompute is not None:
        for i in range(len(eqns) - 1, -1, -1):
            e = eqns[i]
            if in_fwd[i] and any(_is_var(v) and v in need for v in e.outvars) \
                    and not e.effects and recompute(e):
                in_rec[i] = True
                need.difference_update(e.outvars)
                need.update(v for v in e.invars if _is_var(v))

    constvars = set(jaxpr.constvars)
    costly = set(costly_inputs)
    free = constvars | {v for i, v in enumerate(primal_in) if i not in costly}
    recomputed = tuple(e for i, e in enumerate(eqns) if in_rec[i])
    _hoist_shrinking(eqns, in_fwd, in_bwd, in_rec, need, ct_in, ct_out, free)
    _recompute_cheap(eqns, in_fwd, in_rec, need, set(primal_in), free)
    return Decision(in_fwd, in_bwd, in_rec, need, recomputed)


def split_joint(joint: Joint, recompute: Callable[[Any], bool] | None = None,
                costly_inputs: Sequence[int] = (), parts: tuple | None = None) -> Split:
    """Cuts a joint jaxpr into forward and backward parts (see the module doc).

    Args:
      joint: from :func:`trace_joint`.
      recompute: ``recompute(eqn) -> bool`` for forward equations; when true,
        the equation's outputs are not kept but recomputed by the backward part
        (which then keeps the equation's inputs instead, recursively).
      costly_inputs: primal inputs that cost memory to keep (a scan's carry,
        which is stacked per step); the others exist anyway and are free.
      parts: a precomputed :func:`partition` of ``joint`` (optional).

    Returns:
      A :class:`Split`.
    """
    jaxpr = joint.jaxpr
    eqns = jaxpr.eqns
    primal_in = jaxpr.invars[:joint.n_in]
    ct_in = jaxpr.invars[joint.n_in:]
    primal_out = jaxpr.outvars[:joint.n_out]
    ct_out = jaxpr.outvars[joint.n_out:]
    ct_in_set = set(ct_in)
    constvars = set(jaxpr.constvars)
    d = decide(joint, recompute, costly_inputs, parts)
    in_fwd, in_bwd, in_rec, need = d.in_fwd, d.in_bwd, d.in_rec, d.need

    saved, saved_vars = [], []
    for i, v in enumerate(primal_in):
        if v in need:
            saved.append(("input", i))
            saved_vars.append(v)
    computed_vars = []
    for i, e in enumerate(eqns):
        if in_fwd[i]:
            for v in e.outvars:
                if _is_var(v) and v in need:
                    saved.append(("computed", len(computed_vars)))
                    saved_vars.append(v)
                    computed_vars.append(v)
    leftover = need - set(saved_vars) - ct_in_set - constvars
    assert not leftover, f"unclassified residuals {leftover}"
    cts_used = tuple(joint.ct_outputs[k] for k, v in enumerate(ct_in) if v in need)
    cts_used_vars = [v for v in ct_in if v in need]

    fwd_eqns = [e for i, e in enumerate(eqns) if in_fwd[i]]
    fwd = jaxpr.replace(invars=list(primal_in), outvars=list(primal_out) + computed_vars,
                        eqns=fwd_eqns, effects=_effects(fwd_eqns))
    # Drop what nested loops compute but nobody reads (e.g. residual outputs of a
    # nested forward scan whose values the backward part now recomputes).
    fwd, _ = compat.dce_jaxpr(fwd, [True] * len(fwd.outvars), instantiate=True)

    bwd_eqns = [e for i, e in enumerate(eqns) if in_bwd[i] or in_rec[i]]
    bwd = jaxpr.replace(invars=saved_vars + cts_used_vars, outvars=list(ct_out),
                        eqns=bwd_eqns, effects=_effects(bwd_eqns))
    bwd, _ = compat.dce_jaxpr(bwd, [True] * len(bwd.outvars), instantiate=True)

    out_index = {}
    for k, v in enumerate(primal_out):
        if _is_var(v):
            out_index.setdefault(v, k)
    computed_as_output = tuple(out_index.get(v) for v in computed_vars)
    return Split(joint, fwd, bwd, tuple(saved), tuple(saved_vars), computed_as_output,
                 cts_used, d.recomputed)


_staged: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _staged_call(jaxpr):
    """``jaxpr`` as a function bound as one ``jit`` equation: the jaxpr itself
    when the arguments have its input types exactly, else traced once per input
    types."""
    fns = _staged.get(jaxpr)
    if fns is None:
        ref = weakref.ref(jaxpr)
        n_consts = len(jaxpr.constvars)

        def run(args):
            return list(compat.eval_jaxpr(ref(), args[:n_consts], *args[n_consts:]))
        direct = staging.JaxprFunction(compat.open_jaxpr_taking_consts(jaxpr), [],
                                      "checkpointed")
        fns = _staged[jaxpr] = (direct, staging.StagedFunction(run, False, "checkpointed"))
    return fns


def eval_jaxpr(jaxpr, consts, *args) -> list:
    """Evaluates a jaxpr from a split in the current trace.

    Under a transformation, with no tool watching the sweeps, the jaxpr is bound as
    one ``jit`` equation traced once per jaxpr and input types, so the identical
    checkpointed blocks of a model (one cached split) cost one trace, and each
    occurrence one equation of the enclosing program (which the compiler
    inlines). Eagerly it runs op by op.
    """
    if compat.is_eager() or not context.unwatched() or \
            any(compat.is_tracer(c) for c in consts):
        return list(compat.eval_jaxpr(jaxpr, consts, *args))
    direct, traced = _staged_call(jaxpr)
    args = list(consts) + list(args)
    outs = direct(args)
    return traced(args) if outs is None else outs


# ---------------------------------------------------------- the residual report
@dataclasses.dataclass(frozen=True)
class Residual:
    """One value the forward sweep keeps for the backward sweep.

    Attributes:
      shape: its shape (with the leading steps axis for values kept per step
        of a scan).
      dtype: its dtype.
      nbytes: its size in bytes.
      kind: ``"argument"``, ``"constant"`` or ``"intermediate"``.
      primitive: the primitive that produced it (``None`` for arguments).
      source: the user's ``file:line`` that produced it, or the argument's path.
      detail: e.g. ``"named 'h'"``, ``"per step of scan (length 64)"``.
    """
    shape: tuple
    dtype: np.dtype
    nbytes: int
    kind: str
    primitive: str | None
    source: str
    detail: str = ""

    def describe(self) -> str:
        """One line: what produced the value, where, and how it is kept."""
        if self.primitive is None:
            text = f"the {self.kind} {self.source}"
        else:
            text = f"{self.primitive} at {self.source}"
        return text + (f" ({self.detail})" if self.detail else "")


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


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _producers(jaxpr) -> dict:
    return {v: e for e in jaxpr.eqns for v in e.outvars if _is_var(v)}


def _describe_var(v, jaxpr, steps: list[str]) -> tuple[str | None, str, list[str]]:
    """(primitive, source line, details) of the equation that produced ``v``,
    looking through the loops our handlers emit to the per-step producer."""
    e = _producers(jaxpr).get(v)
    if e is None:
        return None, "<input>", steps
    name = e.primitive.name
    if name == "reduce_precision" and _is_var(e.invars[0]):
        # A checkpoint rounds what it saves (compat.round_residuals): the value
        # is its input's, as in JAX's report of saved residuals.
        return _describe_var(e.invars[0], jaxpr, steps)
    if name == "scan":
        k = list(e.outvars).index(v)
        num_carry = e.params["num_carry"]
        body = e.params["jaxpr"].jaxpr
        if k >= num_carry:
            inner = body.outvars[k]
            note = f"x{e.params['length']} steps of the scan at {compat.source_line(e)}"
            if _is_var(inner):
                prim, src, details = _describe_var(inner, body, steps + [note])
                if prim is not None:
                    return prim, src, details
                idx = list(body.invars).index(inner) if inner in body.invars else None
                if idx is not None and idx >= e.params["num_consts"] + num_carry:
                    return "scan", compat.source_line(e), steps + [
                        f"its xs slice, x{e.params['length']} steps"]
                if idx is not None:
                    return "scan", compat.source_line(e), steps + [
                        f"its carry, x{e.params['length']} steps"]
            return "scan", compat.source_line(e), steps + [note]
        return "scan", compat.source_line(e), steps + ["its final carry"]
    if name == "cond":
        k = list(e.outvars).index(v)
        found = []
        for b, branch in enumerate(e.params["branches"]):
            inner = branch.jaxpr.outvars[k]
            if _is_var(inner) and inner in _producers(branch.jaxpr):
                prim, src, _ = _describe_var(inner, branch.jaxpr, [])
                found.append((b, prim, src))
        if len(found) == 1:
            b, prim, src = found[0]
            where = f"in branch {b} of the cond at {compat.source_line(e)}"
            return prim, src, [*steps, where]
    details = list(steps)
    if name == "name":
        details.append(f"named {e.params['name']!r}")
    elif name in compat.JIT_NAMES and e.params.get("name") == "while_forward":
        details.append("kept by the lax.while_loop's forward loop for its backward "
                       "(loop states, their steps, the trip count)")
    elif name in compat.JIT_NAMES:
        details.append(f"output of jitted function {e.params.get('name', '?')!r}")
    from .rules import foreign
    owner = foreign.rule_owner(e.primitive)
    if owner is not None:
        details.append(f"rule from {owner}")
    return name, compat.source_line(e), details


def report_split(split: Split, arg_names: Sequence[str], plans=()) -> SavedResiduals:
    """The residual rows of a split (``arg_names``: one per primal input)."""
    rows = []
    joint_jaxpr = split.joint.jaxpr
    for (kind, idx), v in zip(split.saved, split.saved_vars):
        aval = v.aval
        if kind == "input":
            rows.append(Residual(tuple(aval.shape), np.dtype(aval.dtype), _nbytes(aval),
                                 "argument", None, arg_names[idx]))
            continue
        prim, src, details = _describe_var(v, joint_jaxpr, [])
        rows.append(Residual(tuple(aval.shape), np.dtype(aval.dtype), _nbytes(aval),
                             "intermediate", prim, src, "; ".join(details)))
    return SavedResiduals(rows, plans)


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
    from . import memplan   # (it imports this module)
    with memplan.collecting() as plans:
        joint, recorded = record_joint(fun, in_tree, leaves, static,
                                       what=getattr(fun, "__name__", "fun"))
    with compat.calls_in(recorded):      # a library helper's values: its call's line
        return report_split(split_joint(joint), names, plans)
