"""The sweep context: what decides, for the sweeps running now, which path they take.

(It depends on nothing else of fbackprop, so every layer may read it.)

Everything that used to be a module-level switch lives in one immutable value
held by a :class:`contextvars.ContextVar`: a tool that watches the sweeps, a
linear sweep transposing a custom JVP rule, an analysis that needs nested calls
swept in place, a memory-budget plan being made. A block changes it with
:func:`using`, which restores the previous value on exit, also when the block
raises; threads and asyncio tasks each see their own value.

Handlers and the front ends read it with :func:`current` (or the helpers below)
and choose their path: bind a nested ``jit``'s memoized sweeps or sweep it in
place, compile an eager program or not, and so on. Nothing else decides.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class SweepContext:
    """The state the sweeps running now read (immutable; change it with :func:`using`).

    Attributes:
      observers: objects notified of the sweeps' steps (tools: hooks, tags,
        NaN watch, explain rows). An observer may have ``on_forward(eqn,
        invals, outvals)``, ``on_backward(eqn, cts_out, cts_in, record)`` and
        the events handlers send with :func:`notify` (a loop step beginning...).
      stepping: handlers run loop steps, every branch of a ``cond`` and custom
        rules' own code in place, so observers see each of their equations with
        the step it ran in (``fb.checked_grad``); ``"all"`` also checkpoint
        regions and custom rules, ``"scan"`` only scans and while loops
        (``fb.explain``), ``"while"`` only while loops, each iteration of any
        length (tags in a while body: one cotangent per iteration). Each handler
        reads it with :func:`steps` and takes its observed path.
      in_place: nested calls (``jit``) are swept equation by equation rather than
        bound as memoized sweeps (analyses that read the traced program).
      linear: the custom JVP rule being transposed by a linear sweep (its name,
        for error messages), or ``None``. Every equation that reads a tangent is
        then checked for linearity.
      planning: the memory-budget planner's frames (``memplan``), innermost last.
      collectors: lists receiving the memory plans made (``saved_residuals``).
      explain_marks: dicts receiving recomputed-equation marks (``fb.explain``).
      in_rule: nesting depth inside a custom_jvp rule while eager programs are keyed.
      eager_programs: eager backward sweeps may run as compiled programs
        (environment variable ``FBACKPROP_EAGER_PROGRAMS=0`` turns it off).
      cache: jaxprs and joint traces may be cached (off while a plan is made:
        the same jaxpr then gives different joints).
      call_tables: for a program read after its sweeps, tables from an
        equation's traceback to the calls that ran it (``compat.calls_in``).
      while_slots: the saved loop states the enclosing checkpoint region asks
        for its ``lax.while_loop`` calls (set by the region's handler while it
        sweeps the region): ``None`` (the default count), ``("count", n)``
        (``while_loop_checkpoints=n``) or ``("budget", bytes or fraction)``
        (``memory_budget``). Joint traces depend on it (their cache key has it).
      while_stats: lists receiving one entry per while-loop reversal (trip
        count, slots, body evaluations in its backward loop), for benchmarks
        and tests (``rules.while_loop.stats``).
      per_example: the per-example sweep running now (a
        ``fbackprop._src.per_example.sweep.Sweep``, set by
        ``per_example_grad_norms`` and the like around their sweeps under
        ``jax.vmap``), or ``None``. The engine asks it for the handler of a call
        primitive it replaces (``handler(name)``), lets it apply every rule
        (``apply_rule(rec, cts_out, plain_apply)``) and add cotangents it keeps
        in a form of its own (``symbolic(ct)``, ``add(prev, ct)``).
      linearizing: the tangent sweep being traced is ``fb.linearize``'s: a
        ``custom_vjp`` function's outputs are its fwd rule's and its output
        tangents an error deferred to the evaluation of the linear map (as
        under ``jax.linearize``), instead of an error at once. Staged tangent
        sweeps depend on it (their cache keys have it).
    """
    observers: tuple = ()
    stepping: str | None = None
    in_place: bool = False
    linear: str | None = None
    planning: tuple = ()
    collectors: tuple = ()
    explain_marks: tuple = ()
    in_rule: int = 0
    eager_programs: bool = True
    cache: bool = True
    call_tables: tuple = ()
    while_slots: tuple | None = None
    while_stats: tuple = ()
    per_example: Any = None
    linearizing: bool = False


_DEFAULT = SweepContext(eager_programs=os.environ.get("FBACKPROP_EAGER_PROGRAMS", "1") != "0")
_current: contextvars.ContextVar = contextvars.ContextVar("fbackprop_sweep_context",
                                                          default=_DEFAULT)


def current() -> SweepContext:
    """The sweep context in effect."""
    return _current.get()


_FIELDS = frozenset(f.name for f in dataclasses.fields(SweepContext))


def _replaced(ctx: SweepContext, changes: dict) -> SweepContext:
    """``dataclasses.replace(ctx, **changes)`` without its per-call cost (the
    sweeps change the context around every call they sweep): the fields are
    copied, not passed through ``__init__``."""
    unknown = changes.keys() - _FIELDS
    if unknown:
        raise TypeError(f"using(): the sweep context has no field(s) {sorted(unknown)}; "
                        f"its fields are {sorted(_FIELDS)}")
    new = object.__new__(SweepContext)
    new.__dict__.update(ctx.__dict__)
    new.__dict__.update(changes)
    return new


class using:
    """Runs the block with the current context's fields replaced by ``changes``
    (the previous context is back on exit, also when the block raises).

    Example:
      >>> with using(in_place=True):
      ...     assert current().in_place
    """

    __slots__ = ("_changes", "_token")

    def __init__(self, **changes: Any):
        self._changes = changes

    def __enter__(self) -> SweepContext:
        new = _replaced(_current.get(), self._changes)
        self._token = _current.set(new)
        return new

    def __exit__(self, *exc) -> bool:
        _current.reset(self._token)
        return False


# The calls whose bodies are being swept, innermost last, each as the call
# equation's ``(source_info, inline)`` (``compat.call_site``): reports name the
# calling line for an equation of a library's jitted helper, which has no user
# frame. Kept beside the sweep context, in a variable of its own: it changes
# around every call the sweeps enter, and a copy of the whole context each time
# would cost tracing time. It decides no path.
_calls: contextvars.ContextVar = contextvars.ContextVar("fbackprop_calls", default=())


def calls() -> tuple:
    """The calls being swept now, innermost last (see ``_calls``)."""
    return _calls.get()


class in_call:
    """Runs the block inside the call ``entry`` (see ``_calls``)."""

    __slots__ = ("_entry", "_token")

    def __init__(self, entry: tuple):
        self._entry = entry

    def __enter__(self) -> None:
        self._token = _calls.set(_calls.get() + (self._entry,))

    def __exit__(self, *exc) -> bool:
        _calls.reset(self._token)
        return False


@contextlib.contextmanager
def observing(observer):
    """Attaches ``observer`` to the sweeps for the duration of the block."""
    with using(observers=current().observers + (observer,)):
        yield observer


def notify(method: str, *args) -> None:
    """Tells the observers that have ``method`` about a step they cannot see as
    an equation (a loop step beginning, values sliced or stacked between steps)."""
    for obs in _current.get().observers:
        fn = getattr(obs, method, None)
        if fn is not None:
            fn(*args)


def steps(kind: str, linear_ok: bool = False) -> bool:
    """Whether a handler takes its stepped path: ``kind`` is ``"scan"`` (scans
    are stepped for ``stepping="scan"`` and ``"all"``), ``"while"`` (while
    loops: for ``"while"``, ``"scan"`` and ``"all"``) or ``"all"`` (cond
    branches, checkpoint regions, custom rules: only for ``"all"``). A sweep
    transposing a custom JVP rule steps nothing it differentiates (``linear_ok``: the step has no differentiated input)."""
    ctx = _current.get()
    if ctx.stepping is None or (ctx.linear is not None and not linear_ok):
        return False
    return (ctx.stepping == "all" or kind == ctx.stepping
            or (kind == "while" and ctx.stepping == "scan"))


def unwatched(linear_ok: bool = False) -> bool:
    """No tool watches or steps the sweeps or reads the program they trace, and no
    linear sweep checks them (unless ``linear_ok``: the caller's cache tells linear
    sweeps apart, and the check runs when the sweep is traced). A sub-jaxpr's
    sweeps may then be traced once and bound as one call."""
    ctx = _current.get()
    return not (ctx.observers or ctx.stepping or ctx.in_place
                or (ctx.linear is not None and not linear_ok))


def in_linear_sweep() -> bool:
    return _current.get().linear is not None
