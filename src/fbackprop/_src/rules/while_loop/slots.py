"""How many loop states ("slots") a reversed while loop keeps, and who asks.

``DEFAULT_SLOTS`` (64; fewer when 64 copies of the loop state would exceed
``DEFAULT_SLOT_BYTES``, at least 8): recompute below 2x up to ~1,000 steps and
below 3x at 10,000. A checkpoint region sets it for the loops it contains:
``fb.checkpoint(fun, while_loop_checkpoints=n)`` directly, or
``fb.checkpoint(fun, memory_budget=b)``, which gives each loop
``b // (bytes of one loop state)`` slots (for a fraction ``b``, that fraction
of the default count). The region's handler (rules/remat.py) reads the request
off the region's policy (:func:`unwrap_policy`) and puts it in the sweep
context (``SweepContext.while_slots``) while it sweeps the region; the loops
read it there (:func:`slot_count`).

:func:`stats` collects what each loop reversal did (trip count, slots, body
evaluations in its backward loop), for the benchmark and the tests.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np

from ... import context
from ...planning import memplan

DEFAULT_SLOTS = 64
DEFAULT_SLOT_BYTES = 256 * 2 ** 20
MIN_DEFAULT_SLOTS = 8
MAX_BUDGET_SLOTS = 1024


def default_slots(slot_bytes: int) -> int:
    """The default number of slots for a loop state of ``slot_bytes`` bytes."""
    if slot_bytes <= 0 or DEFAULT_SLOTS * slot_bytes <= DEFAULT_SLOT_BYTES:
        return DEFAULT_SLOTS
    return max(MIN_DEFAULT_SLOTS, DEFAULT_SLOT_BYTES // slot_bytes)


def slot_count(slot_bytes: int, where: str) -> int:
    """The slots of a loop whose state is ``slot_bytes`` bytes (the loop at
    ``where``), as the enclosing checkpoint region asks (the default without
    one)."""
    request = context.current().while_slots
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
    when it carries none; see ``SweepContext.while_slots``) and the policy the
    region's other values follow."""
    if isinstance(policy, WhileLoopCheckpoints):
        inner = policy.inner
        if inner is None:
            inner = jax.checkpoint_policies.everything_saveable
        return ("count", policy.count), inner
    if isinstance(policy, memplan.MemoryBudget):
        return ("budget", policy.budget), policy
    return None, policy


# ------------------------------------------------------------------ statistics
@contextlib.contextmanager
def stats():
    """Collects one ``dict`` per loop reversal run while the block is active:
    ``trip_count``, ``slots``, ``backward_evals`` (body evaluations in the
    backward loop) and ``where``. Values arrive when the program runs (under
    ``jax.jit``: when the compiled program executes). Loops inside checkpoint
    regions or other loops' bodies are not reported."""
    sink: list = []
    with context.using(while_stats=context.current().while_stats + (sink,)):
        yield sink


def report(trip_count, evals, slots: int, where: str) -> None:
    """Sends a reversal's figures to the :func:`stats` blocks in force, when the
    program runs."""
    ctx = context.current()
    # Not from inside a joint trace (a checkpoint region's, a loop body's): a
    # callback is an effect, which would tie the backward part to the forward
    # part there.
    if not ctx.while_stats or ctx.in_place:
        return
    sinks = ctx.while_stats

    def send(T, e):
        for t_, e_ in zip(np.ravel(T).tolist(), np.ravel(e).tolist()):
            for sink in sinks:
                sink.append({"trip_count": t_, "slots": slots, "backward_evals": e_,
                             "where": where})
    jax.debug.callback(send, trip_count, evals)
