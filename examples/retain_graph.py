"""Reusing a backward pass: ``vjp_fn`` may be called many times (retain_graph, functionally).

``fb.vjp`` returns the output and a function holding everything the backward
pass needs. Calling it twice and adding the results is what calling
``backward(retain_graph=True)`` twice does with accumulating ``.grad``: the
gradient doubles -- the reason training loops reset gradients every step.

    z = x^2 + y^2 at x = 2, y = 3:  dz/dx = 4, dz/dy = 6;  twice: 8, 12

Run: python examples/retain_graph.py [--quick]
"""

import argparse

import jax.numpy as jnp

import fbackprop as fb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    z, vjp_fn = fb.vjp(lambda x, y: x ** 2 + y ** 2, 2.0, 3.0)
    gx, gy = vjp_fn(jnp.ones_like(z))
    print(f"z = {float(z)}; first backward: dz/dx = {float(gx)}, dz/dy = {float(gy)}")
    assert (float(gx), float(gy)) == (4.0, 6.0)

    gx2, gy2 = vjp_fn(jnp.ones_like(z))         # the same backward pass again
    acc_x, acc_y = gx + gx2, gy + gy2             # what accumulating .grad would hold
    print(f"second backward on the same graph: {float(gx2)}, {float(gy2)}; accumulated: "
          f"dz/dx = {float(acc_x)}, dz/dy = {float(acc_y)} (twice the gradient)")
    assert (float(acc_x), float(acc_y)) == (8.0, 12.0)

    # The pure-function way needs no reset: each call returns a fresh gradient.
    assert tuple(map(float, fb.grad(lambda x, y: x ** 2 + y ** 2, argnums=(0, 1))(2.0, 3.0))) \
        == (4.0, 6.0)

    # Different upstream gradients reuse the same stored forward values.
    for ct in (0.5, -1.0, 10.0):
        g = vjp_fn(jnp.full_like(z, ct))
        print(f"upstream {ct:5}: gradients {float(g[0]):6.1f}, {float(g[1]):6.1f}")
        assert (float(g[0]), float(g[1])) == (4.0 * ct, 6.0 * ct)


if __name__ == "__main__":
    main()
