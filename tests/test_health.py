"""Gradient health reports: statistics, flags, jit, plotting, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbackprop as fb


def test_statistics_match_numpy():
    g = {"w": jnp.array([[3.0, 0.0], [-4.0, 0.0]]), "b": jnp.array([1.0, 2.0, 2.0])}
    report = fb.gradient_health(g)
    w = report["w"]
    assert w.shape == (2, 2)
    np.testing.assert_allclose(w.norm, 5.0, rtol=1e-6)
    np.testing.assert_allclose(w.mean, -0.25)
    np.testing.assert_allclose(w.std, np.std([3.0, 0.0, -4.0, 0.0]), rtol=1e-6)
    assert w.max_abs == 4.0 and w.zero_fraction == 0.5 and w.nonfinite == 0
    np.testing.assert_allclose(report["b"].norm, 3.0, rtol=1e-6)
    assert report.ok and "w" in report.table()
    assert report.norms() == {"b": report["b"].norm, "w": report["w"].norm}


def test_flags():
    g = [jnp.full(4, 1e-9), jnp.ones(4), jnp.zeros(3), jnp.array([1.0, jnp.nan]),
         jnp.array([1.0] + [0.0] * 19)]
    report = fb.gradient_health(g)
    flags = {leaf.path: leaf.flags for leaf in report.leaves}
    assert flags == {"0": ("vanishing",), "1": (), "2": ("all-zero",), "3": ("nonfinite",),
                     "4": ("mostly-zero",)}
    assert len(report.flagged) == 4 and not report.ok
    # "vanishing" is relative to the largest leaf norm; "exploding" is absolute.
    big = fb.gradient_health({"small": jnp.ones(4), "huge": jnp.full(4, 1e4)})
    assert big["huge"].flags == ("exploding",) and big["small"].flags == ("vanishing",)
    relaxed = fb.gradient_health(g[:2], vanishing_ratio=0.0, vanishing_norm=0.0)
    assert relaxed.ok


def test_stats_under_jit_and_vmap():
    g = {"a": jnp.arange(4.0), "n": jnp.arange(3)}              # integer leaves are skipped
    stats = jax.jit(fb.gradient_stats)(g)
    assert list(stats) == ["a"]
    report = fb.gradient_health(stats)
    np.testing.assert_allclose(report["a"].norm, np.sqrt(14.0), rtol=1e-6)
    batched = jax.vmap(fb.gradient_stats)({"a": jnp.ones((5, 4))})
    assert batched["a"]["norm"].shape == (5,)


def test_bad_input():
    with pytest.raises(TypeError, match="concrete gradients"):
        jax.jit(lambda g: fb.gradient_health(g).ok)(jnp.ones(2))
    with pytest.raises(ValueError, match="no floating-point"):
        fb.gradient_health({"n": jnp.arange(3)})
    with pytest.raises(ValueError, match="non-negative"):
        fb.gradient_health(jnp.ones(2), vanishing_ratio=-1)
    with pytest.raises(TypeError, match="not an array"):
        fb.gradient_health({"x": "text"})
    with pytest.raises(TypeError, match="HealthReport"):
        fb.plot_gradient_norms({"a": 1})


def _deep_mlp_grads(activation, depth=10, width=8):
    keys = jax.random.split(jax.random.PRNGKey(0), depth + 3)
    x = jax.random.normal(keys[-1], (32, width))
    y = jax.random.normal(keys[-2], (32, 1))
    params = [{"w": jax.random.normal(k, (width, width)), "b": jnp.zeros(width)}
              for k in keys[:depth]]
    params.append({"w": jax.random.normal(keys[depth], (width, 1)), "b": jnp.zeros(1)})

    def loss(params):
        h = x
        for layer in params[:-1]:
            h = activation(h @ layer["w"] + layer["b"])
        return jnp.mean((h @ params[-1]["w"] + params[-1]["b"] - y) ** 2)

    grads = jax.jit(fb.grad(loss))(params)
    return {f"layer{i}": layer["w"] for i, layer in enumerate(grads[:-1])}


def test_sigmoid_vanishes_relu_does_not(tmp_path):
    sig = fb.gradient_health(_deep_mlp_grads(jax.nn.sigmoid))
    relu = fb.gradient_health(_deep_mlp_grads(jax.nn.relu))
    s = [leaf.norm for leaf in sig.leaves]
    r = [leaf.norm for leaf in relu.leaves]
    assert s[0] / s[-1] < 1e-2                      # falls by decades towards the input
    assert r[0] / r[-1] > 10 * s[0] / s[-1]
    assert "vanishing" in sig["layer0"].flags
    pytest.importorskip("matplotlib")
    path = tmp_path / "norms.png"
    ax = fb.plot_gradient_norms({"sigmoid": sig, "relu": relu}, path=str(path))
    assert path.stat().st_size > 1000
    assert [line.get_label() for line in ax.get_lines()][:1] == ["sigmoid"]
    sig.plot(path=str(tmp_path / "one.svg"))
    assert (tmp_path / "one.svg").exists()
