"""A compiled fbackprop gradient does the same work as JAX's.

XLA's cost analysis of the compiled program is deterministic, so the FLOP
counts of ``jax.jit(fb.value_and_grad(f))`` and ``jax.jit(jax.value_and_grad(f))``
must be equal: the contraction rules emit the same dot_generals and
convolutions, in layouts XLA handles without extra copies.
"""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

import fbackprop as fb


def compiled_flops(fun, *args):
    return jax.jit(fun).lower(*args).compile().cost_analysis()["flops"]


def _mlp_params(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.normal(0, 0.05, (m, n)), jnp.float32), jnp.zeros(n, jnp.float32))
            for m, n in zip(sizes[:-1], sizes[1:])]


def _mlp_loss(params, x, labels):
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    logits = h @ w + b
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=-1))


def _attention_loss(q, k, v):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.125
    out = jnp.einsum("bhqk,bhkd->bhqd", jnp.tanh(scores), v)
    return jnp.sum(out * out)


def _cnn_loss(kernels, x):
    layers = [((1, 1), 1), ((2, 2), 8), ((2, 2), 1)]   # (strides, feature groups)
    for w, (strides, groups) in zip(kernels, layers):
        x = jnp.tanh(lax.conv_general_dilated(
            x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups))
    return jnp.sum(x * x)


def test_mlp_value_and_grad_flops_match_jax():
    params = _mlp_params([784, 512, 512, 10])
    x = jnp.ones((32, 784), jnp.float32)
    labels = jax.nn.one_hot(jnp.arange(32) % 10, 10, dtype=jnp.float32)
    ours = compiled_flops(fb.value_and_grad(_mlp_loss), params, x, labels)
    theirs = compiled_flops(jax.value_and_grad(_mlp_loss), params, x, labels)
    assert ours == theirs
    # Sanity: a dense layer's backward costs twice its forward, minus the input
    # cotangent of the first layer (the data is not differentiated): 2.4x here.
    forward = compiled_flops(_mlp_loss, params, x, labels)
    assert 2.0 * forward < ours < 3.0 * forward


def test_batched_attention_einsum_flops_match_jax():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 4, 16, 8)), jnp.float32) for _ in range(3))
    argnums = (0, 1, 2)
    ours = compiled_flops(fb.value_and_grad(_attention_loss, argnums=argnums), q, k, v)
    theirs = compiled_flops(jax.value_and_grad(_attention_loss, argnums=argnums), q, k, v)
    assert ours == theirs


def test_conv_net_flops_match_jax():
    rng = np.random.default_rng(2)
    kernels = [jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(3, 3, 3, 8), (3, 3, 1, 8), (3, 3, 8, 16)]]
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    ours = compiled_flops(fb.value_and_grad(_cnn_loss, argnums=(0, 1)), kernels, x)
    theirs = compiled_flops(jax.value_and_grad(_cnn_loss, argnums=(0, 1)), kernels, x)
    assert ours == theirs


@pytest.mark.parametrize("equation,shapes", [
    ("ij,jk->ik", ((3, 4), (4, 5))),
    ("ji,kj->ik", ((4, 3), (5, 4))),
    ("bij,bjk->bik", ((2, 3, 4), (2, 4, 5))),
    ("bhqd,bhkd->bhqk", ((2, 3, 4, 5), (2, 3, 6, 5))),
    ("abc,cda->bd", ((2, 3, 4), (4, 5, 2))),
])
def test_cotangent_layouts_match_jax(equation, shapes):
    """The backward program has exactly JAX's contractions and transposes."""
    rng = np.random.default_rng(3)
    args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    f = lambda x, y: jnp.sum(jnp.sin(jnp.einsum(equation, x, y)))  # noqa: E731

    def layout_ops(grad_fn):
        jaxpr = jax.make_jaxpr(grad_fn)(*args).jaxpr
        return [(e.primitive.name, str(e.params.get("dimension_numbers")),
                 str(e.params.get("permutation")))
                for e in jaxpr.eqns if e.primitive.name in ("dot_general", "transpose")]

    ours = layout_ops(fb.grad(f, argnums=(0, 1)))
    theirs = layout_ops(jax.grad(f, argnums=(0, 1)))
    assert sorted(ours) == sorted(theirs)
