"""How much gradient reaches the first layer: plain deep nets vs residual connections.

Idealized: 10 layers whose local derivative is 0.5 each.

* plain, y = f(x):         dL/dx = 0.5^10 = 0.0009765625   (multiplied away)
* residual, y = x + f(x):  dL/dx = (1 + 0.5)^10 = 57.665...  (the +1 from the skip path
  keeps every factor >= 1)

Then a real network: 20 tanh layers with small weights (each layer scales its
input by about 0.5), with and without skip connections: how much of the output's
gradient reaches the input (fbackprop gradients, checked against JAX's).

Run: python examples/residual_vs_plain.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb
from fbackprop import nn


def plain_chain(x, depth=10):
    for _ in range(depth):
        x = 0.5 * x
    return x


def residual_chain(x, depth=10):
    for _ in range(depth):
        x = x + 0.5 * x
    return x


def deep_net(params, x, residual):
    h = jnp.tanh(nn.dense(params[0], x))
    for layer in params[1:-1]:
        f = jnp.tanh(nn.dense(layer, h))
        h = h + f if residual else f
    return nn.dense(params[-1], h)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    g_plain = float(fb.grad(plain_chain)(1.0))
    g_res = float(fb.grad(residual_chain)(1.0))
    print(f"10 layers, local derivative 0.5: plain dL/dx = {g_plain} (= 0.5^10), "
          f"residual dL/dx = {g_res:.4f} (= 1.5^10)")
    assert g_plain == 0.5 ** 10
    assert abs(g_res - 1.5 ** 10) < 1e-4

    depth, width = 20, 32
    # Weights with std 0.5/sqrt(width): each plain layer shrinks the signal by about 0.5.
    params = nn.init_mlp(jax.random.key(0), [width] * depth + [1],
                         kernel_init=nn.initializers.normal(0.5 / np.sqrt(width)))
    x = jax.random.normal(jax.random.key(1), (64, width))
    y = jax.random.normal(jax.random.key(2), (64, 1))
    reaching = {}
    for residual in (False, True):
        loss = lambda p, x: jnp.mean((deep_net(p, x, residual) - y) ** 2)  # noqa: E731
        g_params, g_x = fb.grad(loss, argnums=(0, 1))(params, x)
        ref = jax.grad(loss, argnums=(0, 1))(params, x)
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree_util.tree_leaves((g_params, g_x)), jax.tree_util.tree_leaves(ref))) < 1e-5
        # Gradient at the network's input (what reaches layer 1) vs at its output.
        out = deep_net(params, x, residual)
        g_out = fb.grad(lambda o: jnp.mean((o - y) ** 2))(out)
        reaching[residual] = float(jnp.linalg.norm(g_x)) / float(jnp.linalg.norm(g_out))
        print(f"{'residual' if residual else 'plain   '} {depth}-layer tanh net: "
              f"|dL/dx| / |dL/d output| = {reaching[residual]:.2e}")
    print(f"the residual net passes {reaching[True] / reaching[False]:.1e}x more gradient "
          f"down to layer 1")
    assert reaching[False] < 1e-4         # plain: about 0.5^20 of it survives
    assert reaching[True] > 1e-1          # residual: the skip path carries it

if __name__ == "__main__":
    main()
