"""Regression tests for rule bugs found by differentiating realistic functions.

Each bug also has a row in ``tests/specs/<family>.py``; these tests exercise the
fixed rules the way users reach them (through jax.numpy, jax.scipy and lax
wrappers), in both modes and at second order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.special as jss
import numpy as np
import pytest
from jax import lax

import fbackprop as fb


def _close(ours, theirs, tol=1e-10):
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert np.shape(a) == np.shape(b) and a.dtype == b.dtype, (a.shape, b.shape)
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   atol=tol, rtol=tol)


def _all_modes(f, x, t):
    """(value_and_grad, jvp, hessian) of a scalar ``f``, with fbackprop or JAX, jitted."""
    def program(vg, jvp, hessian):
        return jax.jit(lambda x: (vg(f)(x), jvp(f, (x,), (t,)), hessian(f)(x)))
    return (program(fb.value_and_grad, fb.jvp, fb.hessian)(x),
            program(jax.value_and_grad, jax.jvp, jax.hessian)(x))


X = np.array([[0.3, -1.2, 0.8, 1.9], [-0.4, 0.1, -2.0, 0.6], [1.1, 1.1, -0.7, 0.2]])
T = np.cos(np.arange(12.0)).reshape(3, 4)


# ---------------------------------------------------- bitcast_convert_type
# jnp.copysign and jax.scipy.special.gamma read a float's sign bit through
# bitcast_convert_type; forward mode had no rule for it (JAX: zero derivative).
@pytest.mark.parametrize("f", [
    lambda x: jnp.sum(jnp.sin(jnp.copysign(x, x[::-1]))),
    lambda x: jnp.sum(jss.gamma(jnp.abs(x) + 0.5)),
], ids=["copysign", "gamma"])
def test_sign_bit_readers_in_every_mode(f):
    ours, theirs = _all_modes(f, X, T)
    _close(ours, theirs, tol=1e-9)


# ------------------------------------------------------ bfloat16 max pooling
# The pooling rules rejected bfloat16 (numpy does not count it as floating).
def test_bfloat16_max_pool_gradient():
    x = jnp.asarray(X, jnp.bfloat16)

    def f(x):
        pooled = lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 1), "VALID")
        return jnp.sum(pooled * jnp.arange(3, dtype=x.dtype)).astype(jnp.float32)
    ours = jax.jit(lambda x: (fb.grad(f)(x), fb.jvp(f, (x,), (x,))[1]))(x)
    theirs = jax.jit(lambda x: (jax.grad(f)(x), jax.jvp(f, (x,), (x,))[1]))(x)
    _close(ours, theirs, tol=1e-2)


# -------------------------------------------------------------- approx_top_k
@pytest.mark.parametrize("f", [
    lambda x: jnp.sum(jnp.sin(lax.approx_max_k(x, 2)[0]) * jnp.arange(2.0)),
    lambda x: jnp.sum(lax.approx_min_k(x, 2, reduction_dimension=0)[0] ** 3),
], ids=["approx_max_k", "approx_min_k_axis0"])
def test_approx_top_k(f):
    ours, theirs = _all_modes(f, X, T)
    _close(ours, theirs)


# ------------------------------------------------------------- generic reduce
def _product_with_extra_op(a, b):
    return a * b * jnp.ones((), a.dtype)


@pytest.mark.parametrize("f", [
    lambda x: jnp.sum(jnp.sin(lax.reduce(x, -jnp.inf, jnp.logaddexp, (1,)))),
    lambda x: lax.reduce(x, 1.0, _product_with_extra_op, (0, 1)),
], ids=["logaddexp_rows", "product_all"])
def test_generic_reduce(f):
    ours, theirs = _all_modes(f, X, T)
    _close(ours, theirs)


def test_generic_reduce_with_an_integer_payload():
    """A hand-written argmax (value and index reduced together, as in JAX's own
    argmax lowering): without ties the value's gradient is the max's. JAX itself fails
    here (its tree form reshapes a symbolic-zero tangent), so the reference is jnp.max."""
    x = X + np.arange(12.0).reshape(3, 4) * 1e-3  # no ties
    def max_and_argmax(x):
        index = lax.broadcasted_iota(jnp.int32, x.shape, 1)

        def pick(a, b):
            first = a[0] >= b[0]
            return lax.select(first, a[0], b[0]), lax.select(first, a[1], b[1])
        return lax.reduce((x, index), (-jnp.inf, np.int32(0)), pick, (1,))

    f = lambda x: jnp.sum(jnp.sin(max_and_argmax(x)[0]))  # noqa: E731
    reference = lambda x: jnp.sum(jnp.sin(jnp.max(x, axis=1)))  # noqa: E731
    ours = jax.jit(lambda x: (fb.grad(f)(x), fb.jvp(f, (x,), (T,)), fb.hessian(f)(x)))(x)
    theirs = jax.jit(lambda x: (jax.grad(reference)(x), jax.jvp(reference, (x,), (T,)),
                                jax.hessian(reference)(x)))(x)
    _close(ours, theirs)
    np.testing.assert_array_equal(max_and_argmax(x)[1], jnp.argmax(x, axis=1))


def test_generic_reduce_over_an_empty_axis_and_a_differentiated_init():
    empty = lambda x: jnp.sum(lax.reduce(x[:, :0], 1.0, _product_with_extra_op, (1,)))  # noqa
    np.testing.assert_array_equal(fb.grad(empty)(X), np.zeros_like(X))
    with pytest.raises(NotImplementedError, match="init values"):
        fb.grad(lambda init: jnp.sum(lax.reduce(X, init, _product_with_extra_op, (1,))))(1.0)
