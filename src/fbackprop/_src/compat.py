"""Everything that depends on JAX internals or a particular JAX version.

fbackprop supports ``jax>=0.10.2,<0.11``. Every private name, primitive name and
parameter layout that may change between JAX versions is read here and nowhere
else, so a new JAX is a contained change.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax._src import ad_util
from jax._src import core as jcore
from jax._src import source_info_util
from jax._src.interpreters import ad as jax_ad

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


def is_tracer(x: Any) -> bool:
    return isinstance(x, jcore.Tracer)


def source_line(eqn: JaxprEqn) -> str:
    """The user's file:line for an equation, as JAX summarizes it."""
    try:
        return source_info_util.summarize(eqn.source_info) or "<unknown source>"
    except Exception:  # pragma: no cover - source info is best effort
        return "<unknown source>"


def user_context(eqn: JaxprEqn):
    """Context that attributes primitives bound now to the equation's user frame."""
    return source_info_util.user_context(eqn.source_info.traceback,
                                         name_stack=eqn.source_info.name_stack)


def bind_eqn(eqn: JaxprEqn, invals: list) -> list:
    """Apply an equation's primitive to values in the current trace; always a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with user_context(eqn):
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


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
CUSTOM_VJP_CALL = "custom_vjp_call"
REMAT_NAMES = ("remat2", "checkpoint")


def jit_inner(params) -> ClosedJaxpr:
    """The closed sub-jaxpr of a ``jit``/``pjit`` equation."""
    return params["jaxpr"]


def remat_inner(params) -> tuple[Jaxpr, dict]:
    """The open sub-jaxpr of a checkpoint equation and its options."""
    return params["jaxpr"], dict(policy=params.get("policy"),
                                 prevent_cse=params.get("prevent_cse", True))


# ------------------------------------------------------------------- custom_jvp
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


# ------------------------------------------------------------------- custom_vjp
def custom_vjp_parts(params):
    """(call_jaxpr, num_consts, fwd, bwd, out_trees, symbolic_zeros) of a ``custom_vjp_call``.

    ``fwd(*primals, nonzeros)`` runs the user's fwd rule in the current trace and
    returns ``(residuals, primal_outs)`` as flat lists. ``bwd(residuals, cts)``
    runs the user's bwd rule and returns one cotangent per primal input
    (``None`` for a symbolic zero).
    """
    call_jaxpr = params["call_jaxpr"]
    num_consts = params["num_consts"]
    fwd_jaxpr_thunk = params["fwd_jaxpr_thunk"]
    bwd = params["bwd"]
    out_trees = params["out_trees"]
    symbolic_zeros = params["symbolic_zeros"]

    def fwd(primals, nonzeros):
        consts_nz, in_nz = nonzeros[:num_consts], nonzeros[num_consts:]
        if any(consts_nz):
            raise jax_ad.CustomVJPException()
        fwd_jaxpr, fwd_consts = fwd_jaxpr_thunk.call_wrapped(*in_nz)
        outs = jcore.eval_jaxpr(fwd_jaxpr, fwd_consts, *primals[num_consts:])
        _, res_tree, input_fwds = out_trees()
        num_res_out = res_tree.num_leaves - sum(f is not None for f in input_fwds)
        res_out, primal_outs = outs[:num_res_out], outs[num_res_out:]
        it = iter(res_out)
        res = [next(it) if f is None else primals[num_consts + f] for f in input_fwds]
        return res, list(primal_outs)

    def run_bwd(res, cts, out_avals):
        if symbolic_zeros:
            cts = [ad_util.SymbolicZero(a.to_tangent_aval()) if c is None else c
                   for c, a in zip(cts, out_avals)]
        else:
            cts = [zeros_like_aval(a) if c is None else c for c, a in zip(cts, out_avals)]
        cts_in = bwd.call_wrapped(*res, *cts)
        return [None] * num_consts + [as_none_if_zero(c) for c in cts_in]

    return call_jaxpr, num_consts, fwd, run_bwd, symbolic_zeros


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


def dce_jaxpr(jaxpr, used_outputs, instantiate=False):
    """JAX's dead-code elimination of a jaxpr: (new jaxpr, used inputs)."""
    from jax._src.interpreters import partial_eval as pe
    return pe.dce_jaxpr(jaxpr, used_outputs, instantiate=instantiate)


def join_effects(eqns):
    """The union of the effects of some equations."""
    return jcore.join_effects(*(e.effects for e in eqns)) if eqns else jcore.no_effects
