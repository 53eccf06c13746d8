"""Reverse mode of ``lax.while_loop`` (and ``lax.fori_loop`` with traced bounds).

A while loop's trip count is known only when it has run, so the values each
iteration's backward step needs cannot be laid out in advance; JAX refuses to
reverse it. fbackprop reverses it by **online checkpointing**: the forward loop
keeps copies of the loop state ("slots") at a few iterations, and the backward
sweep, itself a loop, restores the nearest kept state and recomputes forward from
it. Memory is the ``S`` slots plus one iteration's residuals, whatever the trip
count; time is a few body evaluations per iteration.

Terms: the loop computes ``x_0 -> x_1 -> ... -> x_T``. The state ``x_0`` is the
loop's input (kept anyway), so it is free; ``S`` slots hold other states. The
backward needs, for ``t = T-1 ... 0``, the body's VJP at ``x_t``.

The backward loop (one iteration per loop step, ``T`` in all)
-----------------------------------------------------------
With the cotangent at ``x_g``: take the latest kept state ``x_a`` (``a < g``),
evaluate the body forward from it up to ``x_{g-1}`` (an inner ``while_loop``),
storing states in free slots on the way, then run the body's forward and
backward sweeps at ``x_{g-1}`` (our own sweeps over the body jaxpr, traced once
into a *joint* jaxpr, :func:`residuals.trace_joint`) to get the cotangent at
``x_{g-1}`` and the loop constants' cotangents, which accumulate. A kept state
whose step is reached is dropped, freeing its slot. Where the free slots go is
Griewank's binomial rule (revolve): reversing ``l`` steps from a kept state with
``s`` snapshots (the kept state and ``s - 1`` free slots) takes at least
``t(l, s) = r*l - beta(s+1, r-1)`` forward steps, ``beta(s, r) = C(s+r, s)``,
``r`` the least with ``beta(s, r) >= l`` (Griewank 1992; Griewank & Walther
2000), and a first stored state at any ``m`` in
``[max(beta(s, r-2), l - beta(s-1, r)), min(beta(s, r-1), l - beta(s-1, r-1))]``
attains it (checked against the dynamic program in tests/test_while_loop.py).
Equinox's checkpointed while loop places these states by bisection instead.

The forward loop: which states to keep without knowing ``T``
----------------------------------------------------------------
Given the kept steps ``0 = c_0 < c_1 < ... < c_k`` the backward above costs
``T + sum_i t(c_{i+1} - c_i, S - i + 1)`` body evaluations (``c_{k+1} = T``):
gap ``i`` is reversed with the slots the later gaps have freed. The literature
keeps the states online with Stumm & Walther's algorithm (optimal while
``T <= (S+1)(S+2)/2``) and beyond that Wang, Moin & Iaccarino's minimal
repetition dynamic checkpointing (optimal *repetition number*, not total
work). We use a greedy rule on the cost itself: at iteration ``t`` (state
``x_t`` at hand) fill a free slot if there is one; otherwise replace the kept
state whose removal, together with keeping ``x_t``, lowers the cost *if the loop
stopped after this iteration*, when any does. Each candidate's cost change
splits into a part that changes only when a state is kept (cached, recomputed
then, ``O(S)``) and a part of the last gap (three scalar ``t`` evaluations per
iteration). Against the offline optimum (the best kept set knowing ``T``, a
dynamic program, ``T <= 1200``) the backward costs at most 6% more with 4
slots, 4% with 8, 3% with 16, 1% with 32 and nothing with 64; at ``T = 10^4``
it is within 0.1% of the lower bound ``t(T, S+1) + 1`` for 16 to 256 slots
(:func:`reference_schedule`; tests/test_while_loop.py). Equinox's
checkpointed while loop (Stumm-Walther, then Wang-Moin, and bisection in the
backward) evaluates the body 20-75% more often beyond ``(S+1)(S+2)/2``
steps, as ``python -m fbackprop bench --while`` counts.

Body evaluations in the backward per loop step (``S = 64``): 1.0 up to 65
steps, 1.35 at 100, 1.94 at 1,000, 2.77 at 10,000 (the lower bound is
``(t(T, S+1) + 1) / T``: 2.77 at 10,000).

Activity, constants, zero cost when nothing is differentiated
---------------------------------------------------------------
A carry is differentiated when its initial value is, or when the body makes it
so from a differentiated constant or carry (a fixpoint, as for ``scan``);
integer carries and values behind ``stop_gradient`` carry no cotangent. A
carry the body passes through unchanged (``fori_loop``'s upper bound) is never
copied into a slot. The loop constants' cotangents are summed over the
iterations in the backward loop's carry. A loop with no differentiated carry is
bound as it is. The cond's constants never get a cotangent (it returns a bool).

The number of slots
-------------------
``DEFAULT_SLOTS`` (64; fewer when 64 copies of the loop state would exceed
``DEFAULT_SLOT_BYTES``, at least 8): recompute below 2x up to ~1,000 steps and
below 3x at 10,000. A checkpoint region sets it for the loops it contains:
``fb.checkpoint(fun, while_loop_checkpoints=n)`` directly, or
``fb.checkpoint(fun, memory_budget=b)``, which gives each loop
``b // (bytes of one loop state)`` slots (for a fraction ``b``, that fraction
of the default count). The request travels in a ``contextvars.ContextVar`` set
by the region's handler while it sweeps the region.

Eager calls
-----------
Called eagerly, the trip count is concrete, and the alternative is recording
every iteration (:class:`SteppedWhile`: one op-by-op forward sweep per iteration
and one backward sweep each, memory ``T`` times the residuals). The compiled
loops cost two dispatches once compiled, but they are traced and compiled per
body jaxpr, and a loop's body is usually a closure made afresh in each call
(then every call compiles, about a second); recording costs the body's
operations times ``T`` dispatches and no compilation. So eager calls record,
up to ``EAGER_RECORD_EQNS`` body equations and ``EAGER_RECORD_BYTES`` of loop
states, and run the compiled loops beyond that, or when they exist already for
the loop (``python -m fbackprop bench --while`` measures both). The numbers are
the same either way. Inside a compiled eager program (fbackprop's eager engine
compiles programs that repeat) the values are traced, and the compiled loops
run.

Loops this cannot reverse
-------------------------
A body or cond with side effects (``jax.debug.print``, callbacks, RNG state):
the backward would run them again. The error names the loop's source line.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, tree_util

from .. import compat, residuals, reverse
from .. import forward as _forward
from ..registry import (call_handlers_forward, call_handlers_reverse, is_differentiable_dtype,
                        nondiff_primitives)
from .control import _jvp_out_nonzero, _scan_joint


def _differentiable(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


def _is_var(v) -> bool:
    return type(v) is not compat.Literal and type(v) is not compat.DropVar


def _zeros(aval):
    return lax.broadcast_in_dim(np.zeros((), aval.dtype), tuple(aval.shape), ())


def _strong(x):
    return compat.with_weak_type(x, False)


def _like(xs, avals):
    """``xs`` with the weak types of ``avals`` (loop carries must keep their types)."""
    return [compat.with_weak_type(x, bool(getattr(a, "weak_type", False)))
            for x, a in zip(xs, avals)]


# ============================================================ the slot count
DEFAULT_SLOTS = 64
DEFAULT_SLOT_BYTES = 256 * 2 ** 20
MIN_DEFAULT_SLOTS = 8
MAX_BUDGET_SLOTS = 1024

# ---------------------------------------------------------------------------
# The slots requested by the enclosing checkpoint region, while fbackprop sweeps
# it: None (the default), ("count", n) or ("budget", bytes or fraction). One
# small context value, local to this feature; it belongs in the engine's sweep
# context when there is one.
_slots_request: contextvars.ContextVar = contextvars.ContextVar(
    "fbackprop_while_loop_slots", default=None)
# ---------------------------------------------------------------------------

# While set (a list), each loop reversal reports (trip count, slots, body
# evaluations in the backward, loop source) into it: for benchmarks and tests.
_stats_sink: contextvars.ContextVar = contextvars.ContextVar(
    "fbackprop_while_loop_stats", default=None)


def default_slots(slot_bytes: int) -> int:
    """The default number of slots for a loop state of ``slot_bytes`` bytes."""
    if slot_bytes <= 0 or DEFAULT_SLOTS * slot_bytes <= DEFAULT_SLOT_BYTES:
        return DEFAULT_SLOTS
    return max(MIN_DEFAULT_SLOTS, DEFAULT_SLOT_BYTES // slot_bytes)


def _slots(slot_bytes: int, where: str) -> int:
    request = _slots_request.get()
    if request is None:
        return default_slots(slot_bytes)
    kind, value = request
    if kind == "count":
        return value
    if isinstance(value, float):
        return max(1, int(math.floor(value * default_slots(slot_bytes) + 1e-9)))
    if slot_bytes > value:
        raise ValueError(
            f"fb.checkpoint(memory_budget={value}): the lax.while_loop at {where} needs "
            f"at least one saved copy of its loop state, {slot_bytes:,} bytes, to be "
            f"reversed. Use memory_budget >= {slot_bytes} (or while_loop_checkpoints=n "
            f"to set the number of saved states directly).")
    return int(min(MAX_BUDGET_SLOTS, max(1, value // max(slot_bytes, 1))))


def request_key():
    """The current request (hashable): part of the cache key of joint traces,
    whose while loops depend on it."""
    return _slots_request.get()


@contextlib.contextmanager
def stats():
    """Collects one ``dict`` per loop reversal run while the block is active:
    ``trip_count``, ``slots``, ``backward_evals`` (body evaluations in the
    backward loop) and ``where``. Values arrive when the program runs (under
    ``jax.jit``: when the compiled program executes). Loops inside checkpoint
    regions or other loops' bodies are not reported."""
    sink: list = []
    token = _stats_sink.set(sink)
    try:
        yield sink
    finally:
        _stats_sink.reset(token)


class WhileLoopCheckpoints:
    """A checkpoint policy carrying the number of saved loop states for the
    ``lax.while_loop`` calls in its region (``fb.checkpoint(...,
    while_loop_checkpoints=n)``). As a JAX policy it is ``inner`` (or
    ``everything_saveable`` when there is none)."""
    __slots__ = ("count", "inner", "__weakref__")

    def __init__(self, count, inner=None):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(
                f"checkpoint: `while_loop_checkpoints` must be an int >= 1 (the number of "
                f"loop states a lax.while_loop in the region keeps for its backward "
                f"sweep), got {count!r}.")
        self.count = int(count)
        self.inner = inner

    def __call__(self, *args, **kwargs):
        if self.inner is None:
            return True
        return self.inner(*args, **kwargs)

    def _key(self):
        return (self.count, self.inner)

    def __eq__(self, other):
        return type(other) is WhileLoopCheckpoints and other._key() == self._key()

    def __hash__(self):
        return hash(("fbackprop.while_loop_checkpoints",) + self._key())

    def __repr__(self):
        return f"while_loop_checkpoints({self.count}, {self.inner!r})"


def unwrap_policy(policy):
    """``(request, policy)``: the slot request a region's policy carries (None
    when it carries none) and the policy the region's other values follow."""
    from .. import memplan
    if isinstance(policy, WhileLoopCheckpoints):
        inner = policy.inner
        if inner is None:
            inner = jax.checkpoint_policies.everything_saveable
        return ("count", policy.count), inner
    if isinstance(policy, memplan.MemoryBudget):
        return ("budget", policy.budget), policy
    return None, policy


@contextlib.contextmanager
def region(request):
    """While active, loops take their slot count from ``request`` (see
    :func:`unwrap_policy`); ``None`` leaves the enclosing request in force."""
    if request is None:
        yield
        return
    token = _slots_request.set(request)
    try:
        yield
    finally:
        _slots_request.reset(token)


# ============================================================= the schedule
# Binomial numbers beta(s, r) = C(s + r, s) for the schedule arithmetic. For
# s <= 2 they have closed forms (r + 1 and (r+1)(r+2)/2); rows s >= 3 are a
# small float32 table: row s holds beta(s, 0..) up to the first entry >= _L_MAX
# (padded with +inf), and its prefix sums sum_{j<r} beta(s, j) = beta(s+1, r-1)
# (the hockey-stick identity), which give t(l, s) directly. The least r with
# beta(s, r) >= l is then the number of row entries below l: no search loop.
# The arithmetic is exact for gaps shorter than _L_MAX; longer ones are still
# reversed correctly (positions are clamped into range), only possibly less
# economically.
_L_MAX = 2 ** 20


class _Table:
    def __init__(self, max_s: int):
        rows = {}
        for s in range(3, max_s + 1):
            row, r = [], 0
            while True:
                row.append(math.comb(s + r, s))
                if row[-1] >= _L_MAX:
                    break
                r += 1
            rows[s] = row
        longest = max([len(r) for r in rows.values()] + [1])
        # Rows are searched in two steps (which block of `block` entries, then
        # where in it), so no [lanes, width] comparison is ever materialized.
        self.block = block = max(1, int(math.ceil(math.sqrt(longest))))
        width = block * int(math.ceil(longest / block))
        beta = np.full((max_s + 1, width), np.inf, np.float64)
        pref = np.zeros((max_s + 1, width + 1), np.float64)
        for s, row in rows.items():
            beta[s, :len(row)] = row
            pref[s, 1:len(row) + 1] = np.cumsum(row)
            pref[s, len(row) + 1:] = pref[s, len(row)]
        self.beta = beta.astype(np.float32)
        self.block_last = self.beta[:, block - 1::block]      # each block's largest entry
        self.pref = pref.astype(np.float32)
        self.width = width


@functools.lru_cache(maxsize=32)
def _table(max_s: int) -> _Table:
    return _Table(max_s)


def _f32(x):
    return lax.convert_element_type(x, np.float32)


def _reps2(l):
    """Least ``r`` with ``(r+1)(r+2)/2 >= l``: the root of the quadratic, then
    one correction step each way for rounding."""
    l = jnp.minimum(l, _L_MAX)
    r = jnp.maximum(jnp.ceil((jnp.sqrt(_f32(8 * l + 1)) - 3) / 2).astype(jnp.int32), 0)
    r = jnp.where((r + 1) * (r + 2) // 2 < l, r + 1, r)
    return jnp.where((r >= 1) & (r * (r + 1) // 2 >= l), r - 1, r)


def _count_below(tab: _Table, l, s):
    """The number of entries of row ``s >= 3`` below ``l``: the least ``r`` with
    ``beta(s, r) >= l``."""
    lf = _f32(l)[..., None]
    blocks = jnp.sum(jnp.asarray(tab.block_last)[s] < lf, axis=-1, dtype=jnp.int32)
    idx = jnp.minimum(blocks[..., None] * tab.block + jnp.arange(tab.block, dtype=jnp.int32),
                      tab.width - 1)
    inner = jnp.sum(jnp.asarray(tab.beta)[s[..., None], idx] < lf, axis=-1, dtype=jnp.int32)
    return blocks * tab.block + inner


def _reps(tab: _Table, l, s):
    """Least ``r`` with ``beta(s, r) >= l`` (``s >= 2``, ``l >= 1``)."""
    return jnp.where(s == 2, _reps2(l), _count_below(tab, l, jnp.maximum(s, 3)))


def _beta(tab: _Table, s, r):
    """``beta(s, r)`` (``s >= 1``; 0 for ``r < 0``), as float32."""
    row = jnp.asarray(tab.beta)[jnp.maximum(s, 3), jnp.clip(r, 0, tab.width - 1)]
    rf = _f32(r)
    val = jnp.where(s == 1, rf + 1, jnp.where(s == 2, (rf + 1) * (rf + 2) / 2, row))
    return jnp.where(r < 0, np.float32(0), val)


def _cost1(l):
    """``t(l, 1) = l (l - 1) / 2``."""
    lf = _f32(l)
    return jnp.where(l <= 1, np.float32(0), lf * (lf - 1) / 2)


def _cost2(l):
    """``t(l, 2) = r l - C(r + 2, 3)``."""
    r = _f32(_reps2(l))
    return jnp.where(l <= 1, np.float32(0), r * _f32(l) - r * (r + 1) * (r + 2) / 6)


def _cost(tab: _Table, l, s):
    """``t(l, s) = r l - beta(s + 1, r - 1)``: forward steps to reverse ``l``
    steps with ``s >= 2`` snapshots."""
    s3 = jnp.maximum(s, 3)
    r = _count_below(tab, l, s3)
    pref = jnp.asarray(tab.pref)[s3, jnp.minimum(r, tab.width)]
    general = jnp.where(l <= 1, np.float32(0), _f32(r) * _f32(l) - pref)
    return jnp.where(s == 2, _cost2(l), general)


def _split(tab: _Table, l, s):
    """Where the first new state goes when reversing ``l >= 3`` steps with
    ``s >= 2`` snapshots: the end of the binomially optimal interval."""
    r = _reps(tab, l, s)
    hi = jnp.minimum(_beta(tab, s, r - 1), _f32(l) - _beta(tab, s - 1, r - 1))
    return jnp.clip(hi.astype(jnp.int32), 1, jnp.maximum(l - 1, 1))


_INF = np.float32(np.inf)
_NEVER = np.int32(np.iinfo(np.int32).max)


def _gap_costs(tab: _Table, S: int, k, ck):
    """The cached part of the greedy rule after a state was kept: ``A[i]`` the
    cost of complete gap ``i`` and ``E[p]`` the cost change of dropping the
    kept state at position ``p`` (apart from the last gap's terms)."""
    i = jnp.arange(S, dtype=jnp.int32)
    prev = jnp.concatenate([jnp.zeros((1,), jnp.int32), ck[:-1]])
    valid = i < k
    L = jnp.where(valid, ck - prev, 0)
    s = S - i + 1
    L_next = jnp.concatenate([L[1:], jnp.zeros((1,), jnp.int32)])
    # The three costs per position in one vectorized evaluation: gap i as it is,
    # gap i with one more snapshot, gaps i and i + 1 merged.
    costs = _cost(tab, jnp.concatenate([L, L, L + L_next]), jnp.concatenate([s, s + 1, s]))
    A = jnp.where(valid, costs[:S], 0)
    B = jnp.where(valid, costs[S:2 * S], 0)
    suffix = jnp.cumsum(jnp.where(valid, B - A, 0)[::-1])[::-1]
    after = jnp.concatenate([suffix[2:], jnp.zeros((2,), jnp.float32)])[:S]
    A_next = jnp.concatenate([A[1:], jnp.zeros((1,), jnp.float32)])
    E = costs[2 * S:] - A - A_next + after
    return A, jnp.where(i <= k - 2, E, _INF)


def _decide(tab: _Table, S: int, t, k, ck, A, E):
    """Whether iteration ``t`` keeps its state, and which kept state it replaces
    (``-1``: a free slot)."""
    append = (t >= 1) & (k < S)
    last = ck[S - 1]
    lk = t + 1 - last
    keep_cost = _cost1(lk)
    base = _cost2(lk - 1) - keep_cost
    p_mid = jnp.argmin(E).astype(jnp.int32)
    d_mid = E[p_mid] + base
    prev = ck[S - 2] if S >= 2 else jnp.int32(0)
    d_last = _cost2(last - prev + lk - 1) - A[S - 1] - keep_cost
    use_last = d_last < d_mid
    d = jnp.where(use_last, d_last, d_mid)
    p = jnp.where(use_last, S - 1, p_mid)
    evict = (t >= 1) & (k == S) & (d < 0)
    return append | evict, jnp.where(evict, p, -1)


def _keep(S: int, t, k, ck, order, p):
    """The kept steps (in step order) and slot ids after keeping step ``t``:
    appended (``p = -1``) or replacing position ``p``."""
    idx = jnp.arange(S, dtype=jnp.int32)
    src = jnp.minimum(jnp.where(idx >= p, idx + 1, idx), S - 1)
    freed = order[jnp.maximum(p, 0)]
    ck_e = ck[src].at[S - 1].set(t)
    order_e = order[src].at[S - 1].set(freed)
    ck_a = ck.at[jnp.minimum(k, S - 1)].set(t)
    evict = p >= 0
    return (jnp.where(evict, k, k + 1), jnp.where(evict, ck_e, ck_a),
            jnp.where(evict, order_e, order))


# -------------------------------------------------- the reference, in Python
def _t_exact(l: int, s: int) -> int:
    if l <= 1:
        return 0
    if s == 1:
        return l * (l - 1) // 2
    r = 0
    while math.comb(s + r, s) < l:
        r += 1
    return r * l - math.comb(s + r, s + 1)


def _split_exact(l: int, s: int) -> int:
    r = 0
    while math.comb(s + r, s) < l:
        r += 1
    b = lambda s_, r_: 0 if r_ < 0 else math.comb(s_ + r_, s_)  # noqa: E731
    return min(max(1, min(b(s, r - 1), l - b(s - 1, r - 1))), l - 1)


def reference_schedule(trip_count: int, slots: int) -> dict:
    """The schedule of a loop reversal, computed in Python (the same rules as
    the compiled loops, in exact arithmetic).

    Returns:
      ``{"kept": steps kept at the end of the forward loop, "backward_evals":
      body evaluations in the backward loop, "lower_bound": the fewest any
      schedule with this many slots needs}``.
    """
    T, S = int(trip_count), int(slots)
    c = [0]
    A: list = []
    E: dict = {}

    def refresh():
        k = len(c) - 1
        L = [c[i + 1] - c[i] for i in range(k)]
        s = [S - i + 1 for i in range(k)]
        A[:] = [_t_exact(L[i], s[i]) for i in range(k)]
        B = [_t_exact(L[i], s[i] + 1) for i in range(k)]
        E.clear()
        for p in range(k - 1):
            E[p] = (_t_exact(L[p] + L[p + 1], s[p]) - A[p] - A[p + 1]
                    + sum(B[i] - A[i] for i in range(p + 2, k)))

    for t in range(1, T):
        k = len(c) - 1
        if k < S:
            c.append(t)
            refresh()
            continue
        lk = t + 1 - c[k]
        keep = _t_exact(lk, 1)
        base = _t_exact(lk - 1, 2) - keep
        best, pos = 0, None
        if E:
            p_mid = min(E, key=lambda p: (E[p], p))
            best, pos = E[p_mid] + base, p_mid
        d_last = _t_exact(c[k] - c[k - 1] + lk - 1, 2) - A[k - 1] - keep
        if pos is None or d_last < best:
            best, pos = d_last, k - 1
        if best < 0:
            del c[pos + 1]
            c.append(t)
            refresh()
    kept = c[1:]
    # The backward loop, as the compiled one runs it.
    stack, evals, g = list(kept), 0, T
    while g > 0:
        a = stack[-1] if stack else 0
        nxt = None
        if S - len(stack) >= 1 and g - a >= 3:
            nxt = a + _split_exact(g - a, S - len(stack) + 1)
        while a + 1 < g:
            a += 1
            evals += 1
            if a == nxt:
                stack.append(a)
                nxt = (a + _split_exact(g - a, S - len(stack) + 1)
                       if S - len(stack) >= 1 and g - a >= 3 else None)
        evals += 1
        g -= 1
        if stack and stack[-1] == g:
            stack.pop()
    return {"kept": kept, "backward_evals": evals,
            "lower_bound": _t_exact(T, S + 1) + 1 if T else 0}


# ========================================================== the handler
class _Unsupported:
    """A loop whose reversal raises when a cotangent reaches it."""

    def __init__(self, message):
        self.message = message


tree_util.register_pytree_node(_Unsupported, lambda u: ((), u.message),
                               lambda m, _: _Unsupported(m))


@dataclasses.dataclass(eq=False)
class _Programs:
    """The forward and backward loops of one body, slot count and activity."""
    forward: object
    backward: object
    slots: int
    n_carry: int
    n_bconsts: int
    stored: tuple          # per carry: copied into the slots (not passed through)
    carry_active: tuple
    const_nz: tuple        # body constants whose cotangents accumulate
    where: str


@dataclasses.dataclass
class _Kept:
    """What the forward loop leaves for the backward loop."""
    programs: _Programs
    trip_count: object
    k: object
    steps: object
    order: object
    slots: list
    bconst_start: int      # where the body's constants start in the record's inputs


tree_util.register_pytree_node(
    _Kept, lambda s: ((s.trip_count, s.k, s.steps, s.order, s.slots),
                      (s.programs, s.bconst_start)),
    lambda aux, ch: _Kept(aux[0], *ch, aux[1]))


def _carry_activity(jaxpr, in_active):
    """Activity by a walk over the body (no tracing): for loops that are not
    reversed (side effects), only to say which outputs would need a cotangent."""
    active = {v for v, a in zip(jaxpr.invars, in_active) if a and _differentiable(v.aval)}
    for e in jaxpr.eqns:
        if e.primitive.name in nondiff_primitives:
            continue
        if any(_is_var(v) and v in active for v in e.invars):
            active.update(v for v in e.outvars if _is_var(v) and _differentiable(v.aval))
    return [_is_var(v) and v in active for v in jaxpr.outvars]


def _nbytes(aval) -> int:
    # (``dtype.itemsize`` covers extended dtypes too, e.g. PRNG keys.)
    return int(np.prod(aval.shape, dtype=np.int64)) * int(aval.dtype.itemsize)


_programs_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # body jaxpr -> cond ids


_scalar_pred_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scalar_predicate(eqn):
    """A ``while`` whose cond returns a batch of booleans (what ``vmap`` of a loop
    with a batched condition makes: it runs while any is true, and a carry
    element changes only while its own condition holds) as a loop with one
    boolean: the body selects, per element, the new or the old carry, so
    finished elements are left as they are and get the identity's derivative.

    Returns ``eqn`` unchanged when its cond returns one boolean; otherwise an
    equation over ``(cond consts, cond consts + body consts, carry)``: its body
    reads the cond's constants too (they decide the selection; no cotangent
    reaches them through a boolean).
    """
    p = eqn.params
    cond_closed, body_closed = p["cond_jaxpr"], p["body_jaxpr"]
    if not cond_closed.jaxpr.outvars[0].aval.shape:
        return eqn
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    per = _scalar_pred_cache.setdefault(body_closed.jaxpr, {})
    hit = per.get(id(cond_closed.jaxpr))
    if hit is None or hit[0] is not cond_closed:
        c_avals = [v.aval for v in cond_closed.jaxpr.invars[:cn]]
        b_avals = [v.aval for v in body_closed.jaxpr.invars[:bn]]
        k_avals = [v.aval for v in body_closed.jaxpr.invars[bn:]]

        def pred_of(cconsts, carry):
            return compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts, *cconsts,
                                     *carry)[0]

        def cond(*args):
            return jnp.any(pred_of(args[:cn], args[cn:]))

        def body(*args):
            cconsts, bconsts, carry = args[:cn], args[cn:cn + bn], args[cn + bn:]
            pred = pred_of(cconsts, carry)
            new = compat.eval_jaxpr(body_closed.jaxpr, body_closed.consts, *bconsts, *carry)
            return [lax.select(lax.broadcast_in_dim(pred, jnp.shape(x), tuple(range(pred.ndim))),
                               y, x) for y, x in zip(_like(new, k_avals), carry)]

        spec = residuals.spec_of
        new_cond = jax.make_jaxpr(cond)(*map(spec, c_avals + k_avals))
        new_body = jax.make_jaxpr(body)(*map(spec, c_avals + b_avals + k_avals))
        hit = per[id(cond_closed.jaxpr)] = (cond_closed, new_cond, new_body)
    _, new_cond, new_body = hit
    invars = list(eqn.invars)
    return eqn.replace(
        invars=invars[:cn] + invars[:cn + bn] + invars[cn + bn:],
        params=dict(p, cond_jaxpr=new_cond, body_jaxpr=new_body, body_nconsts=cn + bn))


class WhileCall:
    """Reverse mode of ``lax.while_loop`` by online checkpointing (module doc)."""

    def forward(self, eqn, invals, active):
        scalar = _scalar_predicate(eqn)
        if scalar is not eqn:
            cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            invals = list(invals[:cn]) + list(invals[:cn + bn]) + list(invals[cn + bn:])
            active = list(active[:cn]) + list(active[:cn + bn]) + list(active[cn + bn:])
            outs, sub, out_active = self._forward(scalar, invals, active)
            if isinstance(sub, _Kept):
                sub.bconst_start = 0      # its body constants are the record's first inputs
            return outs, sub, out_active
        return self._forward(eqn, invals, active)

    def _forward(self, eqn, invals, active):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        body_closed, cond_closed = p["body_jaxpr"], p["cond_jaxpr"]
        body = body_closed.jaxpr
        nk = len(body.outvars)
        b_active = list(active[cn:])
        if body.effects or cond_closed.jaxpr.effects:
            carry_active = [bool(a) for a in b_active[bn:]]
            while True:
                out = _carry_activity(body, b_active[:bn] + carry_active)
                new = [a or b for a, b in zip(carry_active, out)]
                if new == carry_active:
                    break
                carry_active = new
            which = "body" if body.effects else "cond"
            effects = ", ".join(sorted(str(e) for e in
                                       (body.effects or cond_closed.jaxpr.effects)))
            message = (
                f"fbackprop cannot reverse the lax.while_loop at {compat.source_line(eqn)}: "
                f"its {which} has side effects ({effects}). The backward sweep of a while "
                f"loop recomputes iterations from saved loop states, which would run the "
                f"side effects again. Take them out of the loop (e.g. return the values "
                f"and print them after it), or, if the loop has a known bound, write it "
                f"as lax.scan or lax.fori_loop with static bounds, whose reverse mode "
                f"keeps every step instead of recomputing.")
            return (compat.bind_eqn(eqn, invals), _Unsupported(message),
                    [a and _differentiable(v.aval) for a, v in zip(carry_active, eqn.outvars)])
        in_avals = [v.aval for v in body.invars]
        joint, carry_active = _scan_joint(body, body_closed.consts, in_avals, b_active, bn, nk)
        if not any(carry_active):
            return compat.bind_eqn(eqn, invals), None, [False] * nk
        programs = self._programs(eqn, joint, carry_active, in_avals)
        with compat.user_context(eqn):
            outs = programs.forward(list(invals))
        carry_out = outs[:nk]
        T, k, steps, order = outs[nk:nk + 4]
        kept = _Kept(programs, T, k, steps, order, list(outs[nk + 4:]), cn)
        return carry_out, kept, [a and _differentiable(v.aval)
                                 for a, v in zip(carry_active, eqn.outvars)]

    def backward(self, record, cts_out):
        kept = record.sub
        if isinstance(kept, _Unsupported):
            raise ValueError(kept.message)
        prog = kept.programs
        p = record.eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        nk = prog.n_carry
        start, n_bconsts = kept.bconst_start, prog.n_bconsts
        out_avals = [v.aval for v in record.eqn.outvars]
        act = [k for k in range(nk) if prog.carry_active[k]]
        ct0 = [_strong(cts_out[k]) if cts_out[k] is not None else _zeros(out_avals[k])
               for k in act]
        bconsts = list(record.invals[start:start + n_bconsts])
        init = list(record.invals[cn + bn:])
        with compat.user_context(record.eqn):
            outs = prog.backward(bconsts + init + [kept.trip_count, kept.k, kept.steps,
                                                   kept.order] + list(kept.slots) + ct0)
        ct_init, accs, evals = outs[:len(act)], outs[len(act):-1], outs[-1]
        sink = _stats_sink.get()
        # Not from inside a joint trace (a checkpoint region's, a loop body's):
        # a callback is an effect, which would tie the backward part to the
        # forward part there.
        if sink is not None and not reverse._in_place:
            where, slots = prog.where, prog.slots
            def report(T, e):
                for t_, e_ in zip(np.ravel(T).tolist(), np.ravel(e).tolist()):
                    sink.append({"trip_count": t_, "slots": slots, "backward_evals": e_,
                                 "where": where})
            jax.debug.callback(report, kept.trip_count, evals)
        result = [None] * len(record.invals)
        for i, acc in zip(prog.const_nz, accs):
            result[start + i] = acc
        for k, ct in zip(act, ct_init):
            result[cn + bn + k] = ct
        return [c if a else None for c, a in zip(result, record.active)]

    # -------------------------------------------------------------- programs
    def _programs(self, eqn, joint, carry_active, in_avals) -> _Programs:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        body_closed, cond_closed = p["body_jaxpr"], p["cond_jaxpr"]
        body = body_closed.jaxpr
        nk = len(body.outvars)
        stored = tuple(not (body.outvars[k] is body.invars[bn + k]) for k in range(nk))
        slot_bytes = sum(_nbytes(in_avals[bn + k]) for k in range(nk) if stored[k])
        where = compat.source_line(eqn)
        S = int(_slots(slot_bytes, where))
        const_nz = tuple(i for i in joint.ct_in_nonzero if i < bn)
        cond_avals = [v.aval for v in cond_closed.jaxpr.invars[:cn]]
        key = (S, tuple(carry_active), tuple(residuals._aval_key(a) for a in in_avals),
               tuple(residuals._aval_key(a) for a in cond_avals), id(cond_closed.jaxpr))
        consts = list(joint.consts) + list(body_closed.consts) + list(cond_closed.consts)
        cacheable = not any(compat.is_tracer(c) for c in consts)
        per = _programs_cache.setdefault(joint, {}) if cacheable else {}
        hit = per.get(key)
        if hit is not None and hit[0] is cond_closed:
            return hit[1]
        fwd = _forward_program(cn, bn, body_closed, cond_closed, S, stored)
        bwd = _backward_program(bn, body_closed, joint, S, stored, carry_active, const_nz)
        if cacheable:
            fwd = compat.StagedFunction(fwd, False, "while_forward")
            bwd = compat.StagedFunction(bwd, False, "while_backward")
        programs = _Programs(fwd, bwd, S, nk, bn, stored, tuple(carry_active), const_nz, where)
        if cacheable:
            per[key] = (cond_closed, programs)
            _built.setdefault(body_closed.jaxpr, set()).add(id(cond_closed.jaxpr))
        return programs

    @staticmethod
    def has_programs(eqn) -> bool:
        """Whether compiled loops exist for this loop's body and cond already."""
        p = _scalar_predicate(eqn).params
        return id(p["cond_jaxpr"].jaxpr) in _built.get(p["body_jaxpr"].jaxpr, ())


def _forward_program(cn, bn, body_closed, cond_closed, S, stored):
    """``(cond consts, body consts, init) -> (final carry, T, k, steps, order,
    *slots)``: the loop, keeping states in ``S`` slots by the greedy rule."""
    body, cond = body_closed.jaxpr, cond_closed.jaxpr
    nk = len(body.outvars)
    tab = _table(S + 2)
    carry_avals = [v.aval for v in body.invars[bn:]]

    def run(args):
        cconsts, bconsts, init = args[:cn], args[cn:cn + bn], args[cn + bn:]
        # One spare slot (index S) takes the writes of iterations that keep
        # nothing: every iteration writes unconditionally, which XLA does in
        # place (a conditional write that reads the old slot makes it copy).
        # (Broadcast from the initial value rather than zeros: PRNG keys and
        # other extended dtypes have no zeros.)
        slots0 = [jnp.broadcast_to(init[k], (S + 1,) + tuple(carry_avals[k].shape))
                  for k in range(nk) if stored[k]]
        state0 = (jnp.int32(0), list(init), jnp.int32(0), jnp.zeros((S,), jnp.int32),
                  jnp.arange(S, dtype=jnp.int32), jnp.zeros((S,), jnp.float32),
                  jnp.full((S,), _INF, jnp.float32), slots0)

        def cond_fn(state):
            return compat.eval_jaxpr(cond, cond_closed.consts, *cconsts, *state[1])[0]

        def body_fn(state):
            t, x, k, ck, order, A, E, slots = state
            save, pos = _decide(tab, S, t, k, ck, A, E)
            k2, ck2, order2 = _keep(S, t, k, ck, order, pos)
            sid = order2[jnp.clip(k2 - 1, 0, S - 1)]
            xs = [xi for xi, st in zip(x, stored) if st]
            slots = [lax.dynamic_update_index_in_dim(buf, xi, jnp.where(save, sid, S), 0)
                     for buf, xi in zip(slots, xs)]
            A, E = lax.cond(save, lambda: _gap_costs(tab, S, k2, ck2), lambda: (A, E))
            new = _like(compat.eval_jaxpr(body, body_closed.consts, *bconsts, *x),
                        carry_avals)
            return (t + 1, new, jnp.where(save, k2, k), jnp.where(save, ck2, ck),
                    jnp.where(save, order2, order), A, E, slots)

        T, x, k, ck, order, _, _, slots = lax.while_loop(cond_fn, body_fn, state0)
        return list(x) + [T, k, ck, order] + list(slots)
    return run


def _backward_program(bn, body_closed, joint, S, stored, carry_active, const_nz):
    """``(body consts, init, T, k, steps, order, *slots, *carry cts) -> (init
    cts, constant cts, body evaluations)``: the reverse loop (module doc)."""
    body = body_closed.jaxpr
    nk = len(body.outvars)
    tab = _table(S + 2)
    in_avals = [v.aval for v in body.invars]
    carry_avals = in_avals[bn:]
    act = [k for k in range(nk) if carry_active[k]]
    n_stored = sum(stored)
    nonzero = joint.ct_in_nonzero
    ct_outputs = joint.ct_outputs

    def next_state(a, g, free):
        l = g - a
        m = _split(tab, jnp.maximum(l, 3), jnp.maximum(free + 1, 2))
        return jnp.where((free >= 1) & (l >= 3), a + m, _NEVER)

    def run(args):
        bconsts, init = list(args[:bn]), list(args[bn:bn + nk])
        T, k0, steps0, order = args[bn + nk:bn + nk + 4]
        slots0 = list(args[bn + nk + 4:bn + nk + 4 + n_stored])
        ct0 = list(args[bn + nk + 4 + n_stored:])
        accs0 = [_zeros(in_avals[i]) for i in const_nz]

        def restore(slots, sid, has):
            it = iter(slots)
            x = []
            for kk in range(nk):
                if stored[kk]:
                    buf = next(it)
                    x.append(jnp.where(has, lax.dynamic_index_in_dim(buf, sid, 0, False),
                                       init[kk]))
                else:
                    x.append(init[kk])
            return _like(x, carry_avals)

        def outer_cond(state):
            return state[0] > 0

        def outer_body(state):
            g, k, steps, slots, ct, accs, evals = state
            has = k >= 1
            top = jnp.maximum(k - 1, 0)
            a0 = jnp.where(has, steps[top], 0)
            x0 = restore(slots, order[top], has)

            def inner_cond(st):
                return st[0] + 1 < g

            def inner_body(st):
                a, x, k, steps, slots, nxt, evals = st
                # Where the next state goes: planned on entry and after each store.
                nxt = lax.cond(nxt < 0, lambda: next_state(a, g, S - k), lambda: nxt)
                x = _like(compat.eval_jaxpr(body, body_closed.consts, *bconsts, *x),
                          carry_avals)
                a = a + 1
                push = a == nxt
                pos = jnp.minimum(k, S - 1)
                sid = order[pos]
                xs = [xi for xi, st_ in zip(x, stored) if st_]
                slots = [lax.dynamic_update_index_in_dim(buf, xi, jnp.where(push, sid, S), 0)
                         for buf, xi in zip(slots, xs)]
                steps = jnp.where(push, steps.at[pos].set(a), steps)
                return (a, x, jnp.where(push, k + 1, k), steps, slots,
                        jnp.where(push, -1, nxt), evals + 1)

            a, x, k, steps, slots, _, evals = lax.while_loop(
                inner_cond, inner_body, (a0, x0, k, steps, slots, jnp.int32(-1), evals))
            # One step back: our own sweeps over the body at x_{g-1}.
            ct_of = dict(zip(act, ct))
            cts = [ct_of[o] if o in ct_of else _zeros(carry_avals[o]) for o in ct_outputs]
            outs = compat.eval_jaxpr(joint.jaxpr, joint.consts, *bconsts, *x, *cts)
            cts_in = dict(zip(nonzero, outs[joint.n_out:]))
            new_ct = [_strong(cts_in[bn + kk]) if bn + kk in cts_in
                      else _zeros(carry_avals[kk]) for kk in act]
            accs = [lax.add(acc, _strong(cts_in[i]).astype(acc.dtype))
                    for acc, i in zip(accs, const_nz)]
            g = g - 1
            pop = (k >= 1) & (steps[jnp.maximum(k - 1, 0)] == g)
            return g, jnp.where(pop, k - 1, k), steps, slots, new_ct, accs, evals + 1

        _, _, _, _, ct, accs, evals = lax.while_loop(
            outer_cond, outer_body, (T, k0, steps0, slots0, ct0, accs0, jnp.int32(0)))
        return list(ct) + list(accs) + [evals]
    return run




# ================================================== one sweep per iteration
@dataclasses.dataclass
class _Steps:
    """The tapes of a loop swept iteration by iteration (a pytree of their values)."""
    tapes: list
    where: str
    start: int
    n_b: int
    body: object


tree_util.register_pytree_node(
    _Steps, lambda s: ((s.tapes,), (s.where, s.start, s.n_b, s.body)),
    lambda aux, ch: _Steps(ch[0], *aux))


class SteppedWhile:
    """Reverse mode of a while loop whose values are concrete, as one in-place
    forward sweep of the body per iteration (kept, like a Python loop under
    ``jax.grad``) and one backward sweep each, with ``enter("while", i, where)``
    / ``exit()`` notices around them: what tools that watch the sweeps (the
    NaN checker, ``fb.explain``) need to name the iteration. The same numbers as
    :class:`WhileCall`; memory grows with the trip count.

    Falls back to ``whole`` (the checkpointed handler) when the values are
    traced (the trip count is unknown), when the body has side effects, or once
    the iterations recorded exceed ``max_eqns`` body equations or ``max_bytes``
    of loop states (the loop is then run again as a whole). With
    ``prefer_compiled``, a loop whose compiled loops exist already runs them.
    """

    def __init__(self, whole, max_eqns: int | None = None, max_bytes: int | None = None,
                 prefer_compiled: bool = False, where=None):
        self.whole = whole
        self.max_eqns = max_eqns
        self.max_bytes = max_bytes
        self.prefer_compiled = prefer_compiled
        self.where = where or compat.source_line

    def evaluate(self, eqn, invals):
        return compat.bind_eqn(eqn, invals)

    def forward(self, eqn, invals, active):
        p = eqn.params
        body_closed = p["body_jaxpr"]
        if (any(compat.is_tracer(x) for x in invals) or not compat.is_eager()
                or body_closed.jaxpr.effects or p["cond_jaxpr"].jaxpr.effects
                or (self.prefer_compiled and self.whole.has_programs(eqn))):
            outs, sub, out_act = self.whole.forward(eqn, invals, active)
            return outs, ("whole", sub), out_act
        scalar = _scalar_predicate(eqn)
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        start, n_b = cn, bn
        whole_args = (eqn, list(invals), list(active))
        if scalar is not eqn:
            invals = list(invals[:cn]) + list(invals[:cn + bn]) + list(invals[cn + bn:])
            active = list(active[:cn]) + list(active[:cn + bn]) + list(active[cn + bn:])
            start, n_b = 0, cn + bn
        sp = scalar.params
        cond_closed, body_closed = sp["cond_jaxpr"], sp["body_jaxpr"]
        body = body_closed.jaxpr
        cconsts, bconsts = list(invals[:cn]), list(invals[cn:cn + n_b])
        b_act, k_act = list(active[cn:cn + n_b]), list(active[cn + n_b:])
        carry = list(invals[cn + n_b:])
        where = self.where(eqn)
        tapes, size, nbytes = [], 0, 0
        n_eqns = max(1, len(body.eqns))
        state_bytes = sum(_nbytes(v.aval) for v in body.invars[n_b:])
        while bool(np.asarray(compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts,
                                                *cconsts, *carry)[0])):
            size += n_eqns
            nbytes += state_bytes
            if (self.max_eqns is not None and size > self.max_eqns) or (
                    self.max_bytes is not None and nbytes > self.max_bytes):
                outs, sub, out_act = self.whole.forward(*whole_args)
                return outs, ("whole", sub), out_act
            i = len(tapes)
            reverse.notify("enter", "while", i, where)
            try:
                carry, tape = reverse.forward(body, body_closed.consts, bconsts + carry,
                                              b_act + k_act)
            finally:
                reverse.notify("exit")
            carry = list(carry)
            k_act = [a or b for a, b in zip(k_act, tape.out_active)]
            tapes.append(tape)
        out_act = [a and _differentiable(v.aval) for a, v in zip(k_act, eqn.outvars)]
        return carry, ("steps", _Steps(tapes, where, start, n_b, body)), out_act

    def backward(self, record, cts_out):
        kind, sub = record.sub
        if kind == "whole":
            return self.whole.backward(dataclasses.replace(record, sub=sub), cts_out)
        tapes, where, start, n_b, body = sub.tapes, sub.where, sub.start, sub.n_b, sub.body
        p = record.eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        ct = list(cts_out)
        const_parts: list = [[] for _ in range(n_b)]
        for i in range(len(tapes) - 1, -1, -1):
            reverse.notify("enter", "while", i, where)
            try:
                reverse.notify("seed", body.outvars, ct)
                cts_in = reverse.backward(tapes[i], ct)
                reverse.notify("end_sweep", body, cts_in)
            finally:
                reverse.notify("exit")
            for j in range(n_b):
                if cts_in[j] is not None:
                    const_parts[j].append(cts_in[j])
            ct = list(cts_in[n_b:])
        result = [None] * len(record.invals)
        for j, parts in enumerate(const_parts):
            total = None
            for c in parts:
                total = c if total is None else lax.add(total, c)
            if len(parts) > 1:
                reverse.notify("link", total, parts)
            if total is not None:
                prev = result[start + j]
                result[start + j] = total if prev is None else lax.add(prev, total)
        for k, c in enumerate(ct):
            result[cn + bn + k] = c
        return [c if a else None for c, a in zip(result, record.active)]


# Called eagerly, a loop is recorded iteration by iteration up to this size
# (body equations x iterations, and bytes of loop states kept): with the body's
# closures made afresh in each call (the usual way), the compiled loops would be
# traced and compiled again in every call, which costs more than sweeping that
# many equations op by op. Longer loops, and loops compiled already, run the
# compiled checkpointed loops (memory bounded). `python -m fbackprop bench
# --while` measures both.
EAGER_RECORD_EQNS = 20_000
EAGER_RECORD_BYTES = 256 * 2 ** 20

_checkpointed = WhileCall()
call_handlers_reverse["while"] = SteppedWhile(
    _checkpointed, max_eqns=EAGER_RECORD_EQNS, max_bytes=EAGER_RECORD_BYTES,
    prefer_compiled=True)


def stepped(max_eqns: int | None, where=None) -> SteppedWhile:
    """A handler that sweeps each iteration of a loop with concrete values in
    place (for tools that watch the sweeps), up to ``max_eqns`` body equations;
    ``where(eqn)`` names the loop in the ``enter`` notices."""
    return SteppedWhile(_checkpointed, max_eqns=max_eqns, where=where)


# ============================================================== forward mode
def _while_jvp(eqn, invals, tangents):
    """Forward mode of ``lax.while_loop``: the loop carries primals and tangents."""
    scalar = _scalar_predicate(eqn)
    if scalar is not eqn:
        cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        eqn = scalar
        invals = list(invals[:cn]) + list(invals[:cn + bn]) + list(invals[cn + bn:])
        tangents = list(tangents[:cn]) + list(tangents[:cn + bn]) + list(tangents[cn + bn:])
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_closed, body_closed = p["cond_jaxpr"], p["body_jaxpr"]
    body = body_closed.jaxpr
    in_avals = [v.aval for v in body.invars]
    nz = [t is not None and _differentiable(a) for t, a in zip(tangents[cn:], in_avals)]
    while True:
        out_nz = _jvp_out_nonzero(body, body_closed.consts, in_avals, nz)
        new = nz[:bn] + [a or b for a, b in zip(nz[bn:], out_nz)]
        if new == nz:
            break
        nz = new
    cconsts, bconsts = list(invals[:cn]), list(invals[cn:cn + bn])
    bconst_t = [tangents[cn + i] if nz[i] else None for i in range(bn)]
    carry_nz = [k for k in range(len(in_avals) - bn) if nz[bn + k]]
    init_t = [_strong(tangents[cn + bn + k]) if tangents[cn + bn + k] is not None
              else _zeros(in_avals[bn + k]) for k in carry_nz]
    n_carry = len(in_avals) - bn

    def cond_fn(state):
        carry, _ = state
        return compat.eval_jaxpr(cond_closed.jaxpr, cond_closed.consts, *cconsts, *carry)[0]

    def body_fn(state):
        carry, ts = state
        t_carry = [None] * n_carry
        for k, t in zip(carry_nz, ts):
            t_carry[k] = t
        outs, touts = _forward.jvp_jaxpr(body, body_closed.consts, bconsts + list(carry),
                                         bconst_t + t_carry)
        return list(outs), [_strong(touts[k]) if touts[k] is not None
                            else _zeros(in_avals[bn + k]) for k in carry_nz]

    with compat.user_context(eqn):
        carry, carry_t = lax.while_loop(cond_fn, body_fn, (list(invals[cn + bn:]), init_t))
    touts = [None] * n_carry
    for k, t in zip(carry_nz, carry_t):
        touts[k] = t
    return list(carry), touts


call_handlers_forward["while"] = _while_jvp
