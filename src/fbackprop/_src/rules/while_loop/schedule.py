"""The checkpointing schedule of a while loop's reversal: which loop states the
forward loop keeps without knowing the trip count, and where the backward loop
stores the states it recomputes.

Terms: the loop computes ``x_0 -> x_1 -> ... -> x_T``. The state ``x_0`` is the
loop's input (kept anyway), so it is free; ``S`` slots hold other states. The
backward needs, for ``t = T-1 ... 0``, the body's VJP at ``x_t``.

The backward loop: binomial placement (revolve)
------------------------------------------------
With the cotangent at ``x_g``, the backward loop takes the latest kept state
``x_a`` (``a < g``) and evaluates the body forward from it up to ``x_{g-1}``,
storing states in free slots on the way. Where the free slots go is Griewank's
binomial rule: reversing ``l`` steps from a kept state with ``s`` snapshots (the
kept state and ``s - 1`` free slots) takes at least ``t(l, s) = r*l - beta(s+1,
r-1)`` forward steps, ``beta(s, r) = C(s+r, s)``, ``r`` the least with
``beta(s, r) >= l`` (Griewank 1992; Griewank & Walther 2000), and a first stored
state at any ``m`` in ``[max(beta(s, r-2), l - beta(s-1, r)), min(beta(s, r-1),
l - beta(s-1, r-1))]`` attains it (:func:`split_point`; checked against the dynamic
program in tests/test_while_loop.py). Equinox's checkpointed while loop places
these states by bisection instead.

The forward loop: which states to keep without knowing ``T``
------------------------------------------------------------
Given the kept steps ``0 = c_0 < c_1 < ... < c_k`` the backward above costs
``T + sum_i t(c_{i+1} - c_i, S - i + 1)`` body evaluations (``c_{k+1} = T``):
gap ``i`` is reversed with the slots the later gaps have freed. The literature
keeps the states online with Stumm & Walther's algorithm (optimal while
``T <= (S+1)(S+2)/2``) and beyond that Wang, Moin & Iaccarino's minimal
repetition dynamic checkpointing (optimal *repetition number*, not total
work). We use a greedy rule on the cost itself (:func:`decide`): at iteration
``t`` (state ``x_t`` at hand) fill a free slot if there is one; otherwise
replace the kept state whose removal, together with keeping ``x_t``, lowers the
cost *if the loop stopped after this iteration*, when any does. Each
candidate's cost change splits into a part that changes only when a state is
kept (cached by :func:`gap_costs`, recomputed then, ``O(S)``) and a part of the
last gap (three scalar ``t`` evaluations per iteration). Against the offline
optimum (the best kept set knowing ``T``, a dynamic program, ``T <= 1200``) the
backward costs at most 6% more with 4 slots, 4% with 8, 3% with 16, 1% with 32
and nothing with 64; at ``T = 10^4`` it is within 0.1% of the lower bound
``t(T, S+1) + 1`` for 16 to 256 slots (:func:`reference_schedule`;
tests/test_while_loop.py). Equinox's checkpointed while loop (Stumm-Walther,
then Wang-Moin, and bisection in the backward) evaluates the body 20-75% more
often beyond ``(S+1)(S+2)/2`` steps, as ``python -m fbackprop bench --while``
counts.

Body evaluations in the backward per loop step (``S = 64``): 1.0 up to 65
steps, 1.35 at 100, 1.94 at 1,000, 2.77 at 10,000 (the lower bound is
``(t(T, S+1) + 1) / T``: 2.77 at 10,000).

The functions on arrays run inside the compiled loops
(:mod:`.programs`); :func:`reference_schedule` is the same rules in exact
Python arithmetic, for the tests and the benchmark.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax


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
def table(max_s: int) -> _Table:
    """The binomial table for up to ``max_s`` snapshots (one per slot count)."""
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


def split_point(tab: _Table, l, s):
    """Where the first new state goes when reversing ``l >= 3`` steps with
    ``s >= 2`` snapshots: the end of the binomially optimal interval."""
    r = _reps(tab, l, s)
    hi = jnp.minimum(_beta(tab, s, r - 1), _f32(l) - _beta(tab, s - 1, r - 1))
    return jnp.clip(hi.astype(jnp.int32), 1, jnp.maximum(l - 1, 1))


INF = np.float32(np.inf)
NEVER = np.int32(np.iinfo(np.int32).max)


def gap_costs(tab: _Table, S: int, k, ck):
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
    return A, jnp.where(i <= k - 2, E, INF)


def decide(tab: _Table, S: int, t, k, ck, A, E):
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


def keep(S: int, t, k, ck, order, p):
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
def cost_exact(l: int, s: int) -> int:
    """``t(l, s)`` (see :func:`_cost`) in exact arithmetic."""
    if l <= 1:
        return 0
    if s == 1:
        return l * (l - 1) // 2
    r = 0
    while math.comb(s + r, s) < l:
        r += 1
    return r * l - math.comb(s + r, s + 1)


def split_exact(l: int, s: int) -> int:
    """:func:`split_point` in exact arithmetic."""
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
        A[:] = [cost_exact(L[i], s[i]) for i in range(k)]
        B = [cost_exact(L[i], s[i] + 1) for i in range(k)]
        E.clear()
        for p in range(k - 1):
            E[p] = (cost_exact(L[p] + L[p + 1], s[p]) - A[p] - A[p + 1]
                    + sum(B[i] - A[i] for i in range(p + 2, k)))

    for t in range(1, T):
        k = len(c) - 1
        if k < S:
            c.append(t)
            refresh()
            continue
        lk = t + 1 - c[k]
        keep_cost = cost_exact(lk, 1)
        base = cost_exact(lk - 1, 2) - keep_cost
        best, pos = 0, None
        if E:
            p_mid = min(E, key=lambda p: (E[p], p))
            best, pos = E[p_mid] + base, p_mid
        d_last = cost_exact(c[k] - c[k - 1] + lk - 1, 2) - A[k - 1] - keep_cost
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
            nxt = a + split_exact(g - a, S - len(stack) + 1)
        while a + 1 < g:
            a += 1
            evals += 1
            if a == nxt:
                stack.append(a)
                nxt = (a + split_exact(g - a, S - len(stack) + 1)
                       if S - len(stack) >= 1 and g - a >= 3 else None)
        evals += 1
        g -= 1
        if stack and stack[-1] == g:
            stack.pop()
    return {"kept": kept, "backward_evals": evals,
            "lower_bound": cost_exact(T, S + 1) + 1 if T else 0}
