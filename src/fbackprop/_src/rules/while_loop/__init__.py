"""Reverse mode of ``lax.while_loop`` (and ``lax.fori_loop`` with traced bounds).

A while loop's trip count is known only when it has run, so the values each
iteration's backward step needs cannot be laid out in advance; JAX refuses to
reverse it. fbackprop reverses it by **online checkpointing**: the forward loop
keeps copies of the loop state ("slots") at a few iterations, and the backward
sweep, itself a loop, restores the nearest kept state and recomputes forward from
it. Memory is the ``S`` slots plus one iteration's residuals, whatever the trip
count; time is a few body evaluations per iteration.

The modules, by responsibility:

- :mod:`.checkpointed`: the reverse handler (:class:`WhileCall`): activity,
  loops it cannot reverse, the compiled loops per body and slot count;
- :mod:`.programs`: the compiled forward and backward loops;
- :mod:`.schedule`: which states to keep (the greedy rule), where the backward
  stores recomputed ones (the binomial split), the reference schedule in Python;
- :mod:`.slots`: the slot count, the checkpoint region's request
  (``fb.checkpoint(while_loop_checkpoints=n)`` or ``memory_budget``) and the
  statistics the benchmark reads;
- :mod:`.stepped`: eager calls recorded iteration by iteration, which is also
  the observed path the tools step;
- :mod:`.jvp`: forward mode;
- :mod:`.common`: loops with a batched condition (``vmap``) as one-condition
  loops, loop-state helpers.

Registered here: reverse mode is :class:`SteppedWhile` over the checkpointed
handler (eager calls record up to a size, see :mod:`.stepped`), forward mode
:func:`while_jvp`.
"""

from __future__ import annotations

from ...registry import call_handlers_forward, call_handlers_reverse
from .checkpointed import WhileCall
from .jvp import while_jvp
from .schedule import reference_schedule
from .slots import (DEFAULT_SLOTS, WhileLoopCheckpoints, default_slots, stats,
                    unwrap_policy)
from .stepped import EAGER_RECORD_BYTES, EAGER_RECORD_EQNS, SteppedWhile

_checkpointed = WhileCall()
call_handlers_reverse["while"] = SteppedWhile(
    _checkpointed, max_eqns=EAGER_RECORD_EQNS, max_bytes=EAGER_RECORD_BYTES,
    prefer_compiled=True)
call_handlers_forward["while"] = while_jvp


__all__ = ["DEFAULT_SLOTS", "EAGER_RECORD_BYTES", "EAGER_RECORD_EQNS", "SteppedWhile",
           "WhileCall", "WhileLoopCheckpoints", "default_slots", "reference_schedule",
           "stats", "unwrap_policy", "while_jvp"]
