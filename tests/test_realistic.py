"""Realistic functions differentiated by fbackprop and by JAX: the results must agree.

Each case is a function a user would write (jax.nn activations, optax losses,
jax.numpy utilities, small models) rather than a single primitive. A case
compares, in one compiled program per library, the value and gradient
(``value_and_grad``) and, where chosen, a VJP with a random cotangent, a JVP with
random tangents and the Hessian; a few run eagerly. Related functions are grouped
into one program to keep compilation (most of the run time) short. Problems
found this way that are not fixed yet are strict ``xfail`` tests in
``test_audit_engine.py``.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import jax.scipy.special as jss
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import fbackprop as fb
from fbackprop._src.testing import tolerance

F32, F64 = np.dtype("float32"), np.dtype("float64")


# ------------------------------------------------------------------ comparison
def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def _is_float(x):
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _random_like(tree, seed):
    """Normal noise with each float leaf's shape and dtype (float0 zeros otherwise)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x))
        if _is_float(x) else np.zeros(np.shape(x), jax.dtypes.float0), tree)


def assert_trees_match(ours, theirs, atol, rtol, what=""):
    """Same structure, shapes and dtypes, and values within tolerance (nan where JAX has nan)."""
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs), what
    for a, b in zip(_leaves(ours), _leaves(theirs)):
        if getattr(b, "dtype", None) == jax.dtypes.float0:
            assert a.dtype == b.dtype and a.shape == b.shape, what
            continue
        assert np.shape(a) == np.shape(b), (what, np.shape(a), np.shape(b))
        assert jnp.result_type(a) == jnp.result_type(b), (what, a.dtype, b.dtype)
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   atol=atol, rtol=rtol, err_msg=what)


def _tol(args, scale=1.0):
    dtypes = [jnp.result_type(x) for x in _leaves(args) if _is_float(x)]
    atol, rtol = tolerance(min(dtypes, key=lambda d: jnp.finfo(d).bits))
    return atol * scale, rtol * scale


def compare(f, *args, argnums=0, jit=True, hessian=False, tol_scale=1.0, modes="grad jvp"):
    """fbackprop and JAX agree on ``f`` at ``args``.

    ``f`` is a function or a dict of named functions of the same arguments (checked
    together in one program, so a group costs one compilation per library). "grad"
    and ``hessian`` need scalar outputs; "vjp" (random cotangent) and "jvp" (random
    tangents for the ``argnums`` arguments) take any output. With ``jit`` each
    library's whole program runs inside one ``jax.jit``.
    """
    funcs = f if isinstance(f, dict) else {"f": f}
    atol, rtol = _tol(args, tol_scale)
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    cts = {name: _random_like(jax.eval_shape(g, *args), 1) for name, g in funcs.items()}
    tangents = tuple(_random_like(args[i], 2 + i) for i in nums)

    def program_of(lib_vg, lib_vjp, lib_jvp, lib_hess):
        def one(g, ct, xs):
            results = {}
            if "grad" in modes:
                results["grad"] = lib_vg(g, argnums=argnums)(*xs)
            if "vjp" in modes:
                out, vjp_fn = lib_vjp(g, *xs)
                results["vjp"] = (out, vjp_fn(ct))
            if "jvp" in modes:
                def g_of_differentiated(*ys):
                    full = list(xs)
                    for i, y in zip(nums, ys):
                        full[i] = y
                    return g(*full)
                results["jvp"] = lib_jvp(g_of_differentiated, tuple(xs[i] for i in nums),
                                         tangents)
            if hessian:
                results["hessian"] = lib_hess(g, argnums=argnums)(*xs)
            return results

        def program(*xs):
            return {name: one(g, cts[name], xs) for name, g in funcs.items()}
        return jax.jit(program) if jit else program

    ours = program_of(fb.value_and_grad, fb.vjp, fb.jvp, fb.hessian)(*args)
    theirs = program_of(jax.value_and_grad, jax.vjp, jax.jvp, jax.hessian)(*args)
    for name in funcs:
        for key in theirs[name]:
            scale = 10.0 if key == "hessian" else 1.0
            assert_trees_match(ours[name][key], theirs[name][key], atol * scale,
                               rtol * scale, what=f"{name}: {key}")


def _x(shape=(3, 4), dtype=F64, seed=0, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape).astype(dtype)


def _sum_sin(g):
    """A scalar whose cotangent differs per output element (sin is not linear), so a
    cotangent sent to the wrong position shows."""
    def f(*args):
        return jnp.sum(jnp.sin(g(*args)))
    return f


# ------------------------------------------------------------------- jax.nn
ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_erf": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "softmax_where": lambda x: jax.nn.softmax(x, where=x > -1.0),
    "log_softmax_where": lambda x: jnp.where(x > -1, jax.nn.log_softmax(x, where=x > -1), 0.0),
    "standardize": lambda x: jax.nn.standardize(x, axis=-1),
    "glu": jax.nn.glu,
    "elu": jax.nn.elu,
    "celu": jax.nn.celu,
    "selu": jax.nn.selu,
    "leaky_relu": jax.nn.leaky_relu,
    "hard_tanh": jax.nn.hard_tanh,
    "sparse_plus": jax.nn.sparse_plus,
    "relu6": jax.nn.relu6,
    "hard_swish": jax.nn.hard_swish,
    "squareplus": jax.nn.squareplus,
    "soft_sign": jax.nn.soft_sign,
    "logsumexp_b": lambda x: jax.nn.logsumexp(x, axis=1, b=jnp.arange(4.0) - 1.0),
    "logsumexp_where": lambda x: jax.nn.logsumexp(x, axis=1, where=x > 0),
    "one_hot": lambda x: jax.nn.one_hot(jnp.argmax(x, -1), 4) * x,
}


def _sum_sin_all(funcs):
    return {name: _sum_sin(g) for name, g in funcs.items()}


def test_jax_nn():
    compare(_sum_sin_all(ACTIVATIONS), _x(), modes="grad")


def test_jax_nn_float32_forward_mode():
    chosen = ("gelu_tanh", "softmax_where", "log_softmax", "standardize", "logsumexp_where",
              "glu", "one_hot", "hard_tanh", "selu")
    compare(_sum_sin_all({n: ACTIVATIONS[n] for n in chosen}), _x(dtype=F32))


def test_hessians():
    chosen = {n: ACTIVATIONS[n] for n in ("gelu_erf", "softmax_where", "standardize")}
    chosen["einsum_chain"] = NUMPY["einsum_chain"]
    chosen["causal_attention"] = lambda x: _causal_attention(x[None, :, None], x[None, :, None],
                                                             x[None, :, None])
    compare(_sum_sin_all(chosen), _x((2, 3), seed=11), hessian=True, modes="grad")


def test_dot_product_attention():
    q, k, v = (_x((2, 5, 2, 3), F32, seed=s, low=-1, high=1) for s in range(3))
    bias = _x((2, 2, 5, 5), F32, seed=4)
    mask = np.random.default_rng(5).uniform(size=(2, 2, 5, 5)) > 0.3
    mask[..., 0] = True
    lengths = jnp.array([3, 5], jnp.int32)

    def f(q, k, v, bias):
        causal = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        masked = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=0.3,
                                              query_seq_lengths=lengths)
        return jnp.sum(causal ** 2) + jnp.sum(masked ** 2)
    compare(f, q, k, v, bias, argnums=(0, 1, 2, 3), modes="grad jvp")


# --------------------------------------------------------------------- optax
_LABELS = np.asarray(jax.nn.softmax(_x(seed=3)))
_INT_LABELS = np.array([0, 3, 1])
_TARGETS = _x(seed=5)

LOSSES = {
    "softmax_cross_entropy": lambda x: optax.softmax_cross_entropy(x, _LABELS.astype(x.dtype)),
    "softmax_cross_entropy_int": lambda x: optax.softmax_cross_entropy_with_integer_labels(
        x, _INT_LABELS),
    "huber": lambda x: optax.huber_loss(x, _TARGETS.astype(x.dtype), delta=0.7),
    "l2": lambda x: optax.l2_loss(x, _TARGETS.astype(x.dtype)),
    "cosine_distance": lambda x: optax.cosine_distance(x, _TARGETS.astype(x.dtype)),
    "kl_divergence": lambda x: optax.kl_divergence(jax.nn.log_softmax(x),
                                                   _LABELS.astype(x.dtype)),
    "hinge": lambda x: optax.hinge_loss(x, jnp.sign(_TARGETS).astype(x.dtype)),
    "smooth_labels": lambda x: optax.softmax_cross_entropy(
        x, optax.smooth_labels(_LABELS.astype(x.dtype), 0.1)),
    "log_cosh": lambda x: optax.log_cosh(x, _TARGETS.astype(x.dtype)),
    "ntxent": lambda x: optax.ntxent(x, np.array([0, 0, 1])),
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_optax_losses(dtype):
    names = LOSSES if dtype == F64 else ("softmax_cross_entropy_int", "huber", "kl_divergence")
    compare({n: lambda x, loss=LOSSES[n]: jnp.mean(loss(x)) for n in names}, _x(dtype=dtype),
            modes="grad")


def test_optax_ctc_loss():
    logits = _x((2, 5, 4), seed=9)
    logit_pad = np.zeros((2, 5))
    labels, label_pad = np.array([[1, 2], [3, 3]]), np.zeros((2, 2))
    compare(lambda lg: jnp.sum(optax.ctc_loss(lg, logit_pad, labels, label_pad)), logits,
            modes="grad")


# ---------------------------------------------------------------- jax.numpy
_POS = _x(low=0.3, high=2.0, seed=7)
_IDX = jnp.array([0, 2, 2, 1])

NUMPY = {
    "var_ddof": lambda x: jnp.var(x, axis=1, ddof=1),
    "std": lambda x: jnp.std(x, axis=0),
    "mean_where": lambda x: jnp.mean(x, axis=1, where=x > 0),
    "median": lambda x: jnp.median(x, axis=1),
    "quantile": lambda x: jnp.quantile(x, jnp.array([0.3, 0.9]), axis=1),
    "percentile_nearest": lambda x: jnp.percentile(x, 30.0, method="nearest"),
    "sort_argsort": lambda x: jnp.sort(x, axis=0) + x[jnp.argsort(x[:, 0])],
    "cumsum_cumprod": lambda x: jnp.cumsum(x, axis=1) + jnp.cumprod(x, axis=0),
    "diff": lambda x: jnp.diff(x, n=2, axis=1),
    "interp": lambda x: jnp.interp(x, jnp.linspace(-2, 2, 5), jnp.arange(5.0) ** 2),
    "clip_where": lambda x: jnp.where(x > 0, jnp.clip(x, -1, 1) ** 2, -x),
    "take_modes": lambda x: jnp.concatenate([
        jnp.take(x, jnp.array([0, 7, -1]), axis=1, mode="fill"),
        jnp.take(x, jnp.array([0, 7, -9]), axis=1, mode="clip"),
        jnp.take(x, jnp.array([-1, 6]), axis=1, mode="wrap")], axis=1),
    "take_along_axis": lambda x: jnp.take_along_axis(x, jnp.argsort(x, axis=1), axis=1),
    "fancy_index": lambda x: x[jnp.array([0, 2, 0]), jnp.array([1, 3, 1])],
    "at_set_add_dup": lambda x: x.at[_IDX[:3]].set(x[2] * 3).at[_IDX[1:]].add(x[::-1] ** 2),
    "at_mul_min_max": lambda x: x.at[1].mul(x[2]).at[_IDX[:2]].min(x[2]).at[
        jnp.array([0, 0])].max(x[1:3]),
    "at_get_drop_clip": lambda x: x.at[jnp.array([0, 5])].get(mode="fill", fill_value=2.0)
    + x.at[jnp.array([0, 5])].set(x[1:3], mode="drop")[:2]
    + x.at[jnp.array([0, 5])].add(x[1:3], mode="clip")[1:],
    "einsum_chain": lambda x: jnp.einsum("ij,kj,kl->il", x, x, x),
    "tensordot_kron_outer": lambda x: jnp.tensordot(x, x, axes=([0, 1], [0, 1]))
    + jnp.sum(jnp.kron(x[:2, :2], x[1:, 2:])) + jnp.outer(x[0], x[1]),
    "trace_diag_tri": lambda x: jnp.trace(x, offset=1) + jnp.diagonal(x, -1).sum()
    + jnp.tril(x, 1) - jnp.triu(x, -1),
    "roll_flip_rot90": lambda x: jnp.roll(x, (1, -1), axis=(0, 1)) + jnp.flip(x)
    + jnp.rot90(x, 2),
    "tile_repeat": lambda x: jnp.tile(x, (2, 1)) + jnp.repeat(x, np.array([1, 0, 3]),
                                                              axis=0, total_repeat_length=6),
    "pad_modes": lambda x: jnp.pad(x, ((1, 2), (2, 1)), mode="reflect")
    + jnp.pad(x, ((1, 2), (2, 1)), mode="edge") + jnp.pad(x, ((1, 2), (2, 1)), mode="wrap")
    + jnp.pad(x, ((1, 2), (2, 1)), mode="symmetric"),
    "norms": lambda x: jnp.linalg.norm(x) + jnp.linalg.norm(x, ord=1, axis=1)
    + jnp.linalg.norm(x, ord=jnp.inf, axis=1) + jnp.linalg.norm(x, "fro")
    + jnp.linalg.norm(x, 3, axis=1) + jnp.linalg.norm(x, 1),
    "polyval": lambda x: jnp.polyval(x[0], x[1:]),
    "convolve_correlate": lambda x: jnp.convolve(x[0], x[1, :3]) + jnp.correlate(
        x[2], x[1, 1:4], mode="full"),
    "max_initial_min_where": lambda x: jnp.max(x, axis=1, initial=0.5)
    + jnp.min(x, axis=1, where=x > -1, initial=9.0),
    "nanmean_nansum": lambda x: jnp.nanmean(jnp.where(x > 1, jnp.nan, x), axis=1)
    + jnp.nansum(jnp.where(x > 1, jnp.nan, x)),
    "binary_ufuncs": lambda x: jnp.logaddexp(x, x[::-1]) + jnp.hypot(x, x[::-1])
    + jnp.arctan2(x, x[::-1]) + jnp.logaddexp2(x, x[::-1]),
    "sinc_i0_heaviside": lambda x: jnp.sinc(x) + jnp.i0(x) + jnp.heaviside(x, 0.5) * x,
    "rounding_zero_gradient": lambda x: jnp.round(x * 3) * x + jnp.floor(x) + jnp.ceil(x)
    + jnp.trunc(x) * x,
    "mod_fmod": lambda x: jnp.fmod(x, 0.7) + jnp.mod(x, 0.7),
    "copysign": lambda x: jnp.copysign(x, x[::-1]),
    "scipy_special": lambda x: jss.logsumexp(x, axis=0, b=2.0) + jss.erf(x) + jss.expit(x),
    "scipy_special_positive": lambda p: jss.entr(p) + jss.digamma(p) + jss.logit(p / 3)
    + jss.gamma(p),
    "segment_sum_max": lambda x: jax.ops.segment_sum(x, jnp.array([0, 1, 0]), 2)
    + jax.ops.segment_max(x, jnp.array([0, 1, 0]), 2),
    "top_k_approx": lambda x: lax.top_k(x, 2)[0] + lax.approx_max_k(x, 2)[0],
}


_NUMPY_GROUPS = [sorted(NUMPY)[i::3] for i in range(3)]
# Forward mode for the functions whose JVP rules differ most from their VJP rules.
_NUMPY_FORWARD = ("sort_argsort", "at_mul_min_max", "at_get_drop_clip", "pad_modes",
                  "cumsum_cumprod", "max_initial_min_where", "top_k_approx", "segment_sum_max")


@pytest.mark.parametrize("group", range(len(_NUMPY_GROUPS)))
def test_jax_numpy(group):
    names = [n for n in _NUMPY_GROUPS[group] if n != "scipy_special_positive"]
    compare(_sum_sin_all({n: NUMPY[n] for n in names}), _x(), modes="grad")


def test_jax_numpy_forward_mode():
    compare(_sum_sin_all({n: NUMPY[n] for n in _NUMPY_FORWARD}), _x(), modes="jvp")


def test_jax_numpy_float32_and_eager():
    chosen = ("var_ddof", "take_modes", "at_set_add_dup", "copysign")
    compare(_sum_sin_all({n: NUMPY[n] for n in chosen}), _x(dtype=F32), modes="grad")
    compare(_sum_sin(NUMPY["take_modes"]), _x(dtype=F32), jit=False, modes="grad")


def test_jax_numpy_positive_domain():
    compare(_sum_sin(NUMPY["scipy_special_positive"]), _POS)


# -------------------------------------------------------------------- models
def _params(seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.normal(size=s) * 0.5  # noqa: E731
    return {"l1": {"w": n(4, 8), "b": n(8)}, "l2": {"w": n(8, 3), "b": None}, "scale": n()}


def _mlp_loss(p, x, labels):
    h = jax.nn.gelu(x @ p["l1"]["w"] + p["l1"]["b"])
    logits = h @ p["l2"]["w"] * p["scale"]
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def test_mlp_pytree_with_none_leaf():
    x, labels = _x((5, 4)), np.array([0, 2, 1, 1, 0])
    compare(_mlp_loss, _params(), x, labels, modes="grad vjp")


def _cnn_loss(p, images):
    dn = ("NCHW", "OIHW", "NCHW")
    h = jax.nn.relu(lax.conv_general_dilated(images, p["k1"], (1, 1), "SAME",
                                             dimension_numbers=dn))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    h = jnp.tanh(lax.conv_general_dilated(h, p["k2"], (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=dn))
    h = lax.reduce_window(h, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4
    return jnp.sum(jnp.sin(h.reshape(h.shape[0], -1) @ p["w"]))


def test_cnn_conv_and_pooling():
    rng = np.random.default_rng(1)
    p = {"k1": rng.normal(size=(6, 3, 3, 3)) * 0.3, "k2": rng.normal(size=(4, 6, 3, 3)) * 0.3,
         "w": rng.normal(size=(16, 3)) * 0.3}
    compare(_cnn_loss, p, _x((2, 3, 8, 8)), modes="grad jvp")


def test_cnn_nhwc_strided_dilated_grouped_float32():
    def f(kernel, images):
        h = lax.conv_general_dilated(images, kernel, (2, 2), "SAME", rhs_dilation=(2, 1),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=2)
        h = lax.reduce_window(h, 0.0, lax.add, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "SAME")
        return jnp.sum(h ** 2)
    compare(f, _x((3, 3, 2, 4), F32), _x((2, 7, 7, 4), F32, seed=1), argnums=(0, 1))


def _causal_attention(q, k, v):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", weights, v) ** 2)


def test_causal_attention():
    q, k, v = (_x((2, 5, 2, 3), F32, seed=s, low=-1, high=1) for s in range(3))
    compare(_causal_attention, q, k, v, argnums=(0, 1, 2))


def test_hvp_and_third_order_through_cnn():
    rng = np.random.default_rng(2)
    p = {"k1": rng.normal(size=(3, 2, 3, 3)) * 0.5, "w": rng.normal(size=(12, 2)) * 0.5}
    images = _x((1, 2, 4, 4))

    def loss(p):
        h = jax.nn.gelu(lax.conv_general_dilated(images, p["k1"], (1, 1), "SAME"))
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        return jnp.sum(jax.nn.log_softmax(h.reshape(1, -1) @ p["w"]) ** 2)

    v = _random_like(p, 5)
    def third(grad, hvp):
        return grad(lambda p: sum(jnp.vdot(a, b) for a, b in zip(
            _leaves(hvp(p)), _leaves(v))))
    ours = jax.jit(third(fb.grad, lambda p: fb.hvp(loss, (p,), (v,))[0]))(p)
    theirs = jax.jit(third(jax.grad, lambda p: jax.jvp(jax.grad(loss), (p,), (v,))[1]))(p)
    assert_trees_match(ours, theirs, 1e-8, 1e-8)


# -------------------------------------------------------------- structures
Pair = collections.namedtuple("Pair", "a b")


def test_namedtuple_and_nested_containers():
    compare(lambda t: jnp.sum(t.a * jnp.sin(t.b)), Pair(_x((3,)), _x((3,), seed=1)))
    compare(lambda t: jnp.sum(t[0][0] * t[1]["z"]) + t[0][1],
            ([_x((3,)), np.float64(0.5)], {"z": _x((3,), seed=2)}), jit=False)
    # A pytree output with a None leaf and a namedtuple.
    compare(lambda t: Pair(t.a * 2, {"x": jnp.sin(t.b), "none": None}),
            Pair(_x((3,)), _x((3,), seed=1)), modes="vjp jvp")


def test_half_precision_parts():
    def mixed(x):
        h = jnp.tanh(x.astype(jnp.bfloat16) @ x.astype(jnp.bfloat16).T).astype(jnp.float32)
        return jnp.sum(h) + jnp.sum((x.astype(jnp.float16) * 2).astype(jnp.float32) ** 2)
    compare(mixed, _x(dtype=F32), tol_scale=100)
    for dtype in (jnp.bfloat16, jnp.float16):
        x = _x(dtype=dtype, low=-1, high=1)
        compare(lambda x: jnp.sum(jax.nn.softmax(x) * jnp.arange(4)).astype(jnp.float32), x,
                modes="grad jvp")
        compare(lambda x: jnp.sum(lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 1),
                                                    "VALID") * 1.5).astype(jnp.float32), x,
                modes="grad jvp")


def test_stop_gradient_and_random_dropout():
    def loss(x, key):
        keep = jax.random.bernoulli(key, 0.7, x.shape)
        noise = jax.random.normal(jax.random.split(key)[1], x.shape, x.dtype) * 0.1
        dropped = jnp.where(keep, x / 0.7, 0.0) + noise
        return jnp.sum(jnp.sin(dropped) * lax.stop_gradient(x)) + jnp.sum(
            jnp.exp(x - lax.stop_gradient(jnp.max(x))))
    compare(loss, _x(), jax.random.key(1))


def test_integer_arguments_mixed_in():
    f = lambda x, n, i: jnp.sum(x ** 2 * n) + x[i, 0]  # noqa: E731
    compare(f, _x(), 3, np.int32(1))
    g = lambda x, n: jnp.sum(x ** 2 * n)  # noqa: E731
    ours = fb.grad(g, argnums=(0, 1), allow_int=True)(_x(), np.arange(4))
    theirs = jax.grad(g, argnums=(0, 1), allow_int=True)(_x(), np.arange(4))
    assert_trees_match(ours, theirs, 1e-12, 1e-12)


def test_vmap_inside_and_outside():
    w, xs = _x((4, 2)), _x((6, 3, 4), seed=1)
    g = lambda w, x: jnp.sum(jnp.tanh(x @ w))  # noqa: E731
    # Per-example gradients (vmap of grad), and vmap inside the differentiated function.
    want = jax.jit(jax.vmap(jax.grad(g), (None, 0)))(w, xs)
    assert_trees_match(jax.jit(jax.vmap(fb.grad(g), (None, 0)))(w, xs), want, 1e-12, 1e-12)
    compare({"in_axes_0": lambda w: jnp.sum(jax.vmap(lambda x: g(w, x))(xs) ** 2),
             "in_axes_1_out_axes_2": lambda w: jnp.sum(
                 jax.vmap(lambda a, b: a @ b, (1, None), 2)(xs, w) ** 2)}, w)
    ys = _x((3, 2), seed=2)
    assert_trees_match(
        jax.jit(jax.vmap(fb.hessian(lambda y: jnp.sum(jnp.sin(y) ** 3))))(ys),
        jax.jit(jax.vmap(jax.hessian(lambda y: jnp.sum(jnp.sin(y) ** 3))))(ys), 1e-12, 1e-12)


@functools.partial(jax.jit, static_argnums=(1,))
def _repeated_sin(x, n):
    for _ in range(n):
        x = jnp.sin(x) * 1.1
    return x


@functools.partial(jax.jit, static_argnames=("mode",))
def _cos_or_exp(x, mode="cos"):
    return jnp.cos(x) if mode == "cos" else jnp.exp(x)


def test_nested_jit_with_static_arguments():
    f = lambda x: jnp.sum(_repeated_sin(x, 3) * _cos_or_exp(x, mode="exp")  # noqa: E731
                          + _cos_or_exp(_repeated_sin(x, 2)))
    compare(f, _x(), hessian=True)


_SCALAR_FUNCS = {
    "sin": jnp.sin, "sum": jnp.sum, "max": jnp.max, "prod": jnp.prod, "cumsum": jnp.cumsum,
    "logsumexp": jax.nn.logsumexp, "norm": jnp.linalg.norm, "var": jnp.var,
    "clip": lambda x: jnp.clip(x, 0, 1), "outer": lambda x: jnp.outer(x, x),
}


def test_zero_dimensional():
    compare(_sum_sin_all(_SCALAR_FUNCS), np.float64(0.7))


_EMPTY_FUNCS = {
    "sum_mean": lambda x: jnp.sum(x, 0) + jnp.mean(x, 1).sum(),
    "prod": lambda x: jnp.prod(x, 0),
    "sort_cumsum": lambda x: jnp.sort(x, 0) + jnp.cumsum(x, 0) + lax.cummax(x, 0),
    "matmul": lambda x: x.T @ x,
    "softmax_logsumexp": lambda x: jax.nn.softmax(x).sum(0) + jax.nn.logsumexp(x, 0),
    "concat_pad_take": lambda x: jnp.sum(jnp.concatenate([x, jnp.ones((1, 3))]))
    + jnp.sum(jnp.pad(x, 1)) + jnp.sum(x[jnp.array([], int)]),
    "einsum_var": lambda x: jnp.einsum("ij,ik->jk", x, x) + jnp.var(x, 0),
}


def test_empty_arrays():
    compare({name: lambda x, g=g: jnp.sum(jnp.sin(g(x))) + 1.0
             for name, g in _EMPTY_FUNCS.items()}, np.zeros((0, 3)), modes="grad jvp vjp")


# --------------------------------------------------------- large and small values
_EXTREMES = np.array([-1e30, -800.0, -100.0, -30.0, -1e-30, 0.0, 1e-30, 1e-8, 30.0, 100.0,
                      800.0, 1e30, np.inf, -np.inf])
_OVERFLOW_FUNCS = {
    "exp": jnp.exp, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "gelu": jax.nn.gelu,
    "silu": jax.nn.silu, "log_softmax": jax.nn.log_softmax, "logsumexp": jax.nn.logsumexp,
    "cosh": jnp.cosh, "pow_abs": lambda x: jnp.abs(x) ** 2.5, "asinh": jnp.arcsinh,
    "hypot": lambda x: jnp.hypot(x, x[::-1]), "std": jnp.std,
    "l2_normalize": lambda x: x / jnp.linalg.norm(x), "log_abs": lambda x: jnp.log(jnp.abs(x)),
    "prod": jnp.prod,
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_extreme_values(dtype):
    """Where JAX's derivative is finite ours is the same number; inf/nan only where JAX's is."""
    x = _EXTREMES.astype(dtype)
    t = np.ones_like(x)

    def program_of(grad, jvp):
        def program(x):
            out = {}
            for name, g in _OVERFLOW_FUNCS.items():
                f = lambda x, g=g: jnp.sum(g(x))  # noqa: E731
                out[name] = (grad(f)(x), jvp(f, (x,), (t,))[1])
            return out
        return jax.jit(program)

    ours, theirs = program_of(fb.grad, fb.jvp)(x), program_of(jax.grad, jax.jvp)(x)
    for name in _OVERFLOW_FUNCS:
        for a, b in zip(ours[name], theirs[name]):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
            finite = np.isfinite(b)
            # Sums of values near 1e30 lose everything below their ulp: compare loosely.
            np.testing.assert_allclose(a[finite], b[finite], atol=1e-30, err_msg=name,
                                       rtol=1e-5 if dtype == F64 else 1e-3)


# ------------------------------------------------------- hypothesis: indexing
@settings(max_examples=5, deadline=None)
@given(st.data())
def test_random_indexing_updates(data):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    n_indexed = data.draw(st.integers(1, len(shape)))
    count = data.draw(st.integers(1, 4))
    index = tuple(np.array(data.draw(st.lists(st.integers(-d, d - 1), min_size=count,
                                              max_size=count)), np.int32)
                  for d in shape[:n_indexed])
    op = data.draw(st.sampled_from(["get", "set", "add", "min", "max"]))
    x = _x(shape, seed=3)
    if op == "get":
        f = lambda x: jnp.sin(x[index])  # noqa: E731
        compare(f, x, modes="vjp jvp")
    else:
        updates = _x(jax.eval_shape(lambda x: x[index], x).shape, seed=4)
        f = lambda x, u: jnp.sin(getattr(x.at[index], op)(u))  # noqa: E731
        compare(f, x, updates, argnums=(0, 1), modes="vjp jvp")


@settings(max_examples=5, deadline=None)
@given(st.data())
def test_random_slices_and_pads(data):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    index = tuple(slice(data.draw(st.integers(-d - 1, d + 1)),
                        data.draw(st.integers(-d - 1, d + 1)),
                        data.draw(st.sampled_from([1, 2, -1, -2]))) for d in shape)
    widths = tuple((data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
                   for _ in shape)
    mode = data.draw(st.sampled_from(["constant", "edge", "wrap", "reflect", "symmetric"]))
    x = _x(shape, seed=5)

    def f(x):
        y = x[index]
        if y.size == 0 or (mode in ("wrap", "reflect", "symmetric") and 0 in y.shape):
            return jnp.sin(y)
        return jnp.sin(jnp.pad(y, widths, mode=mode))
    compare(f, x, modes="vjp jvp")
