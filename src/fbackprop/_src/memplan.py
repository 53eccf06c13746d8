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

The algorithm: Lagrangian min-cut, then a fill along the hull edge
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
The plans between two adjacent vertices lie on the hull edge and differ in
independent components (e.g. one layer each); we add components of the
cheaper-to-keep vertex back greedily while the budget allows, so the slack is
spent on saving FLOPs.

Why not the alternatives: a plain knapsack over the saved values (the
approach of PyTorch's ``activation_memory_budget``) prices each value's
recomputation on its own and misses that recomputing one value needs its
inputs, which may be shared by several values or themselves recomputed; the
min-cut counts those chains exactly. An integer program (Checkmate) also
optimises the schedule, which XLA does for us, at a solver's cost. For graphs
beyond :data:`MAX_CUT_NODES` nodes the planner falls back to a greedy rule
(recompute an equation when its FLOPs cost less than keeping its outputs at
price ``lam``; binary search on ``lam``), linear in the graph size.

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

import contextlib
import dataclasses
import itertools
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from . import compat, residuals, trace

# Above this many graph nodes the planner uses the greedy rule instead of min-cut.
MAX_CUT_NODES = 400_000
# The local search between hull vertices: at most this many candidate values
# and this many plan evaluations (each a walk over one level).
_LOCAL_SEARCH_VALUES = 48
_LOCAL_SEARCH_EVALS = 6000
# Integer capacities for SciPy's max-flow: finite cuts are scaled below _SCALE,
# infinite edges get _INF (the sum of all finite capacities of a cut stays below it).
_INF = 1 << 30
_SCALE = float(1 << 28)


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


# ====================================================================== FLOPs
_ZERO_FLOPS = frozenset({
    "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "slice",
    "dynamic_slice", "dynamic_update_slice", "concatenate", "pad", "gather", "iota",
    "name", "optimization_barrier", "copy", "copy_p", "rev", "convert_element_type",
    "bitcast_convert_type", "split", "device_put", "sharding_constraint", "pvary",
    "stop_gradient", "squeeze_p", "select_and_gather_add", "with_sharding_constraint",
    "reduce_precision",
})
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin",
    "cumlogsumexp", "reduce",
})
_flops_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _size(aval) -> int:
    return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64))


def jaxpr_flops(jaxpr) -> float:
    """Estimated FLOPs of one evaluation of a jaxpr (sum of :func:`eqn_flops`)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    try:
        hit = _flops_cache.get(jaxpr)
    except TypeError:
        hit = None
    if hit is None:
        hit = float(sum(eqn_flops(e) for e in jaxpr.eqns))
        try:
            _flops_cache[jaxpr] = hit
        except TypeError:
            pass
    return hit


def eqn_flops(eqn) -> float:
    """Estimated FLOPs of one equation, in XLA's terms.

    Contractions cost ``2 x output size x contracted size`` (a convolution:
    per output element, the kernel's size over its output features);
    reductions their input size; views, copies, casts and gathers nothing;
    other (elementwise) equations one per output element. Equations with
    sub-jaxprs cost their body: ``length x`` for a scan, the largest branch
    for a cond, one trip for a while loop.
    """
    name = eqn.primitive.name
    p = eqn.params
    if name == "dot_general":
        (lhs_contract, _), _ = p["dimension_numbers"]
        lhs = eqn.invars[0].aval
        k = int(np.prod([lhs.shape[d] for d in lhs_contract], dtype=np.int64))
        return 2.0 * _size(eqn.outvars[0].aval) * k
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        dn = p.get("dimension_numbers")
        out_feature_dim = getattr(dn, "rhs_spec", (0,))[0] if dn is not None else 0
        per_output = _size(rhs) / max(int(rhs.shape[out_feature_dim]), 1)
        return 2.0 * _size(eqn.outvars[0].aval) * per_output
    if name == "scan":
        return p["length"] * jaxpr_flops(p["jaxpr"])
    if name == "while":
        return jaxpr_flops(p["body_jaxpr"]) + jaxpr_flops(p["cond_jaxpr"])
    if name == "cond":
        return max((jaxpr_flops(b) for b in p["branches"]), default=0.0)
    if name in compat.JIT_NAMES or name in compat.REMAT_NAMES:
        return jaxpr_flops(p["jaxpr"])
    if name in (compat.CUSTOM_JVP_CALL, compat.CUSTOM_VJP_CALL):
        return jaxpr_flops(p["call_jaxpr"])
    if name in _ZERO_FLOPS:
        return 0.0
    if name in _REDUCTIONS:
        return float(sum(_size(v.aval) for v in eqn.invars if _is_var(v)))
    if name == "sort":
        n = _size(eqn.invars[0].aval)
        return float(n * max(math.log2(max(n, 2)), 1.0))
    subs = [j for j in trace.sub_jaxprs(eqn)] if hasattr(trace, "sub_jaxprs") else []
    if subs:
        return float(sum(jaxpr_flops(j) for j in subs))
    return float(sum(_size(v.aval) for v in eqn.outvars if _is_var(v)))


def _is_var(v) -> bool:
    return type(v) is not compat.Literal and type(v) is not compat.DropVar


def _nbytes(v) -> int:
    aval = v.aval
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


# ============================================================ planning context
class _State(threading.local):
    def __init__(self):
        self.frames: list = []        # _Level (probe) or _Node (apply) being traced
        self.collectors: list = []    # lists receiving the plans made (saved_residuals)
        self.explain: list = []       # dicts receiving recomputed-equation marks (explain)


_state = _State()
_tags = itertools.count()
_TAG = "fbackprop_plan_scan"


@contextlib.contextmanager
def _frame(frame):
    _state.frames.append(frame)
    residuals.cache_bypass[0] += 1
    try:
        yield frame
    finally:
        residuals.cache_bypass[0] -= 1
        _state.frames.pop()


def planning() -> bool:
    """Whether a memory-budget plan is being made (nested checkpoints inline then)."""
    return bool(_state.frames)


@contextlib.contextmanager
def collecting():
    """Collects the region plans made (or reused) while the block runs."""
    plans: list = []
    _state.collectors.append(plans)
    residuals.cache_bypass[0] += 1
    try:
        yield plans
    finally:
        residuals.cache_bypass[0] -= 1
        _state.collectors.remove(plans)


@contextlib.contextmanager
def explaining():
    """While active, checkpoint regions are swept in place (so ``fb.explain``
    sees their equations) and the equations their backward recomputes are
    recorded in the yielded dict: ``id(eqn) -> note``."""
    marks: dict = {}
    _state.explain.append(marks)
    try:
        yield marks
    finally:
        _state.explain.remove(marks)


def explain_marks():
    """The innermost dict of :func:`explaining`, or None."""
    return _state.explain[-1] if _state.explain else None


class _Counter:
    """Keys the scans swept at one level: (equation, occurrence)."""

    def __init__(self):
        self._counts: dict = {}

    def next_key(self, eqn):
        occ = self._counts.get(id(eqn), 0)
        self._counts[id(eqn)] = occ + 1
        return (id(eqn), occ)

    def reset_counts(self):
        self._counts = {}


@dataclasses.dataclass
class _ScanInfo:
    tag: str
    nc: int
    nk: int
    ny: int
    length: int
    where: str


class _Level(_Counter):
    """Probe pass: one level of the region (the region, or a scan body)."""

    def __init__(self, multiplier: int, scan: _ScanInfo | None = None, key=None):
        super().__init__()
        self.multiplier = multiplier
        self.scan = scan
        self.key = key
        self.joint = None
        self.invariant = None
        self.children: list = []

    def begin_trace(self):
        self.children = []
        self.reset_counts()

    def levels(self):
        out, stack = [], [self]
        while stack:
            lev = stack.pop()
            out.append(lev)
            stack.extend(reversed(lev.children))
        return out


class _Node(_Counter):
    """Apply pass: the plan of one level (joint equation indices to recompute)."""

    def __init__(self, level: _Level | None, recompute: frozenset):
        super().__init__()
        self.level = level
        self.recompute = recompute
        self.children: dict = {}
        self.split = None
        self.mismatch = False
        self.fraction = 1.0      # the share of the level's steps this node plans
        self.segments = None     # [(steps, _Node), ...] when a scan's steps are split

    def begin_trace(self):
        self.reset_counts()

    def ids_in(self, joint) -> set:
        """The ids of ``joint``'s equations to recompute (``joint``: this level's
        apply-pass trace, which should mirror the probe's equation by equation)."""
        if self.level is None or not self.recompute:
            return set()
        eqns = joint.jaxpr.eqns
        probe = self.level.joint.jaxpr.eqns
        if len(eqns) != len(probe) or any(
                eqns[i].primitive is not probe[i].primitive for i in self.recompute):
            self.mismatch = True
            return set()
        return {id(eqns[i]) for i in self.recompute}


class _ProbeScan:
    segments = None

    def __init__(self, level):
        self.level = level

    def body(self):
        return _frame(self.level)

    def begin_trace(self):
        self.level.begin_trace()

    def scope(self):
        return jax.named_scope(self.level.scan.tag)

    def split(self, joint, invariant, costly):
        self.level.joint = joint
        self.level.invariant = invariant
        return residuals.split_joint(joint, recompute=invariant, costly_inputs=costly)


class _ApplyScan:
    def __init__(self, node):
        self.node = node
        self.segments = None
        if node.segments:
            self.segments = [(n, _ApplyScan(sub)) for n, sub in node.segments]

    def body(self):
        return _frame(self.node)

    def begin_trace(self):
        self.node.begin_trace()

    def scope(self):
        return contextlib.nullcontext()

    def split(self, joint, invariant, costly):
        ids = self.node.ids_in(joint)
        split = residuals.split_joint(
            joint, recompute=lambda e: invariant(e) or id(e) in ids, costly_inputs=costly)
        self.node.split = split
        self.node.invariant = invariant
        return split


def scan_hook(eqn):
    """How a ``lax.scan`` being differentiated takes part in the current plan.

    Returns None outside planning. Otherwise an object with ``body()`` (context
    for tracing the body's joint), ``begin_trace()`` (before each such trace),
    ``split(joint, invariant, costly)`` (the body's split: plain in the probe,
    as planned in the apply pass) and ``scope()`` (context around emitting the
    forward loop, which tags it so the planner can find it in the region's
    trace). In the apply pass ``segments`` may be a list of ``(steps, hook)``:
    the scan is then run as consecutive scans of those lengths (in index
    order), each planned by its own hook.
    """
    if not _state.frames:
        return None
    frame = _state.frames[-1]
    p = eqn.params
    key = frame.next_key(eqn)
    if isinstance(frame, _Level):
        info = _ScanInfo(f"{_TAG}{next(_tags)}", p["num_consts"], p["num_carry"],
                         len(eqn.outvars) - p["num_carry"], int(p["length"]),
                         compat.source_line(eqn))
        child = _Level(frame.multiplier * int(p["length"]), info, key)
        frame.children.append(child)
        return _ProbeScan(child)
    node = frame.children.get(key)
    if node is None:
        node = _Node(None, frozenset())
    return _ApplyScan(node)


def _last_tag(eqn) -> str | None:
    text = str(getattr(eqn.source_info, "name_stack", ""))
    k = text.rfind(_TAG)
    if k < 0:
        return None
    end = k + len(_TAG)
    while end < len(text) and text[end].isdigit():
        end += 1
    return text[k:end]


# ================================================================ the model
class _LevelGraph:
    """One level's forward part as arrays: equations, values, costs, the
    values the backward reads, and the static edges of the cut graph."""

    def __init__(self, level: _Level):
        self.level = level
        joint = level.joint
        jaxpr = joint.jaxpr
        eqns = jaxpr.eqns
        self.parts = residuals.partition(joint)
        in_fwd, _, need = self.parts
        m = level.multiplier
        primal_in = jaxpr.invars[:joint.n_in]
        costly = set()
        if level.scan is not None:
            sc = level.scan
            costly = {primal_in[i] for i in range(sc.nc, sc.nc + sc.nk)}
        # The forward loops of the scans planned at this level (found by tag).
        by_tag = {c.scan.tag: c for c in level.children}
        self.child_at: dict = {}
        zero_bytes = set()
        for i, e in enumerate(eqns):
            if in_fwd[i] and e.primitive.name == "scan" and by_tag:
                child = by_tag.get(_last_tag(e))
                if child is not None and child.joint is not None:
                    self.child_at[i] = child
                    sc = child.scan
                    # its residual outputs are the body level's to count
                    zero_bytes.update(v for v in e.outvars[sc.nk + sc.ny:] if _is_var(v))
        self.children = list(self.child_at.values())
        producer = {}
        for i, e in enumerate(eqns):
            if in_fwd[i]:
                for v in e.outvars:
                    if _is_var(v):
                        producer[v] = i
        wanted = [v for v in need if v in producer or v in costly]
        # The equations that can matter: ancestors of what the backward reads.
        rel, seen, stack = set(), set(wanted), list(wanted)
        while stack:
            v = stack.pop()
            i = producer.get(v)
            if i is None or i in rel:
                continue
            rel.add(i)
            for u in eqns[i].invars:
                if _is_var(u) and u not in seen and (u in producer or u in costly):
                    seen.add(u)
                    stack.append(u)
        self.eq_index = sorted(rel)
        local = {i: a for a, i in enumerate(self.eq_index)}
        vals: list = [v for v in primal_in if v in costly and v in seen]
        vid = {v: k for k, v in enumerate(vals)}
        self.eq_outs, self.eq_ins = [], []
        for i in self.eq_index:
            outs = []
            for v in eqns[i].outvars:
                if _is_var(v):
                    vid[v] = len(vals)
                    vals.append(v)
                    outs.append(vid[v])
            self.eq_outs.append(outs)
        for i in self.eq_index:
            ins = []
            for u in eqns[i].invars:
                if _is_var(u) and u in vid and vid[u] not in ins:
                    ins.append(vid[u])
            self.eq_ins.append(ins)
        self.vals = vals
        n_e, n_v = len(self.eq_index), len(vals)
        self.n_e, self.n_v = n_e, n_v
        self.val_bytes = np.array([0.0 if v in zero_bytes else float(m * _nbytes(v))
                                   for v in vals], dtype=np.float64)
        self.val_need = np.array([v in need for v in vals], dtype=bool)
        self.val_costly = np.array([v in costly for v in vals], dtype=bool)
        invariant = level.invariant
        flops, recomputable, inv = [], [], []
        for i in self.eq_index:
            e = eqns[i]
            can = not e.effects and i not in self.child_at
            recomputable.append(can)
            inv.append(bool(can and invariant is not None and invariant(e)))
            flops.append(float(m) * eqn_flops(e) if can else 0.0)
        self.eq_flops = np.array(flops, dtype=np.float64)
        self.eq_recomputable = np.array(recomputable, dtype=bool)
        self.eq_invariant = np.array(inv, dtype=bool)
        self.val_prod = np.full(n_v, -1, np.int64)
        for a, outs in enumerate(self.eq_outs):
            self.val_prod[outs] = a
        self.local = local

    def build_edges(self, base: int):
        """Static edges with base node ``base`` (eqn nodes first, then values).

        Returns arrays (src, dst, rec_w, keep_w, inf) where an edge's capacity
        at price ``lam`` is ``rec_w + lam * keep_w``, or infinite.
        """
        src, dst, rec_w, keep_w, inf = [], [], [], [], []
        ve = base + self.n_e

        def add(a, b, r=0.0, k=0.0, infinite=False):
            src.append(a)
            dst.append(b)
            rec_w.append(r)
            keep_w.append(k)
            inf.append(infinite)

        for a in range(self.n_e):
            if self.eq_recomputable[a]:
                if self.eq_flops[a] > 0:
                    add(0, base + a, r=self.eq_flops[a])
            else:
                add(0, base + a, infinite=True)
            for o in self.eq_outs[a]:
                if self.eq_invariant[a]:
                    add(base + a, ve + o, infinite=True)
                elif self.val_bytes[o] > 0:
                    add(base + a, ve + o, k=self.val_bytes[o])
            for u in self.eq_ins[a]:
                add(ve + u, base + a, infinite=True)
        for v in range(self.n_v):
            if self.val_costly[v] and self.val_bytes[v] > 0:
                add(0, ve + v, k=self.val_bytes[v])
            if self.val_need[v]:
                add(ve + v, 1, infinite=True)
        self.base = base
        return (np.array(src, np.int64), np.array(dst, np.int64),
                np.array(rec_w, np.float64), np.array(keep_w, np.float64),
                np.array(inf, bool))

    def evaluate(self, rec_mask) -> tuple[float, float, list, np.ndarray]:
        """(kept bytes, recompute FLOPs, recomputed local equations, kept-value
        mask) of the plan that may recompute the equations in ``rec_mask`` (plus
        loop invariants): the walk of :func:`residuals.decide`."""
        needed = self.val_need.tolist()
        allowed = (np.asarray(rec_mask, bool) | self.eq_invariant) & self.eq_recomputable
        allowed = allowed.tolist()
        eq_outs, eq_ins = self.eq_outs, self.eq_ins
        rec = []
        for a in range(self.n_e - 1, -1, -1):
            if allowed[a]:
                outs = eq_outs[a]
                if any(needed[o] for o in outs):
                    rec.append(a)
                    for o in outs:
                        needed[o] = False
                    for u in eq_ins[a]:
                        needed[u] = True
        kept = np.array(needed, bool)
        nbytes = float(self.val_bytes[kept].sum()) if self.n_v else 0.0
        flops = float(sum(self.eq_flops[a] for a in rec if not self.eq_invariant[a]))
        return nbytes, flops, rec, kept

    def components(self, mask) -> list[list[int]]:
        """Connected groups of the local equations in ``mask`` (sharing values)."""
        parent = {a: a for a in np.flatnonzero(mask).tolist()}

        def find(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        producer = {}
        for a in parent:
            for o in self.eq_outs[a]:
                producer[o] = a
        for a in parent:
            for u in self.eq_ins[a]:
                b = producer.get(u)
                if b is not None:
                    ra, rb = find(a), find(b)
                    if ra != rb:
                        parent[ra] = rb
        groups: dict = {}
        for a in sorted(parent):
            groups.setdefault(find(a), []).append(a)
        return list(groups.values())


@dataclasses.dataclass
class _Plan:
    """A candidate plan: per level graph, a mask of the equations it may
    recompute (and, once evaluated, of the values it keeps)."""
    masks: list
    nbytes: float
    flops: float
    kept: list | None = None
    # A plan mixing two per-step plans of scans: for the scan level graph ``g``
    # in ``mix``, its first ``mix[g]`` steps (with everything nested in them)
    # follow ``alt``; the other steps, and the rest of the region, ``masks``.
    mix: dict | None = None
    alt: "_Plan | None" = None

    def key(self):
        return (round(self.nbytes, 3), round(self.flops, 3))


class _Model:
    """All levels of a region and the min-cut machinery over them."""

    def __init__(self, root: _Level):
        self.graphs: list[_LevelGraph] = []
        self.parent: list[int] = []
        stack = [(root, -1)]
        while stack:
            lev, parent = stack.pop()
            g = _LevelGraph(lev)
            self.parent.append(parent)
            self.graphs.append(g)
            stack.extend((c, len(self.graphs) - 1) for c in g.children)
        self.index = {id(g.level): k for k, g in enumerate(self.graphs)}
        # The subtree of each level: itself and the scans nested in it.
        self.subtree = [[k] for k in range(len(self.graphs))]
        for k in range(len(self.graphs) - 1, 0, -1):
            self.subtree[self.parent[k]].extend(self.subtree[k])
        self.top_scans = [k for k, p in enumerate(self.parent) if p == 0]
        base = 2
        parts = []
        for g in self.graphs:
            parts.append(g.build_edges(base))
            base += g.n_e + g.n_v
        self.n_nodes = base
        if parts:
            src, dst, rec_w, keep_w, inf = (np.concatenate(x) for x in zip(*parts))
        else:
            src = dst = np.zeros(0, np.int64)
            rec_w = keep_w = np.zeros(0)
            inf = np.zeros(0, bool)
        # Merge parallel edges once; per price only the capacities change.
        order = np.lexsort((dst, src))
        src, dst, rec_w, keep_w, inf = (x[order] for x in (src, dst, rec_w, keep_w, inf))
        flat = src * self.n_nodes + dst
        uniq, self._slot = np.unique(flat, return_inverse=True)
        self._rows, self._cols = uniq // self.n_nodes, uniq % self.n_nodes
        self._rec_w, self._keep_w, self._inf = rec_w, keep_w, inf
        self._n_slots = len(uniq)
        self.need_bytes = float(sum(g.val_bytes[g.val_need].sum() for g in self.graphs))
        self.invariant_flops = float(sum(g.eq_flops[g.eq_invariant].sum() for g in self.graphs))
        self.use_cut = self.n_nodes <= MAX_CUT_NODES
        self.evaluations = 0

    def evaluate(self, masks) -> _Plan:
        self.evaluations += 1
        nbytes = flops = 0.0
        kept = []
        for g, m in zip(self.graphs, masks):
            b, f, _, k = g.evaluate(m)
            nbytes += b
            flops += f
            kept.append(k)
        return _Plan(list(masks), nbytes, flops, kept)

    def level_costs(self, masks) -> list:
        return [g.evaluate(m)[:2] for g, m in zip(self.graphs, masks)]

    def nothing(self) -> _Plan:
        return self.evaluate([np.zeros(g.n_e, bool) for g in self.graphs])

    def everything(self) -> _Plan:
        return self.evaluate([g.eq_recomputable.copy() for g in self.graphs])

    def solve(self, lam: float) -> _Plan:
        """The plan of least ``lam * bytes + flops`` (``lam = inf``: fewest bytes),
        recomputing as little as possible among the optimal ones."""
        if not self.use_cut:
            return self._greedy(lam)
        from scipy import sparse
        from scipy.sparse import csgraph
        if math.isinf(lam):
            caps = self._keep_w.copy()
            bound = self.need_bytes
        else:
            caps = self._rec_w + lam * self._keep_w
            bound = lam * self.need_bytes + self.invariant_flops
        scale = _SCALE / bound if bound > 0 else 1.0
        scaled = np.minimum(np.rint(caps * scale), _INF)
        scaled[(caps > 0) & (scaled < 1)] = 1
        scaled[self._inf] = _INF
        slot_caps = np.minimum(np.bincount(self._slot, weights=scaled,
                                           minlength=self._n_slots), _INF).astype(np.int32)
        n = self.n_nodes
        cap = sparse.csr_array((slot_caps, (self._rows, self._cols)), shape=(n, n))
        flow = csgraph.maximum_flow(cap, 0, 1).flow
        resid = (cap - flow).tocsr()
        resid.data = (resid.data > 0).astype(np.int8)
        resid.eliminate_zeros()
        # Nodes that can still reach t must be on the sink side of every minimum
        # cut; putting only those there recomputes least.
        to_sink = csgraph.breadth_first_order(resid.T.tocsr(), 1, directed=True,
                                              return_predecessors=False)
        sink_side = np.zeros(n, bool)
        sink_side[to_sink] = True
        masks = [sink_side[g.base:g.base + g.n_e].copy() for g in self.graphs]
        return self.evaluate(masks)

    def _greedy(self, lam: float) -> _Plan:
        """Fallback for huge graphs: recompute an equation when its FLOPs cost
        less than keeping its outputs at price ``lam``."""
        masks = []
        for g in self.graphs:
            out_bytes = np.array([float(g.val_bytes[outs].sum()) if outs else 0.0
                                  for outs in g.eq_outs])
            if math.isinf(lam):
                masks.append(g.eq_recomputable.copy())
            else:
                masks.append(g.eq_recomputable & (g.eq_flops <= lam * out_bytes))
        return self.evaluate(masks)

    def policy_plan(self, recompute: Callable) -> _Plan:
        """The plan of a checkpoint policy applied at every level."""
        masks = []
        for g in self.graphs:
            eqns = g.level.joint.jaxpr.eqns
            masks.append(np.array([bool(g.eq_recomputable[a]) and recompute(eqns[i])
                                   for a, i in enumerate(g.eq_index)], bool))
        return self.evaluate(masks)


def _tie_price(a: _Plan, b: _Plan) -> float:
    """The price at which ``a`` (more bytes) and ``b`` (fewer bytes) cost the same."""
    db = a.nbytes - b.nbytes
    return max((b.flops - a.flops) / db, 0.0) if db > 0 else math.inf


class _Search:
    """Plans for budgets over one model, sharing the max-flows already solved."""

    def __init__(self, model: _Model):
        self.model = model
        self.none = model.nothing()          # keep all that is read: plain
        self.least = model.solve(math.inf)   # fewest bytes
        self.solved = {0.0: self.none, math.inf: self.least}

    def at(self, lam: float) -> _Plan:
        hit = self.solved.get(lam)
        if hit is None:
            hit = self.solved[lam] = self.model.solve(lam)
        return hit

    def bracket(self, budget: float) -> tuple[_Plan, _Plan | None]:
        """(best feasible hull vertex, the infeasible neighbour or None)."""
        if self.none.nbytes <= budget:
            return self.none, None
        lo, hi = self.least, self.none
        if lo.nbytes > budget:
            return lo, None
        for _ in range(64):
            lam = _tie_price(hi, lo)
            if not math.isfinite(lam):
                break
            p = self.at(lam)
            if p.key() in (lo.key(), hi.key()):
                break
            if p.nbytes <= budget:
                if p.flops < lo.flops or (p.flops == lo.flops and p.nbytes > lo.nbytes):
                    lo = p
                else:
                    break
            else:
                if p.nbytes < hi.nbytes:
                    hi = p
                else:
                    break
        return lo, hi

    def plan(self, budget: float) -> _Plan:
        """The best plan found within ``budget`` (falls back to the fewest bytes)."""
        lo, hi = self.bracket(budget)
        if hi is None or lo.nbytes > budget:
            return lo
        filled = self.fill(lo, hi, budget)
        options = [lo, filled]
        for root, a, b in ((lo, hi, lo), (hi, hi, lo), (filled, hi, filled)):
            m = self.mix(root, a, b, budget)
            if m is not None:
                options.append(m)
        fits = [p for p in options if p.nbytes <= budget]
        return min(fits, key=lambda p: (p.flops, -p.nbytes))

    def mix(self, root: _Plan, a: _Plan, b: _Plan, budget: float) -> _Plan | None:
        """Splits the steps of the region's scans between two per-step plans.

        A scan's body plan is the same in every step, so between two hull
        vertices that differ inside a scan of ``L`` steps there are ``L - 1``
        plans more: the first ``k`` steps planned like ``a`` (keeping more),
        the others like ``b``. Bytes and FLOPs are linear in ``k``, so these
        lie on the hull edge. The rest of the region follows ``root``; scans
        are filled greedily, the best FLOPs saved per byte first.
        """
        model = self.model
        costs_r = model.level_costs(root.masks)
        costs_a = model.level_costs(a.masks)
        costs_b = model.level_costs(b.masks)
        in_scan = set()
        for k in model.top_scans:
            in_scan.update(model.subtree[k])
        nbytes = sum(c[0] for k, c in enumerate(costs_r) if k not in in_scan)
        flops = sum(c[1] for k, c in enumerate(costs_r) if k not in in_scan)
        items = []
        for k in model.top_scans:
            sub = model.subtree[k]
            bb, fb = sum(costs_b[j][0] for j in sub), sum(costs_b[j][1] for j in sub)
            ba, fa = sum(costs_a[j][0] for j in sub), sum(costs_a[j][1] for j in sub)
            nbytes, flops = nbytes + bb, flops + fb
            if fa < fb:
                items.append((k, ba - bb, fa - fb))
        if not items or nbytes > budget:
            return None
        items.sort(key=lambda t: (t[2] / t[1]) if t[1] > 0 else -math.inf)
        steps = {}
        for k, dbytes, dflops in items:
            length = model.graphs[k].level.scan.length
            if dbytes <= 0:
                n = length
            else:
                n = min(length, int(math.floor((budget - nbytes) * length / dbytes + 1e-9)))
            if n <= 0:
                continue
            steps[k] = n
            nbytes += dbytes * n / length
            flops += dflops * n / length
        if not steps:
            return None
        masks = [m.copy() for m in root.masks]
        for k in model.top_scans:
            for j in model.subtree[k]:
                masks[j] = b.masks[j].copy()
        return _Plan(masks, nbytes, flops, None, steps, a)

    def fill(self, lo: _Plan, hi: _Plan, budget: float) -> _Plan:
        """The best plan found between ``lo`` (a hull vertex within the budget)
        and its neighbour ``hi`` (over it).

        Plans between two hull vertices are not hull vertices, so no price
        finds them (the knapsack part of the problem). When the values worth
        deciding about are few (those any solved plan keeps; a scan body has a
        handful), a local search over the kept set - add, remove or swap one
        value, evaluated exactly - starts from both vertices and keeps the best
        plan that fits. Otherwise (a deep unrolled net) the longest prefix in
        program order of ``hi``'s decisions that fits (keep like ``hi`` early in
        the program, recompute like ``lo`` later).
        """
        cands = self._candidates([lo, hi] + list(self.solved.values()))
        if 0 < len(cands) <= _LOCAL_SEARCH_VALUES:
            return self._local_search(cands, [lo, hi], budget, lo)
        return self._prefix(lo, hi, budget)

    def _candidates(self, plans) -> list:
        """(level, value) pairs kept by some plan, whose producer is recomputable."""
        out = []
        for k, g in enumerate(self.model.graphs):
            seen = np.zeros(g.n_v, bool)
            for p in plans:
                if p.kept is not None:
                    seen |= p.kept[k]
            prod = g.val_prod
            ok = seen & (prod >= 0) & (g.val_bytes > 0)
            ok[ok] &= g.eq_recomputable[prod[ok]]
            out += [(k, v) for v in np.flatnonzero(ok).tolist()]
        return out

    def _local_search(self, cands, starts, budget, fallback) -> _Plan:
        graphs = self.model.graphs
        by_level: dict = {}
        for c, (k, v) in enumerate(cands):
            by_level.setdefault(k, []).append(c)
        cache: dict = {}

        def level_eval(k, chosen):
            key = (k, chosen)
            hit = cache.get(key)
            if hit is None:
                g = graphs[k]
                mask = g.eq_recomputable.copy()
                prods = [g.val_prod[cands[c][1]] for c in chosen]
                mask[prods] = False
                hit = cache[key] = g.evaluate(mask)[:2] + (mask,)
            return hit

        levels = range(len(graphs))

        def evaluate(state):
            b = f = 0.0
            for k in levels:
                chosen = frozenset(c for c in by_level.get(k, ()) if c in state)
                lb, lf, _ = level_eval(k, chosen)
                b += lb
                f += lf
            return b, f

        def better(x, y):   # (bytes, flops) x better than y?
            fx, fy = x[0] <= budget, y[0] <= budget
            if fx != fy:
                return fx
            if not fx:
                return x[0] < y[0]
            return (x[1], x[0]) < (y[1], y[0])

        best_state, best_val = None, None
        all_c = frozenset(range(len(cands)))
        evals = 0
        for start in starts:
            state = frozenset(c for c, (k, v) in enumerate(cands)
                              if start.kept is not None and start.kept[k][v])
            val = evaluate(state)
            while evals < _LOCAL_SEARCH_EVALS:
                move = None
                for c in all_c - state:                    # keep one more
                    cand = evaluate(state | {c})
                    evals += 1
                    if better(cand, val) and (move is None or better(cand, move[1])):
                        move = (state | {c}, cand)
                for c in state:                            # keep one fewer
                    cand = evaluate(state - {c})
                    evals += 1
                    if better(cand, val) and (move is None or better(cand, move[1])):
                        move = (state - {c}, cand)
                if move is None:                           # swap one for another
                    for c in state:
                        for d in all_c - state:
                            cand = evaluate((state - {c}) | {d})
                            evals += 1
                            if better(cand, val) and (move is None or better(cand, move[1])):
                                move = ((state - {c}) | {d}, cand)
                if move is None:
                    break
                state, val = move
            if best_val is None or better(val, best_val):
                best_state, best_val = state, val
        if best_val is None or best_val[0] > budget or not better(
                best_val, (fallback.nbytes, fallback.flops)):
            return fallback
        masks = []
        for k in levels:
            chosen = frozenset(c for c in by_level.get(k, ()) if c in best_state)
            masks.append(level_eval(k, chosen)[2])
        return self.model.evaluate(masks)

    def _prefix(self, lo: _Plan, hi: _Plan, budget: float) -> _Plan:
        model = self.model
        cands = []
        for k, (ml, mh) in enumerate(zip(lo.masks, hi.masks)):
            cands += [(k, a) for a in np.flatnonzero(ml & ~mh).tolist()]
        best = lo
        lo_n, hi_n = 0, len(cands)
        while lo_n < hi_n:
            mid = (lo_n + hi_n + 1) // 2
            masks = [m.copy() for m in lo.masks]
            for k, a in cands[:mid]:
                masks[k][a] = False
            p = model.evaluate(masks)
            if p.nbytes <= budget:
                lo_n = mid
                if p.flops < best.flops:
                    best = p
            else:
                hi_n = mid - 1
        return best

    def hull(self) -> list[_Plan]:
        """The vertices of the lower convex hull (Eisner-Severance recursion)."""
        out = {self.none.key(): self.none, self.least.key(): self.least}
        stack = [(self.none, self.least)]
        steps = 0
        while stack and steps < 512:
            a, b = stack.pop()
            steps += 1
            lam = _tie_price(a, b)
            if not math.isfinite(lam) or a.nbytes - b.nbytes <= 0:
                continue
            p = self.at(lam)
            if p.key() in (a.key(), b.key()) or not (b.nbytes < p.nbytes < a.nbytes):
                continue
            out[p.key()] = p
            stack += [(a, p), (p, b)]
        return sorted(out.values(), key=lambda p: -p.nbytes)


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
            total += _nbytes(v)
    return total


@dataclasses.dataclass
class _Probe:
    root: _Level
    plain: Any               # the plain split of the probe's region joint
    plain_bytes: int
    model: _Model
    search: _Search
    search_seconds: float    # building the model (the traces excluded)


def _probe(jaxpr, consts, in_avals, active) -> _Probe:
    root = _Level(1)
    with _frame(root):
        root.begin_trace()
        joint = residuals.trace_joint(jaxpr, consts, in_avals, active)
    root.joint = joint
    plain = residuals.split_joint(joint)
    t0 = time.perf_counter()
    model = _Model(root)
    search = _Search(model)
    return _Probe(root, plain, _computed_bytes(plain), model, search,
                  time.perf_counter() - t0)


def _plan_tree(model: _Model, plan: _Plan) -> _Node:
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
    cacheable = trace.cache_enabled and not any(compat.is_tracer(c) for c in consts)
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
        lam = _tie_price(search.none, lo) if lo is not search.least else math.inf
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
    kept_rows = tuple(r for r in residuals.report_split(split, names)
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
    for plans in _state.collectors:
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
    """
    budget_bytes: int | None
    kept_bytes: int
    recompute_flops: float
    label: str = ""


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
        out = [f"memory plan of {self.name}: {self.plain_bytes:,} bytes of intermediates kept "
               f"without checkpointing, {self.min_bytes:,} at least; recomputing everything "
               f"costs {_fmt_flops(self.recompute_all_flops)} FLOPs "
               f"(planned in {self.seconds * 1e3:.0f} ms)",
               f"{'budget':>14s} {'kept bytes':>14s} {'kept/plain':>10s} "
               f"{'recompute FLOPs':>16s} {'of all':>7s}"]
        for p in self.points:
            out.append(self._row(f"{p.budget_bytes:,}", p))
        for name, p in self.policies.items():
            out.append(self._row(name, p))
        return "\n".join(out)

    def _row(self, head, p):
        frac = p.kept_bytes / self.plain_bytes if self.plain_bytes else 1.0
        share = p.recompute_flops / self.recompute_all_flops if self.recompute_all_flops else 0
        return (f"{head:>14s} {p.kept_bytes:14,d} {frac:10.3f} "
                f"{_fmt_flops(p.recompute_flops):>16s} {share:7.1%}")

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
        try:
            from matplotlib.figure import Figure
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("Plotting a memory plan needs matplotlib, an optional "
                              "dependency: pip install matplotlib") from err
        fig = None
        if ax is None:
            fig = Figure(figsize=(7.0, 4.6))
            ax = fig.add_subplot(1, 1, 1)
        mib = 2.0 ** 20
        hull = sorted(self.hull, key=lambda p: p.kept_bytes)
        ax.plot([p.kept_bytes / mib for p in hull], [p.recompute_flops / 1e6 for p in hull],
                color="#1f77b4", alpha=0.35, linewidth=1, label="convex hull")
        pts = sorted(self.points, key=lambda p: p.kept_bytes)
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
        figure = fig or ax.figure
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return ax


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
        bytes; 0 means the smallest plan) or ints (bytes). Default: 0, 0.05,
        ..., 1.
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
    traced = trace.trace_flat(fun, in_tree, leaves, static,
                              what=getattr(fun, "__name__", "fun"))
    closed = traced.closed
    in_avals = [v.aval for v in closed.jaxpr.invars]
    active = [True] * len(in_avals)
    probe = _probe(closed.jaxpr, closed.consts, in_avals, active)
    t1 = time.perf_counter()
    search = probe.search
    plain = probe.plain_bytes
    if budgets is None:
        budgets = [k / 20 for k in range(21)]
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
        points.append(PlanPoint(target, kept, 0.0 if p is search.none else p.flops))
    points.sort(key=lambda p: p.budget_bytes)
    hull = [PlanPoint(None, int(p.nbytes), p.flops) for p in search.hull()]
    hull[0] = PlanPoint(None, plain, 0.0)
    if policies is None:
        policies = _DEFAULT_POLICIES
    if not isinstance(policies, dict):
        policies = {n: getattr(jax.checkpoint_policies, n) for n in policies}
    from .remat import _saveable
    pol_points = {}
    for name, pol in policies.items():
        p = probe.model.policy_plan(lambda e, pol=pol: not _saveable(pol, e))
        pol_points[name] = PlanPoint(None, int(p.nbytes), p.flops, name)
    least = int(min(search.least.nbytes, plain))
    return MemoryPlan(getattr(fun, "__name__", "fun"), plain, least,
                      probe.model.everything().flops, points, hull, pol_points,
                      time.perf_counter() - t1, t1 - t0)
