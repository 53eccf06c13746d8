"""``fbackprop.memory_plan``: the trade-off between residual memory and recomputation
of a function, planned by :mod:`fbackprop._src.planning.memplan` for a range of
budgets and for JAX's checkpoint policies, as a table and a plot."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from .. import compat, plotting, residuals, trace
from ..planning.memplan import _fmt_flops, _probe_joint, budget_bytes
from .residuals import record_joint


# ======================================================= the trade-off curve
@dataclasses.dataclass(frozen=True)
class PlanPoint:
    """One plan on the trade-off curve.

    Attributes:
      budget_bytes: the budget it was planned for (``None`` for hull vertices
        and policies).
      kept_bytes: bytes of intermediates it keeps.
      recompute_flops: estimated FLOPs it recomputes.
      label: ``""``, or the policy's name.
      feasible: False for a budget below the smallest plan, which
        ``fb.checkpoint`` refuses; ``kept_bytes`` and ``recompute_flops`` are
        then those of the smallest plan.
    """
    budget_bytes: int | None
    kept_bytes: int
    recompute_flops: float
    label: str = ""
    feasible: bool = True


class MemoryPlan:
    """The memory / recompute trade-off of a function, as fbackprop plans it.

    Attributes:
      plain_bytes: intermediates kept without checkpointing.
      min_bytes: the fewest bytes any plan keeps.
      recompute_all_flops: FLOPs of recomputing everything recomputable.
      points: a :class:`PlanPoint` per requested budget (smallest first).
      hull: the vertices of the lower convex hull (each optimal for its bytes).
      policies: ``name -> PlanPoint`` for checkpoint policies applied to the
        region and to every scan body in it.
      seconds: planning time (after tracing).
    """

    def __init__(self, name, plain_bytes, min_bytes, recompute_all_flops, points, hull,
                 policies, seconds, trace_seconds):
        self.name = name
        self.plain_bytes = plain_bytes
        self.min_bytes = min_bytes
        self.recompute_all_flops = recompute_all_flops
        self.points = tuple(points)
        self.hull = tuple(hull)
        self.policies = dict(policies)
        self.seconds = seconds
        self.trace_seconds = trace_seconds

    def __repr__(self):
        return (f"MemoryPlan({self.name}: {len(self.points)} budgets, plain "
                f"{self.plain_bytes:,} bytes, min {self.min_bytes:,} bytes)")

    def __str__(self):
        rows = [(f"{p.budget_bytes:,}", p) for p in self.points]
        width = max([len("budget (bytes)")] + [len(head) for head, _ in rows] +
                    [len(name) for name in self.policies])
        out = [f"memory plan of {self.name}: {self.plain_bytes:,} bytes of intermediates kept "
               f"without checkpointing, the smallest plan keeps {self.min_bytes:,}; "
               f"recomputing everything costs {_fmt_flops(self.recompute_all_flops)} FLOPs "
               f"(planned in {self.seconds * 1e3:.0f} ms)",
               f"{'budget (bytes)':>{width}s} {'kept bytes':>14s} {'kept/plain':>10s} "
               f"{'recompute FLOPs':>16s} {'of all':>7s}"]
        if self.policies:
            rows.append(("JAX's checkpoint policies, on the region and every scan body in it:",
                         None))
            rows += [(f"{name:<{width}s}", p) for name, p in self.policies.items()]
        for head, p in rows:
            if p is None:
                out.append(head)
            elif not p.feasible:
                out.append(f"{head:>{width}s} {'infeasible':>14s}  (below the smallest plan, "
                           f"{self.min_bytes:,} bytes; fb.checkpoint refuses it)")
            else:
                frac = p.kept_bytes / self.plain_bytes if self.plain_bytes else 1.0
                share = (p.recompute_flops / self.recompute_all_flops
                         if self.recompute_all_flops else 0.0)
                out.append(f"{head:>{width}s} {p.kept_bytes:14,d} {frac:10.3f} "
                           f"{_fmt_flops(p.recompute_flops):>16s} {share:7.1%}")
        return "\n".join(out)

    def as_dicts(self) -> dict:
        return {"plain_bytes": self.plain_bytes, "min_bytes": self.min_bytes,
                "recompute_all_flops": self.recompute_all_flops,
                "points": [dataclasses.asdict(p) for p in self.points],
                "hull": [dataclasses.asdict(p) for p in self.hull],
                "policies": {k: dataclasses.asdict(p) for k, p in self.policies.items()},
                "seconds": self.seconds}

    def plot(self, ax=None, *, path: str | None = None, title: str | None = None):
        """Draws the curve: kept bytes against recompute FLOPs (needs matplotlib).

        Args:
          ax: a matplotlib ``Axes`` to draw on; a new figure when omitted.
          path: save the figure to this file.
          title: the axes title.

        Returns:
          The ``Axes``.
        """
        fig, ax = plotting.axes(ax, "a memory plan", (7.0, 4.6))
        mib = 2.0 ** 20
        hull = sorted(self.hull, key=lambda p: p.kept_bytes)
        ax.plot([p.kept_bytes / mib for p in hull], [p.recompute_flops / 1e6 for p in hull],
                color="#1f77b4", alpha=0.35, linewidth=1, label="convex hull")
        pts = sorted((p for p in self.points if p.feasible), key=lambda p: p.kept_bytes)
        ax.plot([p.kept_bytes / mib for p in pts], [p.recompute_flops / 1e6 for p in pts],
                marker="o", color="#1f77b4", drawstyle="steps-post",
                label="fbackprop memory_budget")
        markers = iter("sD^vP*Xh")
        for name, p in self.policies.items():
            ax.scatter([p.kept_bytes / mib], [p.recompute_flops / 1e6], marker=next(markers, "o"),
                       s=60, zorder=3, label=name)
        ax.axvline(self.plain_bytes / mib, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("residual bytes kept (MiB)")
        ax.set_ylabel("recompute FLOPs (M)")
        ax.set_title(title or f"memory plan of {self.name}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        return plotting.finish(ax, fig, path)


_DEFAULT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def memory_plan(fun: Callable, *args, budgets: Sequence | None = None,
                policies: Sequence[str] | dict | None = None, **kwargs) -> MemoryPlan:
    """The trade-off between residual memory and recomputation for ``fun``.

    Plans ``fun`` as if it were ``fb.checkpoint(fun, memory_budget=b)`` for each
    budget ``b`` (every float argument leaf differentiated, like
    :func:`fbackprop.saved_residuals`), with the planner's own figures: bytes of
    intermediates kept and FLOPs recomputed. Scans inside ``fun`` are planned
    per step.

    Args:
      fun: the function (pytrees of arrays in, pytree of arrays out).
      *args: positional arguments to trace it with.
      budgets: budgets to plan for: floats in [0, 1] (fractions of the plain
        bytes) or ints (bytes). A budget below the smallest plan (which
        ``fb.checkpoint`` refuses) gives a point marked ``feasible=False``.
        Default: the smallest plan's bytes, then those of the fractions 0.05,
        0.1, ..., 1 that lie above it.
      policies: names of ``jax.checkpoint_policies`` (or ``name -> policy``)
        to place on the same axes, applied to ``fun`` and to every scan body in
        it. Default: nothing_saveable, dots_saveable,
        dots_with_no_batch_dims_saveable.
      **kwargs: keyword arguments to trace it with.

    Returns:
      A :class:`MemoryPlan` (``print`` it for a table; ``.plot()`` draws it).

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> f = lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w))
      >>> curve = fb.memory_plan(f, jnp.ones((8, 8)), jnp.ones((4, 8)), budgets=[0.0, 1.0])
      >>> [p.kept_bytes for p in curve.points], curve.plain_bytes
      ([0, 256], 256)
    """
    from jax import tree_util
    t0 = time.perf_counter()
    leaves, in_tree = tree_util.tree_flatten((args, kwargs))
    static = [not (isinstance(x, (np.ndarray, np.generic, jax.Array))
                   or compat.is_tracer(x) or isinstance(x, (bool, int, float, complex)))
              for x in leaves]
    for x, s in zip(leaves, static):
        if not s:
            trace.check_leaf(x, "memory_plan: an argument")
    # The program fb.grad runs: the recording of ``fun`` and its backward sweep.
    probe = _probe_joint(lambda: record_joint(
        fun, in_tree, leaves, static, what=getattr(fun, "__name__", "fun"))[0])
    t1 = time.perf_counter()
    search = probe.search
    plain = probe.plain_bytes
    least = int(min(search.least.nbytes, plain))
    if budgets is None:
        budgets = [least] + [k / 20 for k in range(21) if budget_bytes(k / 20, plain) > least]
    points = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
            raise TypeError(f"memory_plan: each budget must be an int (bytes) or a float "
                            f"in [0, 1], got {b!r}.")
        if isinstance(b, (float, np.floating)):
            if not 0.0 <= b <= 1.0:
                raise ValueError(f"memory_plan: a float budget is a fraction in [0, 1], "
                                 f"got {b!r}.")
            target = budget_bytes(float(b), plain)
        else:
            target = int(b)
        p = search.none if plain <= target else search.plan(target)
        kept = plain if p is search.none else int(p.nbytes)
        points.append(PlanPoint(target, kept, 0.0 if p is search.none else p.flops,
                                feasible=kept <= target))
    points.sort(key=lambda p: p.budget_bytes)
    hull = [PlanPoint(None, int(p.nbytes), p.flops) for p in search.hull()]
    hull[0] = PlanPoint(None, plain, 0.0)
    if policies is None:
        policies = _DEFAULT_POLICIES
    if not isinstance(policies, dict):
        policies = {n: getattr(jax.checkpoint_policies, n) for n in policies}
    pol_points = {}
    for name, pol in policies.items():
        p = probe.model.policy_plan(lambda e, pol=pol: not residuals.policy_saves(pol, e))
        pol_points[name] = PlanPoint(None, int(p.nbytes), p.flops, name)
    return MemoryPlan(getattr(fun, "__name__", "fun"), plain, least,
                      probe.model.everything().flops, points, hull, pol_points,
                      time.perf_counter() - t1, t1 - t0)
