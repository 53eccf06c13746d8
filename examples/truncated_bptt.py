"""Truncated backpropagation through time: an RNN with lax.stop_gradient on its carry.

A tanh RNN reads a stream of random +-1 bits and must output the bit it saw
`DELAY` steps earlier. The stream is cut into windows of `window` steps; the
hidden state flows from window to window (the forward pass is one long
sequence), but `lax.stop_gradient` on the carry at each window boundary stops
the backward sweep there. Inside a window, backprop runs through `lax.scan`.

What it shows:
  1. fbackprop's gradient of the truncated loss equals jax.grad's, and the
     gradient really stops: the loss of window k does not depend (in the
     gradient's eyes) on inputs of window k-1.
  2. Truncation length matters: with windows shorter than the delay the RNN
     does not learn the task (the credit never reaches the step that saw the
     bit); with longer windows it does.
  3. The residuals kept for the backward sweep, per window, from
     `fb.saved_residuals`.

Run: python examples/truncated_bptt.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fbackprop as fb

DELAY = 5
HIDDEN = 32


def init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    # a small recurrent matrix: at first the state holds no memory of past bits,
    # only training through enough steps can teach it to keep one
    return {"wh": jax.random.normal(k1, (HIDDEN, HIDDEN)) * (0.05 / np.sqrt(HIDDEN)),
            "wx": jax.random.normal(k2, (1, HIDDEN)),
            "b": jnp.zeros(HIDDEN),
            "wo": jax.random.normal(k3, (HIDDEN, 1)) / np.sqrt(HIDDEN)}


def stream(key, length):
    bits = jax.random.choice(key, jnp.array([-1.0, 1.0]), (length, 1))
    targets = jnp.concatenate([jnp.zeros((DELAY, 1)), bits[:-DELAY]])
    return bits, targets


def truncated_loss(params, h0, bits, targets, window):
    """Mean squared error over the stream, backprop truncated to `window` steps.

    Returns (loss, final hidden state); the final state seeds the next chunk.
    """
    def step(h, xy):
        x, y = xy
        h = jnp.tanh(h @ params["wh"] + x @ params["wx"] + params["b"])
        return h, jnp.sum((h @ params["wo"] - y) ** 2)

    def run_window(h, window_data):
        h = lax.stop_gradient(h)          # the cut: no gradient into earlier windows
        return lax.scan(step, h, window_data)

    chunks = (bits.reshape(-1, window, 1), targets.reshape(-1, window, 1))
    h, losses = lax.scan(run_window, h0, chunks)
    return jnp.mean(losses), h


def check_against_jax(params, bits, targets, window):
    h0 = jnp.zeros(HIDDEN)
    grad_fb = jax.jit(fb.grad(truncated_loss, has_aux=True), static_argnums=4)
    grad_jax = jax.jit(jax.grad(truncated_loss, has_aux=True), static_argnums=4)
    (g1, _), (g2, _) = grad_fb(params, h0, bits, targets, window), \
        grad_jax(params, h0, bits, targets, window)
    worst = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)))
    print(f"window {window:2d}: max |fbackprop - jax.grad| over parameter gradients = "
          f"{worst:.2e}")
    assert worst < 1e-5

    # The loss of the last window, as a function of all the inputs: its gradient
    # is nonzero only inside that window.
    def last_window_loss(bits):
        def step(h, xy):
            x, y = xy
            h = jnp.tanh(h @ params["wh"] + x @ params["wx"] + params["b"])
            return h, jnp.sum((h @ params["wo"] - y) ** 2)

        def run_window(h, data):
            return lax.scan(step, lax.stop_gradient(h), data)

        chunks = (bits.reshape(-1, window, 1), targets.reshape(-1, window, 1))
        _, losses = lax.scan(run_window, h0, chunks)
        return jnp.sum(losses[-1])

    g = fb.grad(last_window_loss)(bits)[:, 0]
    reached = np.nonzero(np.abs(np.asarray(g)) > 0)[0]
    print(f"           gradient of the last window's loss reaches inputs "
          f"{reached.min()}..{reached.max()} of {len(g)}")
    assert reached.min() >= len(g) - window


def train(window, steps, chunk=64, seed=0):
    """Streams `steps` chunks through the RNN, carrying the state across chunks."""
    tx = optax.adam(1e-2)
    params = init(jax.random.PRNGKey(seed))
    opt_state = tx.init(params)
    grad_fn = fb.value_and_grad(truncated_loss, has_aux=True)

    @jax.jit
    def update(params, opt_state, h, key):
        bits, targets = stream(key, chunk)
        (loss, h), grads = grad_fn(params, h, bits, targets, window)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, h, loss

    h = jnp.zeros(HIDDEN)
    losses = []
    for key in jax.random.split(jax.random.PRNGKey(seed + 1), steps):
        params, opt_state, h, loss = update(params, opt_state, h, key)
        losses.append(float(loss))
    return float(np.mean(losses[-max(steps // 10, 1):]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    steps = 300 if parser.parse_args().quick else 1000

    params = init(jax.random.PRNGKey(0))
    bits, targets = stream(jax.random.PRNGKey(1), 64)
    for window in (2, 8):
        check_against_jax(params, bits, targets, window)

    print("\nresiduals kept for the backward sweep (64 steps, windows of 8):")
    print(fb.saved_residuals(lambda p: truncated_loss(p, jnp.zeros(HIDDEN), bits, targets,
                                                      8)[0], params))

    print(f"\nlearning to echo the bit from {DELAY} steps ago ({steps} chunks of 64 steps; "
          f"chance level: loss 1.0)")
    final = {}
    for window in (2, 4, 8, 16):
        final[window] = train(window, steps)
        print(f"  truncation window {window:2d}: final loss {final[window]:.3f}")
    assert final[8] < 0.3 and final[16] < 0.3 and final[2] > 0.6 and final[4] > 0.6, final
    print("windows shorter than the delay do not learn it; longer windows do.")


if __name__ == "__main__":
    main()
