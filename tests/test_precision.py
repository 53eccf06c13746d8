"""Mixed precision: policies, loss scales (under jit, float16), gradients vs JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbackprop as fb
from fbackprop import precision as mp
from fbackprop._src.testing import tolerance


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make(seed=0, n=16):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"w1": jax.random.normal(k[0], (8, 16), jnp.float32) * 0.3,
              "b1": jnp.zeros((16,), jnp.float32),
              "w2": jax.random.normal(k[1], (16, 4), jnp.float32) * 0.3}
    x = jax.random.normal(k[2], (n, 8), jnp.float32)
    y = jnp.arange(n) % 4
    return params, x, y


def test_parse_long_and_short_forms():
    a = mp.Policy.parse("params=float32,compute=bfloat16,output=float32")
    b = mp.Policy.parse("p=f32,c=bf16,o=f32")
    assert a == b and a.compute_dtype == jnp.bfloat16 and a.param_dtype == jnp.float32
    assert mp.Policy.parse("f16") == mp.Policy(jnp.float16, jnp.float16, jnp.float16)
    assert str(a) == "params=float32,compute=bfloat16,output=float32"


@pytest.mark.parametrize("bad", ["p=f32,x=bf16", "p=f33", "compute"])
def test_parse_errors_are_clear(bad):
    with pytest.raises(ValueError, match="precision policy|dtype"):
        mp.Policy.parse(bad)


def test_casts_touch_only_floats():
    policy = mp.Policy.parse("p=f32,c=f16,o=f32")
    tree = {"w": jnp.ones(2, jnp.float32), "step": jnp.int32(3), "mask": jnp.array([True])}
    out = policy.cast_to_compute(tree)
    assert out["w"].dtype == jnp.float16
    assert out["step"].dtype == jnp.int32 and out["mask"].dtype == jnp.bool_


@pytest.mark.parametrize("compute", ["float32", "bfloat16", "float16"])
def test_gradients_match_jax_under_policy(compute):
    policy = mp.Policy(jnp.float32, compute, jnp.float32)
    params, x, y = make()

    def cast_loss(p):
        return policy.cast_to_output(mlp_loss(policy.cast_to_compute(p),
                                              policy.cast_to_compute(x), y))

    ours = jax.jit(fb.grad(cast_loss))(params)
    theirs = jax.jit(jax.grad(cast_loss))(params)
    atol, rtol = tolerance(compute)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)
    # the activations' cotangents are in the compute dtype: casts transpose to casts
    jaxpr = jax.make_jaxpr(fb.grad(cast_loss))(params)
    if compute != "float32":
        assert any(str(v.aval.dtype) == compute for e in jaxpr.eqns
                   for v in e.outvars if e.primitive.name == "dot_general")


def test_mixed_value_and_grad_unscales():
    params, x, y = make()
    step = jax.jit(mp.value_and_grad(mlp_loss, "p=f32,c=f32,o=f32"))
    loss, grads, scale, finite = step(params, x, y, loss_scale=mp.StaticLossScale.create(1024.0))
    ref_loss, ref = jax.value_and_grad(mlp_loss)(params, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert bool(finite) and float(scale.loss_scale) == 1024.0


def test_dynamic_scale_grows_backs_off_floor_under_jit_float16():
    scale = mp.DynamicLossScale.create(2.0 ** 15, period=3, factor=2.0, min_loss_scale=2.0 ** 14)
    adjust = jax.jit(lambda s, ok: s.adjust(ok))
    for _ in range(2):
        scale = adjust(scale, jnp.array(True))
    assert float(scale.loss_scale) == 2.0 ** 15 and int(scale.counter) == 2
    scale = adjust(scale, jnp.array(True))          # third finite step: grow
    assert float(scale.loss_scale) == 2.0 ** 16 and int(scale.counter) == 0
    assert scale.loss_scale.dtype == jnp.float32    # 2^16 overflows float16; float32 holds it
    scale = adjust(scale, jnp.array(False))         # overflow: back off
    assert float(scale.loss_scale) == 2.0 ** 15
    scale = adjust(scale, jnp.array(False))
    scale = adjust(scale, jnp.array(False))         # floor
    assert float(scale.loss_scale) == 2.0 ** 14


def test_nonfinite_step_is_skipped_with_float16_compute():
    params, x, y = make()
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)
    vg = mp.value_and_grad(mlp_loss, "p=f32,c=f16,o=f32")

    @jax.jit
    def train_step(params, opt_state, scale, x):
        loss, grads, new_scale, finite = vg(params, x, y, loss_scale=scale)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return (mp.select_tree(finite, new_params, params),
                mp.select_tree(finite, new_opt, opt_state), new_scale, finite)

    # a scale of 2^24 overflows float16 cotangents: the step must be skipped
    big = mp.DynamicLossScale.create(2.0 ** 24)
    p2, _, s2, finite = train_step(params, opt_state, big, x)
    assert not bool(finite)
    assert float(s2.loss_scale) == 2.0 ** 23
    for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    # a sane scale takes the step
    p3, _, s3, finite = train_step(params, opt_state, mp.DynamicLossScale.create(2.0 ** 8), x)
    assert bool(finite)
    assert not np.allclose(p3["w1"], params["w1"])


def test_loss_scaling_rescues_float16_underflow():
    # Tiny gradients (a loss scaled by 1e-6) underflow in float16 cotangents.
    params, x, y = make(n=64)
    small_loss = lambda p, x, y: 1e-6 * mlp_loss(p, x, y)  # noqa: E731
    vg = mp.value_and_grad(small_loss, "p=f32,c=f16,o=f32")
    _, g_plain, _, _ = vg(params, x, y, loss_scale=mp.NoOpLossScale())
    _, g_scaled, _, _ = vg(params, x, y, loss_scale=mp.StaticLossScale.create(2.0 ** 15))
    zeros_plain = sum(int(jnp.sum(g == 0)) for g in jax.tree_util.tree_leaves(g_plain))
    zeros_scaled = sum(int(jnp.sum(g == 0)) for g in jax.tree_util.tree_leaves(g_scaled))
    total = sum(g.size for g in jax.tree_util.tree_leaves(g_plain))
    assert zeros_plain > total // 2, (zeros_plain, total)
    assert zeros_scaled < total // 20, (zeros_scaled, total)
    ref = jax.grad(small_loss)(params, x, y)
    np.testing.assert_allclose(g_scaled["w2"], ref["w2"], rtol=0.05, atol=1e-9)


def test_select_tree_errors():
    with pytest.raises(ValueError, match="structure"):
        mp.select_tree(jnp.array(True), {"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="scalar bool"):
        mp.select_tree(jnp.ones(2, bool), 1.0, 2.0)
