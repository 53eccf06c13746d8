"""Collectives over a ``jax.vmap`` axis name, in both modes, compared with JAX.

``jax.vmap(f, axis_name="b")`` with ``psum``/``pmean``/``all_gather``/
``psum_scatter``/``ppermute``/``all_to_all``/``axis_index`` inside: fbackprop's
gradients (eager and under ``jax.jit``) and JVPs equal JAX's. ``pmax``/``pmin``
have no derivative in JAX either; fbackprop says so by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fbackprop as fb

N = 4
_SHIFT = [(i, (i + 1) % N) for i in range(N)]

BODIES = {
    "psum": lambda v: lax.psum(v, "b") * v,
    "pmean": lambda v: jnp.sin(lax.pmean(v, "b")) * v,
    "psum_two_names": None,  # built below: nested vmaps, psum over both names
    "all_gather": lambda v: lax.all_gather(v, "b").sum(0) * v ** 2,
    "all_gather_tiled": lambda v: lax.all_gather(v, "b", tiled=True)[:2] * v,
    "psum_scatter": lambda v: lax.psum_scatter(jnp.stack([v, 2 * v, 3 * v, v * v]), "b") * v,
    "ppermute": lambda v: lax.ppermute(v, "b", _SHIFT) * jnp.cos(v),
    "all_to_all": lambda v: lax.all_to_all(jnp.stack([v, v ** 2, 3 * v, v + 1]), "b", 0, 0)
    .sum(0) * v,
    "axis_index": lambda v: lax.axis_index("b") * v ** 2,
}


def _loss(name):
    if name == "psum_two_names":
        inner = jax.vmap(lambda v: jnp.tanh(lax.psum(v, ("a", "b"))) * v, axis_name="a")
        mapped = jax.vmap(inner, axis_name="b")
        return lambda x: jnp.sum(mapped(x.reshape(N, 2, 1)) ** 2)
    mapped = jax.vmap(BODIES[name], axis_name="b")
    return lambda x: jnp.sum(mapped(x) ** 2)


X = (np.arange(8.0, dtype=np.float32).reshape(N, 2) - 3.0) / 3.0


@pytest.mark.parametrize("name", list(BODIES))
def test_reverse_mode_matches_jax(name):
    loss = _loss(name)
    expected = jax.grad(loss)(X)
    np.testing.assert_allclose(fb.grad(loss)(X), expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fb.grad(loss))(X), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(BODIES))
def test_forward_mode_matches_jax(name):
    loss = _loss(name)
    t = np.cos(X)
    expected = jax.jvp(loss, (X,), (t,))
    got = fb.jvp(loss, (X,), (t,))
    np.testing.assert_allclose(got[0], expected[0], rtol=2e-5)
    np.testing.assert_allclose(got[1], expected[1], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("collective", [lax.pmax, lax.pmin], ids=["pmax", "pmin"])
def test_pmax_pmin_have_no_derivative_in_either(collective):
    loss = lambda x: jnp.sum(jax.vmap(lambda v: v * collective(v, "b"), axis_name="b")(x))
    with pytest.raises(NotImplementedError):
        jax.grad(loss)(X)
    name = collective.__name__
    with pytest.raises(fb.MissingRuleError, match=f"'{name}'"):
        fb.grad(loss)(X)
    with pytest.raises(fb.MissingRuleError, match=f"'{name}'"):
        fb.jvp(loss, (X,), (X,))
