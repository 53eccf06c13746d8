"""Everything that depends on JAX internals or a particular JAX version.

fbackprop supports ``jax>=0.10.2,<0.11``. Every private name, primitive name and
parameter layout that may change between JAX versions is read here and nowhere
else, so a new JAX is a contained change.
"""

from __future__ import annotations

import collections as _collections
import contextlib as _contextlib
import functools
import weakref
from typing import Any, Callable

import jax
import numpy as np
from jax._src import ad_util
from jax._src import core as jcore
from jax._src import source_info_util
from jax._src.interpreters import ad as jax_ad

from . import context as _context

# Source lines reported to users skip fbackprop's own frames, as they skip JAX's.
import os as _os
source_info_util.register_exclusion(_os.path.dirname(_os.path.abspath(__file__)))

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

add_any_p = ad_util.add_jaxvals_p   # JAX autodiff's own addition ("add_any")

Var = jcore.Var
Literal = jcore.Literal
DropVar = jcore.DropVar
Jaxpr = jcore.Jaxpr
ClosedJaxpr = jcore.ClosedJaxpr
JaxprEqn = jcore.JaxprEqn
Primitive = jcore.Primitive
Tracer = jcore.Tracer
ShapedArray = jcore.ShapedArray


def primitive(name: str) -> Primitive:
    """A new primitive object (for users' own primitives and our own markers)."""
    return jcore.Primitive(name)


def wrapped_core(wrapped) -> Any:
    """The Python function at the core of a ``linear_util.WrappedFun`` (the
    subfunctions call primitives carry), or None."""
    return getattr(wrapped, "f", None)


def typeof(x: Any):
    """The abstract value (shape, dtype, weak type) of an array or tracer."""
    return jcore.typeof(x)


def trace_state():
    """An opaque token of the current trace (equal tokens: same trace context)."""
    return jcore.get_opaque_trace_state()


def spec_of(x):
    """A ``ShapeDtypeStruct`` with everything tracing needs of ``x``'s type: shape,
    dtype, weak type, sharding and (inside ``shard_map``) the mesh axes it varies over."""
    a = typeof(x)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=bool(getattr(a, "weak_type", False)),
                                sharding=getattr(a, "sharding", None),
                                manual_axis_type=getattr(a, "manual_axis_type", None))


def aval_key(x) -> tuple:
    """A hashable key of everything in ``x``'s type that a trace depends on."""
    a = typeof(x)
    return (tuple(a.shape), a.dtype, bool(getattr(a, "weak_type", False)),
            getattr(a, "sharding", None), getattr(a, "manual_axis_type", None))


def zeros_like_aval(aval):
    """Zeros of an abstract value, varying over the same ``shard_map`` axes."""
    z = jax.numpy.zeros(aval.shape, aval.dtype)
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    if varying:
        z = jax.lax.pcast(z, tuple(sorted(varying)), to="varying")
    return z


def zeros_like(x):
    """``lax.full_like(x, 0)``: the same equation, staged without ``full_like``'s
    argument handling when ``x`` is a plain array type (no weak type, no
    ``shard_map`` axes it varies over)."""
    a = typeof(x)
    mat = getattr(a, "manual_axis_type", None)
    if a.weak_type or (mat is not None and mat.varying):
        return jax.lax.full_like(x, 0)
    return jax.lax.broadcast_in_dim(np.zeros((), a.dtype), a.shape, (),
                                    out_sharding=a.sharding)


def is_tracer(x: Any) -> bool:
    return isinstance(x, jcore.Tracer)


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
    ctx = _context.current()
    if ctx.call_sites:
        site, inline = ctx.call_sites[-1]
        return [site] if inline or not has_user_frame(source_info) else [source_info]
    if ctx.call_tables and not has_user_frame(source_info):
        key = id(getattr(source_info, "traceback", None))
        for table in reversed(ctx.call_tables):
            if key in table:
                return table[key]
    return [source_info]


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


@_contextlib.contextmanager
def call_site(eqn: JaxprEqn):
    """While the body of the call ``eqn`` is swept (see :func:`reported_source_info`)."""
    site = reported_source_info(eqn.source_info)
    inline = eqn.primitive.name in JIT_NAMES and bool(eqn.params.get("inline", False))
    with _context.using(call_sites=_context.current().call_sites + ((site, inline),)):
        yield


def user_context(eqn: JaxprEqn):
    """Context that attributes primitives bound now to the equation's user frame."""
    return source_info_util.user_context(eqn.source_info.traceback,
                                         name_stack=eqn.source_info.name_stack)


def bind_eqn(eqn: JaxprEqn, invals: list) -> list:
    """Apply an equation's primitive to values in the current trace; always a list.

    Also for a custom_jvp / custom_vjp call recorded define-by-run, whose
    parameters hold the bind's Python functions (``subfuns``)."""
    if "subfuns" in eqn.params:
        params = {k: v for k, v in eqn.params.items() if k != "name"}
        return bind_in(current_trace(), eqn.primitive, list(invals), params)
    params = eqn.primitive.get_bind_params(eqn.params)
    with user_context(eqn):
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def staged_away(eqn: JaxprEqn, invals: list) -> list | None:
    """What JAX's staging (``jax.make_jaxpr``) makes of an equation it does not
    keep, so a tool reading a define-by-run recording shows what a staged
    program shows: ``None`` when staging keeps the equation; otherwise, per
    output, the index of the input it passes on (a no-op conversion), or
    ``None`` for a constant it computes (a Python scalar converted to an array).
    """
    from jax._src.interpreters import partial_eval as pe
    prim = eqn.primitive
    fold = pe.const_fold_rules.get(prim)
    if fold is not None and not any(is_tracer(x) for x in invals):
        try:
            out = fold(list(invals), eqn.params, [v.aval for v in eqn.outvars])
        except Exception:  # noqa: BLE001 - a rule that cannot fold these keeps the eqn
            out = None
        if out is not None:
            return [None] * len(eqn.outvars)
    forward = pe.forwarding_rules.get(prim)
    if forward is not None and prim.name not in JIT_NAMES:
        index, kept = forward(eqn)
        if kept is None:
            return list(index)
    return None


def bind(prim: Primitive, *args, **params):
    return prim.bind(*args, **params)


# ------------------------------------------------------------------ collectives
from jax._src.lax import parallel as _parallel  # noqa: E402

psum_p = _parallel.psum_p
psum_invariant_p = _parallel.psum_invariant_p
pvary_p = jcore.pvary_p
all_gather_p = _parallel.all_gather_p
reduce_scatter_p = _parallel.reduce_scatter_p
ppermute_p = _parallel.ppermute_p
all_to_all_p = _parallel.all_to_all_p
axis_index_p = _parallel.axis_index_p


# ---------------------------------------------------------------- primitive names
# Nested ``jax.jit`` is ``pjit`` in older JAX and ``jit`` in 0.7+; we accept both.
JIT_NAMES = ("jit", "pjit")
CUSTOM_JVP_CALL = "custom_jvp_call"
CLOSED_CALL = "closed_call"
# Other call primitives whose body is a jaxpr param: core.call (an open
# ``call_jaxpr``) and eval_jaxpr (a closed ``jaxpr``; staged as closed_call).
CALL_BODIES = {
    "closed_call": lambda params: params["call_jaxpr"],
    "call": lambda params: ClosedJaxpr(params["call_jaxpr"], ()),
    "eval_jaxpr": lambda params: params["jaxpr"],
}
CUSTOM_VJP_CALL = "custom_vjp_call"
REMAT_NAMES = ("remat2", "checkpoint")


def is_plain_jit(params) -> bool:
    """A nested jit with nothing but a body: no shardings, layouts, donation or
    compiler options (jax.numpy's helpers, most user jits)."""
    unspecified = lambda s: type(s).__name__ == "UnspecifiedValue"  # noqa: E731
    return (all(map(unspecified, params["in_shardings"]))
            and all(map(unspecified, params["out_shardings"]))
            and not any(params["donated_invars"])
            and all(x is None for x in params.get("in_layouts", ()))
            and all(x is None for x in params.get("out_layouts", ()))
            and not params.get("compiler_options_kvs"))


def jit_inner(params) -> ClosedJaxpr:
    """The closed sub-jaxpr of a ``jit``/``pjit`` equation."""
    return params["jaxpr"]


def remat_inner(params) -> tuple[Jaxpr, dict]:
    """The open sub-jaxpr of a checkpoint equation and its options."""
    return params["jaxpr"], dict(policy=params.get("policy"),
                                 prevent_cse=params.get("prevent_cse", True))


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


def eval_jaxpr(jaxpr, consts, *args):
    """Evaluates a jaxpr in the current trace (no differentiation involved)."""
    return jcore.eval_jaxpr(jaxpr, consts, *args)


def dce_keep_inputs(jaxpr, used_outputs) -> Jaxpr:
    """Dead-code elimination of unused outputs; constvars become leading invars.

    The result takes ``(*consts, *args)`` and returns only the used outputs.
    """
    from jax._src.interpreters import partial_eval as pe
    if jaxpr.constvars:
        jaxpr = pe.convert_constvars_jaxpr(jaxpr)
    new, _ = pe.dce_jaxpr(jaxpr, list(used_outputs), instantiate=True)
    return new


def dce_used_inputs(jaxpr) -> list:
    """Per input of ``jaxpr``: does any output depend on it."""
    from jax._src.interpreters import partial_eval as pe
    _, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return list(used)


def dce_jaxpr(jaxpr, used_outputs, instantiate=False):
    """JAX's dead-code elimination of a jaxpr: (new jaxpr, used inputs)."""
    from jax._src.interpreters import partial_eval as pe
    return pe.dce_jaxpr(jaxpr, used_outputs, instantiate=instantiate)


def join_effects(eqns):
    """The union of the effects of some equations."""
    return jcore.join_effects(*(e.effects for e in eqns)) if eqns else jcore.no_effects


# ------------------------------------------------------------- define-by-run
# fbackprop's eager sweeps run the user's function on traces of their own
# (see recording.py): JAX's trace protocol, named here.
Trace = jcore.Trace
no_effects = jcore.no_effects
closed_call_p = jcore.closed_call_p
take_current_trace = jcore.take_current_trace
set_current_trace = jcore.set_current_trace
to_concrete_value = jcore.to_concrete_value
get_referent = jcore.get_referent
full_lower = jcore.full_lower
cur_qdd = jcore.cur_qdd


def current_trace():
    """The trace primitives bind into right now (JAX's eval trace when eager)."""
    return jcore.trace_ctx.trace


def is_eval_trace(trace) -> bool:
    """``trace`` runs primitives on concrete values."""
    return isinstance(trace, jcore.EvalTrace)


def is_eager() -> bool:
    """No transformation is tracing: primitives run on concrete values."""
    return isinstance(jcore.trace_ctx.trace, jcore.EvalTrace)


def current_source_info():
    return source_info_util.current()


def new_eqn(invars, outvars, prim, params, effects, source_info) -> JaxprEqn:
    return jcore.new_jaxpr_eqn(invars, outvars, prim, params, effects, source_info)


def abstract_eval(prim, avals, params) -> tuple[list, Any]:
    """(output avals as a list, effects) of binding ``prim`` on ``avals``."""
    out, effects = prim.abstract_eval(*avals, **params)
    return (list(out) if prim.multiple_results else [out]), effects


def typed_eqn(prim, params, invars, source_info) -> JaxprEqn:
    """An equation of ``prim`` on ``invars`` with its output types and effects: a
    nested jit's from its jaxpr, any other primitive's by abstract evaluation."""
    if prim.name in JIT_NAMES:
        closed = jit_inner(params)
        out_avals, effects = closed.out_avals, closed.effects
    else:
        out_avals, effects = abstract_eval(prim, [v.aval for v in invars], params)
    return new_eqn(invars, [Var(a) for a in out_avals], prim, params, effects, source_info)


def bind_in(trace, prim, args, params):
    """Binds ``prim`` in ``trace`` (not the current one); always a list."""
    out = prim.bind_with_trace(trace, args, tuple(typeof(a) for a in args), params)
    return list(out) if prim.multiple_results else [out]


def constvars_to_invars(closed: ClosedJaxpr) -> tuple[Jaxpr, list]:
    """A closed jaxpr as an open one taking its constants as leading inputs."""
    from jax._src.interpreters import partial_eval as pe
    jaxpr = closed.jaxpr
    if jaxpr.constvars:
        jaxpr = pe.convert_constvars_jaxpr(jaxpr)
    return jaxpr, list(closed.consts)


def open_jaxpr_taking_consts(jaxpr: Jaxpr) -> Jaxpr:
    """``jaxpr`` with its constvars turned into leading inputs."""
    from jax._src.interpreters import partial_eval as pe
    return pe.convert_constvars_jaxpr(jaxpr) if jaxpr.constvars else jaxpr


def make_jaxpr_of_bind(prim, specs, params) -> ClosedJaxpr:
    """Stages one ``prim.bind(*args, **params)`` into a closed jaxpr (used for
    call-like primitives whose bind parameters are functions, e.g. custom_jvp)."""
    return jax.make_jaxpr(lambda *xs: prim.bind(*xs, **params))(*specs)


SymbolicZero = ad_util.SymbolicZero
Zero = ad_util.Zero


def symbolic_zero(aval):
    return ad_util.SymbolicZero(aval.to_tangent_aval())


def _single_eqn_jaxpr(eqn) -> Jaxpr:
    invars, seen = [], set()
    for v in eqn.invars:
        if type(v) is not Literal and v not in seen:
            seen.add(v)
            invars.append(v)
    return new_jaxpr([], invars, list(eqn.outvars), [eqn]), invars


def eqn_inputs_used(eqn, used_outputs) -> list:
    """Per input of ``eqn``: whether the used outputs depend on it (JAX's
    dead-code elimination rules for loops and branches)."""
    from jax._src.interpreters import partial_eval as pe
    if any(type(v) is DropVar for v in eqn.outvars):
        eqn = eqn.replace(outvars=[Var(v.aval) if type(v) is DropVar else v
                                   for v in eqn.outvars])
    jaxpr, invars = _single_eqn_jaxpr(eqn)
    _, used = pe.dce_jaxpr(jaxpr, list(used_outputs), instantiate=False)
    by_var = dict(zip(invars, used))
    return [type(v) is not Literal and by_var[v] for v in eqn.invars]


def dce_eqn(eqn, used_outputs) -> list:
    """``eqn`` pruned to the outputs in ``used_outputs`` (the others are dropped):
    a list of equations (possibly empty)."""
    from jax._src.interpreters import partial_eval as pe
    eqn = eqn.replace(outvars=[v if u else DropVar(v.aval)
                               for v, u in zip(eqn.outvars, used_outputs)])
    jaxpr, _ = _single_eqn_jaxpr(eqn)
    jaxpr = jaxpr.replace(outvars=[v for v in eqn.outvars if type(v) is not DropVar])
    new, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
    return list(new.eqns)


def reset_stores(wrapped_fun):
    """Empties the auxiliary-output stores of a ``lu.WrappedFun``."""
    for store in wrapped_fun.stores:
        store = getattr(store, "_store", store)      # an EqualStore wraps a Store
        if store is not None:
            store.reset()


# ------------------------------------------------------------------ hijax
# ``jax.checkpoint`` and ``jax.custom_vjp`` become one ``call_hi_primitive``
# equation each under ``jax_remat3`` / ``jax_custom_vjp3`` (announced as JAX's
# next defaults); its ``_prim`` parameter is an object describing the call.
CALL_HI = "call_hi_primitive"
REMAT_OPT = "remat_opt"
CUSTOM_VMAP_CALL = "custom_vmap_call"


def hi_kind(hi) -> str:
    """What a ``call_hi_primitive``'s ``_prim`` is: ``"remat"``, ``"name"``
    (checkpoint_name), ``"custom_vjp"``, ``"vjp"`` (another primitive with its
    own VJP), or ``"other"``."""
    from jax._src import ad_checkpoint as _ac
    from jax._src import hijax as _hj
    if isinstance(hi, _ac.RematTraced):
        return "remat"
    if isinstance(hi, _ac.CheckpointName):
        return "name"
    if hi_custom_vjp(hi) is not None:
        return "custom_vjp"
    if type(hi).vjp_bwd_retval is not _hj.VJPHiPrimitive.vjp_bwd_retval:
        return "vjp"
    return "other"


def hi_custom_vjp(hi):
    """The ``custom_vjp`` function (JAX's ``CustomVJPTraced``) whose rules define
    the derivative of the hi-level primitive ``hi``: ``hi`` itself, or the
    function a ``VmapOf`` (``jax.vmap`` of a custom_vjp function) batches; else
    ``None``."""
    from jax._src import hijax as _hj
    while isinstance(hi, _hj.VmapOf):
        hi = hi.prim
    return hi if isinstance(hi, _hj.CustomVJPTraced) else None


def hi_vjp_fwd(hi, nzs, args) -> tuple:
    """``(out, residuals)`` of a hi-level primitive's own VJP forward rule.

    A ``custom_vjp`` function defined with ``optimize_remat=True`` promises that
    its ``fwd`` computes the function's own output; JAX binds its ``fwd`` as one
    ``OptRemat`` call whose dead-code elimination swaps the function itself back
    in wherever the residuals go unused (the forward part of a checkpointed
    region, which recomputes them in its backward part). fbackprop binds the
    same call, so its forward sweeps give JAX's primal there too.
    """
    from jax._src import hijax as _hj
    if isinstance(hi, _hj.CustomVJPTraced) and hi.opt_remat and not hi.symbolic_zeros:
        traced = jax.jit(functools.partial(hi.vjp_fwd, nzs)).trace(*args)
        out, res = _opt_remat_type()(hi, traced)(*args)
        return out, res
    out, res, *_ = hi.vjp_fwd(nzs, *args)
    return out, res


@functools.cache
def _opt_remat_type():
    """JAX's ``OptRemat`` that ``jax.vmap`` can batch (JAX binds it only inside
    checkpointed regions, fbackprop wherever it differentiates the function):
    batched, it is the batched ``fwd``."""
    from jax import tree_util as _tu
    from jax._src import hijax as _hj
    from jax._src.interpreters import batching as _batching

    class BatchableOptRemat(_hj.OptRemat):
        def batch_dim_rule(self, axis_data, in_dims):
            in_dims_flat = self.in_tree.flatten_up_to(in_dims)
            _, out_dims = _batching.batch_jaxpr2(self.traced_fwd.jaxpr, axis_data,
                                                 tuple(in_dims_flat))
            return _tu.tree_unflatten(self.out_tree, out_dims)

    return BatchableOptRemat


def hi_flatten_out(hi, out) -> list:
    return list(hi.out_tree.flatten_up_to(out))


def hi_unflatten_in(hi, flat):
    from jax import tree_util as _tu
    return _tu.tree_unflatten(hi.in_tree, list(flat))


def hi_zero_cotangents(hi, cts) -> Any:
    """Output cotangents (``None`` = zero) as the primitive's output pytree, with
    JAX's symbolic zeros."""
    from jax import tree_util as _tu
    full = [ad_util.Zero(a.to_ct_aval()) if c is None else c
            for c, a in zip(cts, hi.out_avals_flat)]
    return _tu.tree_unflatten(hi.out_tree, full)


def hi_flatten_in_cts(hi, in_cts) -> list:
    flat = hi.in_tree.flatten_up_to(in_cts)
    return [as_none_if_zero(c) for c in flat]


_rounded: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def round_residuals(jaxpr: Jaxpr, num_res: int) -> Jaxpr:
    """``jaxpr`` with each of its last ``num_res`` outputs (the values a
    checkpointed region's forward part saves) rounded to its dtype where it is
    produced (``reduce_precision``), as JAX's checkpoint does (JAX PR #22244):
    XLA may compute a bfloat16 value in float32 for its uses in the forward part
    while the backward part reads the saved, rounded value. Only floats
    narrower than 32 bits are rounded (XLA computes no excess precision for the
    others; JAX's no-op roundings of them cost memory)."""
    key = (num_res,)
    hit = _rounded.get(jaxpr, {}).get(key)
    if hit is not None:
        return hit
    from jax._src.lax import lax as _lax
    saved = jaxpr.outvars[len(jaxpr.outvars) - num_res:]
    used = {x for e in jaxpr.eqns for x in e.invars if isinstance(x, Var)}
    eqns = list(jaxpr.eqns)
    for v in dict.fromkeys(saved):
        dtype = getattr(v.aval, "dtype", None)
        if (not isinstance(v, Var) or v not in used or dtype is None
                or not jax.dtypes.issubdtype(dtype, np.floating)
                or jax.dtypes.finfo(dtype).bits >= 32):
            continue
        at = next((i for i, e in enumerate(eqns) if v in e.outvars), None)
        if at is None:          # an input of the region: not computed here
            continue
        finfo = jax.dtypes.finfo(dtype)
        unrounded = Var(v.aval)
        producer = eqns[at]
        eqns[at] = producer.replace(outvars=[unrounded if o is v else o
                                             for o in producer.outvars])
        eqns.insert(at + 1, new_eqn([unrounded], [v], _lax.reduce_precision_p,
                                    dict(exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant),
                                    jcore.no_effects, producer.source_info))
    rounded = jaxpr.replace(eqns=eqns) if len(eqns) != len(jaxpr.eqns) else jaxpr
    _rounded.setdefault(jaxpr, {})[key] = rounded
    return rounded


# ---------------------------------------------------------------- custom_vmap
# ``jax.custom_batching.custom_vmap`` binds ``custom_vmap_call`` with the
# function's jaxpr (``call``, run where nothing batches it) and its batching rule
# (``rule``, run by ``vmap``), which takes and returns pytrees (``in_tree``,
# ``out_tree``). fbackprop's derivatives are ``custom_vmap_call`` equations
# again, whose rules take flat lists.
def custom_vmap_parts(params) -> tuple:
    """``(call, rule, in_tree, out_tree)`` of a ``custom_vmap_call`` equation."""
    return params["call"], params["rule"], params["in_tree"], params["out_tree"]


def call_vmap_rule(rule, in_tree, out_tree, axis_size, batched: list, args: list) -> tuple:
    """Runs a ``custom_vmap_call``'s batching rule as JAX's ``vmap`` runs it
    (batched arguments have their batch axis in front, ``batched`` says which),
    on flat lists: ``(outs, out_batched)`` as flat lists, checked as JAX checks
    them."""
    from jax import tree_util as _tu
    from jax._src import custom_batching as _cb
    out, out_batched = _cb.call_rule(rule, axis_size, _tu.tree_unflatten(in_tree, batched),
                                     _tu.tree_unflatten(in_tree, list(args)))
    outs, tree = _tu.tree_flatten(out)
    flags, flags_tree = _tu.tree_flatten(out_batched)
    _cb.check_vmap_rule_trees(rule, out_tree, tree, flags_tree)
    return outs, [bool(b) for b in flags]


def bind_custom_vmap(args: list, call: ClosedJaxpr, rule: Callable, n_out: int) -> list:
    """Binds ``custom_vmap_call`` with a ``rule(axis_size, batched, *args)`` over
    flat lists that returns ``(outs, out_batched)`` as tuples."""
    from jax import tree_util as _tu
    from jax._src import custom_batching as _cb
    return _cb.custom_vmap_p.bind(*args, call=call, rule=rule,
                                  in_tree=_tu.tree_structure((0,) * len(args)),
                                  out_tree=_tu.tree_structure((0,) * n_out))


def vmap_unrestricted(fun: Callable, args: list, in_axes: list, axis_size: int) -> tuple:
    """``jax.vmap`` of ``fun`` (flat list in, flat list out) that infers its
    output axes instead of being told them: ``(outs, out_axes)`` (``None`` for
    an unbatched output), as JAX batches the JVP of a custom batching rule."""
    from jax._src import linear_util as lu
    from jax._src import api_util
    from jax._src import custom_batching as _cb
    debug = api_util.debug_info("custom_vmap rule", fun, tuple(args), {})
    wrapped = lu.wrap_init(lambda *xs: list(fun(*xs)), debug_info=debug)
    return _cb.vmap_unrestricted(wrapped, *args, in_axes=list(in_axes),
                                 axis_name=jcore.no_axis_name, axis_size=axis_size)


def _is_high(eqn) -> bool:
    try:
        return eqn.primitive.is_high(*[v.aval for v in eqn.invars], **eqn.params)
    except TypeError:
        # A call recorded define-by-run (a custom_jvp call holding its Python
        # functions, not its jaxpr) has no staged parameters to ask: it is
        # bound again as recorded, never lowered from this jaxpr.
        return False


def new_jaxpr(constvars, invars, outvars, eqns, fun_name: str = "fun") -> Jaxpr:
    """A jaxpr built by fbackprop (e.g. from a define-by-run recording)."""
    from jax._src import linear_util as lu
    debug = lu.DebugInfo("fbackprop", fun_name, None, None)
    # A jaxpr holding a hi-level equation (a remat3 checkpoint, a custom_vjp3
    # function) says so, as JAX's own tracing does: a primitive whose body it
    # is (a scan) is then lowered to low-level JAX before compilation.
    is_high = any(_is_high(eqn) for eqn in eqns)
    return Jaxpr(constvars, invars, outvars, eqns, join_effects(eqns), debug_info=debug,
                 is_high=is_high)


# -------------------------------------------------------------------- scan
def bind_scan(params, jaxpr: Jaxpr, consts: list, num_consts: int, args: list,
              **overrides) -> list:
    """Binds ``lax.scan``'s primitive with the parameters of another scan equation
    (``params``: length, reverse, unroll...; ``overrides`` replace some, e.g.
    ``reverse`` or ``num_carry``) and a body ``jaxpr`` built directly (its
    constvars fed by ``consts``, then ``num_consts`` loop-invariant inputs, the
    carries and the per-step inputs in ``args``)."""
    from jax._src.lax.control_flow.loops import scan_p
    from jax._src.interpreters import partial_eval as pe
    body = pe.convert_constvars_jaxpr(jaxpr) if jaxpr.constvars else jaxpr
    new_params = dict(params, jaxpr=ClosedJaxpr(body, ()), num_consts=len(consts) + num_consts,
                      **overrides)
    if "linear" in params:     # the parameter of earlier JAX versions
        new_params["linear"] = (False,) * (len(consts) + len(args))
    return scan_p.bind(*consts, *args, **new_params)


# ------------------------------------------------- equations built directly
_glue_templates: dict = {}


def _glue_template(kind: str, aval, weak: bool = False) -> JaxprEqn:
    key = (kind, aval, weak)
    eqn = _glue_templates.get(key)
    if eqn is None:
        lax = jax.lax
        spec = jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=weak)
        if kind == "zeros":
            fn = lambda: lax.broadcast_in_dim(np.zeros((), aval.dtype), tuple(aval.shape), ())  # noqa: E731
            closed = jax.make_jaxpr(fn)()
        elif kind == "strong":
            closed = jax.make_jaxpr(lambda x: with_weak_type(x, False))(spec)
        else:
            closed = jax.make_jaxpr(lax.add)(spec, spec)
        eqns = closed.jaxpr.eqns
        assert len(eqns) == 1 and not closed.consts, (kind, closed)
        eqn = _glue_templates[key] = eqns[0]
    return eqn


def zeros_eqn(outvar: Var) -> JaxprEqn:
    """An equation defining ``outvar`` as zeros of its type (no weak type)."""
    aval = outvar.aval
    if aval.shape:
        return _glue_template("zeros", aval).replace(outvars=[outvar])
    # A scalar: jax.numpy stages no equation for it (the literal is the value);
    # the broadcast of a one-element template to shape () defines the variable.
    template = _glue_template("zeros", aval.update(shape=(1,)))
    return template.replace(params=dict(template.params, shape=()), outvars=[outvar])


def strong_eqn(invar, outvar: Var) -> JaxprEqn:
    """An equation defining ``outvar`` as the weakly typed ``invar`` without its
    weak type (same shape and dtype)."""
    template = _glue_template("strong", outvar.aval, weak=True)
    return template.replace(invars=[invar], outvars=[outvar])


def add_eqn(x, y, outvar: Var) -> JaxprEqn:
    """An equation defining ``outvar = x + y`` (all of ``outvar``'s type)."""
    template = _glue_template("add", outvar.aval)
    return template.replace(invars=[x, y], outvars=[outvar])


# ------------------------------------------------------ per-example sweeps
def mapped_by(trace, x) -> bool:
    """``x`` is a value of the ``vmap`` whose trace is ``trace``, batched along an
    axis (a value the vmap does not batch is the same for every example)."""
    from jax._src.interpreters import batching as _batching
    return isinstance(trace, _batching.BatchTrace) and trace.to_batch_info(x)[1] is not None


def batched_value(trace, x) -> tuple:
    """``(value, axis)``: a value of the ``vmap`` whose trace is ``trace``, as the
    array of all examples in the enclosing trace (``vmap_parent(trace)``) and its
    examples' axis (``None``: the same for every example, ``value`` is ``x``)."""
    return trace.to_batch_info(x)


def vmap_parent(trace):
    """The trace enclosing a ``vmap``'s and its number of examples."""
    return trace.parent_trace, trace.axis_data.size


# fbackprop's rules are written with jax.numpy and rely on its broadcasting; a
# user's ``jax_numpy_rank_promotion='raise'`` governs the user's code, not them.
from jax._src import config as _config  # noqa: E402

_NO_CONTEXT = _contextlib.nullcontext()


def rules_context():
    """The numerical settings fbackprop's own rules run under."""
    if _config.numpy_rank_promotion.value == "allow":
        return _NO_CONTEXT
    return jax.numpy_rank_promotion("allow")
