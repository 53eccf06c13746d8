"""Specs for reductions and cumulative ops.

Non-smooth points are tested on purpose: ties for max/min (JAX splits the
cotangent evenly among tied positions) and zeros for products (the gradient is
the product of the other entries, not out / x).
"""

from jax import lax
import jax.numpy as jnp

from .common import Spec


def _ties(*shape):
    """Small integers: many ties along every axis."""
    return lambda rng, dtype: (rng.integers(-2, 3, size=shape).astype(dtype),)


def _with_zeros(rng, dtype):
    # Rows with no zero, one zero and two zeros (reduced along axis 1), and a
    # column with a single zero (reduced along axis 0).
    x = rng.uniform(0.5, 1.5, size=(4, 5)).astype(dtype) * rng.choice([-1, 1], (4, 5))
    x[1, 2] = 0
    x[2, 0] = x[2, 3] = 0
    return (x,)


def _cumprod_zeros(rng, dtype):
    x = rng.uniform(0.5, 1.5, size=(3, 6)).astype(dtype)
    x[0, 2] = 0
    x[1, 0] = x[1, 4] = 0
    return (x,)


def _max_with_payload(xs, ys):
    """Generic variadic reduce: the max of x along axis 1 and the y found with it."""
    def pick(a, b):
        (a_x, a_y), (b_x, b_y) = a, b
        first = a_x >= b_x
        return lax.select(first, a_x, b_x), lax.select(first, a_y, b_y)
    init = (jnp.array(-jnp.inf, xs.dtype), jnp.array(0, ys.dtype))
    best_x, best_y = lax.reduce((xs, ys), init, pick, (1,))
    return best_x * best_y


def _product_with_extra_op(a, b):
    # Not recognized as a plain multiplication: lax.reduce binds the generic primitive.
    return a * b * jnp.ones((), a.dtype)


SPECS = [
    # ------------------------------------------------------------ reduce_sum
    Spec("reduce_sum_all", lambda x: jnp.sum(lax.sin(x))),
    Spec("reduce_sum_axis", lambda x: jnp.sum(x * x, axis=1)),
    Spec("reduce_sum_keepdims_3d", lambda x: jnp.sum(x * x, axis=(0, 2), keepdims=True),
         shapes=((2, 3, 4),)),
    Spec("reduce_mean_axis", lambda x: jnp.mean(x * x, axis=0)),
    # --------------------------------------------------- reduce_max / reduce_min
    Spec("reduce_max_all", lambda x: jnp.max(x * x)),
    Spec("reduce_max_axis", lambda x: jnp.max(x * x, axis=1)),
    Spec("reduce_max_keepdims_3d", lambda x: jnp.max(x * x, axis=(0, 2), keepdims=True),
         shapes=((2, 3, 4),)),
    Spec("reduce_min_axis0", lambda x: jnp.min(x * x, axis=0)),
    Spec("reduce_max_ties", lambda x: jnp.max(x, axis=1), make_args=_ties(3, 5)),
    Spec("reduce_max_ties_all", jnp.max, make_args=_ties(3, 4)),
    Spec("reduce_min_ties_keepdims", lambda x: jnp.min(x, axis=0, keepdims=True),
         make_args=_ties(4, 3)),
    Spec("reduce_logsumexp_max_shift", lambda x: jnp.max(x, axis=1) +
         jnp.log(jnp.sum(jnp.exp(x - jnp.max(x, axis=1, keepdims=True)), axis=1))),
    # ------------------------------------------------------------ reduce_prod
    Spec("reduce_prod_all", jnp.prod, domain=(0.5, 1.5)),
    Spec("reduce_prod_axis", lambda x: jnp.prod(x, axis=1)),
    Spec("reduce_prod_keepdims_3d", lambda x: jnp.prod(x, axis=(0, 2), keepdims=True),
         shapes=((2, 3, 4),)),
    Spec("reduce_prod_zeros_axis1", lambda x: jnp.prod(x, axis=1), make_args=_with_zeros),
    Spec("reduce_prod_zeros_axis0", lambda x: jnp.prod(x, axis=0), make_args=_with_zeros),
    Spec("reduce_prod_zeros_all", jnp.prod, make_args=_with_zeros),
    Spec("reduce_prod_single_element_axis", lambda x: jnp.prod(x, axis=0), shapes=((1, 4),)),
    # --------------------------------------------------- no-gradient reductions
    Spec("reduce_argmax_argmin", lambda x: x * (jnp.argmax(x, axis=1) -
                                         jnp.argmin(x, axis=1))[:, None].astype(x.dtype)),
    Spec("reduce_and_or", lambda x: jnp.where(jnp.all(x > -1, axis=1, keepdims=True) |
                                              jnp.any(x > 1.5, axis=0, keepdims=True), x, x * x)),
    Spec("reduce_xor", lambda x: jnp.where(lax.reduce_xor(x > 0, (1,))[:, None], x, -x)),
    # -------------------------------------------------- generic reduce (tree form)
    Spec("reduce_generic_logaddexp",
         lambda x: lax.reduce(x, jnp.array(-jnp.inf, x.dtype), jnp.logaddexp, (1,)),
         shapes=((3, 5),)),
    Spec("reduce_generic_product_3d",
         lambda x: lax.reduce(x, jnp.array(1, x.dtype), _product_with_extra_op, (0, 2)),
         shapes=((3, 2, 3),), domain=(0.5, 1.5)),
    Spec("reduce_generic_variadic", _max_with_payload, shapes=((3, 5), (3, 5))),
    # ---------------------------------------------------------------- cumsum
    Spec("cumsum_axis0", lambda x: lax.cumsum(x * x, axis=0)),
    Spec("cumsum_axis1_reverse", lambda x: lax.cumsum(x * x, axis=1, reverse=True)),
    Spec("cumsum_flat", lambda x: jnp.cumsum(lax.sin(x))),
    # ---------------------------------------------------------------- cumprod
    Spec("cumprod_axis1", lambda x: lax.cumprod(x, axis=1)),
    Spec("cumprod_axis0_reverse", lambda x: lax.cumprod(x, axis=0, reverse=True)),
    Spec("cumprod_zeros", lambda x: lax.cumprod(x, axis=1), make_args=_cumprod_zeros),
    Spec("cumprod_zeros_reverse", lambda x: lax.cumprod(x, axis=1, reverse=True),
         make_args=_cumprod_zeros),
    Spec("cumprod_jnp_flat", jnp.cumprod, domain=(0.5, 1.5)),
    # -------------------------------------------------------- cummax / cummin
    Spec("cummax_axis1", lambda x: lax.cummax(x, axis=1)),
    Spec("cummax_axis0_reverse", lambda x: lax.cummax(x, axis=0, reverse=True)),
    Spec("cummin_axis1", lambda x: lax.cummin(x, axis=1), shapes=((3, 5),)),
    Spec("cummin_axis0_reverse", lambda x: lax.cummin(x, axis=0, reverse=True)),
    Spec("cummax_ties", lambda x: lax.cummax(x, axis=1), make_args=_ties(3, 6)),
    Spec("cummin_ties_reverse", lambda x: lax.cummin(x, axis=0, reverse=True),
         make_args=_ties(5, 3)),
    # ------------------------------------------------------------ cumlogsumexp
    Spec("cumlogsumexp_axis1", lambda x: lax.cumlogsumexp(x, axis=1)),
    Spec("cumlogsumexp_axis0_reverse", lambda x: lax.cumlogsumexp(x, axis=0, reverse=True)),
    Spec("cumlogsumexp_wide_range", lambda x: lax.cumlogsumexp(x, axis=1),
         domain=(-60.0, 60.0), shapes=((2, 7),)),
]
