"""Special functions, gamma sampling and scatter-min/max: VJP and JVP rules side by side.

The special functions are elementwise and real; their lax primitives broadcast
scalars and size-1 dimensions inside the primitive, so each VJP sums its
cotangent back to the operand's shape with ``unbroadcast``. Where a derivative
has no closed form (the incomplete gamma function's second derivative in
``a``, the Hurwitz zeta function's derivative in ``s``, the incomplete beta
function's derivatives in ``a`` and ``b``) the rule raises
``NotImplementedError`` naming the primitive and the argument (JAX has no
derivative there either).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..registry import defjvp, defvjp, register_jvp, register_vjp, unbroadcast
from .structural import _gather_scattered, _scatter_index_params


def _const(like, value):
    return np.array(value, like.dtype)


def _no_derivative(primitive, argument, why):
    def rule(*args, **kwargs):
        raise NotImplementedError(
            f"fbackprop: '{primitive}' has no derivative with respect to its argument "
            f"'{argument}': {why}")
    return rule


class _Undefined:
    """Marks a partial derivative that has no rule; using it raises with ``why``."""

    def __init__(self, primitive, argument, why):
        self.rule = _no_derivative(primitive, argument, why)


def _negated(d):
    return lambda u, v: lax.neg(d(u, v))


def _def_binary(prim, d_first, d_second, sign=1):
    """Both rules of ``f(u, v)`` from its partial derivatives ``d(u, v)``.

    A partial derivative may be an ``_Undefined``; ``sign=-1`` negates both.
    """
    vjps, jvps = [], []
    for i, d in enumerate((d_first, d_second)):
        if isinstance(d, _Undefined):
            vjps.append(d.rule)
            jvps.append(d.rule)
            continue
        if sign == -1:
            d = _negated(d)
        vjps.append(lambda ct, out, u, v, _d=d, _i=i, **_:
                    unbroadcast(lax.mul(ct, _d(u, v)), (u, v)[_i]))
        jvps.append(lambda t, out, u, v, _d=d, **_: lax.mul(t, _d(u, v)))
    defvjp(prim, *vjps)
    defjvp(prim, *jvps)


# ------------------------------------------------------ incomplete gamma function
# P(a, x) = igamma(a, x) = gamma(a, x) / Gamma(a), Q = igammac = 1 - P.
#   dP/dx = x^(a-1) e^(-x) / Gamma(a)        dP/da = igamma_grad_a(a, x)
#   d(igamma_grad_a)/dx = d/da (dP/dx) = dP/dx * (log x - digamma(a))
# d(igamma_grad_a)/da (the second derivative in a) has no closed form.
def _igamma_dx(a, x):
    one = _const(a, 1)
    return lax.exp(lax.sub(lax.mul(lax.sub(a, one), lax.log(x)), lax.add(x, lax.lgamma(a))))


def _igamma_da(a, x):
    return lax.igamma_grad_a(a, x)


def _igamma_grad_a_dx(a, x):
    return lax.mul(_igamma_dx(a, x), lax.sub(lax.log(x), lax.digamma(a)))


_def_binary(lax.igamma_p, _igamma_da, _igamma_dx)
_def_binary(lax.igammac_p, _igamma_da, _igamma_dx, sign=-1)
_def_binary(lax.igamma_grad_a_p,
            _Undefined("igamma_grad_a", "a",
                       "the second derivative of the regularized incomplete gamma "
                       "function in a has no closed form (JAX has none either)."),
            _igamma_grad_a_dx)


# --------------------------------------------------------------- Hurwitz zeta
# zeta(s, q) = sum_n (n + q)^(-s):   d/dq zeta(s, q) = -s zeta(s + 1, q).
# The derivative in s has no closed form; jax.scipy.special.zeta (a custom_jvp
# function fbackprop differentiates through its rule) provides a series for it.
def _zeta_dq(s, q):
    return lax.neg(lax.mul(s, lax.zeta(lax.add(s, _const(s, 1)), q)))


_def_binary(lax.zeta_p,
            _Undefined("zeta", "s (x)",
                       "it has no closed form. jax.scipy.special.zeta differentiates "
                       "in s through a series; call it instead of lax.zeta."),
            _zeta_dq)


# ------------------------------------------------------ incomplete beta function
# I_x(a, b) = B(x; a, b) / B(a, b):  dI/dx = x^(a-1) (1-x)^(b-1) / B(a, b).
# The derivatives in a and b have no closed form (JAX has none either).
def _betainc_dx(ct, out, a, b, x, **_):
    one = _const(x, 1)
    log_beta = lax.sub(lax.add(lax.lgamma(a), lax.lgamma(b)), lax.lgamma(lax.add(a, b)))
    d = lax.exp(lax.sub(lax.add(lax.mul(lax.sub(b, one), lax.log1p(lax.neg(x))),
                                lax.mul(lax.sub(a, one), lax.log(x))), log_beta))
    return lax.mul(ct, d)


_betainc_why = ("only the derivative in x has a closed form (JAX has none in a or b "
                "either); pass a and b as constants or through stop_gradient.")
defvjp(lax.regularized_incomplete_beta_p,
       _no_derivative("regularized_incomplete_beta", "a", _betainc_why),
       _no_derivative("regularized_incomplete_beta", "b", _betainc_why),
       lambda ct, out, a, b, x, **p: unbroadcast(_betainc_dx(ct, out, a, b, x, **p), x))
defjvp(lax.regularized_incomplete_beta_p,
       _no_derivative("regularized_incomplete_beta", "a", _betainc_why),
       _no_derivative("regularized_incomplete_beta", "b", _betainc_why),
       _betainc_dx)


# --------------------------------------------------------------- gamma sampling
# jax.random.gamma(key, a): implicit reparameterization. A sample z with
# F(z; a) = u (u uniform, independent of a) moves with a as
#   dz/da = -(dF/da) / (dF/dz),
# which random_gamma_grad(a, z) computes. With log_space the primitive returns
# log z, whose derivative is (dz/da) / z (z at least the smallest normal, as in
# JAX). The key carries no gradient. random_gamma_grad is built from while
# loops, so only first-order reverse mode is available (as in JAX).
def _random_gamma_da(a, sample, log_space):
    if not log_space:
        return jax.lax.random_gamma_grad(a, sample)
    z = lax.exp(sample)
    tiny = lax.full_like(z, np.finfo(z.dtype).tiny)
    z = lax.select(lax.eq(z, _const(z, 0)), tiny, z)
    return lax.div(jax.lax.random_gamma_grad(a, z), z)


defvjp(jax.random.random_gamma_p, None,
       lambda ct, out, key, a, *, log_space: lax.mul(ct, _random_gamma_da(a, out, log_space)))
defjvp(jax.random.random_gamma_p, None,
       lambda t, out, key, a, *, log_space: lax.mul(t, _random_gamma_da(a, out, log_space)))


# ------------------------------------------------------------- scatter min/max
# out[p] = max(x[p], updates landing on p) (min alike). The cotangent of out[p]
# goes to the winners: x[p] if it was kept and every update equal to out[p];
# with ties it is split evenly among them (JAX's convention, like max at ties).
# A position no update lands on keeps x[p] (weight 1).
def _scatter_extremal_weights(x, indices, updates, out, params):
    index_params = _scatter_index_params(params)
    zero_x = jnp.zeros(x.shape, x.dtype)
    won = lax.eq(updates, _gather_scattered(out, indices, updates, **index_params))
    kept = lax.eq(x, out)
    n_won = lax.scatter_add(zero_x, indices, won.astype(x.dtype), **index_params)
    weight_x = lax.select(kept, 1 / (n_won + _const(x, 1)), zero_x)
    n_winners = _gather_scattered(n_won + kept.astype(x.dtype), indices, updates,
                                  **index_params)
    zero_u = jnp.zeros(updates.shape, updates.dtype)
    weight_u = lax.select(won, 1 / lax.select(won, n_winners, zero_u + 1), zero_u)
    return weight_x, weight_u


def _scatter_extremal_vjp(ct, out, x, indices, updates, *, active, **params):
    weight_x, weight_u = _scatter_extremal_weights(x, indices, updates, out, params)
    ct_x = lax.mul(ct, weight_x) if active[0] else None
    ct_u = None
    if active[2]:
        ct_u = lax.mul(_gather_scattered(ct, indices, updates, **_scatter_index_params(params)),
                       weight_u)
    return [ct_x, None, ct_u]


def _scatter_extremal_jvp(prim):
    def jvp(primals, tangents, **params):
        x, indices, updates = primals
        t_x, _, t_u = tangents
        out = prim.bind(x, indices, updates, **params)
        if t_x is None and t_u is None:
            return out, None
        weight_x, weight_u = _scatter_extremal_weights(x, indices, updates, out, params)
        t_out = jnp.zeros(x.shape, x.dtype) if t_x is None else lax.mul(t_x, weight_x)
        if t_u is not None:
            t_out = lax.scatter_add(t_out, indices, lax.mul(t_u, weight_u),
                                    **_scatter_index_params(params))
        return out, t_out
    return jvp


for _prim in (lax.scatter_max_p, lax.scatter_min_p):
    register_vjp(_prim, _scatter_extremal_vjp, needs_active=True)
    register_jvp(_prim, _scatter_extremal_jvp(_prim))
