"""The local backward rules of Linear, ReLU and Softmax+Cross-Entropy, checked with fbackprop.

Each layer only needs its own local rule; backprop chains them. Written out:

    Linear   Y = X W + b:   dX = dY W^T,   dW = X^T dY,   db = sum_rows(dY)
    ReLU     Y = max(0, X): dX = dY * (X > 0)
    Softmax + cross-entropy, L = -sum(t * log softmax(z)):   dL/dz = softmax(z) - t

``fb.vjp`` gives the same: it returns the layer's output and a function that
maps an upstream gradient dY to the downstream gradients. Then the three rules
are chained by hand into a full backward pass and compared with ``fb.grad``.

Run: python examples/local_rules.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


def linear(x, w, b):
    return x @ w + b


def softmax_ce(z, t):
    return -jnp.sum(t * jax.nn.log_softmax(z, axis=-1))


def close(a, b, tol=1e-5):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) < tol


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (4, 5))
    w = jax.random.normal(k[1], (5, 3))
    b = jax.random.normal(k[2], (3,))
    dy = jax.random.normal(k[3], (4, 3))

    # Linear
    _, linear_vjp = fb.vjp(linear, x, w, b)
    dx, dw, db = linear_vjp(dy)
    checks = {"Linear dX = dY W^T": close(dx, dy @ w.T),
              "Linear dW = X^T dY": close(dw, x.T @ dy),
              "Linear db = sum(dY)": close(db, dy.sum(0))}

    # ReLU
    z = jax.random.normal(k[4], (4, 3))
    _, relu_vjp = fb.vjp(jax.nn.relu, z)
    (dz,) = relu_vjp(dy)
    checks["ReLU dX = dY * (X > 0)"] = close(dz, dy * (z > 0))

    # Softmax + CE
    t = jax.nn.one_hot(jnp.array([0, 2, 1, 2]), 3)
    dlogits = fb.grad(softmax_ce)(z, t)
    checks["Softmax+CE dz = softmax(z) - t"] = close(dlogits, jax.nn.softmax(z) - t)

    # Chain them: X -> Linear -> ReLU -> Linear -> softmax CE.
    w2 = jax.random.normal(k[5], (3, 3))

    def net(params, x, t):
        h = jax.nn.relu(linear(x, params["w"], params["b"]))
        return softmax_ce(h @ params["w2"], t)

    z1 = linear(x, w, b)
    h = jnp.maximum(z1, 0)
    logits = h @ w2
    d_logits = jax.nn.softmax(logits) - t          # softmax + CE rule
    d_w2, d_h = h.T @ d_logits, d_logits @ w2.T     # linear rule (no bias)
    d_z1 = d_h * (z1 > 0)                           # ReLU rule
    d_w, d_b = x.T @ d_z1, d_z1.sum(0)              # linear rule
    g = fb.grad(net)({"w": w, "b": b, "w2": w2}, x, t)
    checks["chained rules == fb.grad (w, b, w2)"] = (
        close(g["w"], d_w) and close(g["b"], d_b) and close(g["w2"], d_w2))

    for name, ok in checks.items():
        print(f"{'ok ' if ok else 'BAD'} {name}")
    assert all(checks.values())


if __name__ == "__main__":
    main()
