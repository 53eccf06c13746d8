"""fb.check_grads: passes on correct rules, catches planted wrong ones with a readable report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fbackprop as fb
from fbackprop._src import registry


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    out = h @ params["w2"] + params["b2"]
    return jnp.mean((out - y) ** 2)


def _mlp(sizes=(4, 8, 2), batch=5, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    (n_in, n_hidden, n_out) = sizes
    params = {"w1": rng.standard_normal((n_in, n_hidden)) / 2, "b1": rng.standard_normal(n_hidden),
              "w2": rng.standard_normal((n_hidden, n_out)) / 2, "b2": rng.standard_normal(n_out)}
    params = {k: v.astype(dtype) for k, v in params.items()}
    return params, rng.standard_normal((batch, n_in)).astype(dtype), \
        rng.standard_normal((batch, n_out)).astype(dtype)


@pytest.fixture
def planted_rules():
    """Lets a test replace rules; the original table entries come back afterwards."""
    saved_vjp, saved_jvp = dict(registry.vjp_rules), dict(registry.jvp_rules)
    yield
    registry.vjp_rules.clear()
    registry.vjp_rules.update(saved_vjp)
    registry.jvp_rules.clear()
    registry.jvp_rules.update(saved_jvp)


def test_two_layer_mlp_relative_error_below_1e5_float64():
    params, x, y = _mlp()
    report = fb.check_grads(_mlp_loss, (params, x, y), order=2)
    assert report.passed and report.max_rel_error < 1e-5
    # The same with a purely relative criterion (no absolute floor).
    strict = fb.check_grads(_mlp_loss, (params, x, y), order=1, atol=0.0, rtol=1e-5)
    assert strict.max_rel_error < 1e-5
    leaves = {row.leaf for row in report.rows}
    assert {"params['w1']", "params['b2']", "x", "y"} <= leaves
    assert {row.check for row in report.rows} >= {"JVP", "VJP", "JVP/VJP", "JVP of VJP",
                                                  "VJP of VJP", "VJP of JVP", "JVP of JVP"}
    text = str(report)
    assert "check_grads passed" in text and "params['w1']" in text


def test_float32_passes_with_default_tolerances():
    params, x, y = _mlp(dtype=np.float32)
    report = fb.check_grads(_mlp_loss, (params, x, y), order=1)
    assert report.passed
    assert all(row.rtol == 2e-3 for row in report.rows)


def test_planted_wrong_vjp_rule_is_caught(planted_rules):
    # sin's derivative is cos; plant "sin" instead.
    registry.defvjp(lax.sin_p, lambda ct, out, x, **_: lax.mul(ct, lax.sin(x)))

    def loss(params, x):
        return jnp.sum(jnp.sin(x @ params["w"]) + params["b"])

    params = {"w": np.array([[0.3, -0.5], [1.0, 0.2]]), "b": np.array([1.0, 2.0])}
    with pytest.raises(AssertionError) as info:
        fb.check_grads(loss, (params, np.array([[0.5, -1.0]])), modes=("rev",))
    text = str(info.value)
    assert "check_grads FAILED" in text
    failing = [line for line in text.splitlines() if line.rstrip().endswith("FAIL")]
    assert any("VJP" in line and "params['w']" in line for line in failing), text
    assert not any("params['b']" in line for line in failing), text


def test_planted_wrong_jvp_rule_is_caught(planted_rules):
    registry.defjvp(lax.exp_p, lambda t, out, x, **_: lax.mul(t, x))  # should be t * exp(x)

    def energy(x, scale):
        return jnp.exp(x) * scale

    with pytest.raises(AssertionError) as info:
        fb.check_grads(energy, (np.array([0.1, 0.7]), np.array([2.0, 3.0])))
    text = str(info.value)
    failing = [line for line in text.splitlines() if line.rstrip().endswith("FAIL")]
    assert any(line.lstrip().startswith("JVP ") and " x " in line for line in failing), text
    # Reverse mode is still right, and the JVP/VJP identity row exposes the mismatch.
    assert any(line.lstrip().startswith("JVP/VJP") for line in failing), text
    assert not any(line.lstrip().startswith("VJP ") for line in failing), text


@jax.custom_vjp
def swish(x):
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    s = jax.nn.sigmoid(x)
    return x * s, (x, s)


def _swish_bwd(res, g):
    x, s = res
    # d/dx x*sigmoid(x) = s + x*s*(1 - s)
    return (g * (s + x * s * (1.0 - s)),)


swish.defvjp(_swish_fwd, _swish_bwd)


def test_swish_custom_vjp_rule_passes_in_reverse_mode():
    x = np.linspace(-3.0, 3.0, 7)
    report = fb.check_grads(lambda x: jnp.sum(swish(x) ** 2), (x,), order=2, modes=("rev",))
    assert report.passed
    # Forward mode is refused for custom_vjp functions, clearly (not a wrong tangent).
    with pytest.raises(TypeError, match="custom_vjp"):
        fb.check_grads(lambda x: jnp.sum(swish(x)), (x,), modes=("fwd",))


def test_integer_and_python_scalar_arguments():
    def f(x, n, scale):
        return jnp.sum(jnp.sin(x) ** n) * scale

    report = fb.check_grads(f, (np.array([0.2, 0.4]), 3, 1.5), order=1)
    assert {row.leaf for row in report.rows} == {"x", "scale"}


def test_argument_errors():
    f = lambda x: jnp.sum(x ** 2)  # noqa: E731
    with pytest.raises(TypeError, match="tuple of positional arguments"):
        fb.check_grads(f, np.ones(3))
    with pytest.raises(ValueError, match="modes"):
        fb.check_grads(f, (np.ones(3),), modes=("forward",))
    with pytest.raises(TypeError, match="nothing to differentiate"):
        fb.check_grads(f, (np.arange(3),))
