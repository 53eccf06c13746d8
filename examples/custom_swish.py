"""A custom backward rule (Swish with ``jax.custom_vjp``) and a numerical gradient check.

    swish(x) = x * sigmoid(x)
    d swish / dx = s + x s (1 - s) = y + s (1 - y)     with s = sigmoid(x), y = swish(x)

The forward pass saves ``s`` and ``y``; the backward pass reuses them -- the
same contract as a hand-written autograd Function. fbackprop runs the user's
fwd/bwd pair inside its own sweep. ``fb.check_grads`` then compares the rule with
central finite differences (float64), and catches a deliberately wrong rule.

Run: python examples/custom_swish.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


@jax.custom_vjp
def swish(x):
    return x * jax.nn.sigmoid(x)


def swish_fwd(x):
    s = jax.nn.sigmoid(x)
    y = x * s
    return y, (s, y)                      # residuals saved for the backward pass


def swish_bwd(residuals, g):
    s, y = residuals
    return (g * (y + s * (1.0 - y)),)


swish.defvjp(swish_fwd, swish_bwd)


@jax.custom_vjp
def bad_swish(x):
    return x * jax.nn.sigmoid(x)


bad_swish.defvjp(swish_fwd, lambda res, g: (g * res[0],))   # forgot the x s (1 - s) term


def numerical_grad(f, x, eps=1e-6):
    """Central differences, one coordinate at a time (2 evaluations per element)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = eps
        g.flat[i] = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
    return g


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    x = jnp.asarray(np.random.default_rng(0).standard_normal(8))
    g = fb.grad(lambda x: jnp.sum(swish(x)))(x)
    s = jax.nn.sigmoid(x)
    analytic = s * (1 + x * (1 - s))
    print(f"fb.grad through the custom rule: {[round(float(v), 5) for v in g[:4]]} ...")
    np.testing.assert_allclose(g, analytic, rtol=1e-6)
    plain = fb.grad(lambda x: jnp.sum(x * jax.nn.sigmoid(x)))(x)
    print(f"same as differentiating x*sigmoid(x) directly: max diff "
          f"{float(jnp.max(jnp.abs(g - plain))):.1e}")
    np.testing.assert_allclose(g, plain, rtol=1e-6)

    # Numerical check in float64.
    x64 = np.random.default_rng(1).standard_normal(4)
    ours = np.asarray(fb.grad(lambda v: jnp.sum(swish(v)))(x64))
    numeric = numerical_grad(lambda v: jnp.sum(swish(v)), x64)
    rel = np.max(np.abs(ours - numeric) / (np.abs(ours) + np.abs(numeric) + 1e-12))
    print(f"central differences vs custom rule (float64): max relative error {rel:.1e}")
    assert rel < 1e-6

    # fb.check_grads: reverse mode only (a custom_vjp defines no forward mode).
    report = fb.check_grads(lambda v: swish(v), (x64,), modes=("rev",))
    print(str(report).splitlines()[0])
    assert report.passed
    try:
        fb.check_grads(lambda v: bad_swish(v), (x64,), modes=("rev",))
    except AssertionError as err:
        print("the wrong rule is caught: " + str(err).splitlines()[0])
    else:
        raise AssertionError("check_grads should reject the wrong backward rule")


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    main()
