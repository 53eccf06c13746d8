"""Property tests: random shapes, broadcasting, axes and compositions against JAX."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st

import fbackprop as fb

UNARY = {
    "sin": jnp.sin, "cos": jnp.cos, "exp": lambda x: jnp.exp(0.3 * x),
    "tanh": jnp.tanh, "square": jnp.square, "logistic": jax.nn.sigmoid,
    "softplus": jax.nn.softplus, "relu": jax.nn.relu, "abs": jnp.abs,
    "log1p_sq": lambda x: jnp.log1p(x * x),
}
BINARY = {
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply,
    "max": jnp.maximum, "min": jnp.minimum,
    "div": lambda a, b: a / (1.5 + jnp.abs(b)),
}


@st.composite
def broadcast_shapes(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    # the second operand: a suffix of the shape, with some dims set to 1
    k = draw(st.integers(0, ndim))
    other = tuple(1 if draw(st.booleans()) else d for d in shape[ndim - k:])
    return shape, other


@st.composite
def programs(draw):
    """A random composition: a list of (op kind, name) steps."""
    n = draw(st.integers(1, 6))
    return [(draw(st.sampled_from(["u", "b"])),
             draw(st.sampled_from(sorted(UNARY))),
             draw(st.sampled_from(sorted(BINARY)))) for _ in range(n)]


def _run(program, x, y):
    for kind, u, b in program:
        x = UNARY[u](x) if kind == "u" else BINARY[b](x, y)
    return x


@given(shapes=broadcast_shapes(), program=programs(), seed=st.integers(0, 2**16),
       axis_pick=st.integers(0, 7))
def test_random_compositions_match_jax(shapes, program, seed, axis_pick):
    shape, other = shapes
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1.5, 1.5, shape))
    y = jnp.asarray(rng.uniform(-1.5, 1.5, other))
    axes = tuple(i for i in range(len(shape)) if axis_pick >> i & 1)

    def f(x, y):
        out = _run(program, x, y)
        return jnp.sum(jnp.sum(out, axis=axes) ** 2) if axes else jnp.sum(out * out)

    ours = fb.value_and_grad(f, argnums=(0, 1))(x, y)
    theirs = jax.value_and_grad(f, argnums=(0, 1))(x, y)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@given(shapes=broadcast_shapes(), seed=st.integers(0, 2**16))
def test_vjp_with_random_cotangents_broadcasting(shapes, seed):
    shape, other = shapes
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, shape))
    y = jnp.asarray(rng.uniform(-1, 1, other))
    f = lambda x, y: (x * y + jnp.sin(y), x - y)  # noqa: E731
    out, vjp_fn = fb.vjp(f, x, y)
    out2, vjp_fn2 = jax.vjp(f, x, y)
    ct = jax.tree_util.tree_map(lambda o: jnp.asarray(rng.standard_normal(o.shape)), out)
    for a, b in zip(vjp_fn(ct), vjp_fn2(ct)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
