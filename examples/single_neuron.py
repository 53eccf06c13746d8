"""One neuron with a sigmoid and a squared error, by hand and with fbackprop.

    z = w*x + b,  a = sigmoid(z),  L = (a - y)^2       with w=0.5, b=0.1, x=1, y=0.8

Chain rule, one local derivative per node:

    dL/da = 2 (a - y)
    da/dz = sigmoid(z) (1 - sigmoid(z))
    dz/dw = x,  dz/db = 1
    dL/dw = dL/da * da/dz * x,   dL/db = dL/da * da/dz

Also the MSE and cross-entropy derivatives from the same notes:
d/dy_pred mean((y_pred - y)^2) = 2 (y_pred - y) / n, and for softmax + cross-entropy
the gradient with respect to the logits is softmax(z) - y.

Run: python examples/single_neuron.py [--quick]
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


def neuron_loss(w, b, x, y):
    a = jax.nn.sigmoid(w * x + b)
    return (a - y) ** 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    w, b, x, y = 0.5, 0.1, 1.0, 0.8
    # By hand (plain Python floats).
    z = w * x + b
    a = 1.0 / (1.0 + math.exp(-z))
    loss = (a - y) ** 2
    dL_da = 2.0 * (a - y)
    da_dz = a * (1.0 - a)
    dL_dw, dL_db = dL_da * da_dz * x, dL_da * da_dz
    print(f"forward: z = {z:.4f}, a = sigmoid(z) = {a:.6f}, L = {loss:.6f}")
    print(f"by hand: dL/da = {dL_da:.6f}, da/dz = {da_dz:.6f}, dL/dw = {dL_dw:.6f}, "
          f"dL/db = {dL_db:.6f}")

    # With fbackprop.
    L, (gw, gb) = fb.value_and_grad(neuron_loss, argnums=(0, 1))(w, b, x, y)
    print(f"fbackprop: L = {float(L):.6f}, dL/dw = {float(gw):.6f}, dL/db = {float(gb):.6f}")
    assert abs(float(L) - loss) < 1e-7
    assert abs(float(gw) - dL_dw) < 1e-7 and abs(float(gb) - dL_db) < 1e-7
    assert abs(dL_dw - (-0.070623)) < 1e-6      # the number to remember

    # One gradient-descent step lowers the loss.
    lr = 1.0
    L2 = neuron_loss(w - lr * float(gw), b - lr * float(gb), x, y)
    print(f"after one step with lr={lr}: L = {float(L2):.6f} (was {loss:.6f})")
    assert L2 < L

    # MSE derivative: 2 (y_pred - y) / n.
    y_pred, y_true = jnp.array([0.2, 0.9, 0.4]), jnp.array([0.0, 1.0, 1.0])
    g_mse = fb.grad(lambda p: jnp.mean((p - y_true) ** 2))(y_pred)
    print(f"MSE: d/dy_pred = {[round(float(v), 6) for v in g_mse]} "
          f"= 2 (y_pred - y) / n")
    np.testing.assert_allclose(g_mse, 2 * (y_pred - y_true) / 3, rtol=1e-6)

    # Softmax + cross-entropy: gradient w.r.t. logits is softmax - one_hot.
    logits, target = jnp.array([2.0, 1.0, 0.1]), jnp.array([0.0, 1.0, 0.0])
    g_ce = fb.grad(lambda z: -jnp.sum(target * jax.nn.log_softmax(z)))(logits)
    print(f"softmax+CE: d/dz = {[round(float(v), 6) for v in g_ce]} = softmax(z) - y")
    np.testing.assert_allclose(g_ce, jax.nn.softmax(logits) - target, atol=1e-6)


if __name__ == "__main__":
    main()
