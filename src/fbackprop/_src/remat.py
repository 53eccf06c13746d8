"""Gradient checkpointing (rematerialization): keep less, recompute in backward.

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
:class:`~fbackprop._src.memplan.MemoryBudget` policy: fbackprop plans the whole
region (scan bodies and nested checkpoints included) to keep at most ``N``
bytes with the least recomputation (see :mod:`fbackprop._src.memplan`); JAX's
own autodiff sees a policy that saves nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import (
    Offloadable,
    Recompute,
    Saveable,
    checkpoint_name,  # noqa: F401  (re-exported)
)

from . import compat, memplan, residuals, reverse
from .rules import while_loop


def _saveable(policy, eqn) -> bool:
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


def _nothing_saveable(*_, **__) -> bool:
    return False


_split_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_for_policy(joint: residuals.Joint, policy) -> residuals.Split:
    """The split of a checkpointed region: recompute what the policy does not save."""
    per = _split_cache.setdefault(joint, {})
    try:
        hit = per.get(policy)
    except TypeError:  # an unhashable policy: no caching
        return residuals.split_joint(joint, recompute=lambda e: not _saveable(policy, e))
    if hit is None:
        hit = residuals.split_joint(joint, recompute=lambda e: not _saveable(policy, e))
        per[policy] = hit
    return hit


class _Inlined:
    """A checkpoint region swept in place (inside a memory-budget plan, or for
    ``fb.explain``): the sub-tape of its equations."""

    def __init__(self, tape):
        self.tape = tape


class RematCall:
    """Reverse mode of a ``remat2`` (checkpoint) equation."""

    def forward(self, eqn, invals, active):
        # The region's request for the while loops in it (while_loop_checkpoints,
        # or slots from a memory budget) is in force while the region is swept.
        request, _ = while_loop.unwrap_policy(compat.remat_inner(eqn.params)[1]["policy"])
        with while_loop.region(request):
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
        if memplan.planning():
            # Inside a region being planned for a memory budget, a nested
            # checkpoint is part of that region: the outer plan decides.
            outs, tape = reverse.forward(jaxpr, consts, invals, active)
            return outs, _Inlined(tape), tape.out_active
        marks = memplan.explain_marks()
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
            outs, tape = reverse.forward(jaxpr, consts, invals, active)
            return outs, _Inlined(tape), tape.out_active
        with compat.user_context(eqn):
            outs = residuals.eval_jaxpr(split.fwd, split.consts, *invals)
        joint = split.joint
        computed = outs[joint.n_out:]
        saved = [invals[i] if kind == "input" else computed[i] for kind, i in split.saved]
        return outs[:joint.n_out], (split, saved, prevent_cse), list(joint.out_active)

    def backward(self, record, cts_out):
        if isinstance(record.sub, _Inlined):
            return reverse.backward(record.sub.tape, cts_out)
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


# --------------------------------------------------------------------- the API
def _resolve_policy(policy):
    if policy is None or callable(policy):
        return policy
    if isinstance(policy, str):
        found = getattr(jax.checkpoint_policies, policy, None)
        if found is not None and policy not in (
                "save_only_these_names", "save_any_names_but_these",
                "save_anything_except_these_names", "save_from_both_policies",
                "offload_dot_with_no_batch_dims", "save_and_offload_only_these_names"):
            return found
        names = sorted(n for n in vars(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(
            f"checkpoint: unknown policy name {policy!r}. Pass a policy function such as "
            f"jax.checkpoint_policies.dots_saveable, or one of the names "
            f"'nothing_saveable', 'everything_saveable', 'dots_saveable', "
            f"'dots_with_no_batch_dims_saveable' (policies that take arguments, like "
            f"save_only_these_names('h'), must be called: {names}).")
    raise TypeError(f"checkpoint: `policy` must be None, a policy function or a policy "
                    f"name, got {type(policy).__name__}: {policy!r:.60}.")


def checkpoint(fun: Callable, *, policy=None, prevent_cse: bool = True,
               static_argnums: int | Sequence[int] = (), memory_budget=None,
               while_loop_checkpoints: int | None = None) -> Callable:
    """Marks ``fun`` for gradient checkpointing: its backward sweep recomputes
    instead of keeping.

    When fbackprop differentiates a function that calls the result, the forward
    sweep keeps only ``fun``'s inputs and the values ``policy`` saves; the
    backward sweep recomputes the rest (behind ``lax.optimization_barrier`` when
    ``prevent_cse``). Same arguments as :func:`jax.checkpoint` (the marked
    function is ``jax.checkpoint``'s; fbackprop's engine does the
    differentiation), and ``policy`` may also be given by name.

    With ``memory_budget`` instead of a policy, fbackprop decides: the values
    its forward sweep keeps from ``fun``'s intermediates total at most
    ``memory_budget`` bytes (an ``int``), or at most that fraction of what it
    keeps without checkpointing (a ``float`` in (0, 1]), and among the plans
    within the budget it picks one of least recompute cost (FLOPs of the
    recomputed equations). Arguments of ``fun`` are available anyway and do
    not count. The plan covers the whole region: values inside ``lax.scan``
    bodies (per-step residuals times the trip count) and nested checkpoints,
    whose own policies it overrides. ``fb.saved_residuals`` shows the plan and
    ``fb.memory_plan`` the trade-off curve. Under JAX's own autodiff
    (``jax.grad``) the marked function behaves like ``jax.checkpoint`` with
    ``nothing_saveable``. A ``lax.while_loop`` in a budgeted region keeps
    ``memory_budget // (bytes of its loop state)`` saved loop states (for a
    fraction, that fraction of the default 64).

    ``while_loop_checkpoints=n`` sets how many loop states each
    ``lax.while_loop`` (or ``fori_loop`` with traced bounds) in ``fun`` keeps for
    its backward sweep (default 64): memory ``n`` copies of the loop state,
    recompute a few body evaluations per iteration (see the docs page on while
    loops). Given alone, it changes nothing else: the rest of the region keeps
    what it would without the checkpoint.

    Args:
      fun: the function to checkpoint.
      policy: ``None`` (save nothing but the inputs), a
        ``jax.checkpoint_policies`` function (``dots_saveable``,
        ``save_only_these_names('h')``, ...) or the name of one that takes no
        arguments (``"dots_saveable"``).
      prevent_cse: put the recomputation behind an optimization barrier. Inside
        ``lax.scan`` the loop structure already prevents CSE and ``False`` can
        be a little faster.
      static_argnums: arguments that are Python values, not arrays.
      memory_budget: ``None``, an ``int`` number of bytes (> 0) or a ``float``
        fraction in (0, 1]; not together with ``policy``. A budget below what
        the smallest plan keeps is an error (raised when the region is
        differentiated) that names that smallest number of bytes.
      while_loop_checkpoints: ``None`` or an ``int`` >= 1: the number of loop
        states each while loop in ``fun`` saves for its backward sweep.

    Returns:
      A function with ``fun``'s signature.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> layer = fb.checkpoint(lambda x: jnp.sin(jnp.sin(x)))
      >>> fb.grad(lambda x: layer(x).sum())(jnp.zeros(2))
      Array([1., 1.], dtype=float32)
      >>> half = fb.checkpoint(lambda x: jnp.sin(jnp.sin(x)), memory_budget=0.5)
      >>> fb.grad(lambda x: half(x).sum())(jnp.zeros(2))
      Array([1., 1.], dtype=float32)
    """
    if memory_budget is not None:
        if policy is not None:
            raise ValueError(
                f"checkpoint: pass either `policy` or `memory_budget`, not both (got "
                f"policy={policy!r:.60} and memory_budget={memory_budget!r}); with a "
                f"memory budget fbackprop chooses what to keep itself.")
        resolved = memplan.MemoryBudget(memory_budget)
    else:
        resolved = _resolve_policy(policy)
    if while_loop_checkpoints is not None:
        if policy is None and memory_budget is None:
            resolved = None       # only the loops' slots change
        resolved = while_loop.WhileLoopCheckpoints(while_loop_checkpoints, resolved)
    return jax.checkpoint(fun, prevent_cse=prevent_cse, policy=resolved,
                          static_argnums=static_argnums)


remat = checkpoint
# The policies, re-exported so users need not import them from jax.
checkpoint_policies = jax.checkpoint_policies
