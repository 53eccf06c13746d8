"""Detaching values: an exponential moving average (EMA) of weights and a stop-gradient target.

``jax.lax.stop_gradient`` is the functional ``detach``: the value passes
through, the gradient does not. Two everyday uses:

1. An EMA of the parameters, ``ema <- 0.99 ema + 0.01 params``, is bookkeeping,
   not part of the loss: it is updated outside the differentiated function (the
   functional ``torch.no_grad()``).
2. A self-distillation loss compares the student with a *fixed* target produced
   by the EMA ("teacher") weights: ``|| f(x; params) - stop_gradient(f(x; ema)) ||^2``.
   The gradient then reaches only the student, and equals the gradient of the
   same loss with the target passed in as a constant.

Run: python examples/ema_stop_gradient.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp

import fbackprop as fb
from fbackprop import nn


def distill_loss(params, ema, x):
    student = nn.mlp(params, x)
    teacher = jax.lax.stop_gradient(nn.mlp(ema, x))
    return jnp.mean((student - teacher) ** 2) + 1e-3 * jnp.mean(student ** 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args(argv)

    params = nn.init_mlp(jax.random.key(0), [8, 32, 4])
    noise = nn.init_mlp(jax.random.key(2), [8, 32, 4])
    ema = jax.tree_util.tree_map(lambda p, n: p + 0.3 * n, params, noise)   # a different teacher
    x = jax.random.normal(jax.random.key(1), (16, 8))

    g_params, g_ema = fb.grad(distill_loss, argnums=(0, 1))(params, ema, x)
    ema_norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_ema))
    print(f"gradient w.r.t. the EMA (teacher) weights: total |g| = {ema_norm}")
    assert ema_norm == 0.0

    # The same as treating the teacher's output as a constant input.
    target = nn.mlp(ema, x)
    g_const = fb.grad(lambda p: jnp.mean((nn.mlp(p, x) - target) ** 2)
                      + 1e-3 * jnp.mean(nn.mlp(p, x) ** 2))(params)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree_util.tree_leaves(g_params), jax.tree_util.tree_leaves(g_const)))
    print(f"student gradient vs constant-target gradient: max diff {diff:.1e}")
    assert diff < 1e-5

    # Training loop: SGD on the student, EMA update outside the gradient.
    decay, lr = 0.9, 0.05
    step_fn = jax.jit(fb.value_and_grad(distill_loss))
    first = None
    for step in range(50 if args.quick else 300):
        loss, g = step_fn(params, ema, x)
        first = float(loss) if first is None else first
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, g)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ema)))
    print(f"distillation loss {first:.4f} -> {float(loss):.5f}; max |params - ema| = {gap:.4f}")
    assert float(loss) < 0.5 * first


if __name__ == "__main__":
    main()
