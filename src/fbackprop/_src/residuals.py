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

:func:`fbackprop.saved_residuals` (:mod:`fbackprop._src.tools.residuals`) applies
the same split to what ``fb.grad`` runs for a whole function and reports the
residuals (:mod:`fbackprop._src.planning.residual_rows`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.ad_checkpoint import Offloadable, Recompute, Saveable

from . import compat, staging
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


# While a memory-budget plan is being made (fbackprop._src.planning.memplan), joints are
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
