"""Specs for control flow (scan, cond/switch, while_loop) and checkpointing (remat)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from .common import Spec

P = jax.checkpoint_policies


# ------------------------------------------------------------------------ scan
def _scan_rnn(w, h0, xs):
    def body(h, x):
        h = jnp.tanh(w @ h + x)
        return h, jnp.sin(h)
    return lax.scan(body, h0, xs)


def _scan_reverse_two_carries(a, b, xs):
    def body(carry, x):
        u, v = carry
        return (u * jnp.cos(v) + x, v + jnp.sin(u) * x), u * v
    return lax.scan(body, (a, b), xs, reverse=True, unroll=2)


def _scan_consts_no_xs(w, h0):
    # length without xs; w is a constant of the loop
    h, _ = lax.scan(lambda h, _: (jnp.sin(w * h) + 0.5 * h, None), h0, None, length=4)
    return h


def _scan_int_carry(x, y):
    # an integer counter carried next to a float (what fori_loop lowers to)
    def body(carry, _):
        i, h = carry
        return (i + 1, h * y + jnp.sin(h) * i.astype(h.dtype)), None
    (_, h), _ = lax.scan(body, (0, x), None, length=3)
    return h


def _scan_nested(w, xs):
    def outer(h, x):
        def inner(g, z):
            return jnp.sin(g * z + w), g * z
        g, ys = lax.scan(inner, h, xs)
        return g * x, ys.sum(0)
    return lax.scan(outer, w, xs)


def _fori_static(x, y):
    return lax.fori_loop(0, 4, lambda i, c: jnp.sin(c) * y + c * 0.5, x)


def _scan_checkpointed_body(w, h0, xs):
    body = jax.checkpoint(lambda h, x: (jnp.tanh(w @ h + x), h.sum()))
    return lax.scan(body, h0, xs)


# ------------------------------------------------------------------------ cond
def _cond_true(x, y):
    return lax.cond(jnp.sum(x) > 0, lambda a, b: jnp.sin(a) * b, lambda a, b: a * jnp.cos(b),
                    x, y)


def _cond_false(x, y):
    return lax.cond(jnp.sum(x) < 0, lambda a, b: jnp.sin(a) * b, lambda a, b: a * jnp.cos(b),
                    x, y)


def _switch(index):
    def f(x, y):
        y = jnp.broadcast_to(y, jnp.shape(x))
        return lax.switch(index, [lambda a, b: jnp.sin(a) * b,
                                  lambda a, b: (a * b) ** 2,
                                  lambda a, b: jnp.exp(a) + b], x, y)
    return f


def _switch_int_arg(rng, dtype):
    return (rng.uniform(-1, 1, (3, 4)).astype(dtype), rng.uniform(-1, 1, (4,)).astype(dtype),
            np.int32(1))


# ----------------------------------------------------------------------- while
def _while(x, y):
    def body(c):
        i, h = c
        return i + 1, jnp.sin(h) * y + h
    return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]


# ---------------------------------------------------------------------- remat
def _remat(policy):
    def f(w, x):
        def block(x):
            h = checkpoint_name(jnp.tanh(x @ w), "hidden")
            return jnp.sin(h @ w.T) * x
        return jax.checkpoint(block, policy=policy)(x)
    return f


SPECS = [
    Spec("scan_rnn", _scan_rnn, shapes=((4, 4), (4,), (5, 4)), domain=(-1.0, 1.0)),
    Spec("scan_reverse_two_carries", _scan_reverse_two_carries, shapes=((3,), (3,), (4, 3)),
         domain=(-1.0, 1.0)),
    Spec("scan_consts_no_xs", _scan_consts_no_xs, shapes=((3,), (3,)), domain=(-1.0, 1.0)),
    Spec("scan_int_carry", _scan_int_carry, shapes=((3,), ()), domain=(-1.0, 1.0)),
    Spec("scan_nested", _scan_nested, shapes=((3,), (3, 3)), domain=(-1.0, 1.0)),
    Spec("fori_loop_static", _fori_static, shapes=((3,), ()), domain=(-1.0, 1.0)),
    Spec("scan_checkpointed_body", _scan_checkpointed_body, shapes=((3, 3), (3,), (4, 3)),
         domain=(-1.0, 1.0)),
    Spec("cond_true", _cond_true, shapes=((3,), (3,)), domain=(0.1, 1.0)),
    Spec("cond_false", _cond_false, shapes=((3,), (3,)), domain=(0.1, 1.0)),
    *[Spec(f"switch_{i}", _switch(i), shapes=((3, 4), (4,)), domain=(-1.0, 1.0))
      for i in range(3)],
    Spec("switch_traced_index", lambda x, y, i: _switch(i)(x, y), make_args=_switch_int_arg),
    Spec("while_loop", _while, shapes=((3,), ()), domain=(-1.0, 1.0), modes=("fwd",)),
    *[Spec(f"remat_{name}", _remat(policy), shapes=((4, 4), (2, 4)), domain=(-1.0, 1.0))
      for name, policy in [
          ("default", None),
          ("nothing_saveable", P.nothing_saveable),
          ("everything_saveable", P.everything_saveable),
          ("dots_saveable", P.dots_saveable),
          ("dots_with_no_batch_dims_saveable", P.dots_with_no_batch_dims_saveable),
          ("save_only_these_names", P.save_only_these_names("hidden")),
          ("save_any_names_but_these", P.save_any_names_but_these("hidden")),
      ]],
    Spec("remat_no_prevent_cse",
         lambda x: jax.checkpoint(lambda a: jnp.sin(jnp.sin(a)), prevent_cse=False)(x)),
    Spec("checkpoint_name_outside_remat", lambda x: checkpoint_name(jnp.sin(x), "s") * x),
]
