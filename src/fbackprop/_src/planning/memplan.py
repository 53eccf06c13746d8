"""Memory-budget rematerialization: given a byte budget, fbackprop decides what to keep.

``fb.checkpoint(fun, memory_budget=N)`` marks a region like any checkpoint. When
fbackprop differentiates it, the forward sweep keeps at most ``N`` bytes of
``fun``'s intermediates (or that fraction of what it keeps without
checkpointing) and the backward sweep recomputes the rest, choosing, among the
plans that fit, one of least recompute cost (FLOPs of the recomputed
equations, :func:`eqn_flops`). ``fb.memory_plan`` shows the whole trade-off
curve.

The problem
-----------
The region's joint trace (:mod:`fbackprop._src.residuals`) gives its forward
part (a DAG of equations), the set ``N`` of forward values the backward part
reads, and every value's bytes. A *plan* is a set ``R`` of forward equations
the backward part recomputes; it then keeps the values it reads that it does
not recompute: ``N`` minus ``R``'s outputs, plus ``R``'s inputs, recursively.
Minimising the recompute FLOPs subject to ``kept bytes <= B`` is a knapsack
with precedence constraints (NP-hard in general; Checkmate solves it exactly
with an integer program, which needs a solver and minutes on large graphs).

The algorithm: Lagrangian min-cut, then search between hull vertices
-------------------------------------------------------------------
For a price ``lam`` per byte, ``min lam * kept_bytes + recompute_flops`` is a
minimum s-t cut, by a project-selection construction: a node ``E`` per forward
equation (source side: computed once, in the forward sweep; sink side:
recomputed), a node ``K`` per value (sink side: available to the backward
sweep), and edges

* ``s -> E`` of capacity ``flops(E)``: cut when ``E`` is recomputed;
* ``E -> K(v)`` of capacity ``lam * bytes(v)``: cut when ``v`` is available
  but not recomputed, i.e. kept;
* ``K(v) -> E'`` of infinite capacity for every consumer ``E'`` of ``v``: a
  recomputed equation needs its inputs available; ``K(v) -> t`` infinite for
  ``v`` in ``N``.

Every finite cut is a valid plan, and its capacity is exactly the plan's
priced cost, so one max-flow (SciPy's Dinic, compiled code: milliseconds for
10^4 nodes) gives the optimal plan at that price; of the optimal cuts we take
the one recomputing least. As ``lam`` grows the plans sweep the lower convex
hull of the (bytes, FLOPs) trade-off, and a hull vertex is optimal among *all*
plans keeping no more than it does. For a budget ``B`` a breakpoint search
(Eisner-Severance: try the price at which the current feasible and infeasible
plans tie) finds the two hull vertices around ``B`` in a handful of max-flows.

Between two hull vertices lie plans no price finds (the knapsack part of the
problem), and the budget usually falls there. Two moves spend that slack:

* a local search over the kept set - keep one value more, one fewer, or swap
  one for another, each evaluated exactly - from both vertices, when the
  values worth deciding about are few (those any solved plan keeps: a scan
  body has a handful); for a deep unrolled net, the longest program-order
  prefix of the neighbour's decisions that fits;
* splitting a scan's steps: a scan body's plan is the same in every step, so
  for a scan of ``L`` steps the first ``k`` steps can follow one vertex and the
  others the next; bytes and FLOPs are linear in ``k``, so these plans lie *on*
  the hull edge. The scan then runs as two scans over its step numbers (see
  ``ScanCall`` in rules/scan.py).

The best plan found within ``B`` wins. Why not the alternatives: a plain
knapsack over the saved values (the approach of PyTorch's
``activation_memory_budget``) prices each value's recomputation on its own and
misses that recomputing one value needs its inputs, which may be shared by
several values or themselves recomputed; the min-cut counts those chains
exactly. An integer program (Checkmate) also optimises the schedule, which XLA
does for us, at a solver's cost. For graphs beyond ``MAX_CUT_NODES`` nodes
(:mod:`fbackprop._src.planning.memcut`, which holds the solver) the planner falls back
to a greedy rule (recompute an equation when its FLOPs cost less than keeping
its outputs at price ``lam``; binary search on ``lam``), linear in the graph
size. Planning a 1000-layer net takes about 0.1 s (tests/test_memplan.py).

What the plan covers
--------------------
* Arguments of ``fun`` (and constants) are available anyway: they cost nothing.
* A ``lax.scan`` inside the region is planned *inside*: its body is a level of
  the same problem whose costs are multiplied by the trip count (a per-step
  residual is stacked ``length`` times; a recomputed equation runs in every
  step of the backward loop). Carries are not recomputable across steps (they
  are stacked when the body's backward needs them); loop-invariant values are
  recomputed from the scan's constants. One price ``lam`` for all levels makes
  the decomposition the Lagrangian of the whole region. Nested scans nest
  levels. Planning traces the region twice: once plain (the *probe*, which
  records every level), once with the chosen plan (the *apply* pass, in which
  each scan splits its body as planned); the kept bytes are checked on the
  result, and a more frugal plan is tried if an estimate was off.
* Nested checkpoints (any policy, or a budget of their own) inside a budgeted
  region are inlined: the outer plan decides for the whole region.
* Under JAX's own autodiff (``jax.grad``) the budget policy saves nothing:
  the region behaves like ``jax.checkpoint(fun, policy=nothing_saveable)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .. import compat, residuals
from .. import context
from . import memcut
from .frames import _frame, _Level, _Node
from .memcut import eqn_flops, nbytes
from .residual_rows import report_split


# ===================================================================== budgets
def check_budget(budget):
    """Validates a ``memory_budget`` value: an int > 0 (bytes) or a float in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer,
                                                           np.floating)):
        raise TypeError(
            f"checkpoint: `memory_budget` must be an int (bytes, > 0) or a float in (0, 1] "
            f"(a fraction of what the region keeps without checkpointing), got "
            f"{type(budget).__name__}: {budget!r:.60}.")
    if isinstance(budget, (int, np.integer)):
        if budget <= 0:
            raise ValueError(f"checkpoint: `memory_budget` in bytes must be > 0, got {budget}. "
                             f"Pass a positive int, or a float in (0, 1] for a fraction.")
        return int(budget)
    budget = float(budget)
    if not (0.0 < budget <= 1.0):
        example = max(int(budget), 1) if math.isfinite(budget) else 1 << 20
        raise ValueError(
            f"checkpoint: a float `memory_budget` is a fraction of the bytes the region keeps "
            f"without checkpointing and must be in (0, 1], got {budget!r}. For a number of "
            f"bytes pass an int (e.g. memory_budget={example}).")
    return budget


class MemoryBudget:
    """The checkpoint policy that carries a memory budget to fbackprop's planner.

    fbackprop's ``RematCall`` handler recognises it and plans the region. Called
    as a JAX policy (under ``jax.grad``) it saves nothing, like
    ``jax.checkpoint_policies.nothing_saveable``.
    """
    __slots__ = ("budget", "__weakref__")

    def __init__(self, budget):
        self.budget = check_budget(budget)

    def __call__(self, *_, **__) -> bool:
        return False

    def _key(self):
        return (type(self.budget).__name__, self.budget)

    def __eq__(self, other):
        return type(other) is MemoryBudget and other._key() == self._key()

    def __hash__(self):
        return hash(("fbackprop.memory_budget",) + self._key())

    def __repr__(self):
        return f"memory_budget({self.budget!r})"


def budget_bytes(budget, plain_bytes: int) -> int:
    """The budget in bytes: an int as is, a fraction of ``plain_bytes`` rounded down."""
    if isinstance(budget, int):
        return budget
    return int(math.floor(budget * plain_bytes + 1e-9))


def _describe_budget(budget, nbytes: int, plain: int) -> str:
    if isinstance(budget, int):
        return f"{budget:,} bytes"
    return f"{budget!r} x {plain:,} = {nbytes:,} bytes"



# ========================================================== region planning
@dataclasses.dataclass(frozen=True)
class Recomputed:
    """One equation the backward sweep of a budgeted region recomputes.

    Attributes:
      primitive: its primitive.
      source: the user's ``file:line``.
      shape: the shape of its (first) output.
      flops: estimated FLOPs of the recomputation (all steps of a scan).
      detail: e.g. ``"every step of the scan at ... (x64)"``.
    """
    primitive: str
    source: str
    shape: tuple
    flops: float
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """What fbackprop decided for one ``fb.checkpoint(..., memory_budget=...)`` region.

    Attributes:
      where: the source line of the checkpointed call.
      budget: the ``memory_budget`` as given (int bytes or float fraction).
      budget_bytes: the budget in bytes.
      plain_bytes: bytes of intermediates kept without checkpointing.
      min_bytes: the smallest number of bytes any plan keeps (an upper
        estimate when the plan did not need the exact figure).
      kept_bytes: bytes of intermediates this plan keeps (<= ``budget_bytes``).
      recompute_flops: estimated FLOPs the backward sweep recomputes.
      recompute_all_flops: the same when everything recomputable is
        recomputed (what ``nothing_saveable`` does).
      recomputed: the recomputed equations, most expensive first.
      kept: the values kept, as :class:`fbackprop.Residual` rows (intermediates
        of the region; values kept per step of a scan have the steps axis).
      seconds: planning time (tracing the region twice and the search).
      search_seconds: the search alone (building the graphs, the max-flows and
        the local search), without tracing.
    """
    where: str
    budget: Any
    budget_bytes: int
    plain_bytes: int
    min_bytes: int
    kept_bytes: int
    recompute_flops: float
    recompute_all_flops: float
    recomputed: tuple
    kept: tuple
    seconds: float
    search_seconds: float = 0.0

    def describe(self) -> str:
        """A few lines: the budget, what is kept, what is recomputed and its cost."""
        frac = self.kept_bytes / self.plain_bytes if self.plain_bytes else 1.0
        share = (self.recompute_flops / self.recompute_all_flops
                 if self.recompute_all_flops else 0.0)
        lines = [
            f"memory budget plan for the checkpoint at {self.where}:",
            f"  budget {_describe_budget(self.budget, self.budget_bytes, self.plain_bytes)}; "
            f"keeps {self.kept_bytes:,} bytes of intermediates ({frac:.1%} of the "
            f"{self.plain_bytes:,} kept without checkpointing; smallest plan "
            f"{self.min_bytes:,})",
            f"  recomputes {len(self.recomputed)} equations, {_fmt_flops(self.recompute_flops)} "
            f"FLOPs ({share:.1%} of the {_fmt_flops(self.recompute_all_flops)} of "
            f"recomputing everything); planned in {self.seconds * 1e3:.0f} ms "
            f"({self.search_seconds * 1e3:.0f} ms of search, the rest tracing)"]
        for r in sorted(self.kept, key=lambda r: -r.nbytes)[:12]:
            lines.append(f"    kept: {list(r.shape)} {np.dtype(r.dtype).name}, {r.nbytes:,} "
                         f"bytes, {r.describe()}")
        if len(self.kept) > 12:
            lines.append(f"    ... {len(self.kept) - 12} more kept values")
        for r in self.recomputed[:12]:
            extra = f" ({r.detail})" if r.detail else ""
            lines.append(f"    recomputed: {r.primitive}{list(r.shape)} at {r.source}, "
                         f"{_fmt_flops(r.flops)} FLOPs{extra}")
        if len(self.recomputed) > 12:
            rest = sum(r.flops for r in self.recomputed[12:])
            lines.append(f"    ... {len(self.recomputed) - 12} more, "
                         f"{_fmt_flops(rest)} FLOPs")
        return "\n".join(lines)


def _fmt_flops(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _computed_bytes(split, costly=()) -> int:
    total = 0
    for (kind, i), v in zip(split.saved, split.saved_vars):
        if kind == "computed" or i in costly:
            total += nbytes(v)
    return total


@dataclasses.dataclass
class _Probe:
    root: _Level
    plain: Any               # the plain split of the probe's region joint
    plain_bytes: int
    model: memcut.Model
    search: memcut.Search
    search_seconds: float    # building the model (the traces excluded)


def _probe(jaxpr, consts, in_avals, active) -> _Probe:
    """The probe pass over a checkpoint region's program."""
    return _probe_joint(lambda: residuals.trace_joint(jaxpr, consts, in_avals, active))


def _probe_joint(trace_joint: Callable[[], residuals.Joint]) -> _Probe:
    """The probe pass over the joint program ``trace_joint()`` traces."""
    root = _Level(1)
    with _frame(root):
        root.begin_trace()
        joint = trace_joint()
    root.joint = joint
    plain = residuals.split_joint(joint)
    t0 = time.perf_counter()
    model = memcut.Model(root)
    search = memcut.Search(model)
    return _Probe(root, plain, _computed_bytes(plain), model, search,
                  time.perf_counter() - t0)


def _plan_tree(model: memcut.Model, plan: memcut.Plan) -> _Node:
    """The apply pass's plan tree: one node per level (two, with their own
    subtrees, for a scan whose steps a mixed plan splits)."""

    def build(k, masks, fraction):
        g = model.graphs[k]
        idx = frozenset(g.eq_index[a] for a in np.flatnonzero(masks[k]).tolist())
        node = _Node(g.level, idx)
        node.fraction = fraction
        for child in g.children:
            ci = model.index[id(child)]
            n_first = (plan.mix or {}).get(ci, 0)
            length = child.scan.length
            if 0 < n_first < length:
                seg = _Node(child, frozenset())
                seg.fraction = fraction
                seg.segments = [(n_first, build(ci, plan.alt.masks, fraction * n_first / length)),
                                (length - n_first,
                                 build(ci, masks, fraction * (length - n_first) / length))]
                node.children[child.key] = seg
            elif n_first == length:
                node.children[child.key] = build(ci, plan.alt.masks, fraction)
            else:
                node.children[child.key] = build(ci, masks, fraction)
        return node

    return build(0, plan.masks, 1.0)


def _apply(jaxpr, consts, in_avals, active, model, plan) -> tuple[Any, _Node, list]:
    root = _plan_tree(model, plan)
    with _frame(root):
        root.begin_trace()
        joint = residuals.trace_joint(jaxpr, consts, in_avals, active)
    ids = root.ids_in(joint)
    split = residuals.split_joint(joint, recompute=lambda e: id(e) in ids)
    root.split = split
    nodes, stack = [], [root]
    while stack:
        n = stack.pop()
        nodes.append(n)
        stack.extend(n.children.values())
        stack.extend(sub for _, sub in (n.segments or ()))
    return split, root, nodes


def _recomputed_rows(root: _Node, nodes: list) -> tuple:
    rows = []
    for n in nodes:
        split = n.split
        if split is None:
            continue
        lev = n.level
        mult = (lev.multiplier if lev is not None else 1) * n.fraction
        detail = ""
        if lev is not None and lev.scan is not None:
            sc = lev.scan
            if n.fraction >= 1:
                detail = f"every step of the scan at {sc.where}, x{sc.length}"
            else:
                detail = (f"{int(round(n.fraction * sc.length))} of the {sc.length} steps "
                          f"of the scan at {sc.where}")
        invariant = getattr(n, "invariant", None)
        for e in split.recomputed:
            if invariant is not None and invariant(e):
                continue
            shape = tuple(e.outvars[0].aval.shape) if e.outvars else ()
            rows.append(Recomputed(e.primitive.name, compat.source_line(e), shape,
                                   mult * eqn_flops(e), detail))
    rows.sort(key=lambda r: -r.flops)
    return tuple(rows)


_plan_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class RegionResult:
    split: Any
    plan: BudgetPlan
    marks: dict      # id(primal eqn) -> note, for fb.explain


def plan_region(jaxpr, consts, in_avals, active, budget, where: str = "") -> RegionResult:
    """Plans a budgeted checkpoint region and returns its split (and the report).

    Raises:
      ValueError: when the budget is below what the smallest plan keeps.
    """
    in_active = tuple(bool(a) for a in active)
    key = (tuple(residuals._aval_key(a) for a in in_avals), in_active,
           MemoryBudget(budget)._key(), bool(jax.config.jax_enable_x64))
    cacheable = context.current().cache and not any(compat.is_tracer(c) for c in consts)
    if cacheable:
        try:
            per = _plan_cache.setdefault(jaxpr, {})
        except TypeError:
            per, cacheable = None, False
        hit = per.get(key) if per is not None else None
        if hit is not None:
            return _report(hit)
    t0 = time.perf_counter()
    probe = _probe(jaxpr, consts, in_avals, active)
    target = budget_bytes(budget, probe.plain_bytes)
    search = probe.search
    searched = 0.0
    if probe.plain_bytes <= target:
        split, root, nodes = probe.plain, None, []
        kept = probe.plain_bytes
        plan = search.none
    else:
        split = None
        tried = set()
        t_search = time.perf_counter()
        candidates = [search.plan(target)]
        searched = time.perf_counter() - t_search
        lo, _ = search.bracket(target)
        candidates.append(lo)
        lam = memcut.tie_price(search.none, lo) if lo is not search.least else math.inf
        while math.isfinite(lam) and len(candidates) < 12:
            lam = lam * 4.0 + 1e-12
            candidates.append(search.at(lam))
        candidates.append(search.least)
        best_failed = None
        for plan in candidates:
            if plan.key() in tried:
                continue
            tried.add(plan.key())
            s, root, nodes = _apply(jaxpr, consts, in_avals, active, probe.model, plan)
            kept = _computed_bytes(s)
            if kept <= target:
                split = s
                break
            if best_failed is None or kept < best_failed:
                best_failed = kept
        if split is None:
            raise ValueError(
                f"fb.checkpoint(memory_budget={budget!r}) at {where or 'this region'}: the "
                f"budget is {_describe_budget(budget, target, probe.plain_bytes)}, but the "
                f"smallest plan keeps {best_failed:,} bytes of the region's intermediates "
                f"(values that cannot be recomputed in the backward sweep, such as the "
                f"per-step carries of a lax.scan, or the results of effectful operations). "
                f"Use memory_budget >= {best_failed} (bytes) or >= "
                f"{math.ceil(best_failed / max(probe.plain_bytes, 1) * 1000) / 1000:.3f} "
                f"(fraction of the {probe.plain_bytes:,} bytes kept without checkpointing). "
                f"fb.memory_plan(fun, *args) shows the whole range.")
    rows = _recomputed_rows(root, nodes) if root is not None else ()
    flops = float(sum(r.flops for r in rows))
    names = [f"args[{i}]" for i in range(len(in_avals))]
    kept_rows = tuple(r for r in report_split(split, names)
                      if r.kind == "intermediate")
    report = BudgetPlan(where, budget, target, probe.plain_bytes,
                        int(min(search.least.nbytes, kept)), kept, flops,
                        probe.model.everything().flops, rows, kept_rows,
                        time.perf_counter() - t0, probe.search_seconds + searched)
    marks = recomputed_primal_eqns(jaxpr, split)
    for n in nodes:
        lev, inv = n.level, getattr(n, "invariant", None)
        if lev is None or lev.scan is None or n.split is None:
            continue
        count = sum(1 for e in n.split.recomputed if inv is None or not inv(e))
        if count:
            marks[lev.key[0]] = (f"its backward recomputes {count} equation"
                                 f"{'s' if count > 1 else ''} in every step")
    result = RegionResult(split, report, marks)
    if cacheable and per is not None:
        per[key] = result
    return _report(result)


def _report(result: RegionResult) -> RegionResult:
    for plans in context.current().collectors:
        plans.append(result.plan)
    return result


def recomputed_primal_eqns(jaxpr, split) -> dict:
    """``id(eqn) -> note`` for the equations of ``jaxpr`` (a region) whose values
    ``split``'s backward part recomputes (matched by their source frames)."""
    by_tb = {}
    stack = [jaxpr]
    while stack:
        j = stack.pop()
        for e in j.eqns:
            by_tb.setdefault(id(e.source_info.traceback), e)
            if e.primitive.name in compat.JIT_NAMES:
                stack.append(compat.jit_inner(e.params).jaxpr)
            elif e.primitive.name in compat.REMAT_NAMES:
                stack.append(getattr(e.params["jaxpr"], "jaxpr", e.params["jaxpr"]))
    marks = {}
    for e in split.recomputed:
        prim = by_tb.get(id(e.source_info.traceback))
        if prim is not None:
            marks[id(prim)] = "recomputed in the backward sweep"
    return marks
