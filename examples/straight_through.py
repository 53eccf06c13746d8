"""Straight-through estimators and a binary-weight network trained on digits.

``round`` and ``sign`` have zero gradient almost everywhere, so nothing could be
learned through them. A straight-through estimator (STE) keeps the forward
function but pretends in the backward pass that it was the identity:

* ``ste_round``: forward ``round(x)``, backward passes the gradient unchanged;
  written with ``jax.custom_vjp`` and, equivalently, as
  ``x + stop_gradient(round(x) - x)``;
* ``binary_weight``: forward ``sign(w)`` (+1/-1), backward passes the gradient
  only where ``|w| <= 1`` (the clipped identity used for binary networks).

A 64-256-10 MLP whose weights are binarized in the forward pass is then trained
on scikit-learn's digits through the STE (real-valued "latent" weights get the
gradients; the network itself only ever uses +-1 weights).

Run: python examples/straight_through.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fbackprop as fb
from fbackprop import nn
from fbackprop.demo import load_digits


@jax.custom_vjp
def ste_round(x):
    return jnp.round(x)


ste_round.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


def ste_round_sg(x):
    """The same estimator without a custom rule: the rounding error is a constant."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


@jax.custom_vjp
def binary_weight(w):
    return jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)


def _binary_fwd(w):
    return binary_weight(w), w


def _binary_bwd(w, g):
    return (jnp.where(jnp.abs(w) <= 1.0, g, 0.0),)


binary_weight.defvjp(_binary_fwd, _binary_bwd)


def binary_mlp(params, x):
    """Dense layers with +-1 weights, scaled by 1/sqrt(fan_in) to keep activations O(1)."""
    h = x
    for i, layer in enumerate(params):
        w = binary_weight(layer["w"]) / jnp.sqrt(layer["w"].shape[0])
        h = h @ w + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter training")
    args = parser.parse_args(argv)

    x = jnp.array([0.2, 0.7, 1.4, -0.6])
    g_custom = fb.grad(lambda x: jnp.sum(ste_round(x) * jnp.arange(1.0, 5.0)))(x)
    g_sg = fb.grad(lambda x: jnp.sum(ste_round_sg(x) * jnp.arange(1.0, 5.0)))(x)
    g_plain = fb.grad(lambda x: jnp.sum(jnp.round(x) * jnp.arange(1.0, 5.0)))(x)
    print(f"round(x) = {jnp.round(x).tolist()}; gradient of sum(round(x) * [1,2,3,4]):")
    print(f"  plain round: {g_plain.tolist()}   STE (custom_vjp): {g_custom.tolist()}   "
          f"STE (stop_gradient): {g_sg.tolist()}")
    np.testing.assert_array_equal(np.asarray(g_custom), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(np.asarray(g_sg), [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(np.asarray(g_plain), [0.0, 0.0, 0.0, 0.0])

    w = jnp.array([-1.5, -0.3, 0.4, 2.0])
    gw = fb.grad(lambda w: jnp.sum(binary_weight(w)))(w)
    print(f"sign(w) for w = {[round(float(v), 2) for v in w]}: {binary_weight(w).tolist()}; "
          f"STE gradient "
          f"(zero where |w| > 1): {gw.tolist()}")
    np.testing.assert_array_equal(np.asarray(gw), [0.0, 1.0, 1.0, 0.0])

    # Train a binary-weight MLP on digits.
    (x_tr, y_tr), (x_te, y_te) = load_digits()
    params = nn.init_mlp(jax.random.key(0), [64, 256, 10],
                         kernel_init=nn.initializers.uniform(1.0))
    steps = 300 if args.quick else 1500
    opt = optax.adam(optax.cosine_decay_schedule(1e-2, steps))
    state = opt.init(params)
    loss_fn = lambda p, xb, yb: nn.softmax_cross_entropy(binary_mlp(p, xb), yb)  # noqa: E731

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = fb.value_and_grad(loss_fn)(p, xb, yb)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        # Keep latent weights in [-1, 1] so the STE keeps passing gradient.
        p = [{"w": jnp.clip(l["w"], -1.0, 1.0), "b": l["b"]} for l in p]
        return p, s, loss

    rng = np.random.default_rng(0)
    for i in range(steps):
        idx = rng.integers(0, len(x_tr), 128)
        params, state, loss = step(params, state, x_tr[idx], y_tr[idx])
    acc = float(nn.accuracy(binary_mlp(params, x_te), y_te))
    distinct = sorted({float(v) for l in params for v in np.unique(binary_weight(l["w"]))})
    print(f"binary-weight MLP 64-256-10 after {steps} steps: loss {float(loss):.3f}, "
          f"test accuracy {acc:.3f} (forward weights take only the values {distinct})")
    assert distinct == [-1.0, 1.0]
    assert acc > (0.85 if args.quick else 0.92), acc


if __name__ == "__main__":
    main()
