"""Gradient penalty (double backward), second derivatives and Hessian-vector products.

A gradient penalty puts an *input gradient* inside the loss:

    penalty(theta) = mean_i (|| d critic(x_i; theta) / d x_i ||_2 - 1)^2

so training needs the gradient of a gradient. With fbackprop that is just
``fb.grad`` of a function that calls ``fb.grad`` (no ``create_graph`` flag: the
inner backward sweep is ordinary traced code). Checked against JAX.

Also shown: the second derivative of sum(x^2) is 2; a Hessian-vector product
(Pearlmutter's trick, ``fb.hvp``) equals the explicit Hessian times v; and the
forward-mode JVP and reverse-mode VJP agree through <u, J v> = <J^T u, v>.

Run: python examples/gradient_penalty.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb
from fbackprop import nn


def critic(params, x):
    """A scalar score per example: MLP with tanh (smooth, so second derivatives exist)."""
    return nn.mlp(params, x, activation=jnp.tanh)[..., 0]


def penalty(params, x, grad=fb.grad):
    """Mean (||d critic / d x||_2 - 1)^2 over the batch; ``grad`` is fb.grad or jax.grad."""
    input_grads = jax.vmap(grad(lambda xi: critic(params, xi)))(x)    # (batch, features)
    norms = jnp.sqrt(jnp.sum(input_grads ** 2, axis=-1) + 1e-12)
    return jnp.mean((norms - 1.0) ** 2)


def tree_max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v)))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    params = nn.init_mlp(jax.random.key(0), [6, 32, 32, 1])
    x = jax.random.normal(jax.random.key(1), (16, 6))

    value, g_ours = jax.jit(fb.value_and_grad(penalty))(params, x)
    g_jax = jax.jit(jax.grad(lambda p, x: penalty(p, x, grad=jax.grad)))(params, x)
    d = tree_max_diff(g_ours, g_jax)
    print(f"gradient penalty = {float(value):.6f}; d penalty / d params (double backward): "
          f"max |fb - jax| = {d:.2e}")
    assert d < 1e-5

    # d/dx sum(x^2) = 2x; differentiating again gives 2 per element.
    x3 = jnp.array([0.3, -1.2, 2.0])
    g = lambda x: fb.grad(lambda x: jnp.sum(x ** 2))(x)  # noqa: E731
    h = fb.grad(lambda x: jnp.sum(g(x)))(x3)
    print(f"second derivative of sum(x^2): {[float(v) for v in h]}")
    np.testing.assert_array_equal(np.asarray(h), [2.0, 2.0, 2.0])

    # Hessian-vector product without forming the Hessian.
    f = lambda w: jnp.sum(jnp.tanh(w) ** 2) + jnp.prod(w)  # noqa: E731
    w = jnp.array([0.5, -0.3, 0.8, 1.1])
    v = jnp.array([1.0, 2.0, -1.0, 0.5])
    hv = fb.hvp(f, (w,), (v,))[0]
    explicit = jax.hessian(f)(w) @ v
    print(f"Hessian-vector product: fb.hvp = {[round(float(a), 5) for a in hv]}, "
          f"H @ v = {[round(float(a), 5) for a in explicit]}")
    np.testing.assert_allclose(hv, explicit, rtol=1e-5, atol=1e-6)

    # Forward and reverse mode agree: <u, J v> == <J^T u, v>.
    fn = lambda w: jnp.stack([jnp.sin(w).sum(), (w ** 3).sum(), jnp.prod(w)])  # noqa: E731
    _, jv = fb.jvp(fn, (w,), (v,))
    u = jnp.array([1.0, -0.5, 2.0])
    _, vjp_fn = fb.vjp(fn, w)
    (jtu,) = vjp_fn(u)
    lhs, rhs = float(jnp.dot(u, jv)), float(jnp.dot(jtu, v))
    print(f"<u, J v> = {lhs:.6f}, <J^T u, v> = {rhs:.6f}")
    assert abs(lhs - rhs) < 1e-5


if __name__ == "__main__":
    main()
