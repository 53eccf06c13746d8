"""Types, values and primitive names of JAX's core: the aliases every module uses
(``Var``, ``Jaxpr``...), abstract values and zeros, the names of call primitives,
JAX's trace protocol (the current trace, eager or not), dead-code elimination, and
the settings fbackprop's own rules run under."""

from __future__ import annotations

import contextlib as _contextlib
from typing import Any

import jax
import numpy as np
from jax._src import ad_util
from jax._src import core as jcore

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


# fbackprop's rules are written with jax.numpy and rely on its broadcasting; a
# user's ``jax_numpy_rank_promotion='raise'`` governs the user's code, not them.
from jax._src import config as _config  # noqa: E402

_NO_CONTEXT = _contextlib.nullcontext()


def rules_context():
    """The numerical settings fbackprop's own rules run under."""
    if _config.numpy_rank_promotion.value == "allow":
        return _NO_CONTEXT
    return jax.numpy_rank_promotion("allow")


__all__ = [
    'JAX_VERSION',
    'add_any_p',
    'Var',
    'Literal',
    'DropVar',
    'Jaxpr',
    'ClosedJaxpr',
    'JaxprEqn',
    'Primitive',
    'Tracer',
    'ShapedArray',
    'primitive',
    'wrapped_core',
    'typeof',
    'trace_state',
    'spec_of',
    'aval_key',
    'zeros_like_aval',
    'zeros_like',
    'is_tracer',
    'bind',
    'psum_p',
    'psum_invariant_p',
    'pvary_p',
    'all_gather_p',
    'reduce_scatter_p',
    'ppermute_p',
    'all_to_all_p',
    'axis_index_p',
    'JIT_NAMES',
    'CUSTOM_JVP_CALL',
    'CLOSED_CALL',
    'CALL_BODIES',
    'CUSTOM_VJP_CALL',
    'REMAT_NAMES',
    'is_plain_jit',
    'jit_inner',
    'remat_inner',
    'eval_jaxpr',
    'dce_keep_inputs',
    'dce_used_inputs',
    'dce_jaxpr',
    'join_effects',
    'Trace',
    'no_effects',
    'closed_call_p',
    'take_current_trace',
    'set_current_trace',
    'to_concrete_value',
    'get_referent',
    'full_lower',
    'cur_qdd',
    'current_trace',
    'is_eval_trace',
    'is_eager',
    'rules_context',
]
