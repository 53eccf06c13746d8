"""Call primitives: nested jit, custom_jvp_call, custom_vjp_call.

Reverse mode recurses into the sub-jaxpr with the same forward/backward sweeps.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp

import numpy as np

from .. import compat, staging
from .. import context
from ..engine import recording, sweeps
from ..engine import tangents as tangents_mod
from ..engine.recording import custom_vjp_forward_error
from ..registry import (KnownCustomJVP, call_handlers_forward, call_handlers_linear,
                        call_handlers_reverse, is_differentiable_dtype, known_custom_jvp_of)
from .control import short_where


class CallHandler:
    """A reverse-mode handler: ``forward`` returns (outvals, sub, out_active)."""

    def forward(self, eqn, invals, active):
        raise NotImplementedError

    def backward(self, record, cts_out):
        raise NotImplementedError


# ------------------------------------------------------------------- nested jit
class InlineCall(CallHandler):
    """Differentiates a call by sweeping its sub-jaxpr in place."""

    def __init__(self, get_closed):
        self.get_closed = get_closed

    def forward(self, eqn, invals, active):
        closed = self.get_closed(eqn.params)
        outs, tape = sweeps.forward(closed.jaxpr, closed.consts, invals, active)
        return outs, tape, tape.out_active

    def backward(self, record, cts_out):
        return sweeps.backward(record.sub, cts_out)


class _CompiledResiduals:
    """What a compiled nested call kept: its arrays (pytree leaves) and its program."""

    def __init__(self, sweeps, arrays):
        self.sweeps, self.arrays = sweeps, arrays


jax.tree_util.register_pytree_node(
    _CompiledResiduals, lambda r: ((r.arrays,), r.sweeps),
    lambda sweeps, ch: _CompiledResiduals(sweeps, ch[0]))


class _CompiledSweeps:
    """A nested jit's forward sweep and backward sweep, each one jitted program.

    The forward program returns the call's outputs and the array leaves of its
    tape; everything else on the tape (equations, rules' static data) is kept
    from the one trace this object makes (it is cached per input types). Under
    a transformation both are bound as staged functions (traced once, then
    copied into the enclosing program, or bound as one ``jit`` equation); eagerly
    they run as compiled programs.
    """

    def __init__(self, closed, active, inline=False):
        self.closed, self.active = closed, list(active)
        self.static = None
        self.out_active = None
        self.n_out = len(closed.jaxpr.outvars)
        self._fwd_eager = jax.jit(self._fwd, inline=inline)
        self._bwd_eager = jax.jit(self._bwd, inline=inline)
        self._fwd_staged = staging.StagedFunction(self._fwd_flat, inline, "fwd_sweep")
        self._bwd_staged: dict = {}
        self.inline = inline

    def _fwd(self, invals):
        outs, tape = sweeps.forward(self.closed.jaxpr, self.closed.consts, invals, self.active)
        leaves, treedef = jax.tree_util.tree_flatten(tape)
        mask = [isinstance(x, jax.Array) or compat.is_tracer(x) for x in leaves]
        self.static = (treedef, mask, [None if m else x for x, m in zip(leaves, mask)])
        self.out_active = list(tape.out_active)
        return outs, [x for x, m in zip(leaves, mask) if m]

    def _fwd_flat(self, invals):
        outs, arrays = self._fwd(invals)
        return list(outs) + arrays

    def _bwd(self, arrays, cts_out):
        treedef, mask, static = self.static
        it = iter(arrays)
        tape = jax.tree_util.tree_unflatten(
            treedef, [next(it) if m else x for m, x in zip(mask, static)])
        return sweeps.backward(tape, cts_out)

    def fwd(self, invals, types=None):
        """``(outs, arrays)``: the call's outputs and its tape's arrays (``types``:
        the inputs' types, when the caller has them)."""
        if compat.is_eager():
            return self._fwd_eager(invals)
        flat = self._fwd_staged(list(invals), types)
        return flat[:self.n_out], flat[self.n_out:]

    def bwd(self, arrays, cts_out):
        """One cotangent (or ``None``) per input of the call."""
        if compat.is_eager():
            return self._bwd_eager(arrays, cts_out)
        # Zero cotangents are ``None``: one staged function per pattern of them.
        present = tuple(ct is not None for ct in cts_out)
        staged = self._bwd_staged.get(present)
        if staged is None:
            n = len(arrays)

            def bwd_flat(flat, present=present):
                it = iter(flat[n:])
                return self._bwd(flat[:n], [next(it) if p else None for p in present])
            staged = self._bwd_staged[present] = staging.StagedFunction(
                bwd_flat, self.inline, "bwd_sweep")
        return staged(list(arrays) + [ct for ct in cts_out if ct is not None])


def _compiles_eagerly(eqn) -> bool:
    """Concrete values, unwatched sweeps, and a jit not marked ``inline``
    (jax.numpy's small helpers are): the nested jit runs compiled."""
    return (not eqn.params.get("inline", False) and compat.is_eager()
            and context.unwatched())


class JitCall(InlineCall):
    """A nested ``jax.jit``: its forward sweep and its backward sweep are each
    traced once per sub-jaxpr, active inputs and input types, as two jitted
    functions, and every call binds those (as JAX's own transpose does): the
    thousand identical ``jnp.tanh`` calls of a deep net are swept once, not a
    thousand times. Under a transformation they keep the call's ``inline`` flag, so
    jax.numpy's helpers still end up inlined in the enclosing program; eagerly they
    run as compiled programs, as eager ``jax.grad`` runs a jitted function (library
    code such as ``equinox.filter_jit`` relies on it), except the ``inline`` helpers,
    which are swept in place op by op. While a tool watches the sweeps, every call
    is swept in place."""

    def __init__(self, get_closed):
        super().__init__(get_closed)
        self._programs: collections.OrderedDict = collections.OrderedDict()

    def _sweeps(self, closed, types, active, inline=False):
        # A linear sweep (a custom_jvp rule being transposed) checks every
        # equation while its sweep is traced, and differentiates custom_jvp
        # functions inside through their bodies: its programs are its own.
        key = (id(closed), tuple(active), types, inline, context.in_linear_sweep())
        hit = self._programs.get(key)
        if hit is None or hit.closed is not closed:
            hit = self._programs[key] = _CompiledSweeps(closed, active, inline)
            if len(self._programs) > 4096:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(key)
        return hit

    def forward(self, eqn, invals, active):
        inline = bool(eqn.params.get("inline", False))
        if not context.unwatched(linear_ok=True) or (inline and compat.is_eager()):
            return super().forward(eqn, invals, active)
        types = tuple(map(compat.typeof, invals))
        sweeps = self._sweeps(self.get_closed(eqn.params), types, active, inline)
        outs, arrays = sweeps.fwd(invals, types)
        return outs, _CompiledResiduals(sweeps, arrays), list(sweeps.out_active)

    def backward(self, record, cts_out):
        sub = record.sub
        if not isinstance(sub, _CompiledResiduals):
            return super().backward(record, cts_out)
        return sub.sweeps.bwd(sub.arrays, list(cts_out))

    def evaluate(self, eqn, invals):
        """A call nothing differentiates, while a tool steps the sweeps: a jit
        marked ``inline`` (jax.numpy's helpers, which staging inlines into the
        enclosing program) is swept in place, so its equations are seen as in a
        staged program; ``None`` (bound as a whole) for the others."""
        if not (eqn.params.get("inline", False) and context.steps("scan", linear_ok=True)):
            return None
        closed = self.get_closed(eqn.params)
        return sweeps.forward(closed.jaxpr, closed.consts, invals, [False] * len(invals))[0]


for _name in compat.JIT_NAMES:
    call_handlers_reverse[_name] = JitCall(compat.jit_inner)
# ``core.closed_call`` (what define-by-run sweeps record a staged call as),
# ``core.call`` and ``eval_jaxpr``: swept in place.
for _name, _body in compat.CALL_BODIES.items():
    call_handlers_reverse[_name] = InlineCall(_body)


# -------------------------------------------------------------------- custom_jvp
class CustomJVPCall(CallHandler):
    """Reverse mode of ``jax.custom_jvp``, for every front end: linearize the
    user's JVP rule and transpose its tangent part.

    The rule runs once, as ``jax.grad`` runs it: on the primal values, with the
    tangents of the active inputs recorded by a linear recording
    (:func:`fbackprop._src.engine.recording.record` with ``linear=``): the
    primal outputs are the rule's, and the recorded tangent equations, checked
    to be linear in the tangents, are the map whose transpose - our backward
    sweep over them - gives the inputs' cotangents. So e.g. ``jax.nn.relu`` at
    0 has gradient 0 exactly as its rule says. (The tangent equations are also
    bound in the enclosing trace, on the primal values standing in for the
    tangents, since the transpose of a linear map does not read the value it is
    applied to; under a transformation nothing uses their results and the
    compiled program drops them.)

    The call arrives as a jaxpr equation (its rule as ``jvp_jaxpr_fun``) or from
    a define-by-run trace with the bind's Python functions (the rule then runs
    on concrete values eagerly, so Python control flow in it works); see
    :func:`compat.custom_jvp_rule`. JAX's own custom_jvp functions whose
    derivative fbackprop knows (``jax.nn.relu``...) are bound as they are and
    differentiated with the known rule (``registry.register_known_custom_jvp``).
    """

    def forward(self, eqn, invals, active):
        if context.current().observers:
            # Observers see the rule's equations (a recording), inside a
            # "custom_jvp" context: not the program's own.
            with _inside("custom_jvp", eqn):
                return self._forward(eqn, invals, active)
        return self._forward(eqn, invals, active)

    def _forward(self, eqn, invals, active):
        known = known_custom_jvp_of(eqn.params)
        if known is not None and context.unwatched():
            prim = eqn.primitive
            if "subfuns" in eqn.params:
                params = {k: v for k, v in eqn.params.items() if k != "name"}
                outvals = compat.bind_in(compat.current_trace(), prim, list(invals), params)
            else:
                outvals = compat.bind_eqn(eqn, invals)
            return outvals, known, [True] * len(outvals)
        num_consts, rule = compat.custom_jvp_rule(eqn.params)
        name = eqn.params.get("name", "?")
        if any(active[:num_consts]):
            raise NotImplementedError(
                f"fbackprop cannot differentiate the custom_jvp function '{name}' (at "
                f"{compat.source_line(eqn)}) with respect to a value it closes over: its "
                f"JVP rule only covers its explicit arguments. Pass that value as an "
                f"argument of the custom_jvp function.")
        primals = list(invals[num_consts:])
        act = list(active[num_consts:])
        n = len(primals)

        def rule_of_tangents(*xs):
            ts = iter(xs[n:])
            outs, touts = rule(list(xs[:n]), [next(ts) if a else None for a in act])
            # A zero tangent output is a constant of the linear map (no cotangent).
            return list(outs) + [np.zeros((), np.float32) if t is None else t for t in touts]

        leaves = primals + [x for x, a in zip(primals, act) if a]
        tree = jax.tree_util.tree_structure((tuple(range(len(leaves))), {}))
        what = f"the custom_jvp function '{name}' (called at {compat.source_line(eqn)})"
        with compat.user_context(eqn):
            run = recording.record(rule_of_tangents, tree, leaves,
                                   [False] * n + [True] * (len(leaves) - n), linear=what)
        n_out = len(run.out_vals) // 2
        return run.out_vals[:n_out], run.tape, run.out_active[n_out:]

    def backward(self, record, cts_out):
        if isinstance(record.sub, KnownCustomJVP):
            return record.sub.backward(record, cts_out)
        if context.current().observers:
            with _inside("custom_jvp rule", record.eqn):
                return self._backward(record, cts_out)
        return self._backward(record, cts_out)

    def evaluate(self, eqn, invals):
        """A call nothing differentiates, while a tool looks inside custom rules:
        the function's own code runs in place (``None`` otherwise: bound as a
        whole)."""
        if not context.steps("all", linear_ok=True):
            return None
        with _inside("custom_jvp", eqn):
            if "subfuns" in eqn.params:
                return _observed(eqn.params["subfuns"][0].call_wrapped, invals)
            call = eqn.params["call_jaxpr"]
            return sweeps.forward(call.jaxpr, call.consts, invals, [False] * len(invals))[0]

    def _backward(self, record, cts_out):
        num_consts = record.eqn.params.get("num_consts", 0)
        cts = sweeps.backward(record.sub, [None] * len(cts_out) + list(cts_out))
        context.notify("end_sweep", record.sub.program(), cts)
        n = len(record.invals) - num_consts
        it = iter(cts[n:])
        return [None] * num_consts + [next(it) if a else None
                                      for a in record.active[num_consts:]]


call_handlers_reverse[compat.CUSTOM_JVP_CALL] = CustomJVPCall()
# Applied to a tangent inside a rule being transposed, a custom_jvp function is
# part of a linear map: it is differentiated through its body, as JAX does.
call_handlers_linear[compat.CUSTOM_JVP_CALL] = InlineCall(lambda params: params["call_jaxpr"])


# -------------------------------------------------------------------- custom_vjp
class CustomVJPCall(CallHandler):
    """Reverse mode of ``jax.custom_vjp``: run the user's fwd, keep residuals, call bwd.

    As a jaxpr equation or from a define-by-run trace (then fwd runs on the
    values themselves, so Python control flow on them works, as in jax.grad);
    see :func:`compat.custom_vjp_parts`.
    """

    def forward(self, eqn, invals, active):
        num_consts, fwd, bwd = compat.custom_vjp_parts(eqn.params)
        if context.steps("all") and not any(active[:num_consts]):
            return self._forward_observed(eqn, invals, active)
        with compat.user_context(eqn):
            res, outs = fwd(list(invals), list(active))
        out_avals = [compat.typeof(x) for x in outs]
        return outs, (res, bwd, out_avals), [True] * len(outs)

    def backward(self, record, cts_out):
        res, bwd, out_avals = record.sub
        if context.steps("all"):
            return self._backward_observed(record, cts_out)
        with compat.user_context(record.eqn):
            cts = bwd(res, cts_out, out_avals)
        return [_as_cotangent(ct, x) if a and ct is not None else None
                for ct, x, a in zip(cts, record.invals, record.active)]

    # --------------------------------------------------- observed path (tools)
    # While a tool looks inside custom rules (``context.steps("all")``), the
    # user's fwd (or, nothing differentiated, the function) and bwd run in
    # place, inside "custom_vjp" and "custom_vjp bwd" contexts, so observers see
    # each of their equations.
    def evaluate(self, eqn, invals):
        if not context.steps("all", linear_ok=True):
            return None
        with _inside("custom_vjp", eqn):
            if "subfuns" in eqn.params:
                return _observed(eqn.params["subfuns"][0].call_wrapped, invals)
            call = eqn.params["call_jaxpr"]
            return sweeps.forward(call.jaxpr, call.consts, invals, [False] * len(invals))[0]

    def _forward_observed(self, eqn, invals, active):
        p = eqn.params
        num_consts, fwd, bwd = compat.custom_vjp_parts(p)
        with _inside("custom_vjp", eqn):
            if "subfuns" in p:
                res, outs = _observed(lambda *xs: fwd(list(xs), list(active)), invals)
            else:
                fwd_jaxpr, fwd_consts = p["fwd_jaxpr_thunk"].call_wrapped(*active[num_consts:])
                primals = list(invals[num_consts:])
                flat = sweeps.forward(fwd_jaxpr, fwd_consts, primals, [False] * len(primals))[0]
                res, outs = compat.split_custom_vjp_fwd_outputs(flat, primals, p["out_trees"])
        return outs, (res, bwd, [compat.typeof(x) for x in outs]), [True] * len(outs)

    def _backward_observed(self, record, cts_out):
        res, bwd, out_avals = record.sub
        n_res = len(res)
        with _inside("custom_vjp bwd", record.eqn):
            cts = _observed(lambda *xs: bwd(list(xs[:n_res]), list(xs[n_res:]), out_avals),
                            list(res) + list(cts_out))
        return [_as_cotangent(ct, x) if a and ct is not None else None
                for ct, x, a in zip(cts, record.invals, record.active)]


class _inside:
    """Tells the observers that the block runs a custom rule's code (``kind``)
    called at ``eqn``."""

    def __init__(self, kind, eqn):
        self.kind, self.eqn = kind, eqn

    def __enter__(self):
        context.notify("enter", self.kind, 0, short_where(self.eqn))

    def __exit__(self, *exc):
        context.notify("exit")


def _observed(fn, vals):
    """``fn(*vals)``, run so that observers see each equation it binds (in a
    recording that differentiates nothing): the outputs, in ``fn``'s structure."""
    tree = jax.tree_util.tree_structure((tuple(range(len(vals))), {}))
    run = recording.record(fn, tree, list(vals), [False] * len(vals))
    return jax.tree_util.tree_unflatten(run.out_tree, run.out_vals)


def _as_cotangent(ct, primal):
    """A user's bwd result as a cotangent of ``primal``, as JAX takes it: a Python
    scalar or NumPy value becomes an array of the primal's dtype; an array is
    passed on as it is, also in another float precision than the primal's
    (float32 for a bfloat16 input: JAX passes such an excess-precision cotangent
    on, see :func:`fbackprop._src.engine.sweeps.ct_dtype_ok`). Shapes must agree."""
    if not (isinstance(ct, jax.Array) or compat.is_tracer(ct)):
        ct = jnp.asarray(ct, compat.typeof(primal).dtype)
    return ct


call_handlers_reverse[compat.CUSTOM_VJP_CALL] = CustomVJPCall()


# ------------------------------------------------------------------ checkpoint
def _remat_closed(params):
    jaxpr, _ = compat.remat_inner(params)
    return compat.ClosedJaxpr(jaxpr, [])


# Reverse mode keeps only the region's inputs and what the policy saves, and
# recomputes the rest in the backward sweep (see rules/remat.py).
from .remat import RematCall  # noqa: E402

for _name in compat.REMAT_NAMES:
    call_handlers_reverse[_name] = RematCall()


# ----------------------------------------------------------------- forward mode


def _inline_jvp(get_closed):
    def handler(eqn, invals, tangents):
        closed = get_closed(eqn.params)
        return tangents_mod.jvp_jaxpr(closed.jaxpr, closed.consts, invals, tangents)
    return handler


def _jit_jvp():
    """Forward mode of a nested jit: one compiled program eagerly (cached per
    jaxpr; jit caches the input types); under a transformation the tangent sweep
    is traced once per jaxpr, pattern of nonzero tangents and input types, and
    bound like the call (copied into an enclosing jit trace when the call is
    ``inline``), as the reverse sweeps of nested jits are."""
    inline = _inline_jvp(compat.jit_inner)
    programs: collections.OrderedDict = collections.OrderedDict()
    staged: collections.OrderedDict = collections.OrderedDict()

    def handler(eqn, invals, tangents):
        closed = compat.jit_inner(eqn.params)
        if not _compiles_eagerly(eqn):
            if compat.is_eager() or not context.unwatched(linear_ok=True):
                return inline(eqn, invals, tangents)
            present = tuple(t is not None for t in tangents)
            call_inline = bool(eqn.params.get("inline", False))
            key = (id(closed), present, tuple(compat.aval_key(x) for x in invals),
                   call_inline, context.in_linear_sweep(), context.current().linearizing)
            hit = staged.get(key)
            if hit is None or hit[0] is not closed:
                n = len(invals)

                def jvp_flat(flat, present=present):
                    ts = iter(flat[n:])
                    outs, touts = tangents_mod.jvp_jaxpr(
                        closed.jaxpr, closed.consts, flat[:n],
                        [next(ts) if p else None for p in present])
                    return list(outs) + list(touts)
                hit = staged[key] = (closed, staging.StagedFunction(
                    jvp_flat, call_inline, "jvp_sweep"))
                if len(staged) > 4096:
                    staged.popitem(last=False)
            else:
                staged.move_to_end(key)
            flat = hit[1](list(invals) + [t for t in tangents if t is not None])
            n_out = len(closed.jaxpr.outvars)
            return flat[:n_out], flat[n_out:]
        hit = programs.get(id(closed))
        if hit is None or hit[0] is not closed:
            run = jax.jit(lambda xs, ts: tangents_mod.jvp_jaxpr(closed.jaxpr, closed.consts, xs, ts))
            hit = programs[id(closed)] = (closed, run)
            if len(programs) > 256:
                programs.popitem(last=False)
        return hit[1](list(invals), list(tangents))
    return handler


for _name in compat.JIT_NAMES:
    call_handlers_forward[_name] = _jit_jvp()
for _name, _body in compat.CALL_BODIES.items():
    call_handlers_forward[_name] = _inline_jvp(_body)
for _name in compat.REMAT_NAMES:
    call_handlers_forward[_name] = _inline_jvp(_remat_closed)


def _custom_jvp_forward(eqn, invals, tangents):
    """Forward mode of ``jax.custom_jvp`` (either form): evaluate the user's JVP rule."""
    num_consts, rule = compat.custom_jvp_rule(eqn.params)
    if any(t is not None for t in tangents[:num_consts]):
        raise NotImplementedError(
            f"fbackprop cannot differentiate the custom_jvp function "
            f"'{eqn.params.get('name', '?')}' (at {compat.source_line(eqn)}) with respect "
            f"to a value it closes over; pass that value as an argument.")
    with compat.user_context(eqn):
        return rule(list(invals[num_consts:]), list(tangents[num_consts:]))


call_handlers_forward[compat.CUSTOM_JVP_CALL] = _custom_jvp_forward


# jax.linearize accepts a function that calls a custom_vjp function: the primal
# outputs are the rule's fwd outputs, and only evaluating the linear map on a
# tangent that reaches the function raises (library code linearizes just to
# learn which outputs are perturbed, or to read the primal values). While
# fb.linearize traces its tangent sweep (``context.current().linearizing``), a
# custom_vjp's output tangents are this primitive's outputs; the linear map
# refuses to run if one survives dead-code elimination (see linearization.py),
# and its impl raises, should it ever be bound.
custom_vjp_tangent_p = compat.primitive("custom_vjp_tangent")
custom_vjp_tangent_p.multiple_results = True
custom_vjp_tangent_p.def_abstract_eval(lambda *tangents, out_avals, name, where: list(out_avals))


def _custom_vjp_tangent_impl(*tangents, out_avals, name, where):
    raise custom_vjp_forward_error(name, where)


custom_vjp_tangent_p.def_impl(_custom_vjp_tangent_impl)


def _custom_vjp_forward(eqn, invals, tangents):
    """Forward mode of ``jax.custom_vjp``: an error, as in JAX; under linearize
    the primal outputs are the rule's fwd outputs and the tangents an error
    deferred to the evaluation of the linear map."""
    name, where = compat.custom_vjp_name(eqn.params), compat.source_line(eqn)
    if not context.current().linearizing:
        raise custom_vjp_forward_error(name, where)
    _, fwd, _ = compat.custom_vjp_parts(eqn.params)
    with compat.user_context(eqn):
        _, outs = fwd(list(invals), [t is not None for t in tangents])
    avals = tuple(compat.typeof(x).to_tangent_aval() for x in outs)
    touts = custom_vjp_tangent_p.bind(*[t for t in tangents if t is not None],
                                      out_avals=avals, name=name, where=where)
    return outs, [t if _is_differentiable(x) else None for x, t in zip(outs, touts)]


def _is_differentiable(x) -> bool:
    return is_differentiable_dtype(compat.typeof(x).dtype)


call_handlers_forward[compat.CUSTOM_VJP_CALL] = _custom_vjp_forward
