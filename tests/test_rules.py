"""Every spec in the table: fbackprop's VJP/JVP against JAX's, eager and jitted."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbackprop as fb
from fbackprop._src.testing import assert_allclose
from specs import ALL_SPECS


def _is_float(x):
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _split(spec, args):
    """The function of the float inputs only (others are closed over)."""
    float_idx = [i for i, a in enumerate(args) if _is_float(a)]

    def f(*floats):
        full = list(args)
        for i, x in zip(float_idx, floats):
            full[i] = x
        return spec.fn(*full)

    return f, tuple(args[i] for i in float_idx)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(np.shape(x)).astype(x.dtype))
        if _is_float(x) else np.zeros(np.shape(x), jax.dtypes.float0), tree)


def _widest(spec):
    """The most precise dtype a spec lists (eager and second order are checked there)."""
    for d in ("float64", "complex128", "float32", "complex64"):
        if d in spec.dtypes:
            return d
    return spec.dtypes[0]


# Every dtype under jit; eagerly (the same rules, reached through the define-by-run
# trace on concrete values) once per spec, in its widest dtype -- in every dtype with
# FBACKPROP_TEST_FULL=1 (make test-full).
_FULL = os.environ.get("FBACKPROP_TEST_FULL") == "1"
RUNS = [pytest.param(s, d, True, id=f"{s.name}-{d}-jit") for s in ALL_SPECS for d in s.dtypes]
RUNS += [pytest.param(s, d, False, id=f"{s.name}-{d}-eager") for s in ALL_SPECS
         for d in (s.dtypes if _FULL else [_widest(s)])]


@pytest.mark.parametrize("spec,dtype,jit", RUNS)
def test_vjp_and_jvp_match_jax(spec, dtype, jit):
    """fb.vjp with a random cotangent and fb.jvp with a random tangent, against JAX.

    Eagerly the function runs primitive by primitive on fbackprop's traces; under jit both
    directions of one implementation are compiled as one program. JAX's reference is
    computed the same way.
    """
    f, floats = _split(spec, spec.args(dtype))
    tangents = _random_like(floats, 2)

    def run(vjp, jvp):
        def both(*xs):
            results = {}
            if "rev" in spec.modes:
                out, vjp_fn = vjp(f, *xs)
                results["rev"] = (out, vjp_fn(_random_like(out, 1)))
            if "fwd" in spec.modes:
                results["fwd"] = jvp(f, xs, tangents)
            return results
        return (jax.jit(both) if jit else both)(*floats)

    ours, theirs = run(fb.vjp, fb.jvp), run(jax.vjp, jax.jvp)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        if _is_float(b):
            assert np.shape(a) == np.shape(b) and a.dtype == b.dtype, spec.name
            assert_allclose(a, b, dtype, spec.tol, err_msg=spec.name)


SECOND_ORDER = [pytest.param(s, _widest(s), id=f"{s.name}-{_widest(s)}")
                for s in ALL_SPECS if s.order >= 2]


@pytest.mark.parametrize("spec,dtype", SECOND_ORDER)
def test_second_order_matches_jax(spec, dtype):
    """Reverse-over-reverse: the gradient of <vjp(ct), w> against JAX's."""
    if "rev" not in spec.modes:
        pytest.skip("reverse mode not applicable")
    f, floats = _split(spec, spec.args(dtype))
    out = jax.eval_shape(f, *floats)
    ct = _random_like(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out), 3)
    w = _random_like(floats, 4)

    def scalar(vjp):
        def g(*xs):
            _, vjp_fn = vjp(f, *xs)
            gs = vjp_fn(ct)
            return sum(jnp.sum(jnp.real(a * b)) for a, b in zip(gs, w))
        return g

    ours = jax.jit(fb.grad(scalar(fb.vjp), argnums=tuple(range(len(floats)))))
    theirs = jax.jit(jax.grad(scalar(jax.vjp), argnums=tuple(range(len(floats)))))
    for a, b in zip(ours(*floats), theirs(*floats)):
        assert_allclose(a, b, dtype, spec.tol, err_msg=spec.name)
