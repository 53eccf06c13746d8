"""The computational graph of the backward pass, drawn: upstream x local = downstream.

Explains two small functions from the backprop tutorials fbackprop grew out of
and writes each as a self-contained HTML page (graph + table); no Graphviz
needed (it is used when installed). Open the .html files in a browser.

1. z = x*y; w = z + x; loss = w**2 at x=2, y=3: loss 64, dloss/dx 64, dloss/dy 32.
   x is used twice, so its gradient is the sum of two paths: 48 (through the
   product) + 16 (straight into the sum).
2. y = (x1*x2 + x3)**2 at x = (2, -3, 0.5): gradients (33, -22, -11).

Run: python examples/explain_graph.py [--outdir out]
"""

import argparse
import os

import numpy as np

import fbackprop as fb


def seed_graph(x, y):
    z = x * y
    w = z + x
    loss = w ** 2
    return loss


def three_inputs(x1, x2, x3):
    a = x1 * x2 + x3
    y = a ** 2
    return y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="out",
                        help="where to write the .html/.svg/.dot files (default: out)")
    args = parser.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)

    ex = fb.explain(seed_graph, 2.0, 3.0)
    print(ex.table())
    grads = [float(i.grad) for i in ex.inputs]
    assert float(ex.value) == 64.0 and grads == [64.0, 32.0], (ex.value, grads)
    x_uses = [float(g) for _, g in ex.inputs[0].uses]
    assert sorted(x_uses) == [16.0, 48.0], x_uses      # the fan-out of x: two paths add up
    for suffix in ("html", "svg", "dot"):
        path = ex.save(os.path.join(args.outdir, f"seed_graph.{suffix}"))
        print(f"wrote {os.path.abspath(path)}")

    print()
    ex2 = fb.explain(three_inputs, 2.0, -3.0, 0.5)
    print(ex2.table())
    np.testing.assert_allclose([float(i.grad) for i in ex2.inputs], [33.0, -22.0, -11.0])
    path = ex2.save(os.path.join(args.outdir, "three_inputs.html"))
    print(f"wrote {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
