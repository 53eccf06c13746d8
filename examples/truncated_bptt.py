"""Truncated backpropagation through time: an RNN with lax.stop_gradient on its carry.

The task: a stream cut into episodes of 8 steps. At the first step of an episode
a cue (+1 or -1) comes in; the other inputs are 0. `DELAY` = 5 steps later the
RNN must output the cue (the loss counts only there, so chance level is a loss
of 1.0). The stream is cut into windows of `window` steps; the hidden state
flows from window to window (the forward pass is one long sequence), but
`lax.stop_gradient` on the carry at each window boundary stops the backward
sweep there. Inside a window, backprop runs through `lax.scan`.

What it shows:
  1. fbackprop's gradient of the truncated loss equals jax.grad's, and the
     gradient really stops: the loss of a window does not depend (in the
     gradient's eyes) on inputs of earlier windows.
  2. Truncation stops credit. With windows of 2 or 4 steps, shorter than the
     delay, a cue and its recall step are never in the same window, so
     every window that holds a recall step has only zero inputs before
     it. The gradient of the input weights, sum_t x_t * dloss/dpre_t, is then
     exactly zero. The input weights start at zero, so they stay exactly zero:
     the state never learns anything about the cues and the loss stays at
     chance. This holds by construction, for every seed and every number
     of steps. Windows of 8 and 16 steps hold whole episodes and learn the task.
  3. Truncation does not stop information. Start the input weights at random
     values instead. The random recurrent state then already carries the cue
     for 5 steps (as in an echo-state network), and learning to read it out
     needs no gradient through time: windows of 2 steps learn the task too.
  4. The residuals kept for the backward sweep, from `fb.saved_residuals`.

Run: python examples/truncated_bptt.py [--quick] [--seed N]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fbackprop as fb

DELAY = 5          # the cue must be recalled this many steps after it came in
EPISODE = 8        # one cue per episode; windows of 8 and 16 hold whole episodes
HIDDEN = 32
BATCH = 32         # streams trained side by side
CHUNK = 64         # steps per training update (8 episodes), carried across updates


def init(key, input_scale):
    """RNN parameters; `input_scale` 0 means the state starts knowing nothing of the cues."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {"wh": jax.random.normal(k1, (HIDDEN, HIDDEN)) * (0.9 / np.sqrt(HIDDEN)),
            "wx": jax.random.normal(k2, (1, HIDDEN)) * input_scale,
            "b": jnp.zeros(HIDDEN),
            "wo": jax.random.normal(k3, (HIDDEN, 1)) / np.sqrt(HIDDEN),
            "c": jnp.zeros(1)}


def stream(key, length):
    """Inputs, targets (batch, length, 1) and the 0/1 mask of recall steps (length,)."""
    cues = jax.random.choice(key, jnp.array([-1.0, 1.0]), (BATCH, length // EPISODE, 1))
    x = jnp.zeros((BATCH, length, 1)).at[:, ::EPISODE].set(cues)
    y = jnp.zeros((BATCH, length, 1)).at[:, DELAY::EPISODE].set(cues)
    mask = (jnp.arange(length) % EPISODE == DELAY).astype(jnp.float32)
    return x, y, mask


def rnn_step(params, h, x):
    h = jnp.tanh(h @ params["wh"] + x @ params["wx"] + params["b"])
    return h, h @ params["wo"] + params["c"]


def windowed_losses(params, h0, x, y, mask, window):
    """Per-step losses (windows, window) with backprop cut at window boundaries."""
    def step(h, xym):
        x, y, m = xym
        h, pred = rnn_step(params, h, x)
        return h, m * jnp.mean((pred - y) ** 2)

    def run_window(h, window_data):
        h = lax.stop_gradient(h)          # the cut: no gradient into earlier windows
        return lax.scan(step, h, window_data)

    n = x.shape[1] // window
    time_major = lambda a: jnp.swapaxes(a, 0, 1).reshape(n, window, BATCH, 1)  # noqa: E731
    chunks = (time_major(x), time_major(y), mask.reshape(n, window))
    return lax.scan(run_window, h0, chunks)


def truncated_loss(params, h0, x, y, mask, window):
    """Mean squared error at the recall steps, backprop truncated to `window` steps.

    Returns (loss, final hidden state); the final state seeds the next chunk.
    """
    h, losses = windowed_losses(params, h0, x, y, mask, window)
    return jnp.sum(losses) / jnp.sum(mask), h


def check_against_jax(params, data, window):
    h0 = jnp.zeros((BATCH, HIDDEN))
    grad_fb = jax.jit(fb.grad(truncated_loss, has_aux=True), static_argnums=5)
    grad_jax = jax.jit(jax.grad(truncated_loss, has_aux=True), static_argnums=5)
    (g1, _), (g2, _) = grad_fb(params, h0, *data, window), grad_jax(params, h0, *data, window)
    worst = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)))
    print(f"window {window:2d}: max |fbackprop - jax.grad| over parameter gradients = "
          f"{worst:.2e}")
    assert worst < 1e-5

    # The loss of the window that holds the last recall step, as a function of
    # all the inputs: its gradient is nonzero only inside that window.
    x, y, mask = data
    last = int(np.nonzero(np.asarray(mask))[0][-1]) // window

    def window_loss(x):
        _, losses = windowed_losses(params, h0, x, y, mask, window)
        return jnp.sum(losses[last])

    g = jnp.sum(jnp.abs(jax.jit(fb.grad(window_loss))(x)), axis=(0, 2))
    reached = np.nonzero(np.asarray(g) > 0)[0]
    print(f"           gradient of the loss of window {last} (steps {last * window}.."
          f"{last * window + window - 1}) reaches inputs {reached.min()}..{reached.max()}")
    assert reached.min() >= last * window and reached.max() < (last + 1) * window


def input_weight_gradient(params, data, window):
    """|d loss / d wx| at `params`: the credit that teaches the RNN to take in the cue."""
    grad_fn = jax.jit(fb.grad(truncated_loss, has_aux=True), static_argnums=5)
    g, _ = grad_fn(params, jnp.zeros((BATCH, HIDDEN)), *data, window)
    return float(jnp.max(jnp.abs(g["wx"])))


def train(window, steps, seed, input_scale):
    """Streams `steps` chunks through the RNN, carrying the state across chunks.

    Returns the mean loss of the last tenth of the updates and the final parameters.
    """
    tx = optax.adam(1e-2)
    params = init(jax.random.PRNGKey(seed), input_scale)
    opt_state = tx.init(params)
    grad_fn = fb.value_and_grad(truncated_loss, has_aux=True)

    @jax.jit
    def update(params, opt_state, h, key):
        x, y, mask = stream(key, CHUNK)
        (loss, h), grads = grad_fn(params, h, x, y, mask, window)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, h, loss

    h = jnp.zeros((BATCH, HIDDEN))
    losses = []
    for key in jax.random.split(jax.random.PRNGKey(seed + 1), steps):
        params, opt_state, h, loss = update(params, opt_state, h, key)
        losses.append(float(loss))
    return float(np.mean(losses[-max(steps // 10, 1):])), params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    steps = 40 if args.quick else 100

    params = init(jax.random.PRNGKey(args.seed), input_scale=1.0)
    data = stream(jax.random.PRNGKey(args.seed + 1), CHUNK)
    for window in (2, 8):
        check_against_jax(params, data, window)

    print("\nresiduals kept for the backward sweep (64 steps, windows of 8):")
    print(fb.saved_residuals(lambda p: truncated_loss(p, jnp.zeros((BATCH, HIDDEN)), *data,
                                                      8)[0], params))

    print(f"\nlearning to recall a cue {DELAY} steps later ({steps} chunks of {CHUNK} steps "
          f"x {BATCH} streams; chance level: loss 1.0)")
    print("input weights start at 0:")
    zero_in = init(jax.random.PRNGKey(args.seed), input_scale=0.0)
    final = {}
    for window in (2, 4, 8, 16):
        credit = input_weight_gradient(zero_in, data, window)
        final[window], trained = train(window, steps, args.seed, input_scale=0.0)
        wx = float(jnp.max(jnp.abs(trained["wx"])))
        print(f"  truncation window {window:2d}: |dloss/d wx| at the start {credit:.1e}, "
              f"final loss {final[window]:.3f}, max |wx| after training {wx:.3f}")
        if window < DELAY:    # no credit ever reaches the input weights
            assert credit == 0.0 and wx == 0.0, (window, credit, wx)
            assert final[window] > 0.9, final
        else:
            assert credit > 0.0 and final[window] < 0.05, final
    print(f"windows shorter than the delay give the input weights exactly zero gradient: "
          f"the cue never gets into the state, the loss stays at chance.")

    loss_random, _ = train(2, steps, args.seed, input_scale=1.0)
    print(f"\ninput weights start random: truncation window  2: final loss {loss_random:.3f}")
    assert loss_random < 0.05, loss_random
    print("the random state already carries the cue for 5 steps, and reading it out needs "
          "no gradient through time: truncation stops credit, not information.")


if __name__ == "__main__":
    main()
