"""Per-example gradient norms, clipping and statistics against jax.vmap(jax.grad).

Every quantity of ``fb.per_example_grad_norms``, ``fb.clipped_grad`` (each
method) and ``fb.per_example_stats`` is compared with the same quantity computed
from JAX's materialized per-example gradients, on models that exercise every way
a cotangent is kept: a dense layer on vectors (Gram of one row), a sequence
model whose uses are formed per example or kept as a Gram, a tied embedding (an
index factor meeting a matrix factor), convolutions (per-example kernels and
the patch Gram), a weight used at every step of a ``lax.scan`` (steps as rows)
and per-step inputs of a scan over stacked layers (steps kept apart),
checkpointed regions, branches, a ``custom_vjp``, and the linear ops between a
parameter and its use. A few structural checks prove that the per-example
gradients of large parameters are never formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fbackprop as fb

F32 = jnp.float32


def _init(seed, shapes, scale=0.4):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {n: scale * jax.random.normal(k, s, F32) for k, (n, s) in zip(keys, shapes.items())}


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, F32)


def _ints(seed, shape, high):
    return jax.random.randint(jax.random.key(seed), shape, 0, high, jnp.int32)


# -------------------------------------------------------------------- models
def mlp():
    p = _init(0, {"w1": (5, 7), "b1": (7,), "w2": (7, 3)})

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return -jax.nn.log_softmax(h @ p["w2"])[y]
    return loss, p, (_normal(1, (4, 5)), jnp.array([0, 1, 2, 1]))


def sequence_dense():
    """T=6 rows of width 3: the weights' per-example gradients are cheaper than
    their Gram (formed per example)."""
    p = _init(2, {"w": (3, 3), "v": (3, 2)})

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) @ p["v"]) ** 2
    return loss, p, (_normal(3, (3, 6, 3)),)


def cnn():
    """A 3x3 convolution on 6x6 (per-example kernel gradients) and a stride-2
    one on 3x3 with 8 channels in and 12 out (a 4-position patch Gram)."""
    p = _init(4, {"k1": (3, 3, 2, 8), "b1": (8,), "k2": (3, 3, 8, 12), "w": (12, 3)})
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(p, x, y):
        h = jax.nn.relu(lax.conv_general_dilated(x[None], p["k1"], (1, 1), "SAME",
                                                 dimension_numbers=dn) + p["b1"])
        h = h[:, :3, :3, :]
        h = jnp.tanh(lax.conv_general_dilated(h, p["k2"], (2, 2), "SAME", dimension_numbers=dn))
        return -jax.nn.log_softmax(jnp.mean(h, axis=(0, 1, 2)) @ p["w"])[y]
    return loss, p, (_normal(5, (3, 6, 6, 2)), jnp.array([0, 2, 1]))


def _transformer(vocab, seed):
    d, t, heads = 8, 5, 2
    shapes = {"emb": (vocab, d), "pos": (t, d), "wq": (d, d), "wk": (d, d), "wv": (d, d),
              "wo": (d, d), "m1": (d, 2 * d), "m2": (2 * d, d), "g1": (d,), "b1": (d,),
              "g2": (d,), "b2": (d,)}
    p = _init(seed, shapes)

    def ln(x, g, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + 1e-5) * g + b

    def loss(p, tok, tgt):
        h = p["emb"][tok] + p["pos"]
        a = ln(h, p["g1"], p["b1"])
        q, k, v = ((a @ p[n]).reshape(t, heads, d // heads) for n in ("wq", "wk", "wv"))
        s = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d // heads)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
        o = jnp.einsum("hts,shd->thd", jax.nn.softmax(s), v).reshape(t, d)
        h = h + o @ p["wo"]
        h = h + jax.nn.gelu(ln(h, p["g2"], p["b2"]) @ p["m1"]) @ p["m2"]
        logits = h @ p["emb"].T
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[:, None], 1))
    return loss, p, (_ints(seed + 1, (3, t), vocab), _ints(seed + 2, (3, t), vocab))


def transformer_large_vocab():
    """Vocabulary 40 for 5 tokens: the lookup's index factor kept as a Gram."""
    return _transformer(40, 6)


def transformer_small_vocab():
    """Vocabulary 4 for 5 tokens: the lookup's gradient formed by a scatter-add."""
    return _transformer(4, 9)


def rnn():
    """Over 7 steps: the hidden weight's 7 rows per example kept as a Gram, the
    input weight's formed per example."""
    p = _init(12, {"wh": (16, 16), "wx": (4, 16), "b": (16,), "wo": (16, 3)}, scale=0.25)

    def loss(p, xs, y):
        def step(h, x):
            h = jnp.tanh(h @ p["wh"] + x @ p["wx"] + p["b"])
            return h, h
        h, hs = lax.scan(step, jnp.zeros(16, F32), xs)
        return -jax.nn.log_softmax(h @ p["wo"])[y] + 0.1 * jnp.sum(hs ** 2)
    return loss, p, (_normal(13, (3, 7, 4)), jnp.array([0, 1, 2]))


def scan_over_layers():
    """Stacked layers as the scan's per-step inputs, checkpointed; a nested
    jit and a reverse inner scan."""
    p = _init(14, {"W": (3, 5, 5), "B": (3, 5), "v": (5, 5)})

    @jax.jit
    def cell(h, w):
        return jnp.tanh(h @ w)

    def loss(p, x, y):
        def layer(h, wb):
            w, b = wb
            return cell(h, w) + b, None
        h, _ = lax.scan(jax.checkpoint(layer), x, (p["W"], p["B"]))

        def inner(g, _):
            return cell(g, p["v"]), jnp.sum(g)
        h, s = lax.scan(inner, h, None, length=2, reverse=True)
        return jnp.sum((h - y) ** 2) + 0.1 * jnp.sum(s)
    return loss, p, (_normal(15, (4, 5)), _normal(16, (4, 5)))


def checkpointed():
    """fb.checkpoint (nothing saved), a JAX policy and a memory budget."""
    p = _init(17, {"w1": (5, 6), "b1": (6,), "w2": (6, 6), "w3": (6, 2)})

    def block(h, w):
        return jnp.tanh(h @ w)

    def loss(p, x, y):
        h = fb.checkpoint(lambda h, w, b: block(h, w) + b)(x, p["w1"], p["b1"])
        h = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_saveable)(h, p["w2"])
        h = fb.checkpoint(block, memory_budget=0.5)(h, p["w3"])
        return jnp.sum((h - y) ** 2)
    return loss, p, (_normal(18, (4, 5)), _normal(19, (4, 2)))


def linear_ops_between():
    """A parameter reaches its use through a transpose, a broadcast, a size-1
    reshape, a product with a scalar and a cast; it is also used twice with
    different contraction layouts and once elementwise."""
    p = _init(20, {"a": (3, 4, 5), "v": (4,), "s": (5, 5)})

    def loss(p, x, z):
        w = (p["a"] * 0.5).astype(jnp.float32)                   # scalar product, cast
        h = jnp.einsum("i,ijk->jk", x, w)                         # contracts dim 0
        g = jnp.einsum("ij,ijk->k", z, w)                         # contracts dims 0, 1
        u = x[:3] @ jnp.broadcast_to(p["v"][None, :], (3, 4))     # broadcast
        r = jnp.reshape(p["s"], (1, 5, 5))[0] @ g                 # size-1 reshape
        t = p["s"].T @ jnp.tanh(g)                                 # transpose
        return jnp.sum(h ** 2) + jnp.sum(r * t) + jnp.sum(u) ** 2 + jnp.sum(p["a"] * w) * 0.1
    return loss, p, (_normal(21, (3, 3)), _normal(22, (3, 3, 4)))


@jax.custom_vjp
def _clip_ct(x):
    return x


_clip_ct.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.3, 0.3),))


def branches_and_custom_vjp():
    """A cond, a custom_vjp whose bwd is not linear in its cotangent, a fori_loop."""
    p = _init(23, {"w": (5, 5), "v": (5, 5)})

    def loss(p, x, y):
        h = x @ p["w"]
        h = lax.cond(jnp.sum(x) > 0, lambda h: jnp.sin(h @ p["v"]), lambda h: h * 2.0, h)
        h = _clip_ct(h)
        h = lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["v"]), h)
        return jnp.sum((h - y) ** 2)
    return loss, p, (_normal(24, (4, 5)), _normal(25, (4, 5)))


MODELS = {f.__name__: f for f in (
    mlp, sequence_dense, cnn, transformer_large_vocab, transformer_small_vocab, rnn,
    scan_over_layers, checkpointed, linear_ops_between, branches_and_custom_vjp)}


# ------------------------------------------------------------------ reference
def _reference(loss, params, batch, clip):
    n_args = len(batch)
    g = jax.vmap(jax.grad(loss), (None,) + (0,) * n_args)(params, *batch)
    b = batch[0].shape[0]
    flat = jax.tree_util.tree_map(lambda x: x.reshape(b, -1), g)
    leaf_norms = jax.tree_util.tree_map(lambda x: jnp.sqrt(jnp.sum(x * x, 1)), flat)
    norms = jnp.sqrt(sum(jnp.sum(x * x, 1) for x in jax.tree_util.tree_leaves(flat)))
    w = jnp.minimum(1.0, clip / norms)
    mean = jax.tree_util.tree_map(lambda x: x.mean(0), g)
    return dict(
        norms=norms, leaf_norms=leaf_norms, mean=mean,
        clipped=jax.tree_util.tree_map(lambda x: jnp.tensordot(w, x, 1), g),
        second=jax.tree_util.tree_map(lambda x: (x * x).mean(0), g),
        variance=jax.tree_util.tree_map(lambda x, m: ((x - m) ** 2).mean(0), g, mean))


def _close(got, want, rtol, what):
    """Every leaf within ``rtol`` of the largest reference entry (of the whole tree:
    entries that are zero in exact arithmetic come out as rounding noise)."""
    got_l, want_l = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), what
    scale = max(float(jnp.max(jnp.abs(w))) for w in want_l)
    for g, w in zip(got_l, want_l):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, g.shape, w.shape, g.dtype)
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   rtol=0, atol=rtol * scale, err_msg=what)


def _check_all(loss, params, batch, wrap, rtol=2e-5, clip=1.0, methods=("auto",),
               ref_loss=None):
    """``ref_loss``: the same loss written so that ``jax.grad`` can differentiate it
    (default ``loss``)."""
    ref = _reference(loss if ref_loss is None else ref_loss, params, batch, clip)
    norms = wrap(fb.per_example_grad_norms(loss))(params, *batch)
    _close(norms, ref["norms"], rtol, "per_example_grad_norms")
    for method in methods:
        grads, norms = wrap(fb.clipped_grad(loss, clip, method=method))(params, *batch)
        _close(grads, ref["clipped"], rtol, f"clipped_grad({method})")
        _close(norms, ref["norms"], rtol, f"clipped_grad({method}) norms")
    stats = wrap(fb.per_example_stats(loss))(params, *batch)
    _close(stats.value, jax.vmap(loss, (None,) + (0,) * len(batch))(params, *batch), rtol,
           "value")
    _close(stats.norms, ref["norms"], rtol, "stats.norms")
    _close(stats.param_norms, ref["leaf_norms"], rtol, "stats.param_norms")
    _close(stats.grad, ref["mean"], rtol, "stats.grad")
    _close(stats.second_moment, ref["second"], rtol, "stats.second_moment")
    _close(stats.variance, ref["variance"], 10 * rtol, "stats.variance")


# The method "reuse" differs from the default ("second_sweep" but for custom_vjp)
# in how the sum is formed: it is checked where that path differs most.
REUSE_TOO = {"mlp", "cnn", "transformer_large_vocab", "rnn", "scan_over_layers",
             "branches_and_custom_vjp"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_against_vmap_of_grad_under_jit(name):
    loss, params, batch = MODELS[name]()
    _check_all(loss, params, batch, jax.jit,
               methods=("auto", "reuse") if name in REUSE_TOO else ("auto",))


@pytest.mark.parametrize("name", ["mlp", "rnn"])
def test_against_vmap_of_grad_eagerly(name):
    loss, params, batch = MODELS[name]()
    _check_all(loss, params, batch, lambda f: f, methods=("auto",))


def _while_loops(realized):
    """A weight used at every iteration of a ``lax.while_loop`` whose trip count
    differs per example, a loop over parameters only (a matrix power, whose
    cotangents are the same for every example: the second sweep's sums go
    through it), and a while loop in a checkpointed ``lax.scan`` step with
    ``while_loop_checkpoints``. ``realized``: the same loops as ``fori_loop``s
    of fixed length with masked steps, which ``jax.grad`` differentiates."""
    def apply(h, w, b, n, n_max):
        step = lambda h: jnp.tanh(h @ w + b)      # noqa: E731
        if realized:
            return lax.fori_loop(0, n_max, lambda i, h: jnp.where(i < n, step(h), h), h)
        return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, step(c[1])), (0, h))[1]

    def loss(p, x, n, xs):
        h = apply(x, p["w"], p["b"], n, 4)
        m = apply(p["v"], p["v"], 0.0, 2, 2)
        check = (jax.checkpoint if realized else
                 lambda f: fb.checkpoint(f, while_loop_checkpoints=2))

        def scan_step(g, x_t):
            return check(lambda g, w: apply(g + x_t, w, 0.0, n, 4))(g, p["w"]), None
        g, _ = lax.scan(scan_step, h, xs)
        return jnp.sum(jnp.tanh(g @ m) ** 2)
    return loss


def test_through_while_loops_against_realized_loops():
    # jax.grad refuses lax.while_loop: the reference differentiates the realized
    # loops. Both methods ("auto" picks one of them) go through the while loop's
    # reverse handler (the per-example cotangents of the weights used in a loop
    # body are formed there, not factored) and must agree.
    params = _init(26, {"w": (5, 5), "b": (5,), "v": (5, 5)})
    batch = (_normal(27, (3, 5)), jnp.array([0, 2, 4]), _normal(28, (3, 3, 5)))
    _check_all(_while_loops(False), params, batch, jax.jit,
               methods=("reuse", "second_sweep"), ref_loss=_while_loops(True))


def test_mixed_precision_bfloat16_compute():
    from fbackprop import precision
    policy = precision.Policy.parse("p=f32,c=bf16,o=f32")
    loss, params, batch = MODELS["transformer_large_vocab"]()

    def mp_loss(p, tok, tgt):
        return loss(policy.cast_to_compute(p), tok, tgt).astype(F32)
    # bfloat16 rounding: the reference rounds per-example gradients to
    # bfloat16, fbackprop forms norms and sums from bfloat16 factors in float32.
    _check_all(mp_loss, params, batch, jax.jit, rtol=3e-2, methods=("auto",))


# ----------------------------------------------------------------- frameworks
def test_flax_nnx():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 8, rngs=rngs)
            self.ln = nnx.LayerNorm(8, rngs=rngs)
            self.l2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.ln(self.l1(x))))
    graphdef, state = nnx.split(Net(nnx.Rngs(0)))

    def loss(state, x, y):
        return -jax.nn.log_softmax(nnx.merge(graphdef, state)(x))[y]
    _check_all(loss, state, (_normal(30, (4, 6)), jnp.array([0, 1, 2, 0])), jax.jit,
               methods=("auto",))


def test_flax_linen_tied_embedding_attention():
    nn = pytest.importorskip("flax.linen")

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tok):
            emb = nn.Embed(11, 8)
            h = nn.LayerNorm()(emb(tok))
            h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
            return emb.attend(nn.Dense(8)(h))
    lm = LM()
    tok = _ints(31, (3, 5), 11)
    params = lm.init(jax.random.key(0), tok[0])

    def loss(p, tok):
        return -jnp.mean(jax.nn.log_softmax(lm.apply(p, tok))[jnp.arange(5), tok])
    _check_all(loss, params, (tok,), jax.jit, methods=("auto",))


def test_equinox():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(6, 3, 8, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params, x, y):
        return -jax.nn.log_softmax(eqx.combine(params, static)(x))[y]
    _check_all(loss, params, (_normal(32, (4, 6)), jnp.array([0, 1, 2, 0])), jax.jit,
               methods=("auto",))


def test_haiku():
    hk = pytest.importorskip("haiku")
    f = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 3])(x)))
    x = _normal(33, (4, 6))
    params = f.init(jax.random.key(0), x[0])

    def loss(p, x, y):
        return -jax.nn.log_softmax(f.apply(p, x))[y]
    _check_all(loss, params, (x, jnp.array([0, 1, 2, 0])), jax.jit, methods=("auto",))


# ------------------------------------------------------------------ the API
def test_argnums_tuple_has_aux_and_keyword_examples():
    def loss(w, b, x, *, scale):
        value = jnp.sum(jnp.tanh(x @ w + b)) * scale
        return value, x.sum()
    w, b, x = _normal(40, (5, 3)), _normal(41, (3,)), _normal(42, (4, 5))
    scale = jnp.array([1.0, 2.0, 0.5, 1.5], F32)
    ref = jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True),
                   (None, None, 0))(w, b, x, scale=scale)[0]
    want = jnp.sqrt(sum(jnp.sum(g.reshape(4, -1) ** 2, 1) for g in ref))
    norms, aux = fb.per_example_grad_norms(loss, (None, None, 0), argnums=(0, 1),
                                           has_aux=True)(w, b, x, scale=scale)
    _close(norms, want, 2e-6, "norms")
    _close(aux, x.sum(1), 0, "aux")
    (grads, norms), aux = fb.clipped_grad(loss, 0.5, (None, None, 0), argnums=(0, 1),
                                          has_aux=True)(w, b, x, scale=scale)
    assert isinstance(grads, tuple) and grads[0].shape == (5, 3) and grads[1].shape == (3,)
    weights = jnp.minimum(1.0, 0.5 / want)
    _close(grads, tuple(jnp.tensordot(weights, g, 1) for g in ref), 2e-6, "grads")
    stats, aux = fb.per_example_stats(loss, (None, None, 0), argnums=(0, 1),
                                      has_aux=True)(w, b, x, scale=scale)
    assert isinstance(stats, fb.PerExampleStats) and isinstance(stats.grad, tuple)


def test_examples_on_another_axis():
    """``in_axes=1``: the factors carry the examples on another axis; sums over
    them contract that axis where it is."""
    loss, params, (x, y) = MODELS["mlp"]()
    ref = _reference(loss, params, (x, y), 1.0)
    for method in ("reuse", "second_sweep"):
        grads, norms = jax.jit(fb.clipped_grad(loss, 1.0, in_axes=(None, 1, 0), method=method))(
            params, x.T, y)
        _close(grads, ref["clipped"], 2e-5, method)
        _close(norms, ref["norms"], 2e-5, method)


def test_clip_by_a_traced_norm_and_zero_gradients():
    loss, params, batch = MODELS["mlp"]()
    f = jax.jit(lambda c, p, *b: fb.clipped_grad(loss, c)(p, *b))
    ref = _reference(loss, params, batch, 0.3)
    grads, _ = f(jnp.float32(0.3), params, *batch)
    _close(grads, ref["clipped"], 2e-5, "traced clip")
    # An example whose gradient is zero keeps weight 1 (no 0/0).
    grads, norms = fb.clipped_grad(lambda w, x: jnp.sum(w * x) * 0.0, 1.0)(jnp.ones(3, F32),
                                                                           jnp.ones((2, 3), F32))
    assert np.all(np.isfinite(grads)) and np.all(norms == 0)


def test_second_sweep_refuses_a_custom_vjp():
    loss, params, batch = MODELS["branches_and_custom_vjp"]()
    with pytest.raises(ValueError, match="custom_vjp function '_clip_ct'.*method='auto'"):
        fb.clipped_grad(loss, 1.0, method="second_sweep")(params, *batch)


def test_errors_name_the_argument():
    loss, params, batch = MODELS["mlp"]()
    with pytest.raises(ValueError, match=r"argument 0 is differentiated.*in_axes=\(None, 0\)"):
        fb.per_example_grad_norms(loss, in_axes=0)(params, *batch)
    with pytest.raises(ValueError, match="one entry per positional argument"):
        fb.per_example_grad_norms(loss, in_axes=(None, 0))(params, *batch)
    with pytest.raises(ValueError, match="maps no argument"):
        fb.per_example_grad_norms(loss, in_axes=(None, None, None))(params, *batch)
    with pytest.raises(ValueError, match="l2_norm_clip must be positive"):
        fb.clipped_grad(loss, 0.0)
    with pytest.raises(ValueError, match="method must be one of"):
        fb.clipped_grad(loss, 1.0, method="fast")
    with pytest.raises(TypeError, match="scalar-output"):
        fb.per_example_grad_norms(lambda p, x, y: x @ p["w1"])(params, *batch)
    with pytest.raises(TypeError, match="complex dtype complex64"):
        fb.per_example_grad_norms(lambda w, x: jnp.abs(jnp.sum(w * x)))(
            jnp.ones(3, jnp.complex64), jnp.ones((2, 3), jnp.complex64))


def test_examples_that_interact_are_an_error():
    def bn_like(w, x):
        h = x @ w
        return jnp.sum((h - lax.pmean(h, "batch")) ** 2)
    w, x = _normal(50, (5, 3)), _normal(51, (4, 5))
    for f in (fb.per_example_grad_norms(bn_like), fb.clipped_grad(bn_like, 1.0),
              jax.jit(fb.per_example_stats(bn_like))):
        with pytest.raises(ValueError, match="examples that do not interact"):
            f(w, x)


def test_flax_batch_norm_over_the_batch_is_an_error():
    nn = pytest.importorskip("flax.linen")

    class BN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False, axis_name="batch")(nn.Dense(3)(x))
    bn = BN()
    x = _normal(52, (4, 5))
    v = bn.init(jax.random.key(0), x[0])

    def loss(params, stats, x):
        out, _ = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.sum(out ** 2)
    with pytest.raises(ValueError, match="batch norm with running statistics"):
        fb.per_example_grad_norms(loss, in_axes=(None, None, 0))(v["params"],
                                                                  v["batch_stats"], x)


def test_never_calls_jax_autodiff(request):
    loss, params, batch = MODELS["rnn"]()
    request.getfixturevalue("no_jax_autodiff")
    fb.per_example_grad_norms(loss)(params, *batch)
    jax.jit(fb.clipped_grad(loss, 1.0))(params, *batch)
    fb.per_example_stats(loss)(params, *batch)


# ------------------------------------------------- nothing per-example is formed
def _shapes(f, *args):
    """``{(primitive name, output shape)}`` of every equation ``f`` stages."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.update((eqn.primitive.name, tuple(v.aval.shape)) for v in eqn.outvars
                         if hasattr(v.aval, "shape"))
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (tuple, list)) else [value]):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)
    walk(jax.make_jaxpr(f)(*args).jaxpr)
    return found


def test_no_per_example_gradient_of_a_large_weight_is_formed():
    b, d, vocab, t = 3, 16, 64, 4
    p = _init(60, {"emb": (vocab, d), "w": (d, d)})

    def lm(p, tok):
        h = jnp.tanh(p["emb"][tok] @ p["w"])
        return jnp.mean(jax.nn.log_softmax(h @ p["emb"].T)[:, 0])

    def rnn_loss(p, xs):
        h, _ = lax.scan(lambda h, x: (jnp.tanh(h @ p["w"] + x), None), jnp.zeros(d, F32), xs)
        return jnp.sum(h)
    tok, xs = _ints(61, (b, t), vocab), _normal(62, (b, t, d))
    for loss, batch in ((lm, tok), (rnn_loss, xs)):
        for f in (fb.per_example_grad_norms(loss), fb.clipped_grad(loss, 1.0),
                  fb.clipped_grad(loss, 1.0, method="reuse")):
            shapes = {shape for _, shape in _shapes(f, p, batch)}
            assert (b, d, d) not in shapes and (b, vocab, d) not in shapes, f
            # No one-hot matrix of the tokens either (an equality test against
            # every vocabulary entry).
            assert not any(name == "eq" and shape[-1:] == (vocab,)
                           for name, shape in _shapes(f, p, batch)), f


def test_compiled_memory_against_jax():
    """Compiled figures (deterministic): the clipped gradient of an MLP takes
    about the temp bytes of jax.grad of the mean loss, and a small fraction of
    jax.vmap(jax.grad)'s."""
    p = _init(70, {"w1": (256, 256), "b1": (256,), "w2": (256, 256), "w3": (256, 10)})

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"])
        return -jax.nn.log_softmax(h @ p["w3"])[y]
    x, y = _normal(71, (128, 256)), jnp.zeros(128, jnp.int32)

    def temp(f):
        return jax.jit(f).lower(p, x, y).compile().memory_analysis().temp_size_in_bytes

    base = temp(lambda p, x, y: jax.grad(
        lambda p: jnp.mean(jax.vmap(loss, (None, 0, 0))(p, x, y)))(p))
    per_example = temp(lambda p, x, y: jax.vmap(jax.grad(loss), (None, 0, 0))(p, x, y))
    clipped = temp(fb.clipped_grad(loss, 1.0))
    assert clipped <= 1.25 * base, (clipped, base)
    assert clipped <= 0.05 * per_example, (clipped, per_example)
