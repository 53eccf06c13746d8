"""``custom_jvp`` and ``custom_vjp`` calls in both forms fbackprop meets them (an
equation of a jaxpr, or a define-by-run bind holding Python functions), as one view
each; JAX's symbolic zeros; the tracer type libraries test for (``ad.JVPTracer``);
weak types of values handed back to users' rules."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax._src import ad_util
from jax._src import core as jcore
from jax._src.interpreters import ad as jax_ad

from .core import ClosedJaxpr, typeof, zeros_like_aval

# ------------------------------------------------------------------- custom_jvp
# A custom_jvp or custom_vjp call reaches fbackprop in two forms: as an equation
# of a jaxpr (``call_jaxpr``, ``jvp_jaxpr_fun`` / ``fwd_jaxpr_thunk``, ``bwd``...)
# and, from a define-by-run trace, as the bind's Python functions (``subfuns``).
# The helpers below give one view of both, so each has one handler.
def function_name(fun) -> str:
    """The name of a (wrapped) Python function, for messages."""
    return getattr(fun, "__name__", None) or getattr(
        getattr(fun, "debug_info", None), "func_name", "?")


def zero_tangent(x):
    """A materialized zero tangent for a primal (float0 for integer primals)."""
    aval = typeof(x)
    if jax.numpy.issubdtype(aval.dtype, jax.numpy.inexact):
        return zeros_like_aval(aval)
    return np.zeros(aval.shape, jax.dtypes.float0)


def custom_jvp_parts(params) -> tuple[ClosedJaxpr, int, Callable]:
    """(call_jaxpr, num_consts, jvp_jaxpr_of) of a ``custom_jvp_call`` equation.

    ``jvp_jaxpr_of(tangent_is_zero: list[bool])`` returns ``(jaxpr, consts,
    out_tangent_is_zero)``; the jaxpr takes ``(*primals, *nonzero_tangents)``
    (the primals without the hoisted consts) and returns
    ``(*primal_outs, *nonzero_tangent_outs)``.
    """
    fun = params["jvp_jaxpr_fun"]

    def jvp_jaxpr_of(zeros):
        jaxpr, consts, out_zeros = fun.call_wrapped(*zeros)
        return jaxpr, consts, list(out_zeros)

    return params["call_jaxpr"], params["num_consts"], jvp_jaxpr_of


def custom_jvp_rule(params) -> tuple[int, Callable]:
    """``(num_consts, rule)`` of a custom_jvp call in either form.

    ``rule(primals, tangents)`` runs the user's JVP rule in the current trace on
    the primals (without the hoisted consts) and tangents (``None`` = zero:
    materialized, or a symbolic zero when the function asks for them) and
    returns ``(primal_outs, tangent_outs)`` with ``None`` for zero tangents.
    """
    symbolic = bool(params.get("symbolic_zeros", False))
    if "subfuns" in params:
        _, jvp = params["subfuns"]

        def rule(primals, tangents):
            ts = [(symbolic_zero(typeof(x)) if symbolic else zero_tangent(x))
                  if t is None else t for x, t in zip(primals, tangents)]
            outs = jvp.call_wrapped(*primals, *ts)
            n = len(outs) // 2
            return list(outs[:n]), [None if isinstance(t, (SymbolicZero, Zero)) else t
                                    for t in outs[n:]]
        return 0, rule

    _, num_consts, jvp_jaxpr_of = custom_jvp_parts(params)

    def rule(primals, tangents):
        if symbolic:
            zeros = [t is None for t in tangents]
            nz = [t for t in tangents if t is not None]
        else:
            zeros = [False] * len(tangents)
            nz = [zero_tangent(x) if t is None else t for x, t in zip(primals, tangents)]
        jaxpr, consts, out_zeros = jvp_jaxpr_of(zeros)
        outs = jcore.eval_jaxpr(jaxpr, consts, *primals, *nz)
        n_out = len(out_zeros)
        it = iter(outs[n_out:])
        return list(outs[:n_out]), [None if z else next(it) for z in out_zeros]
    return num_consts, rule


# ------------------------------------------------------------------- custom_vjp
def custom_vjp_name(params) -> str:
    """The user's function name of a ``custom_vjp_call`` equation (either form)."""
    if "name" in params:
        return params["name"]
    debug = getattr(getattr(params.get("call_jaxpr"), "jaxpr", None), "debug_info", None)
    return getattr(debug, "func_name", None) or "?"


def custom_vjp_parts(params):
    """(num_consts, fwd, bwd) of a ``custom_vjp_call`` in either form.

    ``fwd(primals, nonzeros)`` runs the user's fwd rule in the current trace and
    returns ``(residuals, primal_outs)`` as flat lists. ``bwd(residuals, cts,
    out_avals)`` runs the user's bwd rule and returns one cotangent per input
    (``None`` for a symbolic zero or a hoisted const).
    """
    out_trees = params["out_trees"]
    symbolic_zeros = params["symbolic_zeros"]
    if "subfuns" in params:
        _, fwd_fun, bwd_fun = params["subfuns"]

        def fwd(primals, nonzeros):
            res_and_outs = fwd_fun.call_wrapped(
                *[y for x, a in zip(primals, nonzeros) for y in (x, a)])
            return split_custom_vjp_fwd_outputs(res_and_outs, primals, out_trees)

        return 0, fwd, custom_vjp_bwd_runner(bwd_fun, 0, symbolic_zeros)

    num_consts = params["num_consts"]
    fwd_jaxpr_thunk = params["fwd_jaxpr_thunk"]

    def fwd(primals, nonzeros):
        consts_nz, in_nz = nonzeros[:num_consts], nonzeros[num_consts:]
        if any(consts_nz):
            raise custom_vjp_closure_error()
        fwd_jaxpr, fwd_consts = fwd_jaxpr_thunk.call_wrapped(*in_nz)
        outs = jcore.eval_jaxpr(fwd_jaxpr, fwd_consts, *primals[num_consts:])
        # input_fwds index the call's inputs, consts included (as in JAX's jvp).
        return split_custom_vjp_fwd_outputs(outs, primals, out_trees)

    return (num_consts, fwd, custom_vjp_bwd_runner(params["bwd"], num_consts, symbolic_zeros))


class _Differentiated(jax_ad.JVPTracer):
    """What fbackprop's eager tracers list among their contents so that
    ``jax.closure_convert``'s heuristic (``custom_derivatives._maybe_perturbed``,
    which recognizes only JAX's own JVP and staging tracers) takes them as
    differentiated values and hoists them out of the closure, as it does under
    ``jax.grad``. It is never used as a value."""
    __slots__ = ()

    @property
    def aval(self):
        return jcore.ShapedArray((), np.float32)

    def _short_repr(self):
        return "differentiated"


DIFFERENTIATED = object.__new__(_Differentiated)
DIFFERENTIATED.tangent = None   # not a symbolic zero: "perturbed"


# fbackprop's forward-mode tracers are JAX JVP tracers as far as code that
# inspects tracer types can tell: Equinox's ``filter_jvp`` keeps only outputs
# that are ``ad.JVPTracer``s of the current trace (``x._trace.main``, i.e. the
# trace's ``tag``), and would otherwise drop every tangent; ``lax.stop_gradient``
# and ``jax.closure_convert`` read ``.primal``/``.tangent`` the same way. A trace
# of ours gets a fresh ``TraceTag``, so JAX's own JVP traces never take it for
# one of theirs.
JVPTracer = jax_ad.JVPTracer
TraceTag = jcore.TraceTag


def init_tracer(tracer, trace, aval) -> None:
    """JAX's base ``Tracer.__init__`` (a JVPTracer subclass sets its own fields)."""
    jcore.Tracer.__init__(tracer, trace, aval)


def custom_vjp_closure_error():
    """JAX's error for differentiating a custom_vjp function through a closed-over value."""
    return jax_ad.CustomVJPException()


def split_custom_vjp_fwd_outputs(outs, primals, out_trees):
    """(residuals, primal outputs) of a custom_vjp fwd's flat outputs; residuals
    that are just inputs were forwarded by JAX and come from ``primals``."""
    _, res_tree, input_fwds = out_trees()
    num_res_out = res_tree.num_leaves - sum(f is not None for f in input_fwds)
    res_out, primal_outs = list(outs[:num_res_out]), list(outs[num_res_out:])
    it = iter(res_out)
    # A forwarded input may be a jaxpr's NumPy constant; the bwd rule gets what fwd
    # returned, a JAX array (it may index it with a traced value).
    res = [next(it) if f is None else _as_jax(primals[f]) for f in input_fwds]
    return res, primal_outs


def _as_jax(x):
    return jax.numpy.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x


def custom_vjp_bwd_runner(bwd, num_consts: int, symbolic_zeros: bool):
    """``run_bwd(residuals, cts, out_avals)``: the user's bwd, one cotangent (or
    ``None``) per input of the custom_vjp call (``None`` for hoisted consts)."""

    def run_bwd(res, cts, out_avals):
        if symbolic_zeros:
            cts = [ad_util.SymbolicZero(a.to_tangent_aval()) if c is None else c
                   for c, a in zip(cts, out_avals)]
        else:
            cts = [zeros_like_aval(a) if c is None else c for c, a in zip(cts, out_avals)]
        cts_in = bwd.call_wrapped(*res, *cts)
        return [None] * num_consts + [as_none_if_zero(c) for c in cts_in]

    return run_bwd


def as_none_if_zero(ct):
    """JAX's symbolic zero objects (and float0 arrays) become ``None``."""
    if ct is None or isinstance(ct, (ad_util.Zero, ad_util.SymbolicZero)):
        return None
    return ct


def with_weak_type(x, weak: bool):
    """``x`` with its weak-type flag set like a primal's (JAX keeps it on gradients)."""
    from jax._src.lax import lax as lax_internal
    if bool(getattr(typeof(x), "weak_type", False)) == weak:
        return x
    return lax_internal._convert_element_type(x, typeof(x).dtype, weak_type=weak)


def as_array_like(x, aval):
    """``x`` (a jaxpr literal's Python scalar or NumPy value, or an array) as a JAX
    array with exactly ``aval``'s dtype and weak type: what library code that
    compares structures (equinox's closure conversion) saw at trace time."""
    from jax._src.lax import lax as lax_internal
    if not hasattr(aval, "dtype"):
        return x  # a token or another non-array value
    weak = bool(getattr(aval, "weak_type", False))
    if not isinstance(x, (jax.Array, jcore.Tracer)):
        return lax_internal._convert_element_type(np.asarray(x), aval.dtype, weak_type=weak)
    if typeof(x).dtype != aval.dtype:
        return x
    return with_weak_type(x, weak)


SymbolicZero = ad_util.SymbolicZero
Zero = ad_util.Zero


def symbolic_zero(aval):
    return ad_util.SymbolicZero(aval.to_tangent_aval())


__all__ = [
    'function_name',
    'zero_tangent',
    'custom_jvp_parts',
    'custom_jvp_rule',
    'custom_vjp_name',
    'custom_vjp_parts',
    'DIFFERENTIATED',
    'JVPTracer',
    'TraceTag',
    'init_tracer',
    'custom_vjp_closure_error',
    'split_custom_vjp_fwd_outputs',
    'custom_vjp_bwd_runner',
    'as_none_if_zero',
    'with_weak_type',
    'as_array_like',
    'SymbolicZero',
    'Zero',
    'symbolic_zero',
]
