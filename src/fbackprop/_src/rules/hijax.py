"""JAX's higher-level call primitives: ``call_hi_primitive``, ``remat_opt``,
``custom_vmap_call``.

``call_hi_primitive`` is what ``jax.checkpoint`` and ``jax.custom_vjp`` stage
to under ``jax_remat3`` / ``jax_custom_vjp3``. Its ``_prim`` parameter says
what the call is:

- a checkpoint (``RematTraced``): fbackprop's own checkpointing
  (:class:`fbackprop._src.rules.remat.RematCall`) on the region's jaxpr and policy;
- ``checkpoint_name``: the identity (a policy sees it as JAX's ``name``);
- a ``custom_vjp`` function, or another primitive defining its own VJP: the
  user's (library's) ``fwd``/``bwd`` rules, as for ``custom_vjp_call``;
- anything else has no rule (differentiating its expansion could silently
  ignore a custom gradient).

``remat_opt`` (a ``custom_vjp`` fwd with ``optimize_remat=True``) is
differentiated through its ``fwd_jaxpr``. The derivatives of ``custom_vmap_call``
are ``custom_vmap_call`` equations again, whose batching rules differentiate the
function's own batching rule (see below).
"""

from __future__ import annotations

import dataclasses
import weakref

import jax
import jax.numpy as jnp

from .. import compat
from ..engine import recording, sweeps
from ..engine import tangents as _forward
from ..engine.recording import custom_vjp_forward_error
from ..registry import MissingRuleError, call_handlers_forward, call_handlers_reverse, \
    is_differentiable_dtype, linear_primitives
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
        from .remat import RematCall
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
        raise custom_vjp_forward_error(
            compat.hi_custom_vjp(hi).traced.fun_name, compat.source_line(eqn))
    raise _missing(eqn, "forward")


call_handlers_forward[compat.CALL_HI] = _hi_jvp


# ----------------------------------------------- calls through their own jaxpr
def _remat_opt_jaxpr(params):
    return params["fwd_jaxpr"]


call_handlers_reverse[compat.REMAT_OPT] = InlineCall(_remat_opt_jaxpr)
call_handlers_forward[compat.REMAT_OPT] = _inline_jvp(_remat_opt_jaxpr)
linear_primitives[compat.REMAT_OPT] = True


# ------------------------------------------------------------------ custom_vmap
# JAX's semantics (jax/_src/custom_batching.py): a custom_vmap function is its
# body where nothing batches it and its custom rule under vmap. Its JVP is again
# a custom_vmap function, whose body is the JVP of the body and whose rule is
# the JVP of the rule (vmapped over the axes only the primals or only the
# tangents have). fbackprop builds that JVP with its own tangent sweeps, and its
# VJP the same way: a custom_vmap function whose body is the VJP of the body and
# whose rule is the VJP of the rule. A vmap of either derivative, however late
# it comes (``jax.vmap(jax.jit(fb.grad(f)))``), thus differentiates the rule.
# (JAX itself cannot linearize the JVP, so ``jax.grad`` of a custom_vmap function
# raises; fbackprop's reverse mode does not go through linearization.)


def _custom_vmap_jvp(eqn, invals, tangents):
    call, rule, in_tree, out_tree = compat.custom_vmap_parts(eqn.params)
    n = len(invals)
    diff_in = [is_differentiable_dtype(compat.typeof(x).dtype) for x in invals]
    diff_out = [is_differentiable_dtype(a.dtype) for a in call.out_avals]
    # Like JAX, every differentiable input carries a tangent (zeros instantiated).
    tangents = [(_forward.zero_tangent(x) if t is None else t)
                for x, t, d in zip(invals, tangents, diff_in) if d]

    def body(*args):
        ts = iter(args[n:])
        outs, touts = _forward.jvp_jaxpr(call.jaxpr, call.consts, list(args[:n]),
                                         [next(ts) if d else None for d in diff_in])
        return list(outs) + [_forward.zero_tangent(o) if t is None else t
                             for o, t, d in zip(outs, touts, diff_out) if d]

    def rule_jvp(axis_size, batched, *args):
        primals, tangents = list(args[:n]), list(args[n:])
        p_batched = list(batched[:n])
        it = iter(batched[n:])
        # (an input without a tangent counts as batched like its tangent would be)
        t_batched = [next(it) if d else p for p, d in zip(p_batched, diff_in)]
        # The rule sees an input as batched where its primal and its tangent
        # both are; an axis only one of them has is vmapped over around the JVP.
        mutual = [p and t for p, t in zip(p_batched, t_batched)]
        p_axes = [0 if p and not t else None for p, t in zip(p_batched, t_batched)]
        t_axes = [0 if t and not p else None
                  for p, t, d in zip(p_batched, t_batched, diff_in) if d]
        out_batched: list = []

        def jvp_of_rule(*flat):
            ps, ts = list(flat[:n]), list(flat[n:])

            def rule_fn(*xs):
                outs, batched_out = compat.call_vmap_rule(rule, in_tree, out_tree,
                                                          axis_size, mutual, list(xs))
                out_batched[:] = batched_out
                return outs
            args_tree = jax.tree_util.tree_structure((tuple(ps), {}))
            t_iter = iter(ts)
            outs, _, touts = _forward.push_tangents(
                rule_fn, args_tree, ps, [next(t_iter) if d else None for d in diff_in])
            return list(outs) + [_forward.zero_tangent(o) if t is None else t
                                 for o, t, d in zip(outs, touts, diff_out) if d]

        flat, axes = compat.vmap_unrestricted(jvp_of_rule, primals + tangents,
                                              p_axes + t_axes, axis_size)
        flat = [x if a is None else jnp.moveaxis(x, a, 0) for x, a in zip(flat, axes)]
        # A tangent output is batched where its primal is under the rule, or where
        # the vmap around the JVP batched it.
        rule_batched = list(out_batched) + [b for b, d in zip(out_batched, diff_out) if d]
        flags = [b or a is not None for b, a in zip(rule_batched, axes)]
        return tuple(flat), tuple(flags)

    specs = [compat.spec_of(x) for x in list(invals) + tangents]
    jvp_call = jax.make_jaxpr(body)(*specs)
    n_out = len(diff_out)
    outs = compat.bind_custom_vmap(list(invals) + tangents, jvp_call, rule_jvp,
                                   n_out + sum(diff_out))
    it = iter(outs[n_out:])
    return list(outs[:n_out]), [next(it) if d else None for d in diff_out]


class CustomVmapCall(CallHandler):
    """Reverse mode of ``custom_vmap_call``: its forward sweep binds the call as
    it is; its backward sweep binds a custom_vmap call of the body's VJP (which
    recomputes the body) with the rule's VJP as its batching rule."""

    def forward(self, eqn, invals, active):
        return compat.bind_eqn(eqn, invals), None, [True] * len(eqn.outvars)

    def backward(self, record, cts_out):
        call, rule, in_tree, out_tree = compat.custom_vmap_parts(record.eqn.params)
        xs, active = list(record.invals), list(record.active)
        n = len(xs)
        wrt = [i for i, a in enumerate(active) if a]
        present = [j for j, ct in enumerate(cts_out) if ct is not None]
        cts = [cts_out[j] for j in present]

        def body(*args):
            _, tape = sweeps.forward(call.jaxpr, call.consts, list(args[:n]), active)
            full = [None] * len(cts_out)
            for j, ct in zip(present, args[n:]):
                full[j] = ct
            in_cts = sweeps.backward(tape, full)
            return [compat.zeros_like_aval(compat.typeof(args[i])) if in_cts[i] is None
                    else in_cts[i] for i in wrt]

        def rule_vjp(axis_size, batched, *args):
            x_b, ct_b = batched[:n], batched[n:]
            out_batched: list = []

            def rule_fn(*diff_xs):
                full = list(args[:n])
                for i, x in zip(wrt, diff_xs):
                    full[i] = x
                outs, batched_out = compat.call_vmap_rule(rule, in_tree, out_tree,
                                                          axis_size, list(x_b), full)
                out_batched[:] = batched_out
                return [outs[j] for j in present]

            leaves = [args[i] for i in wrt]
            run = recording.record(
                rule_fn, jax.tree_util.tree_structure((tuple(range(len(leaves))), {})),
                leaves, [True] * len(leaves))
            # A cotangent batched where the rule's output is not is summed over the
            # batch (that output is the same for every member); one unbatched where
            # the output is batched is the same for every member.
            adjusted = []
            for j, ct, b in zip(present, args[n:], ct_b):
                if out_batched[j] and not b:
                    ct = jnp.broadcast_to(ct, (axis_size,) + tuple(jnp.shape(ct)))
                elif b and not out_batched[j]:
                    ct = jnp.sum(ct, axis=0)
                adjusted.append(ct)
            in_cts = sweeps.backward(run.tape, adjusted)
            in_cts = [compat.zeros_like_aval(compat.typeof(x)) if ct is None else ct
                      for x, ct in zip(leaves, in_cts)]
            return tuple(in_cts), tuple(x_b[i] for i in wrt)

        specs = [compat.spec_of(x) for x in xs + cts]
        bwd_call = jax.make_jaxpr(body)(*specs)
        with compat.user_context(record.eqn):
            outs = compat.bind_custom_vmap(xs + cts, bwd_call, rule_vjp, len(wrt))
        result = [None] * n
        for i, ct in zip(wrt, outs):
            result[i] = ct
        return result


call_handlers_reverse[compat.CUSTOM_VMAP_CALL] = CustomVmapCall()
call_handlers_forward[compat.CUSTOM_VMAP_CALL] = _custom_vmap_jvp
linear_primitives[compat.CUSTOM_VMAP_CALL] = True
