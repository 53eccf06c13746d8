"""Helpers the seeing tools share: the sweep's observer hook, call bodies swept in
place, the user's source line of an equation, short type strings, argument labels."""

from __future__ import annotations

import linecache
import re

import numpy as np
from jax import tree_util

from .. import compat, trace
from .. import context
# ============================================================ shared machinery


observing = context.observing


def _trace_state():
    """A comparable token for JAX's current trace (None if unavailable).

    Observers compare it with the token taken when they were created, so events
    from a sweep running inside another trace (e.g. a ``lax.scan`` body) are
    not mixed with values of the outer computation.
    """
    return compat.trace_state()


def inlined_jaxpr(eqn):
    """The sub-jaxpr the reverse engine sweeps in place for a call equation, or None."""
    name = eqn.primitive.name
    if name in compat.JIT_NAMES:
        return compat.jit_inner(eqn.params).jaxpr
    if name in compat.CALL_BODIES:
        # A call a define-by-run recording staged (core.call, shard_map, an
        # eager custom_jvp function): its body is swept in place.
        return compat.CALL_BODIES[name](eqn.params).jaxpr
    # Checkpoint regions, loops and custom rules run their own programs.
    return None


_sub_jaxprs = trace.sub_jaxprs


_SOURCE_RE = re.compile(r"^(?P<file>.*?):(?P<line>\d+)(?::\d+)?(?: \((?P<func>.*)\))?$")


def source_parts(eqn) -> tuple[str, int | None, str]:
    """(file, line, function) of the user code that created ``eqn``."""
    text = compat.source_line(eqn)
    m = _SOURCE_RE.match(text)
    if not m:
        return text, None, ""
    return m.group("file"), int(m.group("line")), m.group("func") or ""


def source_code(eqn) -> str:
    """The stripped source text of the line that created ``eqn`` ('' if unknown)."""
    file, line, _ = source_parts(eqn)
    if line is None:
        return ""
    return linecache.getline(file, line).strip()


def aval_str(x) -> str:
    try:
        aval = compat.typeof(x)
        return f"{np.dtype(aval.dtype).name}{list(aval.shape)}"
    except Exception:
        return type(x).__name__


def _short_dtype(dtype) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:   # an extended dtype (a PRNG key's key<fry>) is no NumPy dtype
        return str(dtype)
    return {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
            "int32": "i32", "int64": "i64", "bool": "bool", "complex64": "c64",
            "complex128": "c128"}.get(name, name)


def short_aval(x) -> str:
    try:
        aval = compat.typeof(x)
    except Exception:
        return type(x).__name__
    return f"{_short_dtype(aval.dtype)}[{','.join(str(d) for d in aval.shape)}]"


def leaf_labels(args, kwargs, static) -> list[str]:
    """Labels like ``args[0]['w']`` for the non-static flat leaves of (args, kwargs)."""
    paths = [p for p, _ in tree_util.tree_flatten_with_path((tuple(args), kwargs))[0]]
    labels = []
    for path, s in zip(paths, static):
        if s:
            continue
        head = "args" if path[0].idx == 0 else "kwargs"
        labels.append(head + tree_util.keystr(path[1:]))
    return labels



def stepping(checkpoints: bool = True):
    """Scans swept step by step (and, for checking, checkpoint regions swept in
    place, every branch of a cond, custom rules' own code): the handlers'
    stepped paths."""
    return context.using(stepping="all" if checkpoints else "scan")


def fold_staged_away(observer, table: dict, eqn, invals, outvals) -> bool:
    """Whether ``eqn`` is one a staged program would not hold (a Python scalar made
    an array, a no-op conversion); if so its outputs are recorded in ``table`` (the
    observer's map from a value's id to what it reads as) as its operand, or as a
    constant, and it gets no row or node of its own."""
    away = compat.staged_away(eqn, invals)
    if away is None:
        return False
    for x, k in zip(outvals, away):
        if k is None:
            observer._constant(x)
        else:
            table[id(x)] = observer._operand(eqn.invars[k], invals[k])
            observer.alive.append(x)
    return True
