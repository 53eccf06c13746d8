"""ReLU as a gradient gate: its Jacobian is diagonal, with a 0/1 mask on the diagonal.

For z1 = [-3, 2, -1, 5]: relu(z1) = [0, 2, 0, 5] and the gradient mask is
[0, 1, 0, 1] -- the gradient reaches only the units that were active.

Also: a vector -> vector function's derivative is a Jacobian matrix, and for an
elementwise function it is diagonal, so backprop never builds it: the VJP is
just ``upstream * mask``.

Run: python examples/relu_mask.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    z1 = jnp.array([-3.0, 2.0, -1.0, 5.0])
    out, relu_vjp = fb.vjp(jax.nn.relu, z1)
    (mask,) = relu_vjp(jnp.ones_like(z1))        # upstream gradient of ones
    print(f"z1 = {z1.tolist()}, relu(z1) = {out.tolist()}, gradient mask = {mask.tolist()}")
    np.testing.assert_array_equal(np.asarray(mask), [0.0, 1.0, 0.0, 1.0])

    upstream = jnp.array([0.1, 0.2, 0.3, 0.4])
    (down,) = relu_vjp(upstream)
    print(f"upstream {[round(float(v), 6) for v in upstream]} -> downstream "
          f"{[round(float(v), 6) for v in down]}")
    np.testing.assert_allclose(down, upstream * (z1 > 0))

    jac = fb.jacrev(jax.nn.relu)(z1)
    print("Jacobian of relu at z1 (diagonal):")
    print(np.asarray(jac))
    np.testing.assert_array_equal(np.asarray(jac), np.diag([0.0, 1.0, 0.0, 1.0]))

    # At exactly 0 the ReLU's derivative is defined as 0 (as in JAX).
    print(f"d relu / dx at 0 = {float(fb.grad(jax.nn.relu)(0.0))}")
    assert float(fb.grad(jax.nn.relu)(0.0)) == 0.0


if __name__ == "__main__":
    main()
