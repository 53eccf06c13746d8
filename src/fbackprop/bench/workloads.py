"""The benchmark workloads: models written the way a user writes them.

Every model is a plain pure function of a params pytree and a batch, in
``jax.numpy`` / ``jax.lax`` / ``jax.nn``, float32. Nothing here knows about
fbackprop or about JAX's autodiff: the harness differentiates the same function
with both and compares.

Each workload builds a :class:`Problem` for a size (``quick`` gives tiny shapes
so that the whole suite runs in seconds). ``Problem.make_loss`` returns a *new*
function object on every call, so that the trace-and-lower measurement sees a
function no cache has seen before (JAX and fbackprop both cache traces per
function object).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# How a workload's loss is differentiated (the harness builds the fb/jax pair):
#   "value_and_grad": step(params, batch) = value_and_grad(loss)(params, batch)
#   "per_example":    step(params, batch) = vmap(grad(loss), (None, 0))(params, batch)
#   "hvp":            step(params, tangent, batch) = Hessian of loss(., batch) times tangent
KINDS = ("value_and_grad", "per_example", "hvp")


@dataclasses.dataclass
class Problem:
    """One instance of a workload, ready to run.

    Attributes:
      make_loss: returns a fresh ``loss(params, batch) -> scalar`` function object
        (for ``per_example``: ``loss(params, example)`` on one example).
      args: the arguments of the step (``(params, batch)``, or
        ``(params, tangent, batch)`` for ``hvp``).
      sizes: a short human description of the shapes.
      kind: one of :data:`KINDS`.
      theory_grad_over_fwd: the expected gradient-step / forward-pass time ratio
        (about 3 for dense layers: backward is about twice the forward), or None.
    """
    make_loss: Callable[[], Callable]
    args: tuple
    sizes: str
    kind: str = "value_and_grad"
    theory_grad_over_fwd: float | None = 3.0


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    build: Callable[[bool], Problem]   # quick -> Problem


# ------------------------------------------------------------------ building blocks
# Data and parameters come from NumPy's generator: building a workload then
# compiles nothing (jax.random would compile a kernel per shape).
def _normal(key, shape, scale=1.0):
    return jnp.asarray(scale * key.standard_normal(shape), jnp.float32)


def _randint(key, shape, high):
    return jnp.asarray(key.integers(0, high, shape), jnp.int32)


def _dense_init(key, n_in, n_out):
    return {"w": _normal(key, (n_in, n_out), 1.0 / math.sqrt(n_in)),
            "b": jnp.zeros((n_out,), jnp.float32)}


def _norm_init(width):
    return {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}


def dense(p, x):
    return x @ p["w"] + p["b"]


def layer_norm(p, x, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy against integer labels, optionally smoothed."""
    n_classes = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = jax.nn.one_hot(labels, n_classes, dtype=logits.dtype)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / n_classes
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


def _keys(seed, n):
    """``n`` independent NumPy generators derived from ``seed``."""
    return [np.random.default_rng([seed, i]) for i in range(n)]


# ---------------------------------------------------------------------------- MLP
# The seeds' network: Linear(784, 512) - GELU - Linear(512, 512) - GELU - LayerNorm
# - Linear(512, 10), softmax cross-entropy with label smoothing 0.1.
def _mlp_sizes(quick):
    return (64, 32, 10, 16) if quick else (784, 512, 10, 256)


def _mlp_params(quick, seed=0):
    d_in, d_h, d_out, _ = _mlp_sizes(quick)
    k1, k2, k3 = _keys(seed, 3)
    return {"fc1": _dense_init(k1, d_in, d_h), "fc2": _dense_init(k2, d_h, d_h),
            "norm": _norm_init(d_h), "fc3": _dense_init(k3, d_h, d_out)}


def _mlp_batch(quick, batch_size=None, seed=1):
    d_in, _, d_out, batch = _mlp_sizes(quick)
    batch = batch_size or batch
    kx, ky = _keys(seed, 2)
    return _normal(kx, (batch, d_in)), _randint(ky, (batch,), d_out)


def make_mlp_loss():
    def mlp_loss(params, batch):
        x, labels = batch
        h = jax.nn.gelu(dense(params["fc1"], x))
        h = layer_norm(params["norm"], jax.nn.gelu(dense(params["fc2"], h)))
        return cross_entropy(dense(params["fc3"], h), labels, label_smoothing=0.1)
    return mlp_loss


def _build_mlp(quick):
    d_in, d_h, d_out, batch = _mlp_sizes(quick)
    return Problem(make_mlp_loss, (_mlp_params(quick), _mlp_batch(quick)),
                   f"{d_in}-{d_h}-{d_h}-{d_out}, batch {batch}")


def _build_mlp_hvp(quick):
    d_in, d_h, d_out, batch = _mlp_sizes(quick)
    params = _mlp_params(quick)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = _keys(7, len(leaves))
    tangent = jax.tree_util.tree_unflatten(
        tree, [_normal(k, x.shape) for k, x in zip(keys, leaves)])
    return Problem(make_mlp_loss, (params, tangent, _mlp_batch(quick)),
                   f"{d_in}-{d_h}-{d_h}-{d_out}, batch {batch}", kind="hvp",
                   theory_grad_over_fwd=None)


def make_mlp_example_loss():
    inner = make_mlp_loss()

    def mlp_example_loss(params, example):
        x, label = example
        return inner(params, (x[None], label[None]))
    return mlp_example_loss


def _build_per_example(quick):
    d_in, d_h, d_out, _ = _mlp_sizes(quick)
    # Per-example gradients hold one copy of the 670k parameters per example.
    batch = 8 if quick else 32
    # No ~3x theory here: the step writes one full gradient per example, so it is
    # bound by memory traffic, not by the forward pass's FLOPs.
    return Problem(make_mlp_example_loss, (_mlp_params(quick), _mlp_batch(quick, batch)),
                   f"{d_in}-{d_h}-{d_h}-{d_out}, {batch} examples", kind="per_example",
                   theory_grad_over_fwd=None)


# ---------------------------------------------------------------------------- CNN
def _cnn_sizes(quick):
    # batch, conv1 channels, conv2 channels, hidden
    return (8, 4, 8, 32) if quick else (64, 32, 64, 128)


def conv2d(p, x):
    y = lax.conv_general_dilated(x, p["w"], window_strides=(1, 1), padding="SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def max_pool_2x2(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def make_cnn_loss():
    def cnn_loss(params, batch):
        x, labels = batch
        h = max_pool_2x2(jax.nn.relu(conv2d(params["conv1"], x)))
        h = max_pool_2x2(jax.nn.relu(conv2d(params["conv2"], h)))
        h = h.reshape(h.shape[0], -1)
        h = jax.nn.relu(dense(params["fc1"], h))
        return cross_entropy(dense(params["fc2"], h), labels)
    return cnn_loss


def _build_cnn(quick):
    batch, c1, c2, hidden = _cnn_sizes(quick)
    k1, k2, k3, k4, kx, ky = _keys(2, 6)
    params = {
        "conv1": {"w": _normal(k1, (3, 3, 1, c1), 1.0 / 3.0),
                  "b": jnp.zeros((c1,), jnp.float32)},
        "conv2": {"w": _normal(k2, (3, 3, c1, c2), 1.0 / math.sqrt(9 * c1)),
                  "b": jnp.zeros((c2,), jnp.float32)},
        "fc1": _dense_init(k3, 7 * 7 * c2, hidden),
        "fc2": _dense_init(k4, hidden, 10),
    }
    batch_data = (_normal(kx, (batch, 28, 28, 1)), _randint(ky, (batch,), 10))
    return Problem(make_cnn_loss, (params, batch_data),
                   f"28x28x1, conv3x3 {c1}-{c2}, maxpool, dense {hidden}, batch {batch}")


# -------------------------------------------------------------------- transformer
def _transformer_sizes(quick):
    # seq, width, heads, blocks, vocab, batch
    return (16, 16, 4, 1, 32, 2) if quick else (256, 256, 4, 4, 512, 2)


def attention(p, x, n_heads):
    """Causal multi-head self-attention."""
    batch, seq, width = x.shape
    head_dim = width // n_heads
    q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
    q, k, v = (t.reshape(batch, seq, n_heads, head_dim) for t in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, width)
    return out @ p["out"]


def transformer_block(p, x, n_heads):
    """A pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""
    x = x + attention(p["attn"], layer_norm(p["ln1"], x), n_heads)
    h = jax.nn.gelu(dense(p["mlp_in"], layer_norm(p["ln2"], x)))
    return x + dense(p["mlp_out"], h)


def _make_transformer_loss(n_heads, checkpoint):
    def make():
        # A fresh block function too: jax.checkpoint caches its trace per
        # function object, which would make every later "first call" warm.
        def block(p, x, n_heads):
            return transformer_block(p, x, n_heads)
        if checkpoint:
            block = jax.checkpoint(block, static_argnums=(2,))

        def transformer_loss(params, tokens):
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            x = params["embed"][inputs] + params["pos"]
            for p in params["blocks"]:
                x = block(p, x, n_heads)
            logits = dense(params["unembed"], layer_norm(params["ln_f"], x))
            return cross_entropy(logits, targets)
        return transformer_loss
    return make


def _build_transformer(quick, checkpoint=False):
    seq, width, heads, n_blocks, vocab, batch = _transformer_sizes(quick)
    keys = iter(_keys(3, 4 * n_blocks + 4))

    def block_params():
        return {"ln1": _norm_init(width), "ln2": _norm_init(width),
                "attn": {"qkv": _normal(next(keys), (width, 3 * width), 1 / math.sqrt(width)),
                         "out": _normal(next(keys), (width, width), 1 / math.sqrt(width))},
                "mlp_in": _dense_init(next(keys), width, 4 * width),
                "mlp_out": _dense_init(next(keys), 4 * width, width)}

    params = {"embed": _normal(next(keys), (vocab, width), 0.02),
              "pos": _normal(next(keys), (seq, width), 0.02),
              "blocks": [block_params() for _ in range(n_blocks)],
              "ln_f": _norm_init(width),
              "unembed": _dense_init(next(keys), width, vocab)}
    tokens = _randint(next(keys), (batch, seq + 1), vocab)
    extra = ", jax.checkpoint per block" if checkpoint else ""
    return Problem(_make_transformer_loss(heads, checkpoint), (params, tokens),
                   f"{n_blocks} block{'s' if n_blocks > 1 else ''}, seq {seq}, width {width}, "
                   f"{heads} heads, "
                   f"vocab {vocab}, batch {batch}{extra}")


# ------------------------------------------------------------------------ scan RNN
def _rnn_sizes(quick):
    # steps, batch, input, hidden
    return (20, 4, 8, 16) if quick else (200, 32, 32, 128)


def make_rnn_loss():
    def rnn_loss(params, batch):
        xs, ys = batch                       # (T, B, in), (T, B, 1)

        def cell(h, x):
            h = jnp.tanh(x @ params["wx"] + h @ params["wh"] + params["b"])
            return h, h
        h0 = jnp.zeros((xs.shape[1], params["wh"].shape[0]), xs.dtype)
        _, hs = lax.scan(cell, h0, xs)
        return jnp.mean(jnp.square(dense(params["out"], hs) - ys))
    return rnn_loss


def _build_rnn(quick):
    steps, batch, n_in, hidden = _rnn_sizes(quick)
    k1, k2, k3, kx, ky = _keys(4, 5)
    params = {"wx": _normal(k1, (n_in, hidden), 1 / math.sqrt(n_in)),
              "wh": _normal(k2, (hidden, hidden), 1 / math.sqrt(hidden)),
              "b": jnp.zeros((hidden,), jnp.float32),
              "out": _dense_init(k3, hidden, 1)}
    data = (_normal(kx, (steps, batch, n_in)), _normal(ky, (steps, batch, 1)))
    return Problem(make_rnn_loss, (params, data),
                   f"T={steps}, batch {batch}, input {n_in}, hidden {hidden}")


# ---------------------------------------------------------------- deep narrow net
def _deep_sizes(quick):
    # depth, width, batch
    return (50, 16, 8) if quick else (1000, 16, 32)


def make_deep_loss():
    def deep_loss(params, batch):
        x, y = batch
        for p in params:
            x = jnp.tanh(dense(p, x))
        return jnp.mean(jnp.square(x - y))
    return deep_loss


def deep_args(depth, width, batch):
    """``(params, batch)`` of the deep narrow net (also ``bench --depth``'s)."""
    keys = _keys(5, depth + 2)
    params = [_dense_init(k, width, width) for k in keys[:depth]]
    data = (_normal(keys[-2], (batch, width)), _normal(keys[-1], (batch, width)))
    return params, data


def _build_deep(quick):
    depth, width, batch = _deep_sizes(quick)
    return Problem(make_deep_loss, deep_args(depth, width, batch),
                   f"{depth} tanh layers of width {width}, batch {batch}")


# ---------------------------------------------------------------------- the table
WORKLOADS: tuple[Workload, ...] = (
    Workload("mlp", "the seeds' MLP, GELU + LayerNorm, softmax cross-entropy", _build_mlp),
    Workload("cnn", "small CNN: conv + relu + max-pool twice, dense, cross-entropy",
             _build_cnn),
    Workload("transformer", "pre-norm causal transformer LM", _build_transformer),
    Workload("transformer_remat", "the transformer with jax.checkpoint per block",
             lambda quick: _build_transformer(quick, checkpoint=True)),
    Workload("rnn_scan", "tanh RNN over lax.scan, squared error on every step", _build_rnn),
    Workload("mlp_hvp", "Hessian-vector product of the MLP loss", _build_mlp_hvp),
    Workload("per_example", "per-example gradients of the MLP: vmap(grad(loss))",
             _build_per_example),
    Workload("deep_narrow", "deep narrow tanh net (tracing cost)", _build_deep),
)


def get(names: list[str] | None) -> list[Workload]:
    """The workloads with these names (all when ``names`` is empty), in table order.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if not names:
        return list(WORKLOADS)
    by_name = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(by_name)}.")
    return [w for w in WORKLOADS if w.name in names]
