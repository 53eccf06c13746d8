"""JAX's higher-level call primitives: ``call_hi_primitive``, ``remat_opt``,
``custom_vmap_call``.

``call_hi_primitive`` is what ``jax.checkpoint`` and ``jax.custom_vjp`` stage
to under ``jax_remat3`` / ``jax_custom_vjp3``. Its ``_prim`` parameter says
what the call is:

- a checkpoint (``RematTraced``): fbackprop's own checkpointing
  (:class:`fbackprop._src.remat.RematCall`) on the region's jaxpr and policy;
- ``checkpoint_name``: the identity (a policy sees it as JAX's ``name``);
- a ``custom_vjp`` function, or another primitive defining its own VJP: the
  user's (library's) ``fwd``/``bwd`` rules, as for ``custom_vjp_call``;
- anything else has no rule (differentiating its expansion could silently
  ignore a custom gradient).

``remat_opt`` (a ``custom_vjp`` fwd with ``optimize_remat=True``) is
differentiated through its ``fwd_jaxpr``. ``custom_vmap_call`` is differentiated
through its ``call`` jaxpr only eagerly: under jit or vmap a vmap of the
derivative would need the derivative of the custom batching rule, so it is an
error there.
"""

from __future__ import annotations

import dataclasses
import weakref

from .. import compat
from .. import forward as _forward
from ..registry import MissingRuleError, call_handlers_forward, call_handlers_reverse, \
    linear_primitives
from .calls import CallHandler, InlineCall, _as_cotangent, _inline_jvp


# --------------------------------------------------------- checkpoint policies
_translated: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _name_aware(policy):
    """``policy`` seeing a remat3 ``checkpoint_name`` as JAX's ``name`` primitive."""
    if policy is None:
        return None
    try:
        hit = _translated.get(policy)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    from .debug import name_p

    def translated(prim, *avals, **params):
        hi = params.get("_prim")
        if prim.name == compat.CALL_HI and hi is not None and compat.hi_kind(hi) == "name":
            return policy(name_p, *avals, name=hi.name)
        return policy(prim, *avals, **params)

    try:
        _translated[policy] = translated
    except TypeError:
        pass
    return translated


def _remat_eqn(eqn):
    hi = eqn.params["_prim"]
    return eqn.replace(params=dict(jaxpr=hi.jaxpr, policy=_name_aware(hi.policy),
                                   prevent_cse=True))


def _missing(eqn, mode):
    hi = eqn.params["_prim"]
    return MissingRuleError(
        f"fbackprop has no {mode}-mode rule for the hi-level primitive "
        f"{type(hi).__name__} (a call_hi_primitive) used at {compat.source_line(eqn)}: it "
        f"defines no VJP of its own (vjp_fwd/vjp_bwd_retval), and differentiating its "
        f"expansion could ignore a custom gradient. Register a rule with "
        f"fbackprop.extend, or avoid this operation.")


# ---------------------------------------------------------------- reverse mode
class HiCall(CallHandler):
    """Reverse mode of ``call_hi_primitive``, by what its ``_prim`` is."""

    def __init__(self):
        from ..remat import RematCall
        self.remat = RematCall()

    def forward(self, eqn, invals, active):
        hi = eqn.params["_prim"]
        kind = compat.hi_kind(hi)
        if kind == "remat":
            outs, sub, out_act = self.remat.forward(_remat_eqn(eqn), invals, active)
            return outs, ("remat", sub), out_act
        if kind == "name":
            return list(invals), ("name",), [True]
        if kind in ("custom_vjp", "vjp"):
            args = compat.hi_unflatten_in(hi, invals)
            nzs = compat.hi_unflatten_in(hi, active)
            with compat.user_context(eqn):
                out, res = compat.hi_vjp_fwd(hi, nzs, args)
            outs = compat.hi_flatten_out(hi, out)
            return outs, ("vjp", res), [True] * len(outs)
        raise _missing(eqn, "reverse")

    def backward(self, record, cts_out):
        hi = record.eqn.params["_prim"]
        kind = record.sub[0]
        if kind == "name":
            return list(cts_out)
        if kind == "remat":
            inner = dataclasses.replace(record, eqn=_remat_eqn(record.eqn), sub=record.sub[1])
            return self.remat.backward(inner, cts_out)
        if kind == "vjp":
            res = record.sub[1]
            with compat.user_context(record.eqn):
                in_cts = hi.vjp_bwd_retval(res, compat.hi_zero_cotangents(hi, cts_out))
            cts = compat.hi_flatten_in_cts(hi, in_cts)
            return [_as_cotangent(c, x) if a and c is not None else None
                    for c, x, a in zip(cts, record.invals, record.active)]
        raise AssertionError(kind)


call_handlers_reverse[compat.CALL_HI] = HiCall()


def _hi_linear(active, *, _prim):
    return compat.hi_kind(_prim) in ("remat", "name")


linear_primitives[compat.CALL_HI] = _hi_linear


# ---------------------------------------------------------------- forward mode
def _hi_jvp(eqn, invals, tangents):
    hi = eqn.params["_prim"]
    kind = compat.hi_kind(hi)
    if kind == "remat":
        closed = hi.jaxpr
        return _forward.jvp_jaxpr(closed.jaxpr, closed.consts, invals, tangents)
    if kind == "name":
        return list(invals), list(tangents)
    if kind == "custom_vjp":
        raise _forward.custom_vjp_forward_error(
            compat.hi_custom_vjp(hi).traced.fun_name, compat.source_line(eqn))
    raise _missing(eqn, "forward")


call_handlers_forward[compat.CALL_HI] = _hi_jvp


# ----------------------------------------------- calls through their own jaxpr
def _remat_opt_jaxpr(params):
    return params["fwd_jaxpr"]


def _custom_vmap_jaxpr(params):
    return params["call"]


call_handlers_reverse[compat.REMAT_OPT] = InlineCall(_remat_opt_jaxpr)
call_handlers_forward[compat.REMAT_OPT] = _inline_jvp(_remat_opt_jaxpr)
linear_primitives[compat.REMAT_OPT] = True


def _custom_vmap_not_batched(eqn):
    """Through its ``call`` jaxpr is right only where nothing can batch the result
    with the custom rule: on concrete values. Under jit or vmap, JAX differentiates
    the custom batching rule as well; fbackprop does not, so it refuses."""
    if not compat.is_eager():
        raise NotImplementedError(
            f"fbackprop cannot differentiate the jax.custom_batching.custom_vmap function "
            f"at {compat.source_line(eqn)} under jax.jit or jax.vmap: a vmap of the "
            f"derivative must use the derivative of its custom batching rule, which "
            f"fbackprop does not build. Differentiate it eagerly (no enclosing "
            f"transformation), or with jax.grad/jax.jvp.")


class _CustomVmapCall(InlineCall):
    def forward(self, eqn, invals, active):
        _custom_vmap_not_batched(eqn)
        return super().forward(eqn, invals, active)


def _custom_vmap_jvp():
    inline = _inline_jvp(_custom_vmap_jaxpr)

    def handler(eqn, invals, tangents):
        _custom_vmap_not_batched(eqn)
        return inline(eqn, invals, tangents)
    return handler


call_handlers_reverse[compat.CUSTOM_VMAP_CALL] = _CustomVmapCall(_custom_vmap_jaxpr)
call_handlers_forward[compat.CUSTOM_VMAP_CALL] = _custom_vmap_jvp()
linear_primitives[compat.CUSTOM_VMAP_CALL] = True
