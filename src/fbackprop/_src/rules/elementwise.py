"""Elementwise primitives: VJP and JVP rules side by side.

Conventions shared by every rule here:

* Binary lax primitives broadcast inside the primitive (``add f32[3,4] f32[1,4]``,
  ``mul x 2.0:f32[]``), so every binary VJP sums its cotangent back to each
  operand's shape with ``unbroadcast``; JVP contributions are broadcast to the
  output by ``defjvp``.
* Complex numbers follow JAX: a VJP is the plain transpose of the JVP under the
  bilinear pairing ``<u, v> = Re(sum(u * v))``, with no conjugation. For a
  holomorphic ``f`` that makes the cotangent ``ct * f'(z)``, the very formula used
  for reals, so one rule serves both. Only the non-holomorphic primitives (``abs``,
  ``real``, ``imag``, ``conj``, ``complex``) have rules of their own for complex
  inputs.
* Derivatives reuse the output where that is cheaper (``exp``, ``tanh``,
  ``logistic``, ``sqrt``, ``div``...) and otherwise use the same formulas as JAX's
  own rules, so compiled programs cost the same; at singular points (``pow`` at
  ``x = 0``, ``abs`` at ``0``, ties of ``max``) they take JAX's values.
* Rules use only ``jax.lax`` ops that have rules themselves, so derivatives of any
  order work. ``lax`` ops do not promote Python scalars, hence ``_const``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import compat
from ..registry import (defjvp, defnondiff, defvjp, register_jvp,
                        register_known_custom_jvp, register_vjp, unbroadcast)


# --------------------------------------------------------------------- helpers
def _dtype(x):
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else compat.typeof(x).dtype


def _const(like, value):
    """A scalar constant of ``like``'s dtype (lax ops do not promote Python scalars)."""
    return np.array(value, _dtype(like))


def _zeros(like):
    return compat.zeros_like(like)


def _is_complex(x) -> bool:
    return jnp.issubdtype(_dtype(x), jnp.complexfloating)


def _broadcast_to(x, shape):
    """``x`` broadcast to ``shape`` the way binary lax primitives broadcast inside."""
    shape = tuple(shape)
    return x if np.shape(x) == shape else jnp.broadcast_to(x, shape)


def _replace_zero(x):
    # Zeros replaced by ones: keeps log(x) and 1/|x| finite where the factor they
    # multiply is zero anyway (JAX's convention for pow and abs).
    return lax.select(lax.eq(x, _const(x, 0)), lax.full_like(x, 1), x)


def _def_unary(prim, derivative):
    """Registers both rules of ``y = f(x)`` from ``f'``, given as ``derivative(x, y, **params)``.

    The VJP is ``ct * f'(x)`` and the JVP ``t * f'(x)``; for complex ``x`` this is
    JAX's convention whenever ``f`` is holomorphic.
    """
    defvjp(prim, lambda ct, out, x, **params: lax.mul(ct, derivative(x, out, **params)))
    defjvp(prim, lambda t, out, x, **params: lax.mul(t, derivative(x, out, **params)))


def _is_highest(accuracy) -> bool:
    return accuracy is lax.AccuracyMode.HIGHEST


# ------------------------------------------------------------------ linear ops
# add_any is the addition JAX's own autodiff emits; it appears when a user's
# function contains a gradient computed by JAX and is differentiated by us.
defvjp(compat.add_any_p,
       lambda ct, out, x, y, **_: ct,
       lambda ct, out, x, y, **_: ct)
defjvp(compat.add_any_p, lambda t, out, x, y, **_: t, lambda t, out, x, y, **_: t)

defvjp(lax.add_p,
       lambda ct, out, x, y, **_: unbroadcast(ct, x),
       lambda ct, out, x, y, **_: unbroadcast(ct, y))
defjvp(lax.add_p, lambda t, out, x, y, **_: t, lambda t, out, x, y, **_: t)

defvjp(lax.sub_p,
       lambda ct, out, x, y, **_: unbroadcast(ct, x),
       lambda ct, out, x, y, **_: lax.neg(unbroadcast(ct, y)))


def _sub_jvp(primals, tangents, **params):
    out = lax.sub_p.bind(*primals, **params)
    tx, ty = tangents
    if ty is None:
        return out, None if tx is None else _broadcast_to(tx, np.shape(out))
    if tx is None:
        return out, _broadcast_to(lax.neg(ty), np.shape(out))
    return out, lax.sub(tx, ty)  # one subtraction, not an addition of a negation


register_jvp(lax.sub_p, _sub_jvp)

defvjp(lax.neg_p, lambda ct, out, x, **_: lax.neg(ct))
defjvp(lax.neg_p, lambda t, out, x, **_: lax.neg(t))

# copy only materializes a fresh buffer; its derivative is the identity.
defvjp(lax.copy_p, lambda ct, out, x, **_: ct)
defjvp(lax.copy_p, lambda t, out, x, **_: t)

# Rounding the mantissa/exponent is linear as far as JAX is concerned: the
# cotangent is rounded the same way.
defvjp(lax.reduce_precision_p,
       lambda ct, out, x, **params: lax.reduce_precision_p.bind(ct, **params))
defjvp(lax.reduce_precision_p,
       lambda t, out, x, **params: lax.reduce_precision_p.bind(t, **params))


# ------------------------------------------------------------- products, quotients
def _mul_ct(ct, other, like, out_dtype):
    # ``mul`` may carry an ``out_dtype`` (mixed precision); the cotangent of an
    # operand is computed in that operand's dtype, as JAX does.
    return lax.mul(ct, other, out_dtype=None if out_dtype is None else _dtype(like))


defvjp(lax.mul_p,
       lambda ct, out, x, y, *, out_dtype=None, **_:
       unbroadcast(_mul_ct(ct, y, x, out_dtype), x),
       lambda ct, out, x, y, *, out_dtype=None, **_:
       unbroadcast(_mul_ct(ct, x, y, out_dtype), y))
defjvp(lax.mul_p,
       lambda t, out, x, y, *, out_dtype=None, **_: lax.mul(t, y, out_dtype=out_dtype),
       lambda t, out, x, y, *, out_dtype=None, **_: lax.mul(x, t, out_dtype=out_dtype))


# d(x/y)/dx = 1/y;  d(x/y)/dy = -x/y^2.
def _div_vjp(ct, out, x, y, *, active, **_):
    x_active, y_active = active
    ct_over_y = lax.div(ct, y) if x_active else None
    ct_x = unbroadcast(ct_over_y, x) if x_active else None
    ct_y = None
    if y_active:
        if np.shape(y) != np.shape(ct):
            # y was broadcast inside the primitive (softmax's denominator): sum
            # ct x over the broadcast axes first, then divide the small result by
            # y twice. No full-size 1/y buffer stays alive, and nothing full-size
            # is shared with the x cotangent (a shared ct / y would have to be
            # written out for both of its readers).
            summed = unbroadcast(lax.mul(ct, x), y)
            return [ct_x, lax.neg(lax.div(lax.div(summed, y), y))]
        if x_active:
            # Reuse the x cotangent and the quotient: -x/y^2 ct = -(ct/y) out.
            slope_ct = lax.mul(ct_over_y, out)
        else:
            # A constant numerator (1/y...): -(ct x)/(y y) stays cheaper at higher
            # order than going through the quotient.
            slope_ct = lax.div(lax.mul(ct, x), lax.mul(y, y))
        ct_y = lax.neg(unbroadcast(slope_ct, y))
    return [ct_x, ct_y]


register_vjp(lax.div_p, _div_vjp, needs_active=True)
defjvp(lax.div_p,
       lambda t, out, x, y, **_: lax.div(t, y),
       lambda t, out, x, y, **_: lax.neg(lax.mul(lax.div(t, y), out)))


# rem(x, y) = x - y * trunc(x / y): d/dx = 1, d/dy = -trunc(x / y).
def _rem_dy(x, y):
    q = lax.div(x, y)
    return lax.mul(lax.sign(q), lax.floor(lax.abs(q)))


defvjp(lax.rem_p,
       lambda ct, out, x, y, **_: unbroadcast(ct, x),
       lambda ct, out, x, y, **_: lax.neg(unbroadcast(lax.mul(ct, _rem_dy(x, y)), y)))
defjvp(lax.rem_p,
       lambda t, out, x, y, **_: t,
       lambda t, out, x, y, **_: lax.mul(lax.neg(t), _rem_dy(x, y)))


# ------------------------------------------------------------------------ powers
def _pow_dx(x, y, out):
    """d(x**y)/dx = y * x**(y-1), at the output's shape.

    For an integer exponent JAX defines the derivative as 0 where ``y == 0``, even at
    ``x == 0`` (where ``0 * 0**-1`` would be nan).
    """
    if jnp.issubdtype(_dtype(y), jnp.integer):
        shape = np.shape(out)
        y = _broadcast_to(lax.convert_element_type(y, _dtype(x)), shape)
        jac = lax.mul(_replace_zero(y), lax.pow(x, lax.sub(y, _const(y, 1))))
        return lax.select(lax.eq(y, _const(y, 0)), _zeros(jac), _broadcast_to(jac, shape))
    return lax.mul(y, lax.pow(x, lax.sub(y, _const(y, 1))))


def _pow_dy(x, out):
    # d(x**y)/dy = log(x) * x**y; JAX takes log(1) = 0 at x == 0 so 0**y has slope 0.
    return lax.mul(lax.log(_replace_zero(x)), out)


defvjp(lax.pow_p,
       lambda ct, out, x, y, **_: unbroadcast(lax.mul(ct, _pow_dx(x, y, out)), x),
       lambda ct, out, x, y, **_: unbroadcast(lax.mul(ct, _pow_dy(x, out)), y))
defjvp(lax.pow_p,
       lambda t, out, x, y, **_: lax.mul(t, _pow_dx(x, y, out)),
       lambda t, out, x, y, **_: lax.mul(t, _pow_dy(x, out)))


def _integer_pow_scaled(g, x, k):
    """``g * d(x**k)/dx = g * k * x**(k-1)``; ``None`` (zero) for ``k == 0``."""
    if k == 0:
        return None
    if k == 1:
        return g
    if k == 2:
        return lax.mul(g, lax.mul(_const(x, 2), x))
    return lax.mul(g, lax.mul(_const(x, k), lax.integer_pow(x, k - 1)))


defvjp(lax.integer_pow_p, lambda ct, out, x, *, y, **_: _integer_pow_scaled(ct, x, y))
defjvp(lax.integer_pow_p, lambda t, out, x, *, y, **_: _integer_pow_scaled(t, x, y))

# d/dx x^2 = 2x
_def_unary(lax.square_p, lambda x, y, **_: lax.mul(_const(x, 2), x))

# d/dx sqrt(x) = 1 / (2 sqrt(x)) = 0.5 / y
_def_unary(lax.sqrt_p, lambda x, y, **_: lax.div(_const(x, 0.5), y))

# d/dx x^(-1/2) = -x^(-3/2) / 2 = -0.5 * y / x
_def_unary(lax.rsqrt_p, lambda x, y, **_: lax.mul(_const(x, -0.5), lax.div(y, x)))

# d/dx x^(1/3) = x^(-2/3) / 3 = y^-2 / 3
_def_unary(lax.cbrt_p,
           lambda x, y, **_: lax.mul(_const(x, 1 / 3), lax.integer_pow(y, -2)))


# ------------------------------------------------------ exponentials, logarithms
# d/dx exp x = exp x (reuse the output)
_def_unary(lax.exp_p, lambda x, y, **_: y)

# d/dx 2^x = 2^x log 2
defvjp(lax.exp2_p, lambda ct, out, x, **_: lax.mul(lax.mul(ct, out), _const(out, np.log(2))))
defjvp(lax.exp2_p, lambda t, out, x, **_: lax.mul(lax.mul(t, out), _const(out, np.log(2))))

# d/dx (e^x - 1) = e^x = y + 1 (or a fresh exp when the highest accuracy is asked)
_def_unary(lax.expm1_p,
           lambda x, y, *, accuracy=None, **_:
           lax.exp(x, accuracy=accuracy) if _is_highest(accuracy)
           else lax.add(y, _const(y, 1)))

# d/dx log x = 1/x
defvjp(lax.log_p, lambda ct, out, x, **_: lax.div(ct, x))
defjvp(lax.log_p, lambda t, out, x, **_: lax.div(t, x))

# d/dx log(1 + x) = 1/(1 + x)
defvjp(lax.log1p_p, lambda ct, out, x, **_: lax.div(ct, lax.add(x, _const(x, 1))))
defjvp(lax.log1p_p, lambda t, out, x, **_: lax.div(t, lax.add(x, _const(x, 1))))


# ---------------------------------------------------------------- sigmoid family
# tanh' = 1 - y^2, computed as (1 + y)(1 - y): no cancellation near |y| = 1. The
# JVP applies it as JAX does, (t + t y)(1 - y), never forming the factor on its
# own: under forward-over-reverse (hvp) the forward sweep's tangent and the
# backward sweep's cotangent would otherwise build the same (1 + y)(1 - y), XLA
# would merge the two, and the merged factor would stay alive from the forward
# pass to the backward pass (one more activation-sized buffer per tanh). Only the
# cheap 1 - y is then shared, which XLA recomputes inside each fusion. The VJP
# keeps the product: its 1 + y merges with the 1 + tanh of a tanh-GELU's forward.
def _tanh_highest_derivative(x, accuracy):
    return lax.mul(_const(x, 4),
                   lax.mul(lax.logistic(lax.mul(_const(x, 2), x), accuracy=accuracy),
                           lax.logistic(lax.mul(_const(x, -2), x), accuracy=accuracy)))


def _tanh_vjp(ct, out, x, *, accuracy=None, **_):
    if _is_highest(accuracy):
        return lax.mul(ct, _tanh_highest_derivative(x, accuracy))
    scaled = lax.mul(ct, lax.sub(_const(out, 1), out))
    return lax.add(scaled, lax.mul(scaled, out))


def _tanh_jvp(t, out, x, *, accuracy=None, **_):
    if _is_highest(accuracy):
        return lax.mul(t, _tanh_highest_derivative(x, accuracy))
    return lax.mul(lax.add(t, lax.mul(t, out)), lax.sub(_const(out, 1), out))


defvjp(lax.tanh_p, _tanh_vjp)
defjvp(lax.tanh_p, _tanh_jvp)

# logistic' = y (1 - y)
_def_unary(lax.logistic_p,
           lambda x, y, *, accuracy=None, **_:
           lax.mul(y, lax.logistic(lax.neg(x), accuracy=accuracy)) if _is_highest(accuracy)
           else lax.mul(y, lax.sub(_const(y, 1), y)))


# ---------------------------------------------------------------- trigonometric
# d/dx sin x = cos x
_def_unary(lax.sin_p, lambda x, y, *, accuracy=None, **_: lax.cos(x, accuracy=accuracy))

# d/dx cos x = -sin x
defvjp(lax.cos_p, lambda ct, out, x, *, accuracy=None, **_:
       lax.mul(lax.neg(ct), lax.sin(x, accuracy=accuracy)))
defjvp(lax.cos_p, lambda t, out, x, *, accuracy=None, **_:
       lax.neg(lax.mul(t, lax.sin(x, accuracy=accuracy))))

# d/dx tan x = 1 + tan^2 x = 1 + y^2
_def_unary(lax.tan_p, lambda x, y, **_: lax.add(_const(y, 1), lax.square(y)))

# d/dx asin x = 1/sqrt(1 - x^2)
_def_unary(lax.asin_p,
           lambda x, y, **_: lax.rsqrt(lax.sub(_const(x, 1), lax.square(x))))

# d/dx acos x = -1/sqrt(1 - x^2)
_def_unary(lax.acos_p,
           lambda x, y, **_: lax.neg(lax.rsqrt(lax.sub(_const(x, 1), lax.square(x)))))

# d/dx atan x = 1/(1 + x^2)
defvjp(lax.atan_p,
       lambda ct, out, x, **_: lax.div(ct, lax.add(_const(x, 1), lax.square(x))))
defjvp(lax.atan_p,
       lambda t, out, x, **_: lax.div(t, lax.add(_const(x, 1), lax.square(x))))


# atan2(x, y) = angle of (y, x):  d/dx = y/(x^2 + y^2),  d/dy = -x/(x^2 + y^2).
def _atan2_denominator(x, y):
    return lax.add(lax.square(x), lax.square(y))


defvjp(lax.atan2_p,
       lambda ct, out, x, y, **_:
       unbroadcast(lax.mul(ct, lax.div(y, _atan2_denominator(x, y))), x),
       lambda ct, out, x, y, **_:
       unbroadcast(lax.mul(ct, lax.div(lax.neg(x), _atan2_denominator(x, y))), y))
defjvp(lax.atan2_p,
       lambda t, out, x, y, **_: lax.mul(t, lax.div(y, _atan2_denominator(x, y))),
       lambda t, out, x, y, **_: lax.mul(t, lax.div(lax.neg(x), _atan2_denominator(x, y))))


# -------------------------------------------------------------------- hyperbolic
# d/dx sinh x = cosh x;  d/dx cosh x = sinh x
_def_unary(lax.sinh_p, lambda x, y, **_: lax.cosh(x))
_def_unary(lax.cosh_p, lambda x, y, **_: lax.sinh(x))

# d/dx asinh x = 1/sqrt(x^2 + 1)
_def_unary(lax.asinh_p,
           lambda x, y, **_: lax.rsqrt(lax.add(lax.square(x), _const(x, 1))))

# d/dx acosh x = 1/sqrt(x^2 - 1)  (x >= 1 on the real domain, so no cancellation issue)
_def_unary(lax.acosh_p,
           lambda x, y, **_: lax.rsqrt(lax.sub(lax.square(x), _const(x, 1))))


# d/dx atanh x = 1/((1 + x)(1 - x)): the factored form stays accurate near |x| = 1.
def _atanh_denominator(x):
    return lax.mul(lax.add(_const(x, 1), x), lax.sub(_const(x, 1), x))


defvjp(lax.atanh_p, lambda ct, out, x, **_: lax.div(ct, _atanh_denominator(x)))
defjvp(lax.atanh_p, lambda t, out, x, **_: lax.div(t, _atanh_denominator(x)))


# ------------------------------------------------------------ special functions
# d/dx erf x = 2/sqrt(pi) exp(-x^2);  erfc = 1 - erf.
_def_unary(lax.erf_p, lambda x, y, **_: lax.mul(
    _const(x, 2 / np.sqrt(np.pi)), lax.exp(lax.neg(lax.square(x)))))
_def_unary(lax.erfc_p, lambda x, y, **_: lax.mul(
    _const(x, -2 / np.sqrt(np.pi)), lax.exp(lax.neg(lax.square(x)))))

# erf_inv' = 1 / erf'(y) = sqrt(pi)/2 exp(y^2)
_def_unary(lax.erf_inv_p, lambda x, y, **_: lax.mul(
    _const(x, np.sqrt(np.pi) / 2), lax.exp(lax.square(y))))

# lgamma' = digamma;  digamma' = polygamma(1, .);  polygamma(m, .)' = polygamma(m + 1, .)
_def_unary(lax.lgamma_p, lambda x, y, **_: lax.digamma(x))
_def_unary(lax.digamma_p, lambda x, y, **_: lax.polygamma(_const(x, 1), x))


def _polygamma_dx(m, x):
    return lax.polygamma(lax.add(m, _const(m, 1)), x)


# The order m is an integer-valued index: it gets no gradient.
defvjp(lax.polygamma_p,
       None,
       lambda ct, out, m, x, **_: unbroadcast(lax.mul(ct, _polygamma_dx(m, x)), x))
defjvp(lax.polygamma_p,
       None,
       lambda t, out, m, x, **_: lax.mul(t, _polygamma_dx(m, x)))

# i0e(x) = exp(-|x|) I0(x):  i0e' = i1e(x) - sign(x) i0e(x)
_def_unary(lax.bessel_i0e_p,
           lambda x, y, **_: lax.sub(lax.bessel_i1e(x), lax.mul(lax.sign(x), y)))


def _bessel_i1e_derivative(x, y, **_):
    # i1e(x) = exp(-|x|) I1(x):  i1e' = i0e(x) - i1e(x) (sign(x) + 1/x), whose limit at
    # x = 0 is 1/2; JAX evaluates it away from |x| <= eps and uses 1/2 there.
    eps = jnp.finfo(_dtype(x)).eps
    not_tiny = lax.gt(lax.abs(x), _const(x, eps))
    safe_x = lax.select(not_tiny, x, lax.full_like(x, eps))
    slope = lax.sub(lax.bessel_i0e(safe_x),
                    lax.mul(y, lax.add(lax.sign(safe_x), lax.div(_const(x, 1), safe_x))))
    return lax.select(not_tiny, slope, lax.full_like(x, 0.5))


_def_unary(lax.bessel_i1e_p, _bessel_i1e_derivative)


# ------------------------------------------------------ piecewise: abs, max, min
def _abs_scaled(g, out, x):
    """``g`` pushed through |x| (JVP direction)."""
    if _is_complex(x):
        # |z| is not holomorphic: d|z| = Re(conj(z) dz) / |z|, taken as 0 at z = 0.
        return lax.div(lax.real(lax.mul(g, lax.conj(x))), _replace_zero(out))
    return lax.select(lax.ge(x, _const(x, 0)), g, lax.neg(g))


def _abs_vjp(ct, out, x, **_):
    if _is_complex(x):
        # Transpose of t -> Re(conj(z) t) / |z| under <u, v> = Re(u v): ct conj(z) / |z|.
        scale = lax.div(ct, _replace_zero(out))
        return lax.mul(lax.conj(x), lax.convert_element_type(scale, _dtype(x)))
    return _abs_scaled(ct, out, x)


defvjp(lax.abs_p, _abs_vjp)
defjvp(lax.abs_p, lambda t, out, x, **_: _abs_scaled(t, out, x))


def _chosen(g, out, mine, other):
    """``g`` where ``mine`` is the max/min, halved where ``other`` ties with it (JAX's
    convention: tied operands share the gradient evenly), zero elsewhere."""
    g = _broadcast_to(g, np.shape(out))
    shared = lax.select(lax.eq(other, out), lax.mul(g, _const(g, 0.5)), g)
    return lax.select(lax.eq(mine, out), shared, _zeros(g))


for _prim in (lax.max_p, lax.min_p):
    defvjp(_prim,
           lambda ct, out, x, y, **_: unbroadcast(_chosen(ct, out, x, y), x),
           lambda ct, out, x, y, **_: unbroadcast(_chosen(ct, out, y, x), y))
    defjvp(_prim,
           lambda t, out, x, y, **_: _chosen(t, out, x, y),
           lambda t, out, x, y, **_: _chosen(t, out, y, x))


# clamp(lo, x, hi), as JAX differentiates it: x gets the gradient strictly inside
# (lo, hi), lo where lo > x (and lo < hi), hi where hi < x. At x == lo or x == hi
# nobody gets it.
def _clamp_masks(lo, x, hi):
    if _is_complex(x):
        raise NotImplementedError(
            f"fbackprop: 'clamp' has no derivative rule for complex operands (got dtype "
            f"{_dtype(x)}); complex numbers have no order. Clamp the real and imaginary "
            f"parts separately (lax.real/lax.imag) instead.")
    inside = lax.bitwise_and(lax.gt(x, lo), lax.lt(x, hi))
    below = lax.bitwise_and(lax.gt(lo, x), lax.lt(lo, hi))
    above = lax.lt(hi, x)
    return below, inside, above


def _clamp_rule_for(which):
    def vjp(ct, out, lo, x, hi, **_):
        mask = _clamp_masks(lo, x, hi)[which]
        return unbroadcast(lax.select(mask, ct, _zeros(ct)), (lo, x, hi)[which])

    def jvp(t, out, lo, x, hi, **_):
        mask = _clamp_masks(lo, x, hi)[which]
        t = _broadcast_to(t, np.shape(out))
        return lax.select(mask, t, _zeros(t))

    return vjp, jvp


_clamp_rules = [_clamp_rule_for(i) for i in range(3)]
defvjp(lax.clamp_p, *(vjp for vjp, _ in _clamp_rules))
defjvp(lax.clamp_p, *(jvp for _, jvp in _clamp_rules))


# ---------------------------------------------------------------------- select_n
def _select_n_vjp(ct, out, which, *cases, active):
    # The predicate gets no gradient; case i gets ct where it was chosen, 0 elsewhere.
    case_active = active[1:]
    if len(cases) == 1:
        return [None, ct if case_active[0] else None]
    zeros = _zeros(ct)
    if _dtype(which) == np.bool_:
        return [None,
                lax.select(which, zeros, ct) if case_active[0] else None,
                lax.select(which, ct, zeros) if case_active[1] else None]
    return [None] + [lax.select(lax.eq(which, _const(which, i)), ct, zeros) if a else None
                     for i, a in enumerate(case_active)]


def _select_n_jvp(primals, tangents, **params):
    which, *cases = primals
    out = lax.select_n_p.bind(which, *cases, **params)
    case_tangents = tangents[1:]
    if all(t is None for t in case_tangents):
        return out, None
    zeros = None
    filled = []
    for t in case_tangents:
        if t is None:
            zeros = _zeros(out) if zeros is None else zeros
            t = zeros
        filled.append(t)
    return out, lax.select_n_p.bind(which, *filled, **params)


register_vjp(lax.select_n_p, _select_n_vjp, needs_active=True)
register_jvp(lax.select_n_p, _select_n_jvp)


# ----------------------------------------------------------------- dtype changes
def _weak_type(x) -> bool:
    return bool(getattr(compat.typeof(x), "weak_type", False))


def _convert_element_type_vjp(ct, out, x, *, new_dtype, weak_type, sharding, **_):
    # Cast the cotangent back to the input's dtype and weak type (complex -> real keeps
    # the real part and real -> complex adds a zero imaginary part, both the
    # transposes of the forward casts). Only called when x is float/complex and the
    # output is too: a cast to an integer dtype carries no gradient.
    return lax.convert_element_type_p.bind(ct, new_dtype=_dtype(x), weak_type=_weak_type(x),
                                           sharding=None)


def _convert_element_type_jvp(t, out, x, *, new_dtype, weak_type, sharding, **_):
    if not jnp.issubdtype(new_dtype, jnp.inexact):
        return None
    return lax.convert_element_type_p.bind(t, new_dtype=new_dtype, weak_type=weak_type,
                                           sharding=sharding)


defvjp(lax.convert_element_type_p, _convert_element_type_vjp)
defjvp(lax.convert_element_type_p, _convert_element_type_jvp)


# ------------------------------------------------------------- complex numbers
# Under JAX's pairing <u, v> = Re(u v): real(z)^T ct = ct + 0i, imag(z)^T ct = -i ct,
# complex(x, y)^T ct = (Re ct, -Im ct), conj^T ct = conj(ct) (Re ct for a real input).
def _real_zero(t):
    return np.zeros((), _dtype(t))


defvjp(lax.real_p, lambda ct, out, x, **_: lax.complex(ct, _real_zero(ct)))
defjvp(lax.real_p, lambda t, out, x, **_: lax.real(t))

defvjp(lax.imag_p, lambda ct, out, x, **_: lax.complex(_real_zero(ct), lax.neg(ct)))
defjvp(lax.imag_p, lambda t, out, x, **_: lax.imag(t))

defvjp(lax.complex_p,
       lambda ct, out, x, y, **_: unbroadcast(lax.real(ct), x),
       lambda ct, out, x, y, **_: unbroadcast(lax.neg(lax.imag(ct)), y))


def _complex_jvp(primals, tangents, **params):
    out = lax.complex_p.bind(*primals, **params)
    tx, ty = tangents
    if tx is None and ty is None:
        return out, None
    tx = _real_zero(ty) if tx is None else tx
    ty = _real_zero(tx) if ty is None else ty
    return out, _broadcast_to(lax.complex(tx, ty), np.shape(out))


register_jvp(lax.complex_p, _complex_jvp)


def _conj_vjp(ct, out, x, *, input_dtype, **_):
    if jnp.issubdtype(input_dtype, jnp.complexfloating):
        return lax.conj(ct)
    return lax.real(ct)


defvjp(lax.conj_p, _conj_vjp)
defjvp(lax.conj_p, lambda t, out, x, *, input_dtype, **_:
       lax.conj_p.bind(t, input_dtype=_dtype(t)))


# ------------------------------------------------------------------ no gradient
# Comparisons, predicates, integer and bit ops have integer/bool outputs; rounding,
# sign and nextafter are piecewise constant (JAX gives them a zero derivative).
# A bitcast reinterprets the bits (jnp.copysign and jax.scipy.special.gamma read a
# float's sign bit through one); JAX gives it a zero derivative whatever the dtypes.
defnondiff(lax.eq_p, lax.ne_p, lax.lt_p, lax.le_p, lax.gt_p, lax.ge_p,
           lax.bitcast_convert_type_p,
           lax.eq_to_p, lax.le_to_p, lax.lt_to_p, lax.is_finite_p,
           lax.and_p, lax.or_p, lax.not_p, lax.xor_p,
           lax.shift_left_p, lax.shift_right_arithmetic_p, lax.shift_right_logical_p,
           lax.population_count_p, lax.clz_p, lax.mulhi_p,
           lax.floor_p, lax.ceil_p, lax.round_p, lax.sign_p, lax.nextafter_p,
           lax.stop_gradient_p)


# ------------------------------------------------ JAX's custom_jvp activations
# jax.nn.relu and relu6 are custom_jvp functions (gradient 0 at the kinks); their
# VJPs below are the transposes of JAX's rules ``select(mask, g, 0)``.
def _relu_vjp(ct, x):
    zero = np.zeros((), compat.typeof(x).dtype)
    return [lax.select(lax.gt(x, zero), ct, compat.zeros_like(ct))]


def _relu6_vjp(ct, x):
    dtype = compat.typeof(x).dtype
    inside = lax.bitwise_and(lax.gt(x, np.zeros((), dtype)), lax.lt(x, np.full((), 6, dtype)))
    return [lax.select(inside, ct, compat.zeros_like(ct))]


register_known_custom_jvp(jax.nn.relu, _relu_vjp)
register_known_custom_jvp(jax.nn.relu6, _relu6_vjp)
