"""The solver behind memory-budget plans: level graphs, min-cut, search.

:mod:`fbackprop._src.planning.memplan` explains the problem and the algorithm; this
module holds the machinery: the FLOP estimates of equations, one
:class:`LevelGraph` per level of a region (the region, each scan body) with
its cut-graph edges, the :class:`Model` over all levels (max-flow with SciPy,
evaluation of a plan, policies as plans) and the :class:`Search` (breakpoints
of the Lagrangian, the local search between hull vertices, plans that split a
scan's steps, the lower convex hull).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable

import numpy as np

from .. import compat, residuals, trace


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


def nbytes(v) -> int:
    aval = v.aval
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


# The forward loops of scans planned inside a region carry this tag in their name stack.
TAG = "fbackprop_plan_scan"
_TAG = TAG


def last_tag(eqn) -> str | None:
    text = str(getattr(eqn.source_info, "name_stack", ""))
    k = text.rfind(_TAG)
    if k < 0:
        return None
    end = k + len(_TAG)
    while end < len(text) and text[end].isdigit():
        end += 1
    return text[k:end]


# ================================================================ the model
class LevelGraph:
    """One level's forward part as arrays: equations, values, costs, the
    values the backward reads, and the static edges of the cut graph."""

    def __init__(self, level):
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
                child = by_tag.get(last_tag(e))
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
        self.val_bytes = np.array([0.0 if v in zero_bytes else float(m * nbytes(v))
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


@dataclasses.dataclass
class Plan:
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
    alt: "Plan | None" = None

    def key(self):
        return (round(self.nbytes, 3), round(self.flops, 3))


class Model:
    """All levels of a region and the min-cut machinery over them."""

    def __init__(self, root):
        self.graphs: list[LevelGraph] = []
        self.parent: list[int] = []
        stack = [(root, -1)]
        while stack:
            lev, parent = stack.pop()
            g = LevelGraph(lev)
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

    def evaluate(self, masks) -> Plan:
        self.evaluations += 1
        nbytes = flops = 0.0
        kept = []
        for g, m in zip(self.graphs, masks):
            b, f, _, k = g.evaluate(m)
            nbytes += b
            flops += f
            kept.append(k)
        return Plan(list(masks), nbytes, flops, kept)

    def level_costs(self, masks) -> list:
        return [g.evaluate(m)[:2] for g, m in zip(self.graphs, masks)]

    def nothing(self) -> Plan:
        return self.evaluate([np.zeros(g.n_e, bool) for g in self.graphs])

    def everything(self) -> Plan:
        return self.evaluate([g.eq_recomputable.copy() for g in self.graphs])

    def solve(self, lam: float) -> Plan:
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

    def _greedy(self, lam: float) -> Plan:
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

    def policy_plan(self, recompute: Callable) -> Plan:
        """The plan of a checkpoint policy applied at every level."""
        masks = []
        for g in self.graphs:
            eqns = g.level.joint.jaxpr.eqns
            masks.append(np.array([bool(g.eq_recomputable[a]) and recompute(eqns[i])
                                   for a, i in enumerate(g.eq_index)], bool))
        return self.evaluate(masks)


def tie_price(a: Plan, b: Plan) -> float:
    """The price at which ``a`` (more bytes) and ``b`` (fewer bytes) cost the same."""
    db = a.nbytes - b.nbytes
    return max((b.flops - a.flops) / db, 0.0) if db > 0 else math.inf


class Search:
    """Plans for budgets over one model, sharing the max-flows already solved."""

    def __init__(self, model: Model):
        self.model = model
        self.none = model.nothing()          # keep all that is read: plain
        self.least = model.solve(math.inf)   # fewest bytes
        self.solved = {0.0: self.none, math.inf: self.least}

    def at(self, lam: float) -> Plan:
        hit = self.solved.get(lam)
        if hit is None:
            hit = self.solved[lam] = self.model.solve(lam)
        return hit

    def bracket(self, budget: float) -> tuple[Plan, Plan | None]:
        """(best feasible hull vertex, the infeasible neighbour or None)."""
        if self.none.nbytes <= budget:
            return self.none, None
        lo, hi = self.least, self.none
        if lo.nbytes > budget:
            return lo, None
        for _ in range(64):
            lam = tie_price(hi, lo)
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

    def plan(self, budget: float) -> Plan:
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

    def mix(self, root: Plan, a: Plan, b: Plan, budget: float) -> Plan | None:
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
        return Plan(masks, nbytes, flops, None, steps, a)

    def fill(self, lo: Plan, hi: Plan, budget: float) -> Plan:
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

    def _local_search(self, cands, starts, budget, fallback) -> Plan:
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

    def _prefix(self, lo: Plan, hi: Plan, budget: float) -> Plan:
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

    def hull(self) -> list[Plan]:
        """The vertices of the lower convex hull (Eisner-Severance recursion)."""
        out = {self.none.key(): self.none, self.least.key(): self.least}
        stack = [(self.none, self.least)]
        steps = 0
        while stack and steps < 512:
            a, b = stack.pop()
            steps += 1
            lam = tie_price(a, b)
            if not math.isfinite(lam) or a.nbytes - b.nbytes <= 0:
                continue
            p = self.at(lam)
            if p.key() in (a.key(), b.key()) or not (b.nbytes < p.nbytes < a.nbytes):
                continue
            out[p.key()] = p
            stack += [(a, p), (p, b)]
        return sorted(out.values(), key=lambda p: -p.nbytes)


