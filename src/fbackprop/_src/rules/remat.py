"""Reverse mode of a checkpoint region (``remat2``): keep less, recompute in backward.

``jax.checkpoint`` (alias ``jax.remat``, and our :func:`checkpoint`) only marks a
region: it stages the function into a ``remat2`` equation holding the region's
jaxpr, its policy and ``prevent_cse``. The differentiation is ours:

- forward sweep: the region's forward part runs and keeps only the region's
  inputs and the values the policy calls saveable;
- backward sweep: the kept values (and the incoming cotangents) go through one
  ``lax.optimization_barrier``, then the backward part recomputes every other
  forward value it needs and applies the VJP rules.

The barrier makes the recomputation depend on values XLA cannot see through,
so common-subexpression elimination cannot merge it back into the forward
computation, and it cannot be scheduled before the cotangents exist. (On
XLA:CPU the barrier is removed before CSE runs, so in one straight-line program
the compiled memory does not drop; inside a ``lax.scan`` - the usual way to
stack layers - forward and backward are separate loops and the saving is real.)

A policy is called like JAX calls it, ``policy(primitive, *input_avals,
**params)``, on each equation of the region's forward sweep (after nested
``jit`` calls are inlined) and returns a bool or ``jax.ad_checkpoint.Saveable``
/ ``Recompute``. ``Offloadable`` counts as saveable (there is no host memory
to offload to on CPU; the gradient is the same). A nested ``lax.scan`` is one
equation to a policy: saved whole or recomputed whole.

``checkpoint(fun, memory_budget=N)`` instead stages the region with a
:class:`~fbackprop._src.planning.memplan.MemoryBudget` policy: fbackprop plans the whole
region (scan bodies and nested checkpoints included) to keep at most ``N``
bytes with the least recomputation (see :mod:`fbackprop._src.planning.memplan`); JAX's
own autodiff sees a policy that saves nothing.
"""

from __future__ import annotations

import weakref

import jax.numpy as jnp
from jax import lax

from .. import compat, context, residuals
from ..planning import frames, memplan
from ..engine import sweeps
from . import while_loop


def _nothing_saveable(*_, **__) -> bool:
    return False


_split_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_for_policy(joint: residuals.Joint, policy) -> residuals.Split:
    """The split of a checkpointed region: recompute what the policy does not save."""
    per = _split_cache.setdefault(joint, {})
    try:
        hit = per.get(policy)
    except TypeError:  # an unhashable policy: no caching
        return residuals.split_joint(joint, recompute=lambda e: not residuals.policy_saves(policy, e))
    if hit is None:
        hit = residuals.split_joint(joint, recompute=lambda e: not residuals.policy_saves(policy, e))
        per[policy] = hit
    return hit


class _Inlined:
    """A checkpoint region swept in place (inside a memory-budget plan, for
    ``fb.explain``, or while a tool steps the sweeps): the sub-tape of its
    equations."""

    def __init__(self, tape):
        self.tape = tape


class RematCall:
    """Reverse mode of a ``remat2`` (checkpoint) equation."""

    def forward(self, eqn, invals, active):
        # The region's request for the while loops in it (while_loop_checkpoints,
        # or slots from a memory budget) is in force while the region is swept;
        # a region without one leaves the enclosing request in force.
        request, _ = while_loop.unwrap_policy(compat.remat_inner(eqn.params)[1]["policy"])
        if request is None:
            return self._forward(eqn, invals, active)
        with context.using(while_slots=request):
            return self._forward(eqn, invals, active)

    def _forward(self, eqn, invals, active):
        jaxpr, opts = compat.remat_inner(eqn.params)
        policy = while_loop.unwrap_policy(opts["policy"])[1] or _nothing_saveable
        prevent_cse = opts["prevent_cse"]
        if not isinstance(prevent_cse, bool):
            prevent_cse = any(prevent_cse)
        in_avals = [v.aval for v in jaxpr.invars]
        consts = list(getattr(jaxpr, "consts", []))
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        if frames.planning() or context.steps("all"):
            # Inside a region being planned for a memory budget, a nested
            # checkpoint is part of that region: the outer plan decides. While a
            # tool steps the sweeps, observers see the region's equations.
            outs, tape = sweeps.forward(jaxpr, consts, invals, active)
            return outs, _Inlined(tape), tape.out_active
        marks = frames.explain_marks()
        if isinstance(policy, memplan.MemoryBudget):
            planned = memplan.plan_region(jaxpr, consts, in_avals, active, policy.budget,
                                          compat.source_line(eqn))
            split, recomputed = planned.split, planned.marks
        else:
            joint = residuals.trace_joint(jaxpr, consts, in_avals, active)
            split = split_for_policy(joint, policy)
            recomputed = None
        if marks is not None:
            # fb.explain: sweep the region in place so its equations are rows,
            # and mark those the checkpointed backward recomputes.
            if recomputed is None:
                recomputed = memplan.recomputed_primal_eqns(jaxpr, split)
            marks.update(recomputed)
            outs, tape = sweeps.forward(jaxpr, consts, invals, active)
            return outs, _Inlined(tape), tape.out_active
        joint = split.joint
        fwd = compat.round_residuals(split.fwd, len(split.fwd.outvars) - joint.n_out)
        with compat.user_context(eqn):
            outs = residuals.eval_jaxpr(fwd, split.consts, *invals)
        computed = outs[joint.n_out:]
        saved = [invals[i] if kind == "input" else computed[i] for kind, i in split.saved]
        return outs[:joint.n_out], (split, saved, prevent_cse), list(joint.out_active)

    def evaluate(self, eqn, invals):
        """A region nothing differentiates, while a tool steps the sweeps: swept
        in place (``None`` otherwise: bound as a whole)."""
        if not context.steps("all", linear_ok=True):
            return None
        jaxpr, _ = compat.remat_inner(eqn.params)
        consts = list(getattr(jaxpr, "consts", []))
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        return sweeps.forward(jaxpr, consts, invals, [False] * len(invals))[0]

    def backward(self, record, cts_out):
        if isinstance(record.sub, _Inlined):
            return sweeps.backward(record.sub.tape, cts_out)
        split, saved, prevent_cse = record.sub
        joint = split.joint
        out_avals = [v.aval for v in joint.jaxpr.outvars[:joint.n_out]]
        cts = [cts_out[o] if cts_out[o] is not None
               else jnp.zeros(out_avals[o].shape, out_avals[o].dtype)
               for o in split.cts_used]
        with compat.user_context(record.eqn):
            if prevent_cse and split.recomputed and (saved or cts):
                barred = lax.optimization_barrier(list(saved) + list(cts))
                saved, cts = barred[:len(saved)], barred[len(saved):]
            cts_in = residuals.eval_jaxpr(split.bwd, split.consts, *saved, *cts)
        result = [None] * len(record.invals)
        for i, ct in zip(joint.ct_in_nonzero, cts_in):
            result[i] = ct
        return [c if a else None for c, a in zip(result, record.active)]
