"""Engine problems found by differentiating realistic functions, as strict xfail tests.

Each test is a minimal reproduction that compares fbackprop with JAX; it is
expected to fail until the named module is fixed, and ``strict=True`` makes the
suite report it as soon as it passes, so the marker can be removed then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.special as jss
import numpy as np
import optax
import pytest
from jax import lax

import fbackprop as fb

X = np.linspace(-1.5, 1.5, 12).reshape(3, 4)


# ------------------------------------------------ custom_jvp with a constant input
# jax.custom_jvp functions with symbolic_zeros=False (the default: jnp.logaddexp,
# jax.nn.softplus, jax.scipy.special.xlogy, optax.sigmoid_binary_cross_entropy...)
# are promised instantiated zero tangents for inputs that are not differentiated.
# rules/calls.py asks for the JVP jaxpr with those inputs marked as symbolic zeros
# (``jvp_jaxpr_of([not a for a in active])``), so the user's rule receives a
# SymbolicZero and fails. Fix: when ``symbolic_zeros`` is False, request the JVP
# jaxpr with every input nonzero and feed zeros (inactive in the reverse sweep)
# for the inputs that carry no tangent, as JAX's ``instantiate_zeros`` does.
_CONSTANT_INPUT_CASES = [
    ("softplus", jax.nn.softplus),
    ("log_sigmoid", jax.nn.log_sigmoid),
    ("mish", jax.nn.mish),
    ("logaddexp_with_constant", lambda x: jnp.logaddexp(x, 0.5)),
    ("xlogy_with_constant", lambda x: jss.xlogy(x, 2.0)),
    ("sigmoid_binary_cross_entropy",
     lambda x: optax.sigmoid_binary_cross_entropy(x, (X > 0).astype(x.dtype))),
]


@pytest.mark.parametrize("f", [f for _, f in _CONSTANT_INPUT_CASES],
                         ids=[name for name, _ in _CONSTANT_INPUT_CASES])
def test_custom_jvp_with_a_constant_input_reverse(f):
    loss = lambda x: jnp.sum(jnp.sin(f(x)))  # noqa: E731
    np.testing.assert_allclose(fb.grad(loss)(X), jax.grad(loss)(X), rtol=1e-6)


def test_custom_jvp_with_a_constant_input_forward():
    ours = fb.jvp(jax.nn.softplus, (X,), (np.ones_like(X),))
    theirs = jax.jvp(jax.nn.softplus, (X,), (np.ones_like(X),))
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6)


# ------------------------------------------------------------- stale trace cache
# trace.py caches the jaxpr per function object and input types. A function that
# reads a global (the current data batch of a training loop, a Python scalar
# hyperparameter) keeps the value it had at the first call, so values and
# gradients are silently stale where jax.grad retraces on every call. Possible
# fixes: do not cache traces for eager calls (keep caching the compiled program,
# keyed by the traced jaxpr), or document that the function must be pure and
# point to fbackprop.clear_cache().
_batch = {"x": np.ones((2, 3))}


def _loss_reading_a_global(w):
    return jnp.sum((_batch["x"] @ w) ** 2)


def test_gradient_sees_a_changed_global():
    w = np.ones(3)
    fb.grad(_loss_reading_a_global)(w)
    _batch["x"] = np.full((2, 3), 2.0)
    try:
        np.testing.assert_allclose(fb.grad(_loss_reading_a_global)(w),
                                   jax.grad(_loss_reading_a_global)(w))
    finally:
        _batch["x"] = np.ones((2, 3))


# ------------------------------------------- collectives over a vmap axis name
# Inside jax.vmap(..., axis_name="i"), lax.psum/pmean bind psum with positional
# axes (``psum[axes=(0,)]``): a plain sum over that array axis, transposed by
# broadcasting the cotangent back. tests/test_collectives_vmap.py covers every
# collective in both modes.
@pytest.mark.parametrize("collective", [lax.psum, lax.pmean], ids=["psum", "pmean"])
def test_collective_over_a_vmap_axis_name(collective):
    def loss(x):
        normalized = jax.vmap(lambda v: v / collective(v, "i"), axis_name="i")(x)
        return jnp.sum(jnp.sin(normalized))
    x = np.array([0.5, 1.0, 2.0])
    np.testing.assert_allclose(fb.grad(loss)(x), jax.grad(loss)(x), rtol=1e-6)


def test_pmax_over_a_vmap_axis_name_is_a_clear_error_as_in_jax():
    def loss(x):
        return jnp.sum(jnp.sin(jax.vmap(lambda v: v * lax.pmax(v, "i"), axis_name="i")(x)))
    x = np.array([0.5, 1.0, 2.0])
    with pytest.raises(NotImplementedError):
        jax.grad(loss)(x)
    with pytest.raises(fb.MissingRuleError, match="'pmax'"):
        fb.grad(loss)(x)
