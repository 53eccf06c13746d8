"""Control flow: scan and cond/switch (and fori_loop, which lowers to scan).

Reverse mode of a loop or a branch needs the backward sweep of its body as a
program to run inside a reverse ``lax.scan`` or the taken branch of a
``lax.switch``. We get it from :mod:`fbackprop._src.residuals`: our own forward
and backward sweeps over the body, traced together into one jaxpr and split
by data dependence into a forward part (what the outputs need) and a backward
part (everything else the cotangents need), with the residuals in between.

``scan`` - residual strategy: **save per-step body residuals.** The forward is
a ``lax.scan`` of the forward part that also emits, stacked over the steps,
the body values its backward part reads (for a checkpointed body: only what
the checkpoint policy keeps, i.e. by default just the body inputs). Residuals
that already exist outside the loop are not copied: a per-step residual that is
an ``xs`` slice or a ``ys`` output is read from the stacked array, a
loop-invariant one (a function of the scan's constants only) is recomputed in
the backward body instead of being stacked. The backward is a ``lax.scan`` in
the opposite direction whose carry holds the carry cotangents and the running
sums of the constants' cotangents, and whose outputs are the ``xs``
cotangents. Integer carries (loop counters) carry no cotangent; symbolic zero
output cotangents are made inside the backward body, never stacked. (The other
strategy, keeping only the per-step carries and recomputing the body in the
backward loop, is what a checkpointed body gives: ``lax.scan(jax.checkpoint(
body), ...)``.) Compiled memory against ``jax.grad``: tests/test_memory.py.
Inside a region planned for a memory budget (``fb.checkpoint(...,
memory_budget=...)``, :mod:`fbackprop._src.planning.memplan`) the plan chooses which
body values are stacked and which recomputed in every backward step, and may
run the scan as segments of steps planned differently.

``cond``/``switch`` - the branch index is a residual; each branch keeps its own
residuals, laid out in shared slots (one slot per shape/dtype per branch
position); the backward is a ``lax.switch`` running only the taken branch's
backward part.

``while_loop`` (and ``fori_loop`` with traced bounds) - see while_loop.py:
reverse mode by online checkpointing, and forward mode.

(The markers checkpointing uses have their rules with their families:
``checkpoint_name`` in rules/debug.py, ``optimization_barrier`` in structural.py.)
"""

from __future__ import annotations

import weakref
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import compat, context, residuals, trace
from ..engine import tangents as _forward
from ..registry import is_differentiable_dtype


def _differentiable(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


def _zeros(aval):
    # One broadcast of a literal zero (what jnp.zeros stages, without its
    # argument handling: loop bodies make many of these).
    return lax.broadcast_in_dim(np.zeros((), aval.dtype), tuple(aval.shape), ())


def _strong(x):
    """``x`` without a weak type, so branch outputs and loop carries agree."""
    return compat.with_weak_type(x, False)


def _is_var(v) -> bool:
    return type(v) is not compat.Literal and type(v) is not compat.DropVar



# ============================================================== stepped sweeps
# While a tool steps the sweeps (``context.steps``: fb.explain, fb.checked_grad)
# the handlers run each step of a scan, each branch of a cond, ... in place, so
# observers see every equation of a body with the step it ran in. Unrolling
# costs compile time in proportion to steps x body size, so larger loops and
# branches run as a whole.
UNROLL_LIMIT = 20_000          # equations (body size x steps) a stepped loop may unroll to


def unrolled_size(jaxpr) -> int:
    """Equations of ``jaxpr`` with every scan unrolled (sub-jaxprs counted)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        if eqn.primitive.name == "scan":
            n += eqn.params["length"] * unrolled_size(eqn.params["jaxpr"].jaxpr)
        else:
            n += sum(unrolled_size(sub) for sub in trace.sub_jaxprs(eqn))
    return n


def short_where(eqn) -> str:
    """``file.py:12``: an equation's source line without folders or function."""
    return compat.source_line(eqn).split(" (")[0].rsplit("/", 1)[-1]


_nonzero_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _jvp_out_nonzero(jaxpr, consts, in_avals, nonzero):
    """Which outputs of ``jaxpr`` get a nonzero tangent from the given inputs'
    (traced once per jaxpr and pattern, so nested loops do not re-trace)."""
    n = len(in_avals)
    nz_idx = [i for i in range(n) if nonzero[i] and _differentiable(in_avals[i])]
    key = (tuple(nz_idx), tuple((tuple(a.shape), a.dtype) for a in in_avals))
    per = _nonzero_cache.setdefault(jaxpr, {})
    if key in per:
        return per[key]
    cell = {}

    def f(*args):
        primals, ts = list(args[:n]), iter(args[n:])
        tangents = [next(ts) if i in nz_idx else None for i in range(n)]
        outs, touts = _forward.jvp_jaxpr(jaxpr, consts, primals, tangents)
        cell["nz"] = [t is not None for t in touts]
        return outs

    jax.make_jaxpr(f)(*[residuals.spec_of(a) for a in in_avals],
                      *[residuals.spec_of(in_avals[i], False) for i in nz_idx])
    per[key] = cell["nz"]
    return cell["nz"]
