"""Marker primitives: fbackprop's ``tag`` and JAX's ``checkpoint_name``.

Both are the identity on their operand. They exist so a value keeps a name in
the jaxpr: :func:`fbackprop.grad_and_intermediates` reports the cotangent
arriving at each named value, and a tag's ``hook`` may read or replace that
cotangent during the backward sweep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.interpreters import ad as jax_ad
from jax.interpreters import batching, mlir

from .. import compat
from ..registry import register_jvp, register_vjp

# ------------------------------------------------------------- the tag primitive
# Params: ``name`` (str), ``hook`` (callable or None) and ``hook_batch_dims``:
# the batch axis each enclosing ``vmap`` added to the operand, innermost first,
# so the hook can be mapped back over them and still see one example's cotangent.
tag_p = compat.primitive("fbackprop_tag")
# Eagerly a new array (not ``x`` itself), so every value keeps one producer.
tag_p.def_impl(lambda x, **_: jnp.array(x, copy=True))
tag_p.def_abstract_eval(lambda x, **_: x)
mlir.register_lowering(tag_p, lambda ctx, x, **_: [x])


def _tag_batch(args, dims, *, name, hook, hook_batch_dims):
    (x,), (d,) = args, dims
    if d is not None:                    # None: this operand is not batched
        hook_batch_dims = hook_batch_dims + (d,)
    return tag_p.bind(x, name=name, hook=hook, hook_batch_dims=hook_batch_dims), d


batching.primitive_batchers[tag_p] = _tag_batch


# JAX's own transformations (a user's jax.grad over tagged code) see a tag as
# the identity and ignore its hook; fbackprop's engine never reads this table.
def _tag_jax_jvp(primals, tangents, **params):
    return tag_p.bind(primals[0], **params), tangents[0]


jax_ad.primitive_jvps[tag_p] = _tag_jax_jvp


def _describe(x) -> str:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return f"a {type(x).__name__}"
    return f"{np.dtype(dtype).name}{list(np.shape(x))}"


def _checked_hook(hook, name):
    """``hook`` with its result checked against the cotangent it received."""

    def run(ct):
        new = hook(ct)
        if new is None:                       # a hook that only reads
            return ct
        if np.shape(new) != np.shape(ct) or getattr(new, "dtype", None) != ct.dtype:
            hook_name = getattr(hook, "__qualname__", repr(hook))
            raise TypeError(
                f"The hook {hook_name} of tag '{name}' returned {_describe(new)}, but the "
                f"cotangent it replaces is {_describe(ct)}. A hook must return an array "
                f"with its cotangent's shape and dtype (e.g. jnp.clip(ct, -1, 1)), or None "
                f"to leave the cotangent unchanged.")
        return new

    return run


def apply_hook(hook, ct, name, hook_batch_dims=()):
    """Runs a tag's hook on its cotangent, mapped over any ``vmap`` batch axes."""
    fn = _checked_hook(hook, name)
    for d in hook_batch_dims:             # innermost vmap first
        fn = jax.vmap(fn, in_axes=d, out_axes=d)
    return fn(ct)


# The tag is the identity, so its cotangent passes through; the hook (if any)
# sees it first and may replace it.
def _tag_vjp(ct, out, x, *, name, hook, hook_batch_dims):
    if hook is None:
        return [ct]
    return [apply_hook(hook, ct, name, hook_batch_dims)]


register_vjp(tag_p, _tag_vjp)


# Forward mode: the tangent passes through; the primal keeps its tag so a later
# reverse sweep over this computation still sees the name.
def _tag_jvp(primals, tangents, **params):
    return tag_p.bind(primals[0], **params), tangents[0]


register_jvp(tag_p, _tag_jvp)


# ------------------------------------------------------------ checkpoint_name
# The primitive object behind jax.ad_checkpoint.checkpoint_name, read from a
# traced example so no private module is imported.
_name_eqns = jax.make_jaxpr(lambda x: checkpoint_name(x, "_"))(np.float32(0)).jaxpr.eqns
name_p = _name_eqns[0].primitive if len(_name_eqns) == 1 else None

# Primitives whose ``name`` param marks a value for grad_and_intermediates.
NAMED_PRIMITIVES = {tag_p.name}

if name_p is not None and name_p.name == "name":
    register_vjp(name_p, lambda ct, out, x, *, name: [ct])
    register_jvp(name_p, lambda primals, tangents, *, name:
                 (name_p.bind(primals[0], name=name), tangents[0]))
    NAMED_PRIMITIVES.add(name_p.name)
