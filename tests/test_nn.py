"""fbackprop.nn layers and losses, and fbackprop.train: fb gradients equal jax.grad."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbackprop as fb
from fbackprop import nn, train


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(la, lb):
        assert u.shape == v.shape and u.dtype == v.dtype, (u.shape, v.shape, u.dtype, v.dtype)
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64),
                                   atol=atol, rtol=rtol)


def check_against_jax(loss, *args, argnums=(0, 1), jit=True, **tol):
    ours = fb.value_and_grad(loss, argnums=argnums)
    theirs = jax.value_and_grad(loss, argnums=argnums)
    if jit:
        ours, theirs = jax.jit(ours), jax.jit(theirs)
    (v1, g1), (v2, g2) = ours(*args), theirs(*args)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    assert_trees_close(g1, g2, **tol)


KEY = jax.random.key(0)


def _normal(i, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape, dtype)


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("activation", [jax.nn.relu, jax.nn.gelu, jax.nn.sigmoid, jnp.tanh],
                         ids=["relu", "gelu", "sigmoid", "tanh"])
def test_mlp(activation):
    params = nn.init_mlp(KEY, [6, 16, 16, 3])
    x = _normal(1, (5, 6))
    check_against_jax(lambda p, x: jnp.sum(nn.mlp(p, x, activation=activation) ** 2),
                      params, x)


def test_dense_without_bias_and_shape_error():
    params = nn.init_dense(KEY, 4, 3, use_bias=False)
    assert set(params) == {"w"}
    check_against_jax(lambda p, x: jnp.sum(jnp.sin(nn.dense(p, x))), params, _normal(1, (2, 4)))
    with pytest.raises(ValueError, match="in_features=5"):
        nn.dense(params, jnp.ones((2, 5)))


def test_layer_norm():
    params = nn.init_layer_norm(8)
    params = {"scale": params["scale"] + _normal(2, (8,)), "bias": _normal(3, (8,))}
    x = _normal(1, (4, 8))
    y = nn.layer_norm({"scale": jnp.ones(8), "bias": jnp.zeros(8)}, x)
    np.testing.assert_allclose(np.asarray(y.mean(-1)), 0.0, atol=1e-6)
    check_against_jax(lambda p, x: jnp.sum(nn.layer_norm(p, x) ** 3), params, x)


@pytest.mark.parametrize("causal", [False, True])
def test_attention(causal):
    params = nn.init_attention(KEY, 16)
    x = _normal(1, (2, 5, 16))
    check_against_jax(lambda p, x: jnp.sum(nn.attention(p, x, num_heads=4, causal=causal) ** 2),
                      params, x, atol=1e-4, rtol=1e-4)


def test_attention_causal_mask_blocks_the_future():
    params = nn.init_attention(KEY, 8)
    x = _normal(1, (1, 4, 8))
    # The first position's output must not depend on later positions.
    g = fb.grad(lambda x: jnp.sum(nn.attention(params, x, num_heads=2, causal=True)[0, 0]))(x)
    np.testing.assert_array_equal(np.asarray(g[0, 1:]), 0.0)
    assert float(jnp.abs(g[0, 0]).sum()) > 0


def test_transformer_block():
    params = nn.init_transformer_block(KEY, d_model=16, num_heads=4)
    x = _normal(1, (2, 6, 16))
    check_against_jax(lambda p, x: jnp.mean(nn.transformer_block(p, x, num_heads=4,
                                                                 causal=True) ** 2),
                      params, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stride,padding,groups", [(1, "SAME", 1), (2, "VALID", 1),
                                                   (1, [(1, 0), (0, 2)], 2)])
def test_conv2d(stride, padding, groups):
    params = nn.init_conv2d(KEY, 4, 6, 3, feature_group_count=groups)
    x = _normal(1, (2, 4, 7, 7))
    check_against_jax(lambda p, x: jnp.sum(jnp.tanh(nn.conv2d(
        p, x, stride=stride, padding=padding, feature_group_count=groups))), params, x,
        atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pool", [nn.max_pool, nn.avg_pool], ids=["max", "avg"])
def test_pooling(pool):
    x = _normal(1, (2, 3, 8, 8))
    y = pool(x, window=2)
    assert y.shape == (2, 3, 4, 4)
    check_against_jax(lambda x: jnp.sum(pool(x, window=2, stride=2) ** 2), x, argnums=0)
    check_against_jax(lambda x: jnp.sum(pool(x, window=3, stride=1, padding="SAME") ** 2), x,
                      argnums=0)


def test_small_cnn():
    params = {"c1": nn.init_conv2d(KEY, 1, 4, 3), "c2": nn.init_conv2d(jax.random.key(1), 4, 8, 3),
              "out": nn.init_dense(jax.random.key(2), 8 * 2 * 2, 10)}
    x = _normal(1, (3, 1, 8, 8))
    y = jnp.array([1, 2, 3])

    def loss(p, x):
        h = nn.max_pool(jax.nn.relu(nn.conv2d(p["c1"], x)))
        h = nn.avg_pool(jax.nn.relu(nn.conv2d(p["c2"], h)))
        return nn.softmax_cross_entropy(nn.dense(p["out"], h.reshape(3, -1)), y)

    check_against_jax(loss, params, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_recurrent_cells_with_scan(kind):
    init, cell = {"rnn": (nn.init_rnn_cell, nn.rnn_cell),
                  "gru": (nn.init_gru_cell, nn.gru_cell)}[kind]
    params = init(KEY, 3, 5)
    xs = _normal(1, (7, 2, 3))
    h0 = _normal(2, (2, 5))

    def loss(p, xs):
        h_last, hs = nn.run_cell(cell, p, h0, xs)
        return jnp.sum(hs ** 2) + jnp.sum(h_last)

    check_against_jax(loss, params, xs, atol=1e-4, rtol=1e-4)


def test_dropout():
    x = _normal(1, (1000,))
    y = nn.dropout(jax.random.key(3), x, 0.25)
    kept = np.asarray(y != 0)
    assert 0.65 < kept.mean() < 0.85
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert nn.dropout(jax.random.key(3), x, 0.25, deterministic=True) is x
    g = fb.grad(lambda x: jnp.sum(nn.dropout(jax.random.key(3), x, 0.25)))(x)
    np.testing.assert_allclose(np.asarray(g), kept / 0.75, rtol=1e-6)
    with pytest.raises(ValueError, match="rate"):
        nn.dropout(jax.random.key(0), x, 1.0)


def test_initializers_statistics():
    w = nn.initializers.he_normal(KEY, (400, 300))
    assert abs(float(w.std()) - np.sqrt(2 / 400)) < 0.01 * np.sqrt(2 / 400) * 10
    w = nn.initializers.glorot_uniform(KEY, (400, 300))
    assert float(jnp.abs(w).max()) <= np.sqrt(6 / 700)
    k = nn.initializers.lecun_normal(KEY, (8, 4, 3, 3))      # OIHW conv: fan_in = 4*3*3
    assert abs(float(k.std()) - np.sqrt(1 / 36)) < 0.05
    assert float(jnp.abs(nn.initializers.zeros(KEY, (3,))).sum()) == 0.0


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_matches_optax(smoothing):
    logits = _normal(1, (6, 5))
    labels = jnp.array([0, 1, 2, 3, 4, 0])
    ours = nn.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 5), smoothing)
    ref = optax.softmax_cross_entropy(logits, targets).mean()
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)
    check_against_jax(lambda z: nn.softmax_cross_entropy(z, labels, label_smoothing=smoothing),
                      logits, argnums=0)
    # Its gradient is (softmax - target) / batch.
    g = fb.grad(lambda z: nn.softmax_cross_entropy(z, labels, label_smoothing=smoothing))(logits)
    np.testing.assert_allclose(np.asarray(g), np.asarray((jax.nn.softmax(logits) - targets) / 6),
                               atol=1e-6)
    one_hot = nn.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 5),
                                       label_smoothing=smoothing)
    np.testing.assert_allclose(float(one_hot), float(ours), rtol=1e-6)


def test_mse_and_bce():
    p, t = _normal(1, (4, 3)), _normal(2, (4, 3))
    check_against_jax(nn.mse, p, t)
    logits = _normal(3, (10,)) * 5
    labels = (jax.random.uniform(jax.random.key(4), (10,)) > 0.5).astype(jnp.float32)
    ref = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    np.testing.assert_allclose(float(nn.binary_cross_entropy_with_logits(logits, labels)),
                               float(ref), rtol=1e-6)
    check_against_jax(nn.binary_cross_entropy_with_logits, logits, labels, argnums=0)
    g = fb.grad(nn.binary_cross_entropy_with_logits)(logits, labels)
    np.testing.assert_allclose(np.asarray(g), np.asarray((jax.nn.sigmoid(logits) - labels) / 10),
                               atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        nn.mse(p, t[:2])


# ------------------------------------------------ models from other libraries
def test_equinox_model():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 3, 16, 2, key=jax.random.key(0))
    x = _normal(1, (8, 4))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params, x):
        m = eqx.combine(params, static)
        return jnp.mean(jax.vmap(m)(x) ** 2)

    check_against_jax(loss, params, x, atol=1e-5)


def test_flax_model():
    linen = pytest.importorskip("flax.linen")

    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.relu(linen.Dense(16)(x))
            x = linen.LayerNorm()(x)
            return linen.Dense(3)(x)

    model = MLP()
    x = _normal(1, (8, 4))
    params = model.init(jax.random.key(0), x)
    check_against_jax(lambda p, x: jnp.mean(model.apply(p, x) ** 2), params, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    """A module-style layer: a registered dataclass of arrays with a __call__."""
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
        return x @ self.weight + self.bias


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TwoLayer:
    first: Linear
    second: Linear
    act: str = dataclasses.field(default="gelu", metadata=dict(static=True))

    def __call__(self, x):
        return self.second(getattr(jax.nn, self.act)(self.first(x)))


def test_module_style_pytree_model():
    """The same shape of model Equinox users write, without the dependency."""
    k = jax.random.split(KEY, 4)
    model = TwoLayer(Linear(jax.random.normal(k[0], (4, 16)), jnp.zeros(16)),
                     Linear(jax.random.normal(k[1], (16, 3)), jnp.zeros(3)))
    x = _normal(1, (8, 4))
    loss = lambda m, x: jnp.mean(m(x) ** 2)  # noqa: E731
    check_against_jax(loss, model, x)
    g = fb.grad(loss)(model, x)
    assert isinstance(g, TwoLayer) and isinstance(g.first, Linear)


# ------------------------------------------------------------------ training
def _classification_problem():
    params = nn.init_mlp(KEY, [6, 32, 3])
    x = _normal(1, (64, 6))
    y = jnp.argmax(x[:, :3], axis=1)

    def loss_fn(p, batch):
        xb, yb = batch
        return nn.softmax_cross_entropy(nn.mlp(p, xb), yb)

    return params, (x, y), loss_fn


def test_train_step_reduces_loss():
    params, batch, loss_fn = _classification_problem()
    opt = train.make_optimizer(1e-2, total_steps=50, warmup_steps=5)
    state = opt.init(params)
    step = train.make_train_step(loss_fn, opt)
    first = float(loss_fn(params, batch))
    for _ in range(50):
        params, state, loss = step(params, state, batch)
    assert float(loss) < 0.3 * first


def test_train_step_with_aux_and_microbatches():
    params, batch, loss_fn = _classification_problem()

    def loss_aux(p, b):
        logits = nn.mlp(p, b[0])
        return nn.softmax_cross_entropy(logits, b[1]), nn.accuracy(logits, b[1])

    opt = optax.sgd(0.1)
    step = train.make_train_step(loss_aux, opt, has_aux=True, num_microbatches=4, jit=False)
    new_params, _, loss, acc = step(params, opt.init(params), batch)
    assert acc.shape == (4,)
    full = fb.grad(loss_fn)(params, batch)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, full)
    assert_trees_close(new_params, expected, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(loss_fn(params, batch)), rtol=1e-6)


def test_accumulated_gradient_equals_full_batch():
    params, batch, loss_fn = _classification_problem()
    loss, g = jax.jit(train.accumulated_value_and_grad(loss_fn, 8))(params, batch)
    loss_full, g_full = fb.value_and_grad(loss_fn)(params, batch)
    np.testing.assert_allclose(float(loss), float(loss_full), rtol=1e-6)
    assert_trees_close(g, g_full, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        train.accumulated_value_and_grad(loss_fn, 5)(params, batch)


def test_optimizer_accumulation_and_clipping():
    params, batch, loss_fn = _classification_problem()
    opt = train.make_optimizer(1e-2, total_steps=10, accumulate_steps=2, clip_norm=0.5)
    state = opt.init(params)
    g = fb.grad(loss_fn)(params, batch)
    updates, state = opt.update(g, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(updates))
    updates, state = opt.update(g, state, params)
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree_util.tree_leaves(updates))


def test_plot_history_png_and_svg_fallback(tmp_path, monkeypatch):
    history = {"step": [1, 2, 3], "loss": [2.0, 1.0, 0.5], "epoch": [1, 2],
               "train_acc": [0.5, 0.8], "test_acc": [0.4, 0.7]}
    pytest.importorskip("matplotlib")
    path = train.plot_history(history, str(tmp_path / "curves.png"))
    assert os.path.getsize(path) > 1000 and path.endswith(".png")
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = train.plot_history(history, str(tmp_path / "curves2.png"))
    assert path.endswith(".svg") and "<polyline" in open(path).read()


def test_simple_progress_bar(capsys):
    import sys
    bar = train.progress(5, "work", use_tqdm=False, file=sys.stdout)
    for _ in range(5):
        bar.update(1)
    bar.set_postfix_str("done")
    bar.close()
    out = capsys.readouterr().out
    assert "5/5" in out and "work" in out
