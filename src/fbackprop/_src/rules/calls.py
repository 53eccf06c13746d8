"""Call primitives: nested jit, custom_jvp_call, custom_vjp_call.

Reverse mode recurses into the sub-jaxpr with the same forward/backward sweeps.
"""

from __future__ import annotations

import collections


from .. import compat
from .. import reverse
from ..registry import call_handlers_reverse


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
        outs, tape = reverse.forward(closed.jaxpr, closed.consts, invals, active)
        return outs, tape, tape.out_active

    def backward(self, record, cts_out):
        return reverse.backward(record.sub, cts_out)


for _name in compat.JIT_NAMES:
    call_handlers_reverse[_name] = InlineCall(compat.jit_inner)


# -------------------------------------------------------------------- custom_jvp
class CustomJVPCall(CallHandler):
    """Reverse mode of ``jax.custom_jvp``: transpose the user's JVP rule.

    The user's rule, traced with the tangents of the active inputs as inputs, is
    linear in those tangents; our own backward sweep over it (the primals are
    constants there) gives the transpose, so e.g. ``jax.nn.relu`` at 0 has
    gradient 0 exactly as the rule says.
    """

    def forward(self, eqn, invals, active):
        call_jaxpr, num_consts, jvp_jaxpr_of = compat.custom_jvp_parts(eqn.params)
        if any(active[:num_consts]):
            raise NotImplementedError(
                f"fbackprop cannot differentiate the custom_jvp function "
                f"'{eqn.params.get('name', '?')}' (at {compat.source_line(eqn)}) with "
                f"respect to a value it closes over: its JVP rule only covers its explicit "
                f"arguments. Pass that value as an argument of the custom_jvp function.")
        outvals = compat.bind_eqn(eqn, invals)
        out_active = [True] * len(outvals)
        return outvals, (call_jaxpr, num_consts, jvp_jaxpr_of), out_active

    def __init__(self):
        # (jvp rule, zero pattern, used outputs) -> DCE'd transposable jaxpr.
        self._cache = collections.OrderedDict()

    def _tangent_jaxpr(self, jvp_jaxpr_of, zeros, cts_out):
        jvp_jaxpr, jvp_consts, out_zeros = jvp_jaxpr_of(list(zeros))
        n_out = len(out_zeros)
        nz_cts = [ct for ct, z in zip(cts_out, out_zeros) if not z]
        # Only the tangent outputs that receive a cotangent matter; the primal
        # outputs of the rule (and whatever computes only them) are dropped.
        used = [False] * n_out + [ct is not None for ct in nz_cts]
        return compat.dce_keep_inputs(jvp_jaxpr, used), list(jvp_consts), out_zeros

    def backward(self, record, cts_out):
        call_jaxpr, num_consts, jvp_jaxpr_of = record.sub
        primals = record.invals[num_consts:]
        active = record.active[num_consts:]
        # Without symbolic zeros the user's rule expects every tangent as an array.
        symbolic = record.eqn.params.get("symbolic_zeros", False)
        zeros = tuple(not a for a in active) if symbolic else (False,) * len(active)
        key = (record.eqn.params["jvp_jaxpr_fun"], zeros,
               tuple(c is None for c in cts_out))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._tangent_jaxpr(jvp_jaxpr_of, zeros, cts_out)
            if not any(compat.is_tracer(c) for c in hit[1]):
                self._cache[key] = hit
                if len(self._cache) > 256:
                    self._cache.popitem(last=False)
        jaxpr, consts, out_zeros = hit
        cts = [ct for ct, z in zip(cts_out, out_zeros) if not z and ct is not None]
        n_lead = len(consts) + len(primals)
        tangent_avals = [v.aval for v in jaxpr.invars[n_lead:]]
        tangents = [compat.zeros_like_aval(a) for a in tangent_avals]
        tangent_active = [a for a, z in zip(active, zeros) if not z]
        in_active = [False] * n_lead + tangent_active
        _, tape = reverse.forward(jaxpr, [], consts + list(primals) + tangents, in_active)
        cts_in = reverse.backward(tape, cts)[n_lead:]
        it = iter(cts_in)
        per_input = [None if z else next(it) for z in zeros]
        return [None] * num_consts + [ct if a else None for ct, a in zip(per_input, active)]


call_handlers_reverse[compat.CUSTOM_JVP_CALL] = CustomJVPCall()


# -------------------------------------------------------------------- custom_vjp
class CustomVJPCall(CallHandler):
    """Reverse mode of ``jax.custom_vjp``: run the user's fwd, keep residuals, call bwd."""

    def forward(self, eqn, invals, active):
        call_jaxpr, num_consts, fwd, bwd, _ = compat.custom_vjp_parts(eqn.params)
        with compat.user_context(eqn):
            res, outs = fwd(invals, list(active))
        out_avals = [v.aval for v in eqn.outvars]
        return outs, (res, bwd, out_avals), [True] * len(outs)

    def backward(self, record, cts_out):
        res, bwd, out_avals = record.sub
        with compat.user_context(record.eqn):
            cts = bwd(res, cts_out, out_avals)
        return [ct if a else None for ct, a in zip(cts, record.active)]


call_handlers_reverse[compat.CUSTOM_VJP_CALL] = CustomVJPCall()


# ------------------------------------------------------------------ checkpoint
def _remat_closed(params):
    jaxpr, _ = compat.remat_inner(params)
    return compat.ClosedJaxpr(jaxpr, [])


# Reverse mode keeps only the region's inputs and what the policy saves, and
# recomputes the rest in the backward sweep (see fbackprop/_src/remat.py).
from ..remat import RematCall  # noqa: E402

for _name in compat.REMAT_NAMES:
    call_handlers_reverse[_name] = RematCall()


# ----------------------------------------------------------------- forward mode
from .. import forward as _forward  # noqa: E402
from ..registry import call_handlers_forward  # noqa: E402


def _inline_jvp(get_closed):
    def handler(eqn, invals, tangents):
        closed = get_closed(eqn.params)
        return _forward.jvp_jaxpr(closed.jaxpr, closed.consts, invals, tangents)
    return handler


for _name in compat.JIT_NAMES:
    call_handlers_forward[_name] = _inline_jvp(compat.jit_inner)
for _name in compat.REMAT_NAMES:
    call_handlers_forward[_name] = _inline_jvp(_remat_closed)


def _custom_jvp_forward(eqn, invals, tangents):
    """Forward mode of ``jax.custom_jvp``: evaluate the user's JVP rule."""
    call_jaxpr, num_consts, jvp_jaxpr_of = compat.custom_jvp_parts(eqn.params)
    if any(t is not None for t in tangents[:num_consts]):
        raise NotImplementedError(
            f"fbackprop cannot differentiate the custom_jvp function "
            f"'{eqn.params.get('name', '?')}' (at {compat.source_line(eqn)}) with respect "
            f"to a value it closes over; pass that value as an argument.")
    primals = invals[num_consts:]
    tangents = tangents[num_consts:]
    if not eqn.params.get("symbolic_zeros", False):
        # Without symbolic zeros the user's rule expects every tangent as an array.
        tangents = [compat.zeros_like_aval(compat.typeof(x)) if t is None else t
                    for x, t in zip(primals, tangents)]
    jvp_jaxpr, jvp_consts, out_zeros = jvp_jaxpr_of([t is None for t in tangents])
    nz_tangents = [t for t in tangents if t is not None]
    with compat.user_context(eqn):
        outs = compat.eval_jaxpr(jvp_jaxpr, jvp_consts, *primals, *nz_tangents)
    n_out = len(out_zeros)
    primal_outs, nz_out = outs[:n_out], iter(outs[n_out:])
    touts = [None if z else next(nz_out) for z in out_zeros]
    return list(primal_outs), touts


call_handlers_forward[compat.CUSTOM_JVP_CALL] = _custom_jvp_forward


def _custom_vjp_forward(eqn, invals, tangents):
    raise TypeError(
        f"can't apply forward-mode autodiff (jvp) to a custom_vjp function "
        f"('{eqn.params.get('name', '?')}' at {compat.source_line(eqn)}): its custom rule "
        f"only defines reverse mode, and pushing tangents through its primal code could "
        f"disagree with that rule (e.g. a straight-through estimator). Use reverse mode "
        f"(fbackprop.grad / vjp / jacrev), or define the function with jax.custom_jvp.")


call_handlers_forward[compat.CUSTOM_VJP_CALL] = _custom_vjp_forward
