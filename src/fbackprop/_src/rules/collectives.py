"""Collectives inside ``jax.shard_map`` or ``jax.vmap(..., axis_name=...)``, and the
``shard_map`` call itself.

Every collective here is linear, so its VJP is its transpose (another
collective) and its JVP applies the collective to the tangent:

* ``psum`` (all-reduce sum) with ``check_vma=False``: JAX treats it as a psum
  followed by a broadcast, so its transpose is again a psum;
* with ``check_vma=True`` (the default) ``psum`` appears as ``psum_invariant``
  (varying -> invariant), whose transpose is ``pvary`` (invariant -> varying),
  and the other way round. ``pmean`` is ``psum`` followed by a division;
* ``all_gather`` transposes to ``psum_scatter`` (``reduce_scatter``) and back;
* ``ppermute`` transposes to the inverse permutation;
* ``all_to_all`` transposes to ``all_to_all`` with split and concat axes swapped;
* ``axis_index`` has no gradient.

Under ``jax.vmap`` with an axis name, ``psum``/``pmean`` over that name become a
sum over a positional array axis, transposed by broadcasting back along it; the
other collectives' batching rules already turn them into ordinary array code.
``pmax``/``pmin`` have no rule (JAX has none either): a missing-rule error.

Differentiating *through* a ``shard_map`` (``fb.grad(jax.shard_map(f, ...))``)
runs our own sweeps inside a new ``shard_map`` over the same mesh: the backward
pass re-runs the body's forward sweep on each device (the body is rematerialized
rather than passing its residuals out of the mapped region), then the backward
sweep. The usual data-parallel step calls ``fb.value_and_grad`` inside the body
instead and pays nothing extra.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import compat
from ..engine import sweeps
from ..engine import tangents as _forward
from ..registry import (call_handlers_forward, call_handlers_reverse, defjvp, defnondiff,
                        defvjp)

# Version-specific names (jax 0.10.x) live in compat.
psum_p = compat.psum_p
psum_invariant_p = compat.psum_invariant_p
pvary_p = compat.pvary_p
all_gather_p = compat.all_gather_p
reduce_scatter_p = compat.reduce_scatter_p
ppermute_p = compat.ppermute_p
all_to_all_p = compat.all_to_all_p
axis_index_p = compat.axis_index_p


def _varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    mat = getattr(compat.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def _pvary(x, axes):
    """``x`` made varying over ``axes`` (only those it does not vary over yet)."""
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    return pvary_p.bind(x, axes=missing) if missing else x


def _psum_invariant(x, axes):
    """All-reduce sum over ``axes`` of a value varying over them."""
    x = _pvary(x, axes)
    return psum_invariant_p.bind(x, axes=tuple(axes))


# --------------------------------------------------------------- all-reduce sum
# Under jax.vmap(..., axis_name=...), a psum over the vmapped name becomes a psum
# over a positional axis: a sum over that array axis. Its transpose broadcasts
# the cotangent back along it; the named axes keep the collective transposes.
def _split_axes(axes):
    axes = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    return (tuple(a for a in axes if isinstance(a, int)),
            tuple(a for a in axes if not isinstance(a, int)))


def _unsum_positional(ct, x, positional):
    """The transpose of summing ``x`` over its array axes ``positional``."""
    if not positional:
        return ct
    shape = compat.typeof(x).shape
    kept = tuple(d for d in range(len(shape)) if d not in positional)
    return lax.broadcast_in_dim(ct, shape, kept)


# psum (check_vma=False): psum = psum . pbroadcast, so the transpose is a psum.
def _psum_vjp(ct, out, x, *, axes, axis_index_groups):
    positional, named = _split_axes(axes)
    if named:
        ct = psum_p.bind(ct, axes=named, axis_index_groups=axis_index_groups)
    return _unsum_positional(ct, x, positional)


defvjp(psum_p, _psum_vjp)
defjvp(psum_p, lambda t, out, x, *, axes, axis_index_groups:
       psum_p.bind(t, axes=axes, axis_index_groups=axis_index_groups))


# psum_invariant (check_vma=True): varying -> invariant; its transpose is pvary.
def _psum_invariant_vjp(ct, out, x, *, axes):
    positional, named = _split_axes(axes)
    return _unsum_positional(_pvary(ct, named), x, positional)


defvjp(psum_invariant_p, _psum_invariant_vjp)
defjvp(psum_invariant_p, lambda t, out, x, *, axes: psum_invariant_p.bind(
    _pvary(t, _split_axes(axes)[1]), axes=axes))

# pvary: invariant -> varying (an implicit broadcast to every device); its
# transpose sums the per-device cotangents back: psum_invariant.
defvjp(pvary_p, lambda ct, out, x, *, axes: _psum_invariant(ct, axes))
defjvp(pvary_p, lambda t, out, x, *, axes: _pvary(t, axes))


# ------------------------------------------------------------------ all-gather
def _all_gather(x, *, all_gather_dimension, axis_name, axis_index_groups, tiled):
    return lax.all_gather(x, axis_name, axis_index_groups=axis_index_groups,
                          axis=all_gather_dimension, tiled=tiled)


def _reduce_scatter(x, *, scatter_dimension, axis_name, axis_index_groups, tiled):
    return lax.psum_scatter(x, axis_name, scatter_dimension=scatter_dimension,
                            axis_index_groups=axis_index_groups, tiled=tiled)


# d(all_gather)^T = psum_scatter on the gathered dimension: device i receives
# the sum over devices of the cotangent slice that came from device i.
defvjp(all_gather_p, lambda ct, out, x, *, all_gather_dimension, axis_name,
       axis_index_groups, axis_size, tiled:
       _reduce_scatter(ct, scatter_dimension=all_gather_dimension, axis_name=axis_name,
                       axis_index_groups=axis_index_groups, tiled=tiled))
defjvp(all_gather_p, lambda t, out, x, *, all_gather_dimension, axis_name,
       axis_index_groups, axis_size, tiled:
       _all_gather(t, all_gather_dimension=all_gather_dimension, axis_name=axis_name,
                   axis_index_groups=axis_index_groups, tiled=tiled))

defvjp(reduce_scatter_p, lambda ct, out, x, *, scatter_dimension, axis_name,
       axis_index_groups, axis_size, tiled:
       _all_gather(ct, all_gather_dimension=scatter_dimension, axis_name=axis_name,
                   axis_index_groups=axis_index_groups, tiled=tiled))
defjvp(reduce_scatter_p, lambda t, out, x, *, scatter_dimension, axis_name,
       axis_index_groups, axis_size, tiled:
       _reduce_scatter(t, scatter_dimension=scatter_dimension, axis_name=axis_name,
                       axis_index_groups=axis_index_groups, tiled=tiled))


# -------------------------------------------------------------------- ppermute
def _inverse_perm(perm):
    return tuple((dst, src) for src, dst in perm)


defvjp(ppermute_p, lambda ct, out, x, *, axis_name, perm:
       lax.ppermute(ct, axis_name, perm=_inverse_perm(perm)))
defjvp(ppermute_p, lambda t, out, x, *, axis_name, perm: lax.ppermute(t, axis_name, perm=perm))


# ------------------------------------------------------------------ all-to-all
defvjp(all_to_all_p, lambda ct, out, x, *, axis_name, split_axis, concat_axis,
       axis_index_groups, tiled:
       lax.all_to_all(ct, axis_name, split_axis=concat_axis, concat_axis=split_axis,
                      axis_index_groups=axis_index_groups, tiled=tiled))
defjvp(all_to_all_p, lambda t, out, x, **params: all_to_all_p.bind(t, **params))


# ------------------------------------------------------------ no gradient
defnondiff(axis_index_p)


# ================================================================== shard_map
def _specs(params):
    """(mesh, in_specs, out_specs, manual_axes, check_vma) of a shard_map equation."""
    return (params["mesh"], tuple(params["in_specs"]), tuple(params["out_specs"]),
            frozenset(params["newly_manual_axes"]), bool(params["check_vma"]))


def _ct_spec(spec):
    return spec.to_ct_spec() if hasattr(spec, "to_ct_spec") else spec


def _spec_axes(spec) -> set:
    """The mesh axis names a PartitionSpec mentions."""
    names = set()
    for entry in spec:
        if entry is None:
            continue
        names.update(entry if isinstance(entry, tuple) else (entry,))
    return names


def _unmentioned(spec, manual_axes) -> tuple:
    return tuple(sorted((a for a in manual_axes if a not in _spec_axes(spec)), key=str))


def _shard_map(body, params, in_specs, out_specs):
    mesh, _, _, manual_axes, check_vma = _specs(params)
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs),
                         out_specs=tuple(out_specs), axis_names=set(manual_axes),
                         check_vma=check_vma)


def _body_jaxpr(eqn):
    jaxpr = eqn.params["jaxpr"]
    if jaxpr.constvars:
        raise NotImplementedError("fbackprop: a shard_map body with constvars is not "
                                  "supported (JAX normally passes them as arguments).")
    return jaxpr


class ShardMapCall:
    """Reverse mode of ``shard_map``: a backward ``shard_map`` that re-runs the body."""

    def forward(self, eqn, invals, active):
        outvals = compat.bind_eqn(eqn, invals)
        return outvals, ("shard_map",), [True] * len(outvals)

    def backward(self, record, cts_out):
        eqn = record.eqn
        jaxpr = _body_jaxpr(eqn)
        mesh, in_specs, out_specs, manual_axes, check_vma = _specs(eqn.params)
        active = list(record.active)
        nz_out = [ct is not None for ct in cts_out]
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

        def body(*args):
            cts_nz, invals = args[:sum(nz_out)], args[sum(nz_out):]
            it = iter(cts_nz)
            cts = [next(it) if nz else None for nz in nz_out]
            if not check_vma:
                # Without vma types an output replicated over an axis gets the same
                # cotangent on every device; JAX divides it by the replication count.
                counts = [math.prod(sizes[a] for a in _unmentioned(_ct_spec(s), manual_axes))
                          for s in out_specs]
                cts = [ct if ct is None or n == 1 else ct / n for ct, n in zip(cts, counts)]
            _, tape = sweeps.forward(jaxpr, [], list(invals), active)
            cts_in = sweeps.backward(tape, cts)
            results = []
            for x, ct, a, spec in zip(invals, cts_in, active, in_specs):
                if not a:
                    continue
                if ct is None:
                    ct = jnp.zeros(jnp.shape(x), compat.typeof(x).dtype)
                if not check_vma and (axes := _unmentioned(_ct_spec(spec), manual_axes)):
                    ct = lax.psum(ct, axes)
                results.append(ct)
            return tuple(results)

        cts_nz = [ct for ct in cts_out if ct is not None]
        in_specs_b = [_ct_spec(s) for s, nz in zip(out_specs, nz_out) if nz] + list(in_specs)
        out_specs_b = [_ct_spec(s) for s, a in zip(in_specs, active) if a]
        with compat.user_context(eqn):
            grads = _shard_map(body, eqn.params, in_specs_b, out_specs_b)(
                *cts_nz, *record.invals)
        it = iter(grads)
        return [next(it) if a else None for a in active]


def _shard_map_jvp(eqn, invals, tangents):
    """Forward mode of ``shard_map``: the tangent sweep runs inside a new shard_map."""
    jaxpr = _body_jaxpr(eqn)
    _, in_specs, out_specs, _, _ = _specs(eqn.params)
    nz_in = [t is not None for t in tangents]
    n_in = len(invals)

    def body(*args):
        primals, nz_tangents = args[:n_in], iter(args[n_in:])
        ts = [next(nz_tangents) if nz else None for nz in nz_in]
        outs, touts = _forward.jvp_jaxpr(jaxpr, [], list(primals), ts)
        touts = [jnp.zeros(jnp.shape(o), compat.typeof(o).dtype) if t is None else t
                 for o, t in zip(outs, touts)]
        return (*outs, *touts)

    in_specs_f = list(in_specs) + [s for s, nz in zip(in_specs, nz_in) if nz]
    out_specs_f = list(out_specs) * 2
    with compat.user_context(eqn):
        res = _shard_map(body, eqn.params, in_specs_f, out_specs_f)(
            *invals, *[t for t in tangents if t is not None])
    n_out = len(out_specs)
    return list(res[:n_out]), list(res[n_out:])


call_handlers_reverse["shard_map"] = ShardMapCall()
call_handlers_forward["shard_map"] = _shard_map_jvp
