"""Vanishing gradients: 10 sigmoid layers vs 10 ReLU layers, weights drawn with std 1.0.

Builds the same deep MLP twice, differentiates the loss with fbackprop, prints a
gradient health report per network (norm, mean, std, max |g|, exact zeros and
flags per layer) and plots the per-layer weight-gradient norms on a log scale.

With std-1.0 weights the sigmoid layers saturate: each layer multiplies the
gradient by sigmoid' <= 0.25 (much less when saturated), so the norm falls by
orders of magnitude from the last layer to the first. The ReLU network passes
the gradient through unchanged wherever a unit is active, so its norms stay
within a few orders of magnitude of each other (with std 1.0 they even grow
towards the first layers: that is the exploding side of the same problem).

Run: python examples/vanishing_gradients_plot.py [--out out/vanishing_gradients.png]
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb

DEPTH, WIDTH, BATCH = 10, 8, 64


def init(key, depth=DEPTH, width=WIDTH, std=1.0):
    """Weights ~ N(0, std^2) (like torch.nn.init.normal_(std=1.0)), zero biases."""
    params = []
    for k in jax.random.split(key, depth + 1):
        params.append({"w": std * jax.random.normal(k, (width, width), jnp.float32),
                       "b": jnp.zeros((width,), jnp.float32)})
    params[-1] = {"w": params[-1]["w"][:, :1], "b": params[-1]["b"][:1]}   # output layer
    return params


def loss_fn(params, x, y, activation):
    h = x
    for layer in params[:-1]:
        h = activation(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((out - y) ** 2)


def weight_grads(grads):
    """Only the hidden layers' weight gradients, named layer0 ... layer9."""
    return {f"layer{i}": layer["w"] for i, layer in enumerate(grads[:-1])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("out", "vanishing_gradients.png"),
                        help="where to save the plot (needs matplotlib; default: "
                             "out/vanishing_gradients.png)")
    args = parser.parse_args(argv)

    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (BATCH, WIDTH), jnp.float32)
    y = jax.random.normal(ky, (BATCH, 1), jnp.float32)
    params = init(kp)

    reports = {}
    for name, activation in (("sigmoid", jax.nn.sigmoid), ("relu", jax.nn.relu)):
        grads = jax.jit(fb.grad(loss_fn), static_argnums=3)(params, x, y, activation)
        report = fb.gradient_health(weight_grads(grads))
        reports[name] = report
        print(f"\n=== {DEPTH} {name} layers, init std 1.0 ===")
        print(report)

    sig, relu = (np.array([leaf.norm for leaf in reports[k].leaves])
                 for k in ("sigmoid", "relu"))
    print(f"\nfirst/last layer gradient norm: sigmoid {sig[0] / sig[-1]:.2e}, "
          f"relu {relu[0] / relu[-1]:.2e}")
    assert sig[0] / sig[-1] < 1e-2, "the sigmoid network should show vanishing gradients"
    assert any("vanishing" in leaf.flags for leaf in reports["sigmoid"].leaves)

    try:
        fb.plot_gradient_norms(reports, path=args.out,
                               title=f"{DEPTH}-layer MLP, weights N(0, 1): per-layer "
                                     f"weight-gradient norms")
        print(f"saved the plot to {args.out}")
    except ImportError as err:
        print(f"(no plot: {err})")


if __name__ == "__main__":
    main()
