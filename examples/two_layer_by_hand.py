"""A two-layer network's backward pass written by hand, checked against fbackprop.

The network learns y = x1 + x2 (2 -> 64 -> 1, ReLU, MSE) with plain gradient
descent. Every step computes the gradients twice: once with the hand-written
backward pass (NumPy, the chain rule layer by layer, reusing the activations
saved on the way forward) and once with ``fb.grad``. They must agree at every
step, and the loss must fall.

    forward:  z1 = x W1 + b1,  a1 = relu(z1),  out = a1 W2 + b2,  L = mean((out - y)^2)
    backward: dout = 2 (out - y) / n
              dW2 = a1^T dout,  db2 = sum(dout),  da1 = dout W2^T
              dz1 = da1 * (z1 > 0)                    (ReLU passes gradient where z1 > 0)
              dW1 = x^T dz1,    db1 = sum(dz1)

A second check uses another small 2-layer MLP (B=5, 3 -> 4 -> 1, loss 0.5*mean)
and compares hand-derived gradients with fbackprop's.

Run: python examples/two_layer_by_hand.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


def forward(params, x):
    z1 = x @ params["W1"] + params["b1"]
    a1 = np.maximum(0.0, z1)
    out = a1 @ params["W2"] + params["b2"]
    return out, (x, z1, a1)


def backward_by_hand(params, cache, dout):
    x, z1, a1 = cache
    grads = {"W2": a1.T @ dout, "b2": dout.sum(0)}
    da1 = dout @ params["W2"].T
    dz1 = da1 * (z1 > 0)
    grads["W1"] = x.T @ dz1
    grads["b1"] = dz1.sum(0)
    return grads


def loss_fn(params, x, y):
    """The same network in jax.numpy, for fbackprop."""
    a1 = jax.nn.relu(x @ params["W1"] + params["b1"])
    out = a1 @ params["W2"] + params["b2"]
    return jnp.mean((out - y) ** 2)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    args = parser.parse_args(argv)
    epochs = 200 if args.quick else 1000

    rng = np.random.default_rng(42)
    params = {"W1": rng.standard_normal((2, 64)) * 0.5, "b1": np.zeros(64),
              "W2": rng.standard_normal((64, 1)) * 0.1, "b2": np.zeros(1)}
    params = {k: v.astype(np.float64) for k, v in params.items()}
    X = rng.standard_normal((100, 2))
    y = X[:, 0:1] + X[:, 1:2]

    grad_fn = jax.jit(fb.grad(loss_fn))
    worst = 0.0
    for epoch in range(epochs):
        out, cache = forward(params, X)
        loss = np.mean((out - y) ** 2)
        dout = 2.0 * (out - y) / len(y)                  # d mean((out-y)^2) / d out
        by_hand = backward_by_hand(params, cache, dout)
        by_fb = grad_fn(params, X, y)
        worst = max(worst, max_diff(by_hand, by_fb))
        if epoch == 0:
            first_loss = loss
        if epoch % (epochs // 5) == 0:
            print(f"epoch {epoch:4d}: loss = {loss:.6f}   max |hand - fb| = "
                  f"{max_diff(by_hand, by_fb):.2e}")
        params = {k: params[k] - 0.1 * by_hand[k] for k in params}
    print(f"final loss {loss:.6f} (from {first_loss:.4f}); largest gradient difference over "
          f"all {epochs} steps: {worst:.2e}")
    assert worst < 1e-10, worst
    assert loss < 0.01 * first_loss

    # The second hand derivation: loss = 0.5 * mean((y_hat - y)^2), x: (5, 3).
    k = jax.random.split(jax.random.key(0), 6)
    x, t = jax.random.normal(k[0], (5, 3)), jax.random.normal(k[1], (5, 1))
    p = {"W1": jax.random.normal(k[2], (4, 3)), "b1": jax.random.normal(k[3], (4,)),
         "W2": jax.random.normal(k[4], (1, 4)), "b2": jax.random.normal(k[5], (1,))}

    def loss2(p):
        h = jax.nn.relu(x @ p["W1"].T + p["b1"])
        return 0.5 * jnp.mean((h @ p["W2"].T + p["b2"] - t) ** 2)

    z = x @ p["W1"].T + p["b1"]
    h = jnp.maximum(z, 0)
    err = (h @ p["W2"].T + p["b2"] - t) / t.size           # dL/dy_hat
    dz = (err @ p["W2"]) * (z > 0)
    hand = {"W2": err.T @ h, "b2": err.sum(0), "W1": dz.T @ x, "b1": dz.sum(0)}
    ours = fb.grad(loss2)(p)
    d2 = max_diff(hand, ours)
    for name in ("W1", "b1", "W2", "b2"):
        print(f"{name}: |grad| = {float(jnp.linalg.norm(ours[name])):.6f}")
    print(f"hand-derived vs fbackprop (2-layer MLP, batch 5): max difference {d2:.2e}")
    assert d2 < 1e-5, d2


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    main()
