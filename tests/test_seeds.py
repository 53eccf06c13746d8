"""The backpropagation numbers our users check first, asserted directly (fbackprop = JAX)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fbackprop as fb
from fbackprop import nn


def both(f, *args, argnums=0):
    """(fbackprop gradient, jax gradient) as float64 numpy arrays."""
    ours = fb.grad(f, argnums=argnums)(*args)
    theirs = jax.grad(f, argnums=argnums)(*args)
    to_np = lambda t: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), t)  # noqa
    return to_np(ours), to_np(theirs)


def test_graph_64_32():
    def loss(x, y):
        z = x * y
        w = z + x
        return w ** 2

    value, (dx, dy) = fb.value_and_grad(loss, argnums=(0, 1))(2.0, 3.0)
    assert (float(value), float(dx), float(dy)) == (64.0, 64.0, 32.0)
    _, ref = both(loss, 2.0, 3.0, argnums=(0, 1))
    assert (float(ref[0]), float(ref[1])) == (64.0, 32.0)


@pytest.mark.parametrize("f,x,expected", [
    (lambda x: (3 * x + 1) ** 2, 2.0, 42.0),
    (lambda x: jnp.square(jax.nn.relu(3 * x + 1)), 2.0, 42.0),
    (lambda x: (2 * x + 3) ** 2, 1.0, 20.0),
    (lambda x: 3 * x ** 2, 2.0, 12.0),
], ids=["3x+1_squared", "3x+1_relu_squared", "2x+3_squared", "3x^2"])
def test_scalar_chain_rule(f, x, expected):
    ours, theirs = both(f, x)
    assert float(ours) == expected == float(theirs)


def test_three_input_product():
    x = jnp.array([2.0, -3.0, 0.5])
    ours, theirs = both(lambda x: (x[0] * x[1] + x[2]) ** 2, x)
    np.testing.assert_array_equal(ours, [33.0, -22.0, -11.0])
    np.testing.assert_array_equal(theirs, ours)


def test_second_derivative_of_sum_of_squares():
    x = jnp.array([0.3, -1.0, 4.0])
    first = fb.grad(lambda x: jnp.sum(x ** 2))
    second = fb.grad(lambda x: jnp.sum(first(x)))(x)
    np.testing.assert_array_equal(np.asarray(second), [2.0, 2.0, 2.0])


def test_gradient_has_the_shape_of_its_variable():
    W = jnp.ones((4, 3))
    X = jnp.ones((5, 3))
    assert fb.grad(lambda W: jnp.sum(X @ W.T))(W).shape == W.shape
    assert fb.grad(lambda w: jnp.dot(w, jnp.arange(3.0)))(jnp.ones(3)).shape == (3,)
    assert jnp.shape(fb.grad(lambda w: w * 3.0)(2.0)) == ()


def test_relu_mask_and_diagonal_jacobian():
    z1 = jnp.array([-3.0, 2.0, -1.0, 5.0])
    _, vjp_fn = fb.vjp(jax.nn.relu, z1)
    np.testing.assert_array_equal(np.asarray(vjp_fn(jnp.ones(4))[0]), [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(fb.jacrev(jax.nn.relu)(z1)),
                                  np.diag([0.0, 1.0, 0.0, 1.0]))


def test_single_neuron_sigmoid_mse():
    w, b, x, y = 0.5, 0.1, 1.0, 0.8
    a = 1 / (1 + math.exp(-(w * x + b)))
    expected = 2 * (a - y) * a * (1 - a)           # dL/dz; dz/dw = x = 1, dz/db = 1
    loss = lambda w, b: (jax.nn.sigmoid(w * x + b) - y) ** 2  # noqa: E731
    (gw, gb), _ = both(loss, w, b, argnums=(0, 1))
    assert abs(float(gw) - expected * x) < 1e-7 and abs(float(gb) - expected) < 1e-7
    assert abs(float(gw) - (-0.070623)) < 1e-6


def test_local_rules_linear_relu_softmax_ce():
    k = jax.random.split(jax.random.key(0), 4)
    x, w, b = (jax.random.normal(k[0], (4, 5)), jax.random.normal(k[1], (5, 3)),
               jax.random.normal(k[2], (3,)))
    dy = jax.random.normal(k[3], (4, 3))
    _, vjp_fn = fb.vjp(lambda x, w, b: x @ w + b, x, w, b)
    dx, dw, db = vjp_fn(dy)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, x.T @ dy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db, dy.sum(0), rtol=1e-5, atol=1e-6)
    _, relu_vjp = fb.vjp(jax.nn.relu, x)
    np.testing.assert_array_equal(np.asarray(relu_vjp(x)[0]), np.asarray(x * (x > 0)))
    t = jax.nn.one_hot(jnp.array([1, 0, 2, 2]), 3)
    g = fb.grad(lambda z: -jnp.sum(t * jax.nn.log_softmax(z)))(dy)
    np.testing.assert_allclose(g, jax.nn.softmax(dy) - t, atol=1e-6)


def test_residual_vs_plain_ten_layers():
    def plain(x):
        for _ in range(10):
            x = 0.5 * x
        return x

    def residual(x):
        for _ in range(10):
            x = x + 0.5 * x
        return x

    assert float(fb.grad(plain)(1.0)) == 0.5 ** 10
    assert abs(float(fb.grad(residual)(1.0)) - 1.5 ** 10) < 1e-4
    assert float(fb.grad(residual)(1.0)) >= 1.0


def test_retain_graph_twice_doubles_the_gradient():
    z, vjp_fn = fb.vjp(lambda x, y: x ** 2 + y ** 2, 2.0, 3.0)
    first, second = vjp_fn(jnp.ones_like(z)), vjp_fn(jnp.ones_like(z))
    accumulated = [float(a + b) for a, b in zip(first, second)]
    assert accumulated == [8.0, 12.0]


def _numerical_gradient(f, x, eps):
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = eps
        g.flat[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def test_numerical_gradient_check_and_pass_count():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 10))
    W = rng.standard_normal((10, 5))
    calls = []

    def f(W):
        calls.append(1)
        return jnp.sum((x @ W) ** 2)

    with jax.enable_x64(True):
        numeric = _numerical_gradient(lambda v: float(f(v)), W, 1e-5)
        assert len(calls) == 2 * W.size          # numerical: 2N forward passes
        calls.clear()
        fb.clear_cache()
        analytic = np.asarray(fb.grad(f)(W))
        assert len(calls) == 1                    # backprop: one forward pass, one backward
    assert np.max(np.abs(analytic - numeric)) < 1e-4


def test_two_layer_mlp_4_8_2_relative_error():
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(1), 3)
        params = nn.init_mlp(k[0], [4, 8, 2], dtype=jnp.float64)
        xs = jax.random.normal(k[1], (6, 4), jnp.float64)
        ys = jax.random.normal(k[2], (6, 2), jnp.float64)
        flat, unravel = ravel_pytree(params)
        loss = lambda v: jnp.mean((nn.mlp(unravel(v), xs, activation=jnp.tanh) - ys) ** 2)  # noqa
        analytic = np.asarray(fb.grad(loss)(flat))
        numeric = _numerical_gradient(lambda v: float(loss(jnp.asarray(v))),
                                      np.asarray(flat), 1e-5)
    rel = np.linalg.norm(analytic - numeric) / (np.linalg.norm(analytic) +
                                                np.linalg.norm(numeric))
    assert rel < 1e-5


def test_gradient_accumulation_equals_big_batch():
    params = nn.init_mlp(jax.random.key(0), [5, 8, 3])
    x = jax.random.normal(jax.random.key(1), (12, 5))
    y = jnp.arange(12) % 3
    loss = lambda p, x, y: nn.softmax_cross_entropy(nn.mlp(p, x), y)  # noqa: E731
    full = fb.grad(loss)(params, x, y)
    parts = [fb.grad(loss)(params, xb, yb) for xb, yb in zip(jnp.split(x, 3), jnp.split(y, 3))]
    summed = jax.tree_util.tree_map(lambda *g: sum(g) / 3, *parts)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(summed)):
        np.testing.assert_allclose(a, b, atol=1e-6)

