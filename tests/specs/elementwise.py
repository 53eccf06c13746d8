"""Specs for elementwise primitives (arithmetic, transcendental, piecewise, complex, casts)."""

import jax.numpy as jnp
import numpy as np
from jax import lax

from .common import Spec

COMPLEX = ("complex64", "complex128")


def _c(x, value):
    """A constant of x's dtype (lax ops do not promote Python scalars)."""
    return jnp.asarray(value, x.dtype)


# ------------------------------------------------------------- complex helpers
# Real random cotangents/tangents would leave the imaginary directions untested, so
# complex specs evaluate f at w = z * _ROT_IN and return f(w) * _ROT_OUT: the
# tangents and cotangents reaching f then have both parts. make_args draws w in the
# wanted region and returns z = w / _ROT_IN.
_ROT_IN = 0.8 + 0.6j
_ROT_OUT = 0.6 - 0.8j


def _complex_args(shapes, re, im):
    def make(rng, dtype):
        return tuple(((rng.uniform(*re, size=s) + 1j * rng.uniform(*im, size=s)) / _ROT_IN)
                     .astype(dtype) for s in shapes)
    return make


def _cspec(name, f, shapes=((3, 4),), re=(-1.5, 1.5), im=(-1.5, 1.5), order=2, tol=None):
    def fn(*zs):
        return f(*(z * _ROT_IN for z in zs)) * _ROT_OUT
    return Spec(name, fn, shapes=shapes, dtypes=COMPLEX,
                make_args=_complex_args(shapes, re, im), order=order, tol=tol)


# ----------------------------------------------------------------- arg makers
def _ties(rng, dtype):
    """x and y equal at about half of the entries (max/min ties)."""
    x = rng.uniform(-2, 2, size=(3, 4)).astype(dtype)
    y = rng.uniform(-2, 2, size=(3, 4)).astype(dtype)
    y = np.where(rng.uniform(size=(3, 4)) < 0.5, x, y).astype(dtype)
    return x, y


def _clamp_at_bounds(rng, dtype):
    lo = rng.uniform(-1.5, -0.5, size=(3, 4)).astype(dtype)
    hi = rng.uniform(0.5, 1.5, size=(3, 4)).astype(dtype)
    x = rng.uniform(-2, 2, size=(3, 4)).astype(dtype)
    pick = rng.integers(0, 3, size=(3, 4))
    x = np.where(pick == 0, lo, np.where(pick == 1, hi, x)).astype(dtype)
    return lo, x, hi


def _pow_at_zero(rng, dtype):
    x = rng.uniform(0.2, 2, size=(3, 4)).astype(dtype)
    x[0] = 0
    y = rng.choice([2.0, 2.5, 3.0], size=(3, 4)).astype(dtype)
    return x, y


def _pow_int_exponent(rng, dtype):
    x = rng.uniform(-2, 2, size=(3, 4)).astype(dtype)
    x[0, 0] = 0
    y = rng.integers(0, 4, size=(3, 4)).astype(np.int32)
    return x, y


def _select2(rng, dtype):
    return (rng.uniform(size=(3, 4)) < 0.5,
            rng.uniform(-2, 2, size=(3, 4)).astype(dtype),
            rng.uniform(-2, 2, size=(3, 4)).astype(dtype))


def _select3(rng, dtype):
    return (rng.integers(0, 3, size=(3, 4)).astype(np.int32),
            *(rng.uniform(-2, 2, size=(3, 4)).astype(dtype) for _ in range(3)))


def _select_scalar_pred(rng, dtype):
    return (np.bool_(True), rng.uniform(-2, 2, size=(3, 4)).astype(dtype),
            rng.uniform(-2, 2, size=(3, 4)).astype(dtype))


def _with_ints(rng, dtype):
    return (rng.uniform(-2, 2, size=(3, 4)).astype(dtype),
            rng.integers(1, 50, size=(3, 4)).astype(np.int32),
            rng.integers(1, 50, size=(3, 4)).astype(np.int32))


# ----------------------------------------------------------------- spec bodies
def _comparisons(x, y):
    picks = [x == y, x != y, x < y, x <= y, x >= y,
             lax.eq_to_p.bind(x, y), lax.le_to_p.bind(x, y), lax.lt_to_p.bind(x, y)]
    return sum(jnp.where(p, x * y, x - y) for p in picks)


def _bitwise(x, i, j):
    k = (i & j) | (i ^ j)
    k = k + (~i) + (i << 1) + lax.shift_right_arithmetic(i, np.int32(1))
    k = k + lax.shift_right_logical(j, np.int32(2)) + lax.population_count(i) + lax.clz(j)
    k = k + lax.mulhi(i, j)
    flag = jnp.logical_or(jnp.logical_not(i > 10), jnp.logical_and(j > 5, i < 40))
    return x * k.astype(x.dtype) + jnp.where(flag, x, -x)


def _piecewise_constant(x):
    rounded = lax.floor(x) + lax.ceil(x) + lax.round(x) + \
        lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN) + lax.sign(x)
    finite = jnp.where(lax.is_finite(x), x, jnp.zeros_like(x))
    after = lax.nextafter(lax.stop_gradient(x), lax.stop_gradient(x) + 1)
    return x * rounded + finite * after


def _weak_cast(x):
    weak = lax.convert_element_type_p.bind(x, new_dtype=x.dtype, weak_type=True,
                                           sharding=None)
    return jnp.sin(weak) * x


def _cast(x, dtype):
    # The primitive itself: lax.convert_element_type warns on complex -> real.
    return lax.convert_element_type_p.bind(x, new_dtype=np.dtype(dtype), weak_type=False,
                                           sharding=None)


def _clamp_scalar_literals(x):
    return lax.clamp(_c(x, -0.7), x, _c(x, 0.9))


def _add_any(x, y):
    from fbackprop._src import compat
    return compat.add_any_p.bind(x, y) * x


SPECS = [
    Spec("add_any", _add_any, shapes=((3, 4), (3, 4))),
    # -------------------------------------------------------- linear, broadcasting
    Spec("add", lax.add, shapes=((3, 4), (3, 4))),
    Spec("add_broadcast_inside", lambda x, y: lax.add(x, y), shapes=((3, 4), (1, 4))),
    Spec("add_scalar_operand", lambda x, y: lax.add(x, y), shapes=((3, 4), ())),
    Spec("sub", lax.sub, shapes=((3, 4), (3, 4))),
    Spec("sub_broadcast_inside", lambda x, y: lax.sub(y, x), shapes=((3, 4), (1, 4))),
    Spec("neg", lax.neg),
    Spec("copy", lambda x: jnp.array(x, copy=True) * x),
    Spec("reduce_precision", lambda x: lax.reduce_precision(x, 5, 10) * x),
    # -------------------------------------------------------- products, quotients
    Spec("mul", lax.mul, shapes=((3, 4), (3, 4))),
    Spec("mul_scalar_literal", lambda x: x * 2.5),
    Spec("mul_broadcast_inside", lambda x, y: lax.mul(x, y), shapes=((3, 4), (1, 4))),
    Spec("mul_self", lambda x: lax.mul(x, x)),
    Spec("div", lax.div, shapes=((3, 4), (3, 4)), domain=((-2, 2), (0.5, 2))),
    Spec("div_broadcast_inside", lambda x, y: lax.div(x, y), shapes=((1, 4), (3, 4)),
         domain=((-2, 2), (0.5, 2))),
    Spec("div_scalar_literal", lambda x: 1.5 / x, domain=(0.5, 2)),
    Spec("rem", lax.rem, shapes=((3, 4), (3, 4)), domain=((-3, 3), (0.6, 1.4))),
    Spec("rem_broadcast_inside", lambda x, y: lax.rem(x, y), shapes=((3, 4), ()),
         domain=((-3, 3), (0.6, 1.4))),
    # ----------------------------------------------------------------- powers
    Spec("pow", lax.pow, shapes=((3, 4), (3, 4)), domain=((0.3, 2), (-1.5, 2.5))),
    Spec("pow_broadcast_inside", lambda x, y: lax.pow(x, y), shapes=((3, 4), (1, 4)),
         domain=((0.3, 2), (-1.5, 2.5))),
    Spec("pow_scalar_literal_exponent", lambda x: x ** 2.5, domain=(0.3, 2)),
    Spec("pow_scalar_literal_base", lambda y: 2.0 ** y),
    Spec("pow_at_zero", lax.pow, make_args=_pow_at_zero),
    Spec("pow_int_exponent", lambda x, y: lax.pow(x, y), make_args=_pow_int_exponent),
    Spec("integer_pow", lambda x: lax.integer_pow(x, 3) + lax.integer_pow(x, 1)
         + lax.integer_pow(x, 2) + lax.integer_pow(x, 0) + lax.integer_pow(x, -2),
         domain=(0.5, 2)),
    Spec("square", lax.square),
    Spec("sqrt", lax.sqrt, domain=(0.3, 3)),
    Spec("rsqrt", lax.rsqrt, domain=(0.3, 3)),
    Spec("cbrt", lax.cbrt, domain=(0.3, 3)),
    Spec("cbrt_negative", lax.cbrt, domain=(-3, -0.3)),
    # ------------------------------------------------- exponentials, logarithms
    Spec("exp", lax.exp),
    Spec("exp2", lax.exp2),
    Spec("expm1", lax.expm1),
    Spec("expm1_highest_accuracy",
         lambda x: lax.expm1(x, accuracy=lax.AccuracyMode.HIGHEST)),
    Spec("log", lax.log, domain=(0.5, 3.0)),
    Spec("log1p", lax.log1p, domain=(-0.7, 3.0)),
    # ------------------------------------------------------------ sigmoid family
    Spec("tanh", lax.tanh, domain=(-3, 3)),
    Spec("tanh_highest_accuracy",
         lambda x: lax.tanh(x, accuracy=lax.AccuracyMode.HIGHEST)),
    Spec("logistic", lax.logistic, domain=(-4, 4)),
    Spec("logistic_highest_accuracy",
         lambda x: lax.logistic(x, accuracy=lax.AccuracyMode.HIGHEST)),
    # ------------------------------------------------------------ trigonometric
    Spec("sin", lax.sin),
    Spec("cos", lax.cos),
    Spec("tan", lax.tan, domain=(-1.2, 1.2)),
    Spec("asin", lax.asin, domain=(-0.9, 0.9)),
    Spec("acos", lax.acos, domain=(-0.9, 0.9)),
    Spec("atan", lax.atan, domain=(-3, 3)),
    Spec("atan2", lax.atan2, shapes=((3, 4), (3, 4))),
    Spec("atan2_broadcast_inside", lambda x, y: lax.atan2(x, y), shapes=((3, 4), (1, 4)),
         domain=((-2, 2), (0.5, 2))),
    # --------------------------------------------------------------- hyperbolic
    Spec("sinh", lax.sinh),
    Spec("cosh", lax.cosh),
    Spec("asinh", lax.asinh, domain=(-3, 3)),
    Spec("acosh", lax.acosh, domain=(1.2, 3)),
    Spec("atanh", lax.atanh, domain=(-0.9, 0.9)),
    # -------------------------------------------------------- special functions
    Spec("erf", lax.erf),
    Spec("erfc", lax.erfc),
    Spec("erf_inv", lax.erf_inv, domain=(-0.9, 0.9)),
    Spec("lgamma", lax.lgamma, domain=(0.5, 4)),
    Spec("digamma", lax.digamma, domain=(0.5, 4)),
    Spec("polygamma", lambda x: lax.polygamma(jnp.full_like(x, 2), x), domain=(0.5, 4),
         tol={"float32": (1e-3, 1e-3)}),
    Spec("bessel_i0e", lax.bessel_i0e, domain=(-4, 4)),
    Spec("bessel_i1e", lax.bessel_i1e, domain=(-4, 4)),
    # ------------------------------------------------------------------- piecewise
    Spec("abs", lax.abs),
    Spec("max", lax.max, shapes=((3, 4), (3, 4))),
    Spec("min", lax.min, shapes=((3, 4), (3, 4))),
    Spec("max_ties", lax.max, make_args=_ties),
    Spec("min_ties", lax.min, make_args=_ties),
    Spec("max_self_tie", lambda x: lax.max(x, x)),
    Spec("max_broadcast_inside", lambda x, y: lax.max(x, y), shapes=((3, 4), (1, 4))),
    Spec("relu_literal", lambda x: jnp.maximum(x, 0.0) + jnp.minimum(x, 0.5)),
    Spec("clip", lambda x: jnp.clip(x, -0.5, 0.8)),
    Spec("clamp", lax.clamp, shapes=((3, 4), (3, 4), (3, 4)),
         domain=((-1.5, -0.5), (-2, 2), (0.5, 1.5))),
    Spec("clamp_scalar_literals", _clamp_scalar_literals),
    Spec("clamp_at_bounds", lax.clamp, make_args=_clamp_at_bounds),
    Spec("select_n_2_cases", lax.select_n, make_args=_select2),
    Spec("select_n_3_cases", lax.select_n, make_args=_select3),
    Spec("select_n_scalar_predicate", lax.select_n, make_args=_select_scalar_pred),
    Spec("select_n_1_case", lambda x: lax.select_n(jnp.zeros(x.shape, jnp.int32), x) * x),
    Spec("where", lambda x, y: jnp.where(x > y, x * y, jnp.sin(y)),
         shapes=((3, 4), (3, 4))),
    # --------------------------------------------------------------- no gradient
    Spec("compare_where", lambda x, y: jnp.where(x > y, x, y) * lax.stop_gradient(x),
         shapes=((3, 4), (3, 4)), order=1),
    Spec("comparisons", _comparisons, shapes=((3, 4), (3, 4))),
    Spec("bitwise_and_logical", _bitwise, make_args=_with_ints),
    Spec("piecewise_constant", _piecewise_constant),
    # jnp.copysign reads the sign bit with bitcast_convert_type (zero derivative).
    Spec("bitcast_sign_bit", lambda x, y: jnp.copysign(x, y) * y, shapes=((3, 4), (3, 4))),
    # ------------------------------------------------------------------ casts
    Spec("convert_f32_to_f64", lambda x: jnp.sin(x.astype(jnp.float64)) * x,
         dtypes=("float32",)),
    Spec("convert_f64_to_f32", lambda x: jnp.sin(x.astype(jnp.float32)),
         dtypes=("float64",), tol={"float64": (1e-5, 1e-5)}),
    Spec("convert_float_to_int", lambda x: x * (3 * x).astype(jnp.int32)),
    Spec("convert_int_to_float", lambda x, i, j: x * i.astype(x.dtype),
         make_args=_with_ints),
    Spec("convert_weak_type", _weak_cast),
    Spec("convert_complex_to_real",
         lambda z: _cast(z * _ROT_IN, jnp.finfo(z.dtype).dtype) ** 2,
         dtypes=COMPLEX, make_args=_complex_args([(3, 4)], (-2, 2), (-2, 2))),
    Spec("convert_real_to_complex",
         lambda x: jnp.sin(x.astype(jnp.result_type(x, jnp.complex64)) * _ROT_IN) * _ROT_OUT),
    # ---------------------------------------------------------------- complex
    Spec("complex", lambda x, y: lax.complex(x, y) ** 2 * _ROT_OUT,
         shapes=((3, 4), (3, 4))),
    Spec("complex_broadcast_inside", lambda x, y: lax.exp(lax.complex(x, y)) * _ROT_OUT,
         shapes=((3, 4), (1, 4))),
    Spec("conj_of_real", lambda x: lax.conj(x) * _ROT_OUT),
    _cspec("complex_add", lax.add, shapes=((3, 4), (3, 4))),
    _cspec("complex_add_broadcast", lax.add, shapes=((3, 4), (1, 4))),
    _cspec("complex_sub", lax.sub, shapes=((3, 4), (3, 4))),
    _cspec("complex_neg", lax.neg),
    _cspec("complex_mul", lax.mul, shapes=((3, 4), (3, 4))),
    _cspec("complex_div", lax.div, shapes=((3, 4), (1, 4)), re=(0.5, 2)),
    _cspec("complex_exp", lax.exp),
    _cspec("complex_log", lax.log, re=(0.3, 2)),
    _cspec("complex_sin", lax.sin),
    _cspec("complex_cos", lax.cos),
    _cspec("complex_tanh", lax.tanh, re=(-1, 1), im=(-1, 1)),
    _cspec("complex_sqrt", lax.sqrt, re=(0.3, 2)),
    _cspec("complex_rsqrt", lax.rsqrt, re=(0.3, 2)),
    _cspec("complex_square", lax.square),
    _cspec("complex_integer_pow", lambda z: lax.integer_pow(z, 3) + lax.integer_pow(z, -2),
           re=(0.5, 2)),
    _cspec("complex_pow", lax.pow, shapes=((3, 4), (3, 4)), re=(0.3, 2), im=(-1, 1)),
    _cspec("complex_conj", lambda z: lax.conj(z) * z),
    _cspec("complex_real", lambda z: lax.real(z) * lax.imag(z) + lax.real(z)),
    _cspec("complex_imag", lax.imag),
    _cspec("complex_abs", lambda z: lax.abs(z) + lax.abs(z * z)),
    _cspec("complex_expm1_log1p", lambda z: lax.expm1(z) + lax.log1p(z), re=(0, 1.5)),
    _cspec("complex_logistic", lax.logistic, re=(-1, 1), im=(-1, 1)),
    _cspec("complex_trig_inverse", lambda z: lax.asin(z) + lax.acos(z) + lax.atan(z),
           re=(-0.6, 0.6), im=(0.2, 0.8)),
    _cspec("complex_hyperbolic", lambda z: lax.sinh(z) + lax.cosh(z) + lax.tan(z),
           re=(-1, 1), im=(-0.7, 0.7)),
    _cspec("complex_hyperbolic_inverse",
           lambda z: lax.asinh(z) + lax.acosh(z) + lax.atanh(z),
           re=(1.2, 2), im=(0.2, 0.8)),
    _cspec("complex_exp2", lax.exp2),
    _cspec("complex_select_n", lambda z, w: lax.select_n(lax.real(z) > lax.real(w), z, w),
           shapes=((3, 4), (3, 4))),
]
