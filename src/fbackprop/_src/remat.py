"""``fb.checkpoint`` / ``fb.remat``: mark a region for gradient checkpointing.

``jax.checkpoint`` (alias ``jax.remat``, and our :func:`checkpoint`) only marks a
region: it stages the function into a ``remat2`` equation holding the region's
jaxpr, its policy and ``prevent_cse``. The differentiation is fbackprop's: see
:mod:`fbackprop._src.rules.remat` for what the forward sweep keeps and how the
backward sweep recomputes the rest. ``checkpoint(fun, memory_budget=N)`` stages
the region with a :class:`~fbackprop._src.planning.memplan.MemoryBudget` policy: fbackprop
plans the whole region for a number of bytes (see :mod:`fbackprop._src.planning.memplan`);
JAX's own autodiff sees a policy that saves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.ad_checkpoint import checkpoint_name  # noqa: F401  (re-exported)

from .planning import memplan
from .rules import while_loop


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
