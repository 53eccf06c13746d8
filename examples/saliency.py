"""Saliency maps: the gradient of a class score with respect to the input pixels.

Trains a small MLP on scikit-learn's 8x8 digits, then for each test image takes
``|d logit[class] / d image|`` with ``fb.grad`` -- which pixels the score is most
sensitive to. ``jax.vmap(fb.grad(...))`` gives one map per image in a batch.

Checks: the maps equal ``jax.grad``'s; and blanking the 8 most salient pixels
lowers the class score more than blanking 8 random pixels (averaged over the
test set), i.e. the map points at pixels the model really uses.

Run: python examples/saliency.py [--quick] [--out out]
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fbackprop as fb
from fbackprop import nn
from fbackprop.demo import load_digits


def train_mlp(x, y, steps, seed=0):
    params = nn.init_mlp(jax.random.key(seed), [64, 128, 10])
    opt = optax.adam(3e-3)
    state = opt.init(params)
    loss = lambda p, xb, yb: nn.softmax_cross_entropy(nn.mlp(p, xb), yb)  # noqa: E731

    @jax.jit
    def step(p, s, xb, yb):
        g = fb.grad(loss)(p, xb, yb)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 128)
        params, state = step(params, state, x[idx], y[idx])
    return params


def class_score(image, params, label):
    """The logit of ``label`` for one flattened image."""
    return nn.mlp(params, image)[label]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter training, no figure")
    parser.add_argument("--out", default="out", help="directory for the saliency figure")
    args = parser.parse_args(argv)

    (x_tr, y_tr), (x_te, y_te) = load_digits()
    params = train_mlp(x_tr, y_tr, steps=150 if args.quick else 600)
    acc = float(nn.accuracy(nn.mlp(params, x_te), y_te))
    print(f"MLP test accuracy: {acc:.3f}")

    per_image = jax.jit(jax.vmap(fb.grad(class_score), in_axes=(0, None, 0)))
    grads = per_image(jnp.asarray(x_te), params, jnp.asarray(y_te))
    reference = jax.vmap(jax.grad(class_score), in_axes=(0, None, 0))(x_te, params, y_te)
    diff = float(jnp.max(jnp.abs(grads - reference)))
    saliency = jnp.abs(grads)
    print(f"saliency maps: {saliency.shape[0]} images of {int(np.sqrt(saliency.shape[1]))}x"
          f"{int(np.sqrt(saliency.shape[1]))}; max |fb - jax| = {diff:.2e}")
    assert diff < 1e-5

    # Blank (set to the training mean, i.e. 0 after standardization) k pixels.
    k = 8
    top = jnp.argsort(-saliency, axis=1)[:, :k]
    rand = jnp.asarray(np.random.default_rng(1).permuted(
        np.tile(np.arange(64), (len(x_te), 1)), axis=1)[:, :k])
    score = jax.vmap(class_score, in_axes=(0, None, 0))
    base = score(x_te, params, y_te)

    def blank(idx):
        rows = jnp.arange(len(x_te))[:, None]
        return jnp.asarray(x_te).at[rows, idx].set(0.0)

    drop_top = float(jnp.mean(base - score(blank(top), params, y_te)))
    drop_rand = float(jnp.mean(base - score(blank(rand), params, y_te)))
    print(f"mean class-score drop after blanking {k} pixels: most salient {drop_top:.3f}, "
          f"random {drop_rand:.3f}")
    assert drop_top > drop_rand

    if not args.quick:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib not installed: no figure)")
            return
        fig, axes = plt.subplots(2, 6, figsize=(9, 3.4))
        for j in range(6):
            axes[0, j].imshow(np.asarray(x_te[j]).reshape(8, 8), cmap="gray")
            axes[0, j].set_title(f"label {int(y_te[j])}", fontsize=9)
            axes[1, j].imshow(np.asarray(saliency[j]).reshape(8, 8), cmap="hot")
            for ax in axes[:, j]:
                ax.axis("off")
        fig.suptitle("digits (top) and |d score / d pixel| (bottom)")
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "saliency.png")
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
