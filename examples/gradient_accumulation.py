"""Gradient accumulation: micro-batch gradients add up to the big-batch gradient.

For a loss that is a mean over examples, splitting a batch of 64 into 4
micro-batches of 16 and averaging their gradients gives exactly the batch-64
gradient, while only one micro-batch's activations are alive at a time. Three
ways, all compared with the full-batch ``fb.grad``:

1. a Python loop summing ``fb.grad`` of ``loss / accum_steps`` per micro-batch
   (the functional form of calling ``backward()`` several times before a step);
2. ``fbackprop.train.accumulated_value_and_grad`` (a ``lax.scan`` over micro-batches);
3. ``optax.MultiSteps`` accumulating across optimizer calls: 4 micro-batch updates
   produce the same parameters as 1 full-batch update.

And the pitfall from the other side: forgetting to reset the accumulator (the
missing ``zero_grad``) adds the previous step's gradient again.

Run: python examples/gradient_accumulation.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import fbackprop as fb
from fbackprop import nn, train


def loss_fn(params, batch):
    x, y = batch
    return nn.softmax_cross_entropy(nn.mlp(params, x), y)


def tree_max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v)))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    params = nn.init_mlp(jax.random.key(0), [20, 64, 5])
    x = jax.random.normal(jax.random.key(1), (64, 20))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 5)
    accum = 4

    full = fb.grad(loss_fn)(params, (x, y))

    # 1. Loop over micro-batches, adding gradients of loss / accum.
    acc = jax.tree_util.tree_map(jnp.zeros_like, params)
    grad_fn = jax.jit(fb.grad(lambda p, b: loss_fn(p, b) / accum))
    for xb, yb in zip(jnp.split(x, accum), jnp.split(y, accum)):
        acc = jax.tree_util.tree_map(jnp.add, acc, grad_fn(params, (xb, yb)))
    d1 = tree_max_diff(acc, full)
    print(f"1. sum of {accum} micro-batch gradients (loss/{accum}) vs batch-64 gradient: "
          f"max diff {d1:.1e}")

    # 2. The library helper (lax.scan over micro-batches).
    loss2, g2 = jax.jit(train.accumulated_value_and_grad(loss_fn, accum))(params, (x, y))
    d2 = tree_max_diff(g2, full)
    print(f"2. accumulated_value_and_grad: loss {float(loss2):.6f} "
          f"(full batch {float(loss_fn(params, (x, y))):.6f}), max gradient diff {d2:.1e}")

    # 3. optax.MultiSteps: 4 calls with micro-batches == 1 call with the full batch.
    sgd = optax.sgd(0.1)
    multi = optax.MultiSteps(sgd, every_k_schedule=accum)
    state = multi.init(params)
    p_multi = params
    for xb, yb in zip(jnp.split(x, accum), jnp.split(y, accum)):
        g = fb.grad(loss_fn)(p_multi, (xb, yb))
        updates, state = multi.update(g, state, p_multi)
        p_multi = optax.apply_updates(p_multi, updates)
    p_full = optax.apply_updates(params, sgd.update(full, sgd.init(params))[0])
    d3 = tree_max_diff(p_multi, p_full)
    print(f"3. optax.MultiSteps over {accum} micro-batches vs one full-batch SGD step: "
          f"max parameter diff {d3:.1e}")
    assert max(d1, d2, d3) < 1e-6

    # Pitfall: not resetting the accumulator between steps doubles the gradient.
    stale = jax.tree_util.tree_map(jnp.add, acc, full)
    ratio = float(jnp.linalg.norm(stale[0]["w"]) / jnp.linalg.norm(full[0]["w"]))
    print(f"without resetting the accumulator the next step uses {ratio:.2f}x the gradient")
    assert abs(ratio - 2.0) < 1e-5


if __name__ == "__main__":
    main()
