"""The two rule tables (reverse and forward mode) and the helpers that fill them.

A VJP rule has one signature everywhere::

    rule(cts, outs, *primals, **params) -> list of cotangents, one per primal

``primals`` are the primitive's input values (arrays positional), ``params`` its
parameters (keyword-only). For a single-result primitive ``cts`` and ``outs`` are
the one cotangent / output value; for a multiple-results primitive they are lists
and a cotangent may be ``None`` (a symbolic zero). A rule returns ``None`` for an
input that gets no gradient. The engine only calls rules when at least one
cotangent is nonzero and tells rules which inputs are active through the
``active`` keyword when they ask for it (``needs_active=True``).

A JVP rule::

    rule(primals, tangents, **params) -> (outs, out_tangents)

``tangents`` holds ``None`` for inputs with a zero tangent; for a single-result
primitive ``outs``/``out_tangents`` are single values.

Other libraries' own rules for their primitives (lineax, equinox...) are read
from JAX's tables by :func:`rules_for` (``rules/foreign.py`` differentiates with
them); :func:`rule_owner` names the library, for the tools' reports.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from . import compat


@dataclasses.dataclass(frozen=True)
class VJPRule:
    fn: Callable
    needs_active: bool = False
    # Optional forward replacement ``fwd(*primals, **params) -> (outs, residuals)``:
    # the forward sweep calls it instead of binding the primitive, and the rule
    # receives ``residuals=`` (e.g. a sort that also returns its permutation).
    fwd: Callable | None = None


vjp_rules: dict[Any, VJPRule] = {}
jvp_rules: dict[Any, Callable] = {}
# Primitives whose every output carries no gradient (comparisons, integer ops...).
nondiff_primitives: set = set()
# Call-like primitives the engines handle by recursing into a sub-jaxpr.
call_handlers_reverse: dict[str, Callable] = {}
call_handlers_forward: dict[str, Callable] = {}
# While a custom JVP rule is transposed (see engine.linear.check_linear): primitives
# that may read a tangent, each ``True`` or a predicate ``(active, **params) ->
# bool`` (e.g. a product is linear when one factor is a constant), and call
# primitives handled differently there (a custom_jvp function applied to a
# tangent is differentiated through its body).
linear_primitives: dict[str, Any] = {}
call_handlers_linear: dict[str, Any] = {}
# Primitives of other libraries (lineax, equinox...), differentiated with the
# rules those libraries register with JAX: filled by rules/foreign.py.
foreign_rules: dict[str, Callable] = {}


class MissingRuleError(NotImplementedError):
    """A primitive reached the engine with no derivative rule registered.

    The message names the primitive, the line of the user's code that used it,
    and how to register a rule (:func:`fbackprop.extend.register_vjp` and friends).
    It is raised only when a cotangent (or tangent) actually reaches the
    primitive: a primitive whose output does not influence the result needs no rule.
    """


def missing_rule_error(eqn, mode: str) -> MissingRuleError:
    name = eqn.primitive.name
    table = "vjp" if mode == "reverse" else "jvp"
    return MissingRuleError(
        f"fbackprop has no {mode}-mode ({table.upper()}) rule for primitive '{name}'.\n"
        f"  used at: {compat.source_line(eqn)}\n"
        f"  equation: {eqn}\n"
        f"Register one with fbackprop.extend.def{table}(<the primitive object>, rule) "
        f"(see `help(fbackprop.extend)`), or avoid this operation.")


def with_call_site(err: MissingRuleError, eqn) -> MissingRuleError:
    """The same error, noting the call primitive (jit, custom_jvp...) it happened inside."""
    return MissingRuleError(f"{err}\n  inside '{eqn.primitive.name}' called at "
                            f"{compat.source_line(eqn)}")


def _prim_name(prim) -> str:
    return prim if isinstance(prim, str) else prim.name


# ----------------------------------------------------------------- registration
def register_vjp(prim, fn: Callable, *, needs_active: bool = False,
                 fwd: Callable | None = None):
    """Registers a whole VJP rule: the cotangents of all inputs at once.

    Args:
      prim: the primitive (or its name).
      fn: ``fn(cts, outs, *primals, **params)`` returns one cotangent per input,
        ``None`` for an input without gradient. For a ``multiple_results``
        primitive ``cts`` and ``outs`` are lists, and an entry of ``cts`` may be
        ``None`` (a zero cotangent). Each cotangent must have its primal's shape
        and dtype (:func:`unbroadcast` helps).
      needs_active: pass ``active=`` (one bool per input: whether it is
        differentiated) so the rule can skip work for the others.
      fwd: ``fwd(*primals, **params) -> (outs, residuals)`` runs in the forward
        sweep in place of the primitive, and ``fn`` then receives ``residuals=``
        (for something the forward pass produces cheaply, like a sort's
        permutation).

    Returns:
      ``fn``, so this can be used as a decorator.
    """
    vjp_rules[_prim_name(prim)] = VJPRule(fn, needs_active, fwd)
    return fn


def register_jvp(prim, fn: Callable):
    """Registers a whole JVP rule for forward mode (``fb.jvp``, ``fb.jacfwd``, ...).

    Args:
      prim: the primitive (or its name).
      fn: ``fn(primals, tangents, **params) -> (outs, out_tangents)``; a ``None``
        tangent means zero, and an output tangent may be ``None`` too.

    Returns:
      ``fn``, so this can be used as a decorator.
    """
    jvp_rules[_prim_name(prim)] = fn
    return fn


def defvjp(prim, *per_input: Callable | None):
    """Registers a VJP rule given one function per input (autograd style).

    Each function is ``g(ct, out, *primals, **params) -> cotangent for that input``;
    ``None`` means the input never gets a gradient. Only the functions for active
    inputs run.
    """

    def rule(ct, out, *primals, active, **params):
        return [None if (g is None or not a) else g(ct, out, *primals, **params)
                for g, a in zip(per_input, active)]

    register_vjp(prim, rule, needs_active=True)


def defnondiff(*prims):
    """Marks primitives whose outputs carry no gradient (and tangent zero).

    For integer-valued or piecewise-constant operations (``floor``, ``argmax``,
    comparisons, random bits): fbackprop sends no cotangent through them, and
    their outputs' tangents are zero.
    """
    for prim in prims:
        name = _prim_name(prim)
        nondiff_primitives.add(name)
        vjp_rules.pop(name, None)
        jvp_rules.pop(name, None)


def defjvp_linear(prim):
    """Forward rule of a primitive linear in all its (array) inputs: apply it to tangents."""

    def rule(primals, tangents, **params):
        out = prim.bind(*primals, **params)
        if all(t is None for t in tangents):
            return out, None
        ts = [zeros_like_aval(x) if t is None else t for x, t in zip(primals, tangents)]
        return out, prim.bind(*ts, **params)

    register_jvp(prim, rule)


def defjvp(prim, *per_input: Callable | None):
    """Registers a JVP rule given one function per input.

    Each function is ``g(t, out, *primals, **params) -> contribution to the output
    tangent`` for the tangent ``t`` of that input; contributions are summed.
    """

    def rule(primals, tangents, **params):
        out = prim.bind(*primals, **params)
        total = None
        for g, t in zip(per_input, tangents):
            if t is None:
                continue
            if g is None:
                continue
            term = g(t, out, *primals, **params)
            total = term if total is None else add_tangents(total, term)
        if total is not None:
            total = broadcast_to_aval(total, out)
        return out, total

    register_jvp(prim, rule)


# JAX's own custom_jvp functions whose derivative fbackprop knows (jax.nn.relu...):
# under a transformation, reverse mode stages the call as it is and applies the
# known VJP in the backward sweep instead of running and transposing JAX's JVP
# rule. Keyed by the function's JVP rule, so a function whose rule someone
# redefines (``jax.nn.relu.defjvps(...)``) is no longer recognized.
_known_custom_jvps: dict = {}
# id(params) -> (params, handler): the equation parameters KnownCustomJVP.call_params
# made, so an equation recorded with them is recognized when it is bound again.
_known_by_params: dict = {}


class KnownCustomJVP:
    """The reverse handler of a known custom_jvp function: ``vjp(ct, *xs)``
    returns one cotangent per input (the function has one output)."""

    def __init__(self, function, vjp: Callable):
        self.function, self.vjp = function, vjp
        self.name = getattr(function, "__name__", "?")
        self._call_params: dict = {}

    def call_params(self, xs) -> dict:
        """The parameters of the ``custom_jvp_call`` equation of the function
        applied to arguments of ``xs``'s types (traced once per types, so every
        call's equation has the same parameter objects)."""
        key = tuple(compat.aval_key(x) for x in xs)
        params = self._call_params.get(key)
        if params is None:
            closed = jax.make_jaxpr(self.function)(*map(compat.spec_of, xs))
            eqn, = closed.jaxpr.eqns
            assert eqn.primitive.name == compat.CUSTOM_JVP_CALL, closed
            params = self._call_params[key] = eqn.params
            _known_by_params[id(params)] = (params, self)
        return params

    def backward(self, record, cts_out):
        ct, = cts_out
        return [c if a else None
                for c, a in zip(self.vjp(ct, *record.invals), record.active)]


def register_known_custom_jvp(function, vjp: Callable):
    """Registers ``vjp(ct, *xs)`` as the derivative of the ``jax.custom_jvp``
    object ``function`` (one output, no ``nondiff_argnums``); it must equal the
    transpose of the function's own JVP rule."""
    if function.nondiff_argnums:
        raise ValueError(f"{function}: a known custom_jvp function has no nondiff_argnums")
    _known_custom_jvps[function.jvp] = (function, KnownCustomJVP(function, vjp))


def known_custom_jvp(fun, jvp):
    """The handler of a known custom_jvp function bound with the wrapped
    ``fun``/``jvp`` (``custom_jvp_call``'s subfuns), or None."""
    rule = compat.wrapped_core(jvp)
    entry = _known_custom_jvps.get(rule)
    if entry is None:
        return None
    function, handler = entry
    if function.jvp is not rule or function.fun is not compat.wrapped_core(fun):
        return None
    return handler


def known_custom_jvp_of(params):
    """The handler of the known custom_jvp function a ``custom_jvp_call``
    equation calls (define-by-run form, or parameters made by
    :meth:`KnownCustomJVP.call_params`), or None."""
    subfuns = params.get("subfuns")
    if subfuns is not None:
        return known_custom_jvp(*subfuns)
    entry = _known_by_params.get(id(params))
    return entry[1] if entry is not None and entry[0] is params else None


# ----------------------------------------------------------------- small helpers
def zeros_like_aval(x):
    return compat.zeros_like_aval(compat.typeof(x))


def add_tangents(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return lax.add(a, b)


def broadcast_to_aval(t, like):
    shape = np.shape(like)
    if np.shape(t) != shape:
        t = jnp.broadcast_to(t, shape)
    dtype = compat.typeof(like).dtype
    if t.dtype != dtype:
        t = lax.convert_element_type(t, dtype)
    return t


def unbroadcast(ct, x):
    """Sums a cotangent down to the shape of ``x`` (which may have been broadcast
    inside the primitive, e.g. ``add f32[3,4] f32[1,4]`` or a scalar literal) and
    casts it to ``x``'s dtype."""
    shape = np.shape(x)
    dtype = compat.typeof(x).dtype
    ct_shape = np.shape(ct)
    if ct_shape != shape:
        lead = len(ct_shape) - len(shape)
        axes = tuple(range(lead)) + tuple(
            lead + i for i, d in enumerate(shape) if d == 1 and ct_shape[lead + i] != 1)
        if axes:
            ct = lax.reduce_sum(ct, axes)
        ct = lax.reshape(ct, shape)
    if ct.dtype != dtype:
        ct = lax.convert_element_type(ct, dtype)
    return ct


def is_float0(x) -> bool:
    return getattr(x, "dtype", None) == jax_float0


def is_differentiable_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)



# ------------------------------------------------- other libraries' own rules
# The tables JAX keeps of other libraries' rules (read, never written here);
# rules/foreign.py differentiates with them, and the tools name their owner.
from jax._src.interpreters import ad as _jax_ad  # noqa: E402


class ForeignRules:
    """A library primitive's own rules, and which library they come from."""

    def __init__(self, prim, jvp, transpose, owner):
        self.prim, self.jvp, self.transpose, self.owner = prim, jvp, transpose, owner


def _is_jax_module(module: str) -> bool:
    return module == "jax" or module.startswith(("jax.", "jaxlib"))


def _module_of(fn) -> str:
    if isinstance(fn, functools.partial):
        # ``ad.defjvp(p, rule)`` registers ``partial(standard_jvp, [rule], p)``:
        # whose rule it is shows in the functions the partial holds.
        held = [fn.func] + [f for a in fn.args
                            for f in (a if isinstance(a, (list, tuple)) else [a]) if callable(f)]
        modules = [_module_of(f) for f in held]
        return next((m for m in modules if m and not _is_jax_module(m)), modules[0])
    return getattr(fn, "__module__", None) or ""


def _owner(fn) -> str:
    """The top-level package whose code the rule is: a generic wrapper's module
    is skipped for the function it wraps (equinox wraps lineax's rules)."""
    seen, stack, modules = set(), [fn], []
    while stack and len(seen) < 20:
        f = stack.pop()
        if id(f) in seen or not callable(f):
            continue
        seen.add(id(f))
        modules.append(_module_of(f))
        stack.extend(c.cell_contents for c in (getattr(f, "__closure__", None) or ())
                     if callable(getattr(c, "cell_contents", None)))
        wrapped = getattr(f, "__wrapped__", None)
        if wrapped is not None:
            stack.append(wrapped)
    tops = [m.split(".")[0] for m in modules if m]
    for top in reversed(tops):
        if top and top != tops[0]:
            return top
    return tops[0] if tops else "unknown"


def _is_jax_own(fn) -> bool:
    return _is_jax_module(_module_of(fn))


@functools.lru_cache(maxsize=None)
def _rules_for(prim):
    jvp = _jax_ad.primitive_jvps.get(prim)
    transpose = _jax_ad.primitive_transposes.get(prim)
    fn = jvp or transpose
    if fn is None:
        return None
    if _is_jax_own(fn):
        # One of JAX's primitives keeps fbackprop's rules, except for a transpose
        # rule a library registered for it (lineax's for stop_gradient, JAX
        # #22011): transposing a linear map applies it, as JAX's transpose does.
        if transpose is None or _is_jax_own(transpose):
            return None
        return ForeignRules(prim, None, transpose, _owner(transpose))
    return ForeignRules(prim, jvp, transpose, _owner(fn))


def rules_for(prim) -> ForeignRules | None:
    """Another library's rules for ``prim``, or None (no rules, or JAX's own)."""
    try:
        return _rules_for(prim)
    except TypeError:        # an unhashable primitive object
        return None


def rule_owner(prim) -> str | None:
    """The library whose rules fbackprop uses for ``prim`` (None: fbackprop's own
    rule, or no rule). What ``fb.explain`` and ``fb.saved_residuals`` show."""
    name = getattr(prim, "name", None)
    if (name in vjp_rules or name in call_handlers_reverse
            or name in jvp_rules or name in nondiff_primitives):
        return None
    rules = rules_for(prim)
    return rules.owner if rules is not None else None


from jax.dtypes import float0 as jax_float0  # noqa: E402
