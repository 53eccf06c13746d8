"""Where an equation came from, as users are shown it: the user's file and line,
the enclosing call's line for the body of a library's jitted helper (``jnp.var``),
and the context that attributes what fbackprop binds to the user's line."""

from __future__ import annotations

import collections as _collections
import contextlib as _contextlib
import functools
import os as _os

from jax._src import source_info_util

from .. import context as _context
from .core import JIT_NAMES, Jaxpr, JaxprEqn

# Source lines reported to users skip fbackprop's own frames (everything under
# ``fbackprop/_src``), as they skip JAX's.
source_info_util.register_exclusion(
    _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))


def source_line(eqn: JaxprEqn) -> str:
    """The user's file:line for an equation, as JAX summarizes it (for an equation
    of a library's jitted helper, the line that called it: see :func:`call_site`)."""
    return source_line_of(eqn.source_info)


def source_line_of(source_info) -> str:
    try:
        lines = dict.fromkeys(source_info_util.summarize(s)
                              for s in _reported_source_infos(source_info))
        return " or ".join(line for line in lines if line) or "<unknown source>"
    except Exception:  # pragma: no cover - source info is best effort
        return "<unknown source>"


# A traceback JAX records while tracing stops at the function being traced, so
# the equations of a library's jitted helper (``jnp.var``, ``jax.nn.log_softmax``)
# have no frame of the user's: only the equation calling the helper does. JAX
# itself gives inlined equations the call's source; while fbackprop sweeps a
# call's body, ``call_site`` keeps the nearest enclosing call with a user frame,
# and reports of the body's equations (explain's rows, checked_grad's sites,
# error messages) name that call's line.
@functools.lru_cache(maxsize=4096)
def _traceback_has_user_frame(traceback) -> bool:
    return source_info_util.user_frame(traceback) is not None


def has_user_frame(source_info) -> bool:
    """Whether a frame of the user's code (outside JAX and fbackprop) created it."""
    tb = getattr(source_info, "traceback", None)
    return tb is not None and _traceback_has_user_frame(tb)


def _reported_source_infos(source_info) -> list:
    """``[source_info]``, or, when it has no user frame, the enclosing call's
    (the calls' that ran it, for a program read after its sweeps). Inside a
    call marked ``inline`` (jax.numpy's helpers), always the call's: JAX
    inlines those into the calling program with the call's source, and the
    body's own tracebacks are those of whichever call traced it first."""
    calls = _context.calls()
    if calls:
        site, inline = _enclosing_call(calls)
        return [site] if inline or not has_user_frame(source_info) else [source_info]
    return _outside_calls(source_info)


def _outside_calls(source_info) -> list:
    tables = _context.current().call_tables
    if tables and not has_user_frame(source_info):
        key = id(getattr(source_info, "traceback", None))
        for table in reversed(tables):
            if key in table:
                return table[key]
    return [source_info]


def _enclosing_call(calls: tuple) -> tuple:
    """``(site, inline)`` of the innermost call being swept: its reported source
    info (read here, when a report asks, not each time a call is entered) and
    whether it is an ``inline`` jit."""
    site, inline = None, False
    for source_info, call_inline in calls:
        if site is None:
            site = _outside_calls(source_info)[0]
        elif not inline and has_user_frame(source_info):
            site = source_info
        inline = call_inline
    return site, inline


def reported_source_info(source_info):
    """``source_info``, or the enclosing call's when it has no user frame."""
    return _reported_source_infos(source_info)[0]


@_contextlib.contextmanager
def calls_in(jaxpr):
    """While reading a program traced from ``jaxpr``'s sweeps once they are done
    (``fb.saved_residuals`` reads its joint forward-backward program): its
    equations that came from a call's body without a user frame are reported at
    the calls of ``jaxpr`` that contain that body (matched by traceback; a
    helper called from several lines names them all)."""
    table: dict = {}
    todo = _collections.deque([(jaxpr, None)])     # in program order
    while todo:
        j, outer = todo.popleft()
        for eqn in j.eqns:
            si = eqn.source_info
            own = has_user_frame(si)
            if not own and outer is not None and si.traceback is not None:
                found = table.setdefault(id(si.traceback), [])
                if all(o is not outer for o in found):
                    found.append(outer)
            inner_outer = si if own else outer
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else [value]:
                    inner = getattr(item, "jaxpr", item)
                    if isinstance(inner, Jaxpr):
                        todo.append((inner, inner_outer))
    with _context.using(call_tables=_context.current().call_tables + (table,)):
        yield


def call_site(eqn: JaxprEqn):
    """While the body of the call ``eqn`` is swept (see :func:`reported_source_info`)."""
    inline = eqn.primitive.name in JIT_NAMES and bool(eqn.params.get("inline", False))
    return _context.in_call((eqn.source_info, inline))


def user_context(eqn: JaxprEqn):
    """Context that attributes primitives bound now to the equation's user frame."""
    return source_info_util.user_context(eqn.source_info.traceback,
                                         name_stack=eqn.source_info.name_stack)


__all__ = [
    'source_line',
    'source_line_of',
    'has_user_frame',
    'reported_source_info',
    'calls_in',
    'call_site',
    'user_context',
]
