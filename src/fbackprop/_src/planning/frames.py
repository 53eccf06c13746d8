"""The planner's frames in the sweep context, and the hook the scan handler calls.

While :mod:`fbackprop._src.planning.memplan` plans a region, each scan the
region's sweeps meet is keyed by its frame (a ``_Level`` in the probe pass, a
``_Node`` in the apply pass) and split per step as the plan says
(:func:`scan_hook`). The lists receiving the plans made (``saved_residuals``)
and the dicts receiving recomputed-equation marks (``explain``) are fields of
the sweep context too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import jax

from .. import compat, residuals
from .. import context
from . import memcut


# ============================================================ planning context
# The planner's frames (a _Level in the probe pass, a _Node in the apply pass),
# the lists receiving the plans made (saved_residuals) and the dicts receiving
# recomputed-equation marks (explain) are fields of the sweep context.
_tags = itertools.count()
_TAG = memcut.TAG


@contextlib.contextmanager
def _frame(frame):
    ctx = context.current()
    with context.using(planning=ctx.planning + (frame,), cache=False):
        yield frame


def planning() -> bool:
    """Whether a memory-budget plan is being made (nested checkpoints inline then)."""
    return bool(context.current().planning)


@contextlib.contextmanager
def collecting():
    """Collects the region plans made (or reused) while the block runs."""
    plans: list = []
    ctx = context.current()
    with context.using(collectors=ctx.collectors + (plans,), cache=False):
        yield plans


@contextlib.contextmanager
def explaining():
    """While active, checkpoint regions are swept in place (so ``fb.explain``
    sees their equations) and the equations their backward recomputes are
    recorded in the yielded dict: ``id(eqn) -> note``."""
    marks: dict = {}
    with context.using(explain_marks=context.current().explain_marks + (marks,)):
        yield marks


def explain_marks():
    """The innermost dict of :func:`explaining`, or None."""
    marks = context.current().explain_marks
    return marks[-1] if marks else None


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
        apply-pass trace). It mirrors the probe's trace equation by equation,
        unless a scan in it now runs as segments; then equations are matched by
        the user frame that emitted them, primitive and occurrence."""
        if self.level is None or not self.recompute:
            return set()
        eqns = joint.jaxpr.eqns
        probe = self.level.joint.jaxpr.eqns
        if len(eqns) == len(probe) and all(
                eqns[i].primitive is probe[i].primitive for i in self.recompute):
            return {id(eqns[i]) for i in self.recompute}

        def keys(es):
            seen, out = {}, []
            for e in es:
                k = (id(e.source_info.traceback), e.primitive.name)
                seen[k] = seen.get(k, -1) + 1
                out.append(k + (seen[k],))
            return out

        where = {k: j for j, k in enumerate(keys(eqns))}
        probe_keys = keys(probe)
        ids = set()
        for i in self.recompute:
            j = where.get(probe_keys[i])
            if j is None:
                self.mismatch = True
            else:
                ids.add(id(eqns[j]))
        return ids


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
    frames = context.current().planning
    if not frames:
        return None
    frame = frames[-1]
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
