"""Multi-head self-attention and a pre-norm transformer block.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fbackprop import nn
  >>> p = nn.init_transformer_block(jax.random.key(0), d_model=32, num_heads=4)
  >>> x = jnp.ones((2, 5, 32))                         # (batch, sequence, features)
  >>> nn.transformer_block(p, x, num_heads=4, causal=True).shape
  (2, 5, 32)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from . import initializers
from .dense import dense, init_dense
from .norm import init_layer_norm, layer_norm


def init_attention(key, d_model: int, *, kernel_init: Callable = initializers.lecun_normal,
                   dtype=jnp.float32) -> dict:
    """Query/key/value/output projections of multi-head self-attention."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    return {name: init_dense(k, d_model, d_model, kernel_init=kernel_init, dtype=dtype)
            for name, k in zip(("query", "key", "value", "out"), (kq, kk, kv, ko))}


def attention(params: dict, x, *, num_heads: int, causal: bool = False, mask=None):
    """Multi-head scaled dot-product self-attention.

    Args:
      params: from :func:`init_attention`.
      x: array ``(batch, seq, d_model)``.
      num_heads: number of heads; must divide ``d_model``.
      causal: if true, position ``i`` attends only to positions ``<= i``.
      mask: optional boolean ``(batch or 1, 1 or heads, seq, seq)``; false entries
        are not attended to.

    Returns:
      Array ``(batch, seq, d_model)``.
    """
    batch, seq, d_model = x.shape
    if d_model % num_heads:
        raise ValueError(f"attention: d_model={d_model} is not divisible by "
                         f"num_heads={num_heads}.")
    head_dim = d_model // num_heads

    def heads(name):  # (batch, seq, d_model) -> (batch, heads, seq, head_dim)
        y = dense(params[name], x).reshape(batch, seq, num_heads, head_dim)
        return y.transpose(0, 2, 1, 3)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    if causal:
        allowed = jnp.tril(jnp.ones((seq, seq), dtype=bool))
        mask = allowed if mask is None else jnp.logical_and(mask, allowed)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
    out = out.transpose(0, 2, 1, 3).reshape(batch, seq, d_model)
    return dense(params["out"], out)


def init_transformer_block(key, d_model: int, num_heads: int, *, mlp_ratio: int = 4,
                           dtype=jnp.float32) -> dict:
    """Parameters of a pre-norm block: LN -> attention -> +x, LN -> MLP -> +x."""
    del num_heads  # heads split d_model at apply time; kept for a readable call site
    k_attn, k_up, k_down = jax.random.split(key, 3)
    return {
        "ln1": init_layer_norm(d_model, dtype=dtype),
        "attn": init_attention(k_attn, d_model, dtype=dtype),
        "ln2": init_layer_norm(d_model, dtype=dtype),
        "up": init_dense(k_up, d_model, mlp_ratio * d_model, dtype=dtype),
        "down": init_dense(k_down, mlp_ratio * d_model, d_model,
                           kernel_init=initializers.lecun_normal, dtype=dtype),
    }


def transformer_block(params: dict, x, *, num_heads: int, causal: bool = False, mask=None,
                      activation: Callable = jax.nn.gelu):
    """A pre-norm transformer block with residual connections.

    ``x + attn(LN(x))`` then ``h + MLP(LN(h))``: the residual paths carry the
    gradient straight through (d(x + f(x))/dx = 1 + f'(x)), which is what lets
    deep stacks train.

    Args:
      params: from :func:`init_transformer_block`.
      x: array ``(batch, seq, d_model)``.
      num_heads: attention heads.
      causal: causal self-attention mask.
      mask: optional extra attention mask (see :func:`attention`).
      activation: MLP nonlinearity.

    Returns:
      Array ``(batch, seq, d_model)``.
    """
    h = x + attention(params["attn"], layer_norm(params["ln1"], x), num_heads=num_heads,
                      causal=causal, mask=mask)
    y = activation(dense(params["up"], layer_norm(params["ln2"], h)))
    return h + dense(params["down"], y)
