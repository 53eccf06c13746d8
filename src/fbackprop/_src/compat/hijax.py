"""Hi-level call primitives (``call_hi_primitive``): ``jax.checkpoint`` and
``jax.custom_vjp`` under ``jax_remat3`` / ``jax_custom_vjp3``, their VJP rules, and
the rounding of a checkpointed region's saved residuals."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import jax
import numpy as np
from jax._src import ad_util
from jax._src import core as jcore

from .core import Jaxpr, Var
from .custom_calls import as_none_if_zero
from .jaxprs import new_eqn

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


__all__ = [
    'CALL_HI',
    'REMAT_OPT',
    'CUSTOM_VMAP_CALL',
    'hi_kind',
    'hi_custom_vjp',
    'hi_vjp_fwd',
    'hi_flatten_out',
    'hi_unflatten_in',
    'hi_zero_cotangents',
    'hi_flatten_in_cts',
    'round_residuals',
]
