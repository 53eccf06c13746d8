"""Eager gradients that reuse one compiled backward program per recorded program.

An eager ``fb.grad`` call runs the user's function on concrete values (Python
control flow on them works, as in ``jax.grad``), which records the program it
ran. When a call records the same program as earlier calls (the same
primitives with the same parameters, types and wiring, whatever the values),
its backward sweep does not need to be dispatched primitive by primitive: the
rules' forward halves and the backward sweep of that program are traced once
into a jitted function, and every later call with the same program feeds it the
values it recorded. What still runs op by op is the user's forward pass itself,
which must, to keep eager semantics.

Two forward modes exist for one eager call:

- *full*: each primitive's forward half runs as it is recorded (residuals are
  computed eagerly) and the backward sweep is dispatched op by op. This is the
  mode of a function's first calls and of programs that do not repeat.
- *tape only*: the forward pass binds only the primitives themselves and keeps
  their inputs; the compiled program recomputes each rule's residuals from the
  recorded inputs of its equation (XLA drops what the backward sweep does not
  read) and runs the backward sweep. A function is switched to this mode once a
  program it recorded has repeated; if its programs stop repeating it goes back.

A recorded program is matched by a structural key (:func:`tape_key`). Values
never enter the key, only types; parameters enter by value where their
equality is by value (shapes, dtypes, dimension numbers, sub-jaxprs compared
equation by equation) and by identity otherwise (functions), so two programs
with equal keys compute the same function of the values fed in. Programs with
effects, with a ``custom_vjp`` whose ``bwd`` runs as Python on the recorded
values, or with parameters that cannot be compared are never compiled.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from . import compat
from . import context
from .engine import sweeps
from .engine.tape import Tape
from .registry import call_handlers_reverse, known_custom_jvp_of, vjp_rules

# How many recorded programs keep a compiled backward, and how many programs'
# occurrence counts are remembered.
MAX_PROGRAMS = 32
MAX_COUNTS = 512
# A function in tape-only mode whose recorded programs miss the compiled ones
# this many times in a row goes back to the full mode (a miss costs a second
# forward pass: the rules' forward halves run after the recording).
MAX_MISSES = 8


class _Uncompilable(Exception):
    """The recorded program has something a compiled backward cannot reproduce."""


# ----------------------------------------------------------------- the key
class _Interned:
    """A structural key with its hash computed once (sub-jaxpr keys are shared by
    every equation that calls the same jaxpr, so comparing them is cheap)."""
    __slots__ = ("key", "hash")

    def __init__(self, key):
        self.key, self.hash = key, hash(key)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return self is other or (type(other) is _Interned and self.hash == other.hash
                                 and self.key == other.key)


# id(jaxpr) -> (jaxpr, key); the jaxpr is kept so its id cannot be reused.
_jaxpr_keys: collections.OrderedDict = collections.OrderedDict()
_MAX_JAXPR_KEYS = 4096


def _float_key(x: float):
    # -0.0 == 0.0 and 1 == 1.0 == True in Python; the program differs.
    return ("f", float(x).hex()) if x == x else ("f", "nan")


def _value_key(x):
    """A parameter's key: equal keys mean the parameter means the same."""
    t = type(x)
    if x is None or t in (bool, int, str):
        return (t, x)
    if t is float:
        return _float_key(x)
    if t is complex:
        return ("c", _float_key(x.real), _float_key(x.imag))
    if t in (tuple, list):
        return (t, tuple(_value_key(y) for y in x))
    if t is dict:
        return (t, tuple((k, _value_key(v)) for k, v in x.items()))
    if t is compat.ClosedJaxpr:
        return ("closed", _jaxpr_key(x.jaxpr), tuple(_const_key(c) for c in x.consts))
    if t is compat.Jaxpr:
        return ("jaxpr", _jaxpr_key(x))
    if isinstance(x, np.ndarray):
        if x.size > 64 or x.dtype == object:
            raise _Uncompilable(f"an array parameter of shape {x.shape}")
        return ("nd", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, tuple):   # named tuples (dimension numbers)
        return (t, tuple(_value_key(y) for y in x))
    if isinstance(x, np.generic):   # NumPy scalars, by their bytes
        return ("np", x.dtype.str, x.tobytes())
    if compat.is_tracer(x) or hasattr(x, "__jax_array__") or type(x).__name__ == "ArrayImpl":
        raise _Uncompilable("an array parameter")
    try:
        hash(x)
    except TypeError:
        raise _Uncompilable(f"an unhashable parameter of type {t.__name__}") from None
    return (t, x)


class _Identity:
    """Compares by identity (and keeps the object alive, so its id stays unique)."""
    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return type(other) is _Identity and other.obj is self.obj


def _const_key(c):
    """A jaxpr constant: small ones by value, others by identity."""
    if not compat.is_tracer(c) and np.size(c) <= 64:
        try:
            a = np.asarray(c)
        except Exception:  # noqa: BLE001 - e.g. PRNG keys: compared by identity
            a = None
        if a is not None and a.dtype != object:
            return ("v", a.dtype.str, a.shape, a.tobytes(), compat.typeof(c))
    return _Identity(c)


# Inside a custom_jvp function's JVP rule (which may call the function itself),
# nested custom_jvp functions are keyed by their body only: the backward sweep
# over a rule binds them on primals or differentiates their body, never their rule
# (the sweep context's ``in_rule`` counts the nesting).


# Parameters of nested jit equations are keyed once per set of parameter
# objects: jax.jit hands every call of one function the same objects (its
# jaxpr, its sharding tuples), so a repeated call is a lookup by identity.
_jit_params_keys: collections.OrderedDict = collections.OrderedDict()
_MAX_JIT_PARAMS_KEYS = 4096


def _params_key(eqn):
    params = eqn.params
    if eqn.primitive.name in compat.JIT_NAMES:
        values = tuple(params.values())
        ident = (bool(context.current().in_rule),) + tuple(map(id, values))
        hit = _jit_params_keys.get(ident)
        if hit is not None and all(a is b for a, b in zip(hit[0], values)):
            return hit[1]
        key = tuple((k, _value_key(v)) for k, v in params.items())
        _bounded_put(_jit_params_keys, ident, (values, key), _MAX_JIT_PARAMS_KEYS)
        return key
    if eqn.primitive.name == compat.CUSTOM_JVP_CALL and "jvp_jaxpr_fun" in params:
        # The JVP rule's traced function is made anew by every trace; what the
        # backward sweep transposes is the jaxpr it returns.
        if context.current().in_rule:
            rule = "in a rule"
        else:
            if params.get("symbolic_zeros"):
                raise _Uncompilable("a custom_jvp function with symbolic zeros")
            _, num_consts, jvp_jaxpr_of = compat.custom_jvp_parts(params)
            try:
                jaxpr, consts, out_zeros = jvp_jaxpr_of(
                    [False] * (len(eqn.invars) - num_consts))
            except Exception as err:  # noqa: BLE001 - a rule that refuses to be traced
                raise _Uncompilable(f"a custom_jvp rule that raised {err!r}") from None
            with context.using(in_rule=context.current().in_rule + 1):
                rule = ("jvp_rule", _jaxpr_key(jaxpr), tuple(_const_key(c) for c in consts),
                        tuple(out_zeros))
        return tuple((k, rule if k == "jvp_jaxpr_fun" else _value_key(v))
                     for k, v in params.items())
    return tuple((k, _value_key(v)) for k, v in params.items())


def _eqn_key(eqn, ins: tuple):
    if eqn.effects:
        raise _Uncompilable(f"the effects of '{eqn.primitive.name}'")
    return (eqn.primitive,
            _params_key(eqn),
            ins,
            tuple(None if type(v) is compat.DropVar else v.aval for v in eqn.outvars),
            eqn.ctx)


def _jaxpr_key(jaxpr) -> _Interned:
    memo = (id(jaxpr), bool(context.current().in_rule))
    hit = _jaxpr_keys.get(memo)
    if hit is not None and hit[0] is jaxpr:
        _jaxpr_keys.move_to_end(memo)
        return hit[1]
    index: dict = {}

    def define(v):
        index[v] = len(index)
        return v.aval

    def atom(v):
        if type(v) is compat.Literal:
            val = v.val
            if isinstance(val, np.ndarray) or hasattr(val, "dtype"):
                val = np.asarray(val)
                return ("lit", v.aval, val.dtype.str, val.shape, val.tobytes())
            return ("lit", v.aval, _value_key(val))
        return index[v]

    parts: list[Any] = [tuple(define(v) for v in jaxpr.constvars),
                        tuple(define(v) for v in jaxpr.invars)]
    for eqn in jaxpr.eqns:
        parts.append(_eqn_key(eqn, tuple(atom(v) for v in eqn.invars)))
        for v in eqn.outvars:
            if type(v) is not compat.DropVar:
                index[v] = len(index)
    parts.append(tuple(atom(v) for v in jaxpr.outvars))
    if jaxpr.effects:
        raise _Uncompilable("a sub-jaxpr with effects")
    key = _Interned(tuple(parts))
    _jaxpr_keys[memo] = (jaxpr, key)
    if len(_jaxpr_keys) > _MAX_JAXPR_KEYS:
        _jaxpr_keys.popitem(last=False)
    return key


class _Layout:
    """A recorded program's key, the values to feed its compiled program (those of
    the distinct variables its equations read, in the order first read) and where
    each equation's inputs are among them."""
    __slots__ = ("key", "fed", "in_pos", "eqns")

    def __init__(self, key, fed, in_pos, eqns):
        self.key, self.fed, self.in_pos, self.eqns = key, fed, in_pos, eqns


def _replayable(eqn, invals):
    """The equation as a compiled program binds it again: a known custom_jvp
    function's call recorded with the bind's Python functions (which run once)
    becomes the call with parameters traced once per input types."""
    if eqn.primitive.name == compat.CUSTOM_JVP_CALL and "subfuns" in eqn.params:
        known = known_custom_jvp_of(eqn.params)
        if known is None:
            raise _Uncompilable("a custom_jvp call recorded with its Python functions")
        return eqn.replace(params=known.call_params(invals))
    return eqn


def tape_key(tape) -> _Layout:
    """The structural key of a recorded program and its input layout.

    Raises:
      _Uncompilable: the program cannot be compiled as one backward program.
    """
    index: dict = {}
    fed_pos: dict = {}
    fed: list = []
    parts: list[Any] = []
    frame = tape.jaxpr
    parts.append(tuple(None if v is None else v.aval for v in frame.invars))
    for v in frame.invars:
        if v is not None:
            index[v] = len(index)
    in_pos, eqns = [], []
    custom_vjp = compat.CUSTOM_VJP_CALL
    for rec in tape.records:
        eqn = _replayable(rec.eqn, rec.invals)
        eqns.append(eqn)
        name = eqn.primitive.name
        if name == custom_vjp:
            raise _Uncompilable("a custom_vjp function (its bwd runs on the recorded values)")
        if name == compat.CUSTOM_JVP_CALL and "call_jaxpr" not in eqn.params:
            raise _Uncompilable("a custom_jvp function linearized on the recorded values")
        if name not in vjp_rules and name not in call_handlers_reverse:
            # Only primitives we know to be pure: the compiled program evaluates
            # them again (an eagerly recorded equation does not list its effects).
            raise _Uncompilable(f"the primitive '{name}'")
        pos = []
        codes = []
        for v, x in zip(eqn.invars, rec.invals):
            i = index.get(v)
            if i is None:
                i = index[v] = len(index)
                codes.append((i, v.aval))
            else:
                codes.append(i)
            p = fed_pos.get(v)
            if p is None:
                p = fed_pos[v] = len(fed)
                fed.append(x)
            pos.append(p)
        in_pos.append(tuple(pos))
        parts.append((_eqn_key(eqn, tuple(codes)), tuple(rec.active)))
        for v in eqn.outvars:
            if type(v) is not compat.DropVar:
                index[v] = len(index)
    parts.append(tuple(None if v is None else index.get(v, -1) for v in frame.outvars))
    parts.append((tuple(tape.in_active), tuple(tape.out_active)))
    return _Layout(tuple(parts), fed, in_pos, eqns)


# -------------------------------------------------------- compiled programs
class _Program:
    """One recorded program's rules' forward halves and backward sweep, jitted."""

    def __init__(self, tape, layout):
        import jax
        self.specs = [(eqn, pos, list(rec.active))
                      for rec, eqn, pos in zip(tape.records, layout.eqns, layout.in_pos)]
        frame = tape.jaxpr
        self.frame = type(frame)(list(frame.invars), list(frame.outvars))
        self.in_active, self.out_active = list(tape.in_active), list(tape.out_active)
        self.run = jax.jit(self._run)

    def _run(self, fed, cts_out):
        records = []
        for eqn, pos, act in self.specs:
            _, rec, _ = sweeps.forward_eqn(eqn, [fed[p] for p in pos], act)
            if rec is not None:
                records.append(rec)
        tape = Tape(self.frame, records, self.in_active, self.out_active)
        return sweeps.backward(tape, cts_out)


class _FunctionState:
    __slots__ = ("tape_only", "misses", "promoted")

    def __init__(self):
        self.tape_only, self.misses, self.promoted = False, 0, False


_programs: collections.OrderedDict = collections.OrderedDict()
_counts: collections.OrderedDict = collections.OrderedDict()
_functions: collections.OrderedDict = collections.OrderedDict()
_failed: collections.OrderedDict = collections.OrderedDict()
stats = collections.Counter()   # hits, compiles, fallbacks (read by the tests)


def clear():
    """Forgets every compiled eager program and what was learned about functions."""
    _programs.clear()
    _counts.clear()
    _functions.clear()
    _failed.clear()
    _jaxpr_keys.clear()
    _jit_params_keys.clear()
    _calls.clear()
    _hvp_misses.clear()
    stats.clear()


def _bounded_put(table: collections.OrderedDict, key, value, limit: int):
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)


def _function_key(fun):
    # Closures made anew per call (``lambda p: loss(p, batch)``) share their code.
    return getattr(fun, "__code__", None) or id(fun)


def _state(fun) -> _FunctionState:
    k = _function_key(fun)
    st = _functions.get(k)
    if st is None:
        st = _FunctionState()
        _bounded_put(_functions, k, st, MAX_COUNTS)
    return st


def eligible() -> bool:
    """An eager call nothing watches: its backward may run as a compiled program
    (the sweep context's ``eager_programs``; the environment variable
    ``FBACKPROP_EAGER_PROGRAMS=0`` turns it off, every eager call then sweeping
    op by op, as on a program's first calls)."""
    import jax
    return (context.current().eager_programs and compat.is_eager() and context.unwatched()
            and not jax.config.jax_disable_jit)


def records_tape_only(fun) -> bool:
    """Whether ``fun``'s next eager call should record its program only."""
    return _state(fun).tape_only


def full_tape(tape):
    """A tape recorded program-only, with each rule's forward half run now."""
    records = []
    for rec in tape.records:
        if rec.handler is not None:      # custom_vjp: its fwd already ran
            records.append(rec)
            continue
        _, full, _ = sweeps.forward_eqn(rec.eqn, rec.invals, rec.active)
        if full is not None:
            records.append(full)
    return Tape(tape.jaxpr, records, tape.in_active, tape.out_active)


def _key_of(tape, kind):
    """``(layout, key)`` of a recorded program, or ``(None, None)`` when it
    cannot be compiled."""
    try:
        layout = tape_key(tape)
        key = (kind, layout.key)
        hash(key)
    except (_Uncompilable, TypeError):
        return None, None
    return layout, key


def _lookup(key):
    """``(program, count)``: the compiled program of ``key`` (count 0), or ``None``
    and how often the program has now been seen."""
    if key is None or key in _failed:
        return None, 0
    program = _programs.get(key)
    if program is not None:
        _programs.move_to_end(key)
        return program, 0
    count = _counts.get(key, 0) + 1
    _bounded_put(_counts, key, count, MAX_COUNTS)
    return None, count


def _compile(key, make, stat: str):
    try:
        program = make()
    except Exception:  # noqa: BLE001 - the ordinary path reports real errors
        _bounded_put(_failed, key, True, MAX_COUNTS)
        return None
    _bounded_put(_programs, key, program, MAX_PROGRAMS)
    stats[stat] += 1
    return program


_FAILED = object()


def _run(key, program, *args):
    """``program.run(*args)``, or ``_FAILED`` (and the program is dropped for good)."""
    try:
        return program.run(*args)
    except Exception:  # noqa: BLE001 - the ordinary path reports real errors
        _programs.pop(key, None)
        _bounded_put(_failed, key, True, MAX_COUNTS)
        return _FAILED


def backward(fun, tape, cts_out: list, tape_only: bool) -> list:
    """The backward sweep of an eager recording, compiled when its program repeats.

    Same result as ``sweeps.backward(tape, cts_out)`` on the full tape.
    """
    st = _state(fun)
    layout, key = _key_of(tape, tape_only)
    program, count = _lookup(key)
    if program is None and count:
        if not tape_only:
            if count >= 2:   # the next call records the program only, and compiles
                st.tape_only, st.promoted, st.misses = True, True, 0
        elif st.promoted or count >= 2:
            st.promoted = False
            program = _compile(key, lambda: _Program(tape, layout), "compiles")
    if program is not None:
        out = _run(key, program, layout.fed, cts_out)
        if out is not _FAILED:
            st.misses = 0
            stats["hits"] += 1
            return out
    if tape_only:
        st.misses += 1
        if key is None or st.misses >= MAX_MISSES:
            st.tape_only = False
        tape = full_tape(tape)
    stats["fallbacks"] += 1
    return sweeps.backward(tape, cts_out)


# ------------------------------------------- the recorded forward pass itself
_calls: collections.OrderedDict = collections.OrderedDict()
MAX_CALLS = 1024


def bind(eqn, vals: list) -> list:
    """Evaluates a recorded equation eagerly, as ``compat.bind_eqn`` does.

    Nested jits and checkpointed regions run as one cached jitted call (JAX's
    own eager path for a jit reached by a tracer is in Python, and a checkpointed
    region is otherwise evaluated op by op); everything else is bound as is.
    """
    import jax
    name = eqn.primitive.name
    params = eqn.params
    try:
        if name in compat.JIT_NAMES and compat.is_plain_jit(params):
            key = (_Identity(params["jaxpr"]), params["keep_unused"])
        elif name in compat.REMAT_NAMES:
            key = (name, _jaxpr_key(params["jaxpr"]), _value_key(params["prevent_cse"]),
                   _value_key(params["differentiated"]), _value_key(params["policy"]))
        else:
            return compat.bind_eqn(eqn, vals)
        key = (key, tuple(compat.aval_key(x) for x in vals))
        hash(key)
    except (_Uncompilable, TypeError):
        return compat.bind_eqn(eqn, vals)
    fn = _calls.get(key)
    if fn is None:
        fn = jax.jit(lambda *xs, _eqn=eqn: compat.bind_eqn(_eqn, list(xs)))
        _bounded_put(_calls, key, fn, MAX_CALLS)
    return list(fn(*vals))


# ------------------------------------------------ Hessian-vector products
class _HvpProgram:
    """fbackprop's forward-over-reverse ``hvp`` of one recorded program, jitted;
    the program's constants are inputs, so values never enter the compiled code."""

    def __init__(self, jaxpr, hvp_fn):
        import jax
        self.jaxpr, self.hvp_fn = jaxpr, hvp_fn
        self.run = jax.jit(self._run)

    def _run(self, consts, leaves, tangents):
        jaxpr = self.jaxpr

        def recorded(*xs):
            return compat.eval_jaxpr(jaxpr, consts, *xs)[0]
        return self.hvp_fn(recorded, tuple(leaves), tuple(tangents))


_hvp_misses: collections.OrderedDict = collections.OrderedDict()


def _plain_float_array(x) -> bool:
    import jax
    import jax.numpy as jnp
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)


def hvp(fun, primals, tangents, hvp_fn):
    """An eager ``fb.hvp(fun, primals, tangents)`` (``hvp_fn`` is ``fb.hvp``
    itself) through a compiled program when
    the program ``fun`` records at ``primals`` repeats; ``None`` when this call
    should take the ordinary path (the first calls, programs that do not repeat or
    cannot be compiled, and every argument the ordinary path must check)."""
    from jax import tree_util
    from .engine import recording
    if not eligible():
        return None
    p_leaves, p_tree = tree_util.tree_flatten(tuple(primals))
    t_leaves, t_tree = tree_util.tree_flatten(tuple(tangents))
    if p_tree != t_tree or not all(
            _plain_float_array(x) and _plain_float_array(t) and x.shape == t.shape
            and x.dtype == t.dtype for x, t in zip(p_leaves, t_leaves)):
        return None
    fkey = _function_key(fun)
    misses = _hvp_misses.get(fkey, 0)
    if misses >= MAX_MISSES:
        return None
    in_tree = tree_util.tree_structure((tuple(primals), {}))
    run = recording.record(fun, in_tree, p_leaves, [True] * len(p_leaves),
                           tape_only=True, bind=bind)
    key = layout = None
    if (len(run.out_vals) == 1 and run.out_active[0]
            and compat.typeof(run.out_vals[0]).shape == ()):
        layout, key = _key_of(run.tape, "hvp")
    program, count = _lookup(key)
    if program is not None or count >= 2:
        try:
            closed = recording.recorded_jaxpr(run, layout.eqns)
        except Exception:  # noqa: BLE001 - the ordinary path reports it
            closed = None
        if closed is not None and program is None:
            program = _compile(key, lambda: _HvpProgram(closed.jaxpr, hvp_fn), "hvp_compiles")
        if closed is not None and program is not None:
            out = _run(key, program, list(closed.consts), p_leaves, t_leaves)
            if out is not _FAILED:
                _hvp_misses.pop(fkey, None)
                stats["hvp_hits"] += 1
                return tree_util.tree_unflatten(p_tree, list(out))
    _bounded_put(_hvp_misses, fkey, misses + 1, MAX_COUNTS)
    return None
