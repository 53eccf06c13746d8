"""Numerical differentiation vs backprop: the cost (count the forward passes) and a gradient check.

Central differences need two forward passes per parameter: 2N passes for N
parameters. Backprop needs one forward pass (storing what backward needs) and
one backward pass, whatever N is -- about 2-3x the cost of one forward pass.

This script counts the passes, reads the compiled cost (FLOPs) of the forward
pass and of the gradient from XLA, and uses the numerical gradient the way it
is meant to be used: to check backprop on small problems (max difference < 1e-4;
relative error < 1e-5 for a 4-8-2 MLP in float64).

Run: python examples/numerical_vs_backprop.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import fbackprop as fb
from fbackprop import nn

CALLS = {"n": 0}


def counted(f):
    """Counts how many times the Python function runs (one run = one forward pass)."""
    def wrapper(*args):
        CALLS["n"] += 1
        return f(*args)
    return wrapper


def numerical_gradient(f, w, eps=1e-5):
    grad = np.zeros_like(w)
    for i in range(w.size):
        plus, minus = w.copy(), w.copy()
        plus.flat[i] += eps
        minus.flat[i] -= eps
        grad.flat[i] = (f(plus) - f(minus)) / (2 * eps)
    return grad


def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 10))
    W = rng.standard_normal((10, 5))
    f = counted(lambda W: float(np.sum((x @ W) ** 2)))
    f_jax = counted(lambda W: jnp.sum((x @ W) ** 2))

    CALLS["n"] = 0
    num = numerical_gradient(f, W)
    n_numeric = CALLS["n"]
    CALLS["n"] = 0
    fb.clear_cache()
    _, ours = fb.value_and_grad(f_jax)(W)
    n_backprop = CALLS["n"]
    diff = float(np.max(np.abs(np.asarray(ours) - num)))
    print(f"N = {W.size} parameters: numerical gradient ran the function {n_numeric} times "
          f"(2N); fb.value_and_grad ran it {n_backprop} time (one forward pass, then one "
          f"backward sweep)")
    print(f"max |backprop - numerical| = {diff:.2e} (check passes: {diff < 1e-4})")
    assert n_numeric == 2 * W.size and n_backprop == 1
    assert diff < 1e-4

    # Compiled cost: gradient vs forward, from XLA's cost analysis.
    params = nn.init_mlp(jax.random.key(0), [256, 512, 512, 10])
    xb = jnp.ones((128, 256))
    yb = jnp.zeros((128,), jnp.int32)
    loss = lambda p: nn.softmax_cross_entropy(nn.mlp(p, xb), yb)  # noqa: E731
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    fwd, bwd = flops(loss, params), flops(fb.value_and_grad(loss), params)
    print(f"MLP with {n_params:,} parameters: forward {fwd / 1e6:.1f} MFLOP, forward+backward "
          f"{bwd / 1e6:.1f} MFLOP ({bwd / fwd:.2f}x); numerical differentiation would need "
          f"{2 * n_params:,} forward passes ({2 * n_params * fwd / 1e12:.1f} TFLOP)")
    assert 1.5 < bwd / fwd < 4.0

    for n in (1_000_000, 7_000_000_000):
        print(f"N = {n:,}: numerical {2 * n:,} forward passes; backprop 1 forward + 1 backward")

    # Gradient check of a 4-8-2 MLP in float64: relative error < 1e-5.
    k = jax.random.split(jax.random.key(1), 3)
    mlp_params = nn.init_mlp(k[0], [4, 8, 2], dtype=jnp.float64)
    xs = jax.random.normal(k[1], (6, 4), jnp.float64)
    ys = jax.random.normal(k[2], (6, 2), jnp.float64)
    flat, unravel = ravel_pytree(mlp_params)
    mse = lambda v: jnp.mean((nn.mlp(unravel(v), xs, activation=jnp.tanh) - ys) ** 2)  # noqa
    analytic = np.asarray(fb.grad(mse)(flat))
    numeric = numerical_gradient(lambda v: float(mse(jnp.asarray(v))), np.asarray(flat))
    rel = np.linalg.norm(analytic - numeric) / (np.linalg.norm(analytic) +
                                                np.linalg.norm(numeric))
    print(f"4-8-2 MLP ({flat.size} parameters), float64: relative error "
          f"||analytic - numeric|| / (||analytic|| + ||numeric||) = {rel:.2e}")
    assert rel < 1e-5


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    main()
