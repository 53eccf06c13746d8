"""Small computational graphs differentiated by hand and by fbackprop.

Every number below is the chain rule done by hand: upstream gradient x local
gradient = downstream gradient, summed where a value is used twice.

1. x=2, y=3: z = x*y, w = z + x, loss = w^2      -> loss 64, dloss/dx 64, dloss/dy 32
   (x feeds two nodes, so its gradient is the sum over both paths: 16*3 + 16*1).
2. L = (3x + 1)^2 at x = 2                        -> dL/dx = 2*7*3 = 42
   and the same through a ReLU: x -> 3x+1 -> relu -> square (7 > 0, so still 42).
3. L = (2x + 3)^2 at x = 1                        -> dL/dx = 2*5*2 = 20
4. y = (x1*x2 + x3)^2 at x = (2, -3, 0.5)         -> a = -5.5, grads (2a*x2, 2a*x1, 2a)
                                                     = (33, -22, -11)
5. y = x^2, z = 3y at x = 2                       -> dz/dx = 3 * 2x = 12
6. d/dx sum(x^2) = 2x, and its derivative again    -> 2 (per element)
7. A gradient has the shape of its variable (scalar, vector, matrix, batch).

Run: python examples/scalar_graphs.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


def graph_64_32(x, y):
    z = x * y          # 6
    w = z + x          # 8
    return w ** 2      # 64


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(this example is always quick)")
    parser.parse_args(argv)

    # 1. loss = (x*y + x)^2
    loss, (dx, dy) = fb.value_and_grad(graph_64_32, argnums=(0, 1))(2.0, 3.0)
    print(f"1. z=x*y, w=z+x, loss=w^2 at x=2, y=3: loss={loss:.0f}, dloss/dx={dx:.0f}, "
          f"dloss/dy={dy:.0f}")
    assert (loss, dx, dy) == (64.0, 64.0, 32.0)

    # 2. (3x + 1)^2, with and without a ReLU in the middle
    d_sq = fb.grad(lambda x: (3 * x + 1) ** 2)(2.0)
    d_relu = fb.grad(lambda x: jnp.square(jax.nn.relu(3 * x + 1)))(2.0)
    print(f"2. L=(3x+1)^2 at x=2: dL/dx={d_sq:.0f}; via relu: {d_relu:.0f}")
    assert d_sq == 42.0 and d_relu == 42.0

    # 3. (2x + 3)^2
    d3 = fb.grad(lambda x: (2 * x + 3) ** 2)(1.0)
    print(f"3. L=(2x+3)^2 at x=1: dL/dx={d3:.0f}")
    assert d3 == 20.0

    # 4. (x1*x2 + x3)^2
    x = jnp.array([2.0, -3.0, 0.5])
    g4 = fb.grad(lambda x: (x[0] * x[1] + x[2]) ** 2)(x)
    print(f"4. y=(x1*x2+x3)^2 at (2,-3,0.5): grad={np.asarray(g4).tolist()}")
    np.testing.assert_array_equal(np.asarray(g4), [33.0, -22.0, -11.0])

    # 5. z = 3 * x^2
    d5 = fb.grad(lambda x: 3 * x ** 2)(2.0)
    print(f"5. y=x^2, z=3y at x=2: dz/dx={d5:.0f}")
    assert d5 == 12.0

    # 6. second derivative of sum(x^2): grad of (grad . ones)
    x3 = jnp.array([1.0, -2.0, 0.5])
    first = fb.grad(lambda x: jnp.sum(x ** 2))
    second = fb.grad(lambda x: jnp.sum(first(x)))(x3)
    print(f"6. d/dx sum(x^2) = 2x = {np.asarray(first(x3)).tolist()}; "
          f"differentiated again: {np.asarray(second).tolist()}")
    np.testing.assert_array_equal(np.asarray(second), [2.0, 2.0, 2.0])

    # 7. gradients have their variable's shape
    W = jnp.ones((4, 3))
    X = jnp.ones((5, 3))
    cases = {
        "scalar w in y=w*x": fb.grad(lambda w: w * 3.0)(2.0),
        "vector w in y=w.x": fb.grad(lambda w: jnp.dot(w, jnp.arange(3.0)))(jnp.ones(3)),
        "matrix W in L=sum(W x)": fb.grad(lambda W: jnp.sum(W @ jnp.ones(3)))(W),
        "batch: W in L=sum(X W^T)": fb.grad(lambda W: jnp.sum(X @ W.T))(W),
    }
    for name, g in cases.items():
        print(f"7. {name}: gradient shape {jnp.shape(g)}")
    assert jnp.shape(cases["matrix W in L=sum(W x)"]) == W.shape
    assert jnp.shape(cases["batch: W in L=sum(X W^T)"]) == W.shape
    print("all scalar-graph numbers match")


if __name__ == "__main__":
    main()
