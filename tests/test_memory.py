"""The memory of backprop, measured: compiled temp bytes of fbackprop vs jax.grad.

``jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes`` is
deterministic for one JAX/XLA version, so these are exact comparisons, not
timings. Layers are stacked and run by ``lax.scan`` (the standard way to build
deep nets in JAX): there forward and backward are separate loops, so what a
checkpoint does not keep is really not kept. (In one straight-line program
XLA:CPU removes the optimization barrier before CSE and merges recomputation
back, for JAX as for us; test_remat.py checks remat at the jaxpr level.)

The tests use moderate sizes; ``python tests/test_memory.py`` prints the
full-size table (64-layer residual MLP, 4-block transformer with sequence 256
and width 256, RNN over 1000 steps) and the jitted step-time ratio of the
checkpointed transformer.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import fbackprop as fb

P = jax.checkpoint_policies
POLICIES = {
    "nothing_saveable": P.nothing_saveable,
    "everything_saveable": P.everything_saveable,
    "dots_saveable": P.dots_saveable,
    "dots_with_no_batch_dims_saveable": P.dots_with_no_batch_dims_saveable,
    "save_only_these_names": P.save_only_these_names("hidden"),
    "save_any_names_but_these": P.save_any_names_but_these("hidden"),
}


def temp_bytes(fun, *args) -> int:
    """Compiled temp bytes of ``jax.jit(fun)(*args)``."""
    return jax.jit(fun).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


# --------------------------------------------------------------- workloads
def mlp_stack(layers, width, hidden, batch, seed=0):
    """Residual MLP blocks stacked on a leading axis: (params, x)."""
    rng = np.random.default_rng(seed)
    params = {"w1": _normal(rng, layers, width, hidden, scale=width ** -0.5),
              "b1": jnp.zeros((layers, hidden), jnp.float32),
              "w2": _normal(rng, layers, hidden, width, scale=hidden ** -0.5),
              "b2": jnp.zeros((layers, width), jnp.float32)}
    return params, _normal(rng, batch, width)


def _named(x, named):
    return checkpoint_name(x, "hidden") if named else x


def mlp_block(x, p, named=False):
    h = _named(jnp.tanh(x @ p["w1"] + p["b1"]), named)
    return x + h @ p["w2"] + p["b2"]


def transformer_stack(blocks, seq, width, batch=1, seed=0):
    """Pre-norm causal transformer blocks stacked on a leading axis: (params, x)."""
    rng = np.random.default_rng(seed)
    params = {"wqkv": _normal(rng, blocks, width, 3 * width, scale=width ** -0.5),
              "wo": _normal(rng, blocks, width, width, scale=width ** -0.5),
              "w1": _normal(rng, blocks, width, 4 * width, scale=width ** -0.5),
              "w2": _normal(rng, blocks, 4 * width, width, scale=(4 * width) ** -0.5),
              "g1": jnp.ones((blocks, width), jnp.float32),
              "g2": jnp.ones((blocks, width), jnp.float32)}
    return params, _normal(rng, batch, seq, width)


def _layer_norm(x, gain):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * gain


def transformer_block(x, p, named=False, heads=4):
    seq, width = x.shape[-2:]

    def split_heads(t):
        return t.reshape(*t.shape[:-1], heads, width // heads).swapaxes(-2, -3)

    q, k, v = map(split_heads, jnp.split(_layer_norm(x, p["g1"]) @ p["wqkv"], 3, axis=-1))
    scores = q @ k.swapaxes(-1, -2) / float(np.sqrt(width // heads))
    scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -1e9)
    attended = (jax.nn.softmax(scores, axis=-1) @ v).swapaxes(-2, -3).reshape(x.shape)
    x = x + attended @ p["wo"]
    h = _named(jax.nn.gelu(_layer_norm(x, p["g2"]) @ p["w1"]), named)
    return x + h @ p["w2"]


def scanned_loss(block, policy=None, checkpointed=False, named=False):
    """mean(y^2) of the blocks run by lax.scan, the body checkpointed or not
    (``named``: the hidden activation is marked with ``checkpoint_name``)."""
    def body(x, p):
        return block(x, p, named), None
    if checkpointed:
        body = jax.checkpoint(body, policy=policy)

    def loss(params, x):
        y, _ = lax.scan(body, x, params)
        return jnp.mean(y ** 2)
    return loss


def rnn(steps, hidden, inputs, batch, seed=0):
    rng = np.random.default_rng(seed)
    params = {"wh": _normal(rng, hidden, hidden, scale=hidden ** -0.5),
              "wx": _normal(rng, inputs, hidden, scale=inputs ** -0.5),
              "b": jnp.zeros(hidden, jnp.float32)}
    return params, _normal(rng, steps, batch, inputs), jnp.zeros((batch, hidden), jnp.float32)


def rnn_loss(checkpointed):
    def loss(p, xs, h0):
        def cell(h, x):
            return jnp.tanh(h @ p["wh"] + x @ p["wx"] + p["b"]), None
        if checkpointed:
            cell = jax.checkpoint(cell)
        h, _ = lax.scan(cell, h0, xs)
        return jnp.sum(h ** 2)
    return loss


def memory_table(block, params, x):
    """{case: (fb temp bytes, jax temp bytes)} for plain and each policy."""
    cases = {"plain": scanned_loss(block)}
    cases.update({name: scanned_loss(block, policy, True, named="names" in name)
                  for name, policy in POLICIES.items()})
    return {name: (temp_bytes(fb.grad(loss), params, x), temp_bytes(jax.grad(loss), params, x))
            for name, loss in cases.items()}


# ------------------------------------------------------------------- tests
def _assert_table(table, *, saving):
    for name, (ours, theirs) in table.items():
        assert ours <= theirs, f"{name}: fbackprop {ours} > jax {theirs} temp bytes"
    plain = table["plain"][0]
    for name in ("nothing_saveable", "save_any_names_but_these"):
        assert table[name][0] * saving < plain, (name, table[name][0], plain)
    # saving nothing is the floor; saving everything is the plain program
    assert all(table["nothing_saveable"][0] <= ours for ours, _ in table.values())
    assert table["everything_saveable"][0] == plain


def test_scan_over_stacked_mlp_layers():
    params, x = mlp_stack(layers=16, width=32, hidden=128, batch=256)
    _assert_table(memory_table(mlp_block, params, x), saving=3)


def test_scan_over_transformer_blocks():
    params, x = transformer_stack(blocks=4, seq=64, width=64)
    _assert_table(memory_table(transformer_block, params, x), saving=2)


def test_checkpointed_workloads_have_jax_gradients():
    for block, (params, x) in [(mlp_block, mlp_stack(4, 16, 32, 8)),
                               (transformer_block, transformer_stack(2, 16, 16))]:
        for policy in (None, P.dots_saveable, P.save_only_these_names("hidden")):
            loss = scanned_loss(block, policy, True, named=True)
            ours = jax.jit(fb.grad(loss))(params, x)
            theirs = jax.jit(jax.grad(loss))(params, x)
            for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
                np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_checkpointed_rnn_memory_grows_linearly_and_no_faster_than_jax():
    sizes = (100, 200, 300)
    ours, theirs = [], []
    for steps in sizes:
        params, xs, h0 = rnn(steps, hidden=64, inputs=16, batch=8)
        loss = rnn_loss(checkpointed=True)
        ours.append(temp_bytes(fb.grad(loss), params, xs, h0))
        theirs.append(temp_bytes(jax.grad(loss), params, xs, h0))
    per_step = np.diff(ours) / np.diff(sizes)
    assert per_step[0] == per_step[1], ours            # exactly linear
    assert per_step[0] <= (np.diff(theirs) / np.diff(sizes))[0]
    # a checkpointed step keeps its input state only: batch x hidden floats
    assert per_step[0] == 8 * 64 * 4
    plain = rnn_loss(checkpointed=False)
    params, xs, h0 = rnn(sizes[-1], hidden=64, inputs=16, batch=8)
    assert temp_bytes(fb.grad(plain), params, xs, h0) > ours[-1]


def test_scan_over_relu_layers_keeps_masks_not_inputs():
    # ReLU's backward needs only x > 0: a boolean per element is kept per step
    def loss(ws, x):
        y, _ = lax.scan(lambda x, w: (jax.nn.relu(x @ w), None), x, ws)
        return jnp.sum(y ** 2)

    ws, x = jnp.ones((8, 64, 64)) * 0.01, jnp.ones((32, 64))
    assert temp_bytes(fb.grad(loss), ws, x) <= temp_bytes(jax.grad(loss), ws, x)
    masks = [r for r in fb.saved_residuals(loss, ws, x) if r.dtype == np.dtype(bool)]
    assert len(masks) == 1 and masks[0].shape == (8, 32, 64)


# ------------------------------------------------------ full-size figures
def _step_time_ratio(loss, params, x, repeats=30):
    """Median jitted step time of fb.grad over jax.grad, interleaved."""
    ours, theirs = jax.jit(fb.grad(loss)), jax.jit(jax.grad(loss))
    for f in (ours, theirs):
        jax.block_until_ready(f(params, x))
    times = {ours: [], theirs: []}
    for _ in range(repeats):
        for f in (ours, theirs):
            start = time.perf_counter()
            jax.block_until_ready(f(params, x))
            times[f].append(time.perf_counter() - start)
    return np.median(times[ours]) / np.median(times[theirs])


def _print_table(title, table):
    print(f"\n{title}\n{'case':36s} {'fbackprop MB':>13s} {'jax.grad MB':>12s} {'fb/jax':>7s}")
    for name, (ours, theirs) in table.items():
        print(f"{name:36s} {ours / 1e6:13.2f} {theirs / 1e6:12.2f} {ours / theirs:7.3f}")


def main():  # pragma: no cover - prints the full-size figures
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; compiled temp bytes")
    params, x = mlp_stack(layers=64, width=64, hidden=256, batch=1024)
    _print_table("64-layer residual MLP (width 64, hidden 256, batch 1024), scan over layers",
                 memory_table(mlp_block, params, x))
    params, x = transformer_stack(blocks=4, seq=256, width=256)
    _print_table("4-block transformer (seq 256, width 256, 4 heads), scan over blocks",
                 memory_table(transformer_block, params, x))
    print("\nscan RNN (hidden 256, inputs 64, batch 32), checkpointed cell")
    print(f"{'steps':>6s} {'fbackprop MB':>13s} {'jax.grad MB':>12s}")
    rows = []
    for steps in (250, 500, 1000):
        p, xs, h0 = rnn(steps, hidden=256, inputs=64, batch=32)
        loss = rnn_loss(True)
        rows.append((steps, temp_bytes(fb.grad(loss), p, xs, h0),
                     temp_bytes(jax.grad(loss), p, xs, h0)))
        print(f"{steps:6d} {rows[-1][1] / 1e6:13.2f} {rows[-1][2] / 1e6:12.2f}")
    (s0, o0, t0), (s1, o1, t1) = rows[0], rows[-1]
    print(f"per step: fbackprop {(o1 - o0) / (s1 - s0):.0f} B, jax {(t1 - t0) / (s1 - s0):.0f} B")
    loss = scanned_loss(transformer_block, None, True)
    print(f"\ncheckpointed transformer, jitted step time fb/jax: "
          f"{_step_time_ratio(loss, params, x):.3f}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
