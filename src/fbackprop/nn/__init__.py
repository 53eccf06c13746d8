"""Small neural-network building blocks as pure functions (init/apply pairs).

Every layer is a pair ``init_<layer>(key, ...) -> params`` and
``<layer>(params, x, ...) -> y`` over plain pytrees (dicts and lists), so a model
is an ordinary function that ``fbackprop.grad`` (or ``jax.grad``) differentiates.
They exist to make examples and benchmarks real, not to replace Flax or Equinox:
fbackprop differentiates those models' apply functions just the same.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fbackprop as fb
  >>> from fbackprop import nn
  >>> params = nn.init_mlp(jax.random.key(0), [4, 8, 3])
  >>> loss = lambda p, x, y: nn.softmax_cross_entropy(nn.mlp(p, x), y)
  >>> grads = fb.grad(loss)(params, jnp.ones((2, 4)), jnp.array([0, 2]))
  >>> grads[0]["w"].shape
  (4, 8)
"""

from . import initializers
from .attention import attention, init_attention, init_transformer_block, transformer_block
from .conv import avg_pool, conv2d, init_conv2d, max_pool
from .dense import dense, init_dense, init_mlp, mlp
from .dropout import dropout
from .losses import accuracy, binary_cross_entropy_with_logits, mse, softmax_cross_entropy
from .norm import init_layer_norm, layer_norm
from .recurrent import gru_cell, init_gru_cell, init_rnn_cell, rnn_cell, run_cell

__all__ = [
    "initializers",
    "init_dense", "dense", "init_mlp", "mlp",
    "init_layer_norm", "layer_norm",
    "init_attention", "attention", "init_transformer_block", "transformer_block",
    "init_conv2d", "conv2d", "max_pool", "avg_pool",
    "init_rnn_cell", "rnn_cell", "init_gru_cell", "gru_cell", "run_cell",
    "dropout",
    "softmax_cross_entropy", "mse", "binary_cross_entropy_with_logits", "accuracy",
]
