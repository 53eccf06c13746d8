"""The compiled loops of a while loop's reversal (see :mod:`.checkpointed`).

:func:`forward_program` is the loop itself, keeping loop states in a fixed
number of slots as it goes (:func:`.schedule.decide`); :func:`backward_program`
is the reverse loop: one iteration per loop step, each restoring the nearest
kept state, recomputing forward from it with binomially placed extra states
(:func:`.schedule.split_point`) and applying our own sweeps over the body at the
step before (the body's joint trace, :func:`residuals.trace_joint`).

One spare slot (index ``S``) takes the writes of iterations that keep nothing:
every iteration writes unconditionally, which XLA does in place (a conditional
write that reads the old slot makes it copy), so compiled temp memory is the
slots plus a few KB, whatever the trip count.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ... import compat
from ..control import _strong, _zeros
from . import schedule
from .common import like


def forward_program(cn, bn, body_closed, cond_closed, S, stored):
    """``(cond consts, body consts, init) -> (final carry, T, k, steps, order,
    *slots)``: the loop, keeping states in ``S`` slots by the greedy rule."""
    body, cond = body_closed.jaxpr, cond_closed.jaxpr
    nk = len(body.outvars)
    tab = schedule.table(S + 2)
    carry_avals = [v.aval for v in body.invars[bn:]]

    def run(args):
        cconsts, bconsts, init = args[:cn], args[cn:cn + bn], args[cn + bn:]
        # One spare slot (index S) takes the writes of iterations that keep
        # nothing: every iteration writes unconditionally, which XLA does in
        # place (a conditional write that reads the old slot makes it copy).
        # (Broadcast from the initial value rather than zeros: PRNG keys and
        # other extended dtypes have no zeros.)
        slots0 = [jnp.broadcast_to(init[k], (S + 1,) + tuple(carry_avals[k].shape))
                  for k in range(nk) if stored[k]]
        state0 = (jnp.int32(0), list(init), jnp.int32(0), jnp.zeros((S,), jnp.int32),
                  jnp.arange(S, dtype=jnp.int32), jnp.zeros((S,), jnp.float32),
                  jnp.full((S,), schedule.INF, jnp.float32), slots0)

        def cond_fn(state):
            return compat.eval_jaxpr(cond, cond_closed.consts, *cconsts, *state[1])[0]

        def body_fn(state):
            t, x, k, ck, order, A, E, slots = state
            save, pos = schedule.decide(tab, S, t, k, ck, A, E)
            k2, ck2, order2 = schedule.keep(S, t, k, ck, order, pos)
            sid = order2[jnp.clip(k2 - 1, 0, S - 1)]
            xs = [xi for xi, st in zip(x, stored) if st]
            slots = [lax.dynamic_update_index_in_dim(buf, xi, jnp.where(save, sid, S), 0)
                     for buf, xi in zip(slots, xs)]
            A, E = lax.cond(save, lambda: schedule.gap_costs(tab, S, k2, ck2), lambda: (A, E))
            new = like(compat.eval_jaxpr(body, body_closed.consts, *bconsts, *x),
                       carry_avals)
            return (t + 1, new, jnp.where(save, k2, k), jnp.where(save, ck2, ck),
                    jnp.where(save, order2, order), A, E, slots)

        T, x, k, ck, order, _, _, slots = lax.while_loop(cond_fn, body_fn, state0)
        return list(x) + [T, k, ck, order] + list(slots)
    return run


def backward_program(bn, body_closed, joint, S, stored, carry_active, const_nz):
    """``(body consts, init, T, k, steps, order, *slots, *carry cts) -> (init
    cts, constant cts, body evaluations)``: the reverse loop (module doc)."""
    body = body_closed.jaxpr
    nk = len(body.outvars)
    tab = schedule.table(S + 2)
    in_avals = [v.aval for v in body.invars]
    carry_avals = in_avals[bn:]
    act = [k for k in range(nk) if carry_active[k]]
    n_stored = sum(stored)
    nonzero = joint.ct_in_nonzero
    ct_outputs = joint.ct_outputs

    def next_state(a, g, free):
        l = g - a
        m = schedule.split_point(tab, jnp.maximum(l, 3), jnp.maximum(free + 1, 2))
        return jnp.where((free >= 1) & (l >= 3), a + m, schedule.NEVER)

    def run(args):
        bconsts, init = list(args[:bn]), list(args[bn:bn + nk])
        T, k0, steps0, order = args[bn + nk:bn + nk + 4]
        slots0 = list(args[bn + nk + 4:bn + nk + 4 + n_stored])
        ct0 = list(args[bn + nk + 4 + n_stored:])
        accs0 = [_zeros(in_avals[i]) for i in const_nz]

        def restore(slots, sid, has):
            it = iter(slots)
            x = []
            for kk in range(nk):
                if stored[kk]:
                    buf = next(it)
                    x.append(jnp.where(has, lax.dynamic_index_in_dim(buf, sid, 0, False),
                                       init[kk]))
                else:
                    x.append(init[kk])
            return like(x, carry_avals)

        def outer_cond(state):
            return state[0] > 0

        def outer_body(state):
            g, k, steps, slots, ct, accs, evals = state
            has = k >= 1
            top = jnp.maximum(k - 1, 0)
            a0 = jnp.where(has, steps[top], 0)
            x0 = restore(slots, order[top], has)

            def inner_cond(st):
                return st[0] + 1 < g

            def inner_body(st):
                a, x, k, steps, slots, nxt, evals = st
                # Where the next state goes: planned on entry and after each store.
                nxt = lax.cond(nxt < 0, lambda: next_state(a, g, S - k), lambda: nxt)
                x = like(compat.eval_jaxpr(body, body_closed.consts, *bconsts, *x),
                         carry_avals)
                a = a + 1
                push = a == nxt
                pos = jnp.minimum(k, S - 1)
                sid = order[pos]
                xs = [xi for xi, st_ in zip(x, stored) if st_]
                slots = [lax.dynamic_update_index_in_dim(buf, xi, jnp.where(push, sid, S), 0)
                         for buf, xi in zip(slots, xs)]
                steps = jnp.where(push, steps.at[pos].set(a), steps)
                return (a, x, jnp.where(push, k + 1, k), steps, slots,
                        jnp.where(push, -1, nxt), evals + 1)

            a, x, k, steps, slots, _, evals = lax.while_loop(
                inner_cond, inner_body, (a0, x0, k, steps, slots, jnp.int32(-1), evals))
            # One step back: our own sweeps over the body at x_{g-1}.
            ct_of = dict(zip(act, ct))
            cts = [ct_of[o] if o in ct_of else _zeros(carry_avals[o]) for o in ct_outputs]
            outs = compat.eval_jaxpr(joint.jaxpr, joint.consts, *bconsts, *x, *cts)
            cts_in = dict(zip(nonzero, outs[joint.n_out:]))
            new_ct = [_strong(cts_in[bn + kk]) if bn + kk in cts_in
                      else _zeros(carry_avals[kk]) for kk in act]
            accs = [lax.add(acc, _strong(cts_in[i]).astype(acc.dtype))
                    for acc, i in zip(accs, const_nz)]
            g = g - 1
            pop = (k >= 1) & (steps[jnp.maximum(k - 1, 0)] == g)
            return g, jnp.where(pop, k - 1, k), steps, slots, new_ct, accs, evals + 1

        _, _, _, _, ct, accs, evals = lax.while_loop(
            outer_cond, outer_body, (T, k0, steps0, slots0, ct0, accs0, jnp.int32(0)))
        return list(ct) + list(accs) + [evals]
    return run
