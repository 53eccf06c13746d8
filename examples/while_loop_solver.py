"""Training the parameters of an ODE integrated by an adaptive while-loop stepper.

The model is dy/dt = -k y + A sin(y), integrated from t = 0 to t = 2 by a
Heun-Euler pair with step-size control, written as a plain ``lax.while_loop``:
the number of steps depends on the parameters and on the initial state, so the
loop cannot be a ``lax.scan`` of fixed length, and ``jax.grad`` refuses it
("Reverse-mode differentiation does not work for lax.while_loop"). fbackprop
reverses it as written: the forward loop keeps 64 loop states, the backward loop
recomputes from the nearest one (memory flat in the number of steps).

The script checks fbackprop's gradient against JAX's (``jax.jacfwd``: forward
mode does go through while loops), eagerly and under ``jax.jit``, with
``jax.vmap`` over a batch of initial states that each take a different number
of steps, then fits ``k`` and ``A`` to observed final states with Adam.

Run: python examples/while_loop_solver.py [--steps N]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fbackprop as fb

T1, RTOL, ATOL = 2.0, 1e-3, 1e-5


def integrate(params, y0, loop=lax.while_loop):
    """y(T1) for dy/dt = -k y + A sin(y), adaptive Heun-Euler steps; ``loop`` is
    the while loop (a stand-in replaces it for the reference)."""
    k, A = params["k"], params["A"]

    def f(y):
        return -k * y + A @ jnp.sin(y)

    def step(state):
        t, y, dt, n = state
        dt = jnp.minimum(dt, T1 - t)
        k1 = f(y)
        k2 = f(y + dt * k1)
        y_new = y + dt * (k1 + k2) / 2
        err = jnp.max(jnp.abs(dt * (k2 - k1) / 2) / (ATOL + RTOL * jnp.abs(y_new)))
        accept = err <= 1.0
        grow = jnp.clip(0.9 * lax.rsqrt(jnp.maximum(err, 1e-12)), 0.2, 5.0)
        return (jnp.where(accept, t + dt, t), jnp.where(accept, y_new, y), dt * grow, n + 1)

    zero = jnp.zeros((), y0.dtype)
    _, y, _, n = loop(lambda s: s[0] < T1, step, (zero, y0, zero + 0.01, jnp.int32(0)))
    return y, n


def loss(params, y0s, targets, loop=lax.while_loop):
    ys, _ = jax.vmap(lambda y0: integrate(params, y0, loop))(y0s)
    return jnp.mean(jnp.sum((ys - targets) ** 2, axis=-1))


def reference_grad(params, y0s, targets):
    """JAX's own derivative of the same loss: forward mode goes through while
    loops, and the Jacobian of a scalar loss (10 parameters: 10 tangent
    directions) is its gradient."""
    return jax.jacfwd(loss)(params, y0s, targets)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="Adam steps")
    args = parser.parse_args()
    t_start = time.perf_counter()

    true = {"k": jnp.array(0.8), "A": jnp.array([[0.0, 1.5, 0.0], [-1.5, 0.0, 0.5],
                                                  [0.0, -0.5, 0.0]])}
    y0s = jax.random.uniform(jax.random.key(0), (8, 3), minval=-2.0, maxval=2.0)
    targets = jax.vmap(lambda y0: integrate(true, y0)[0])(y0s)
    params = {"k": jnp.array(0.3), "A": 0.2 * jax.random.normal(jax.random.key(1), (3, 3))}

    # fbackprop's gradient against the reference, eagerly and under jax.jit.
    ref = reference_grad(params, y0s, targets)
    _, counts = jax.vmap(lambda y0: integrate(params, y0))(y0s)
    eager = fb.grad(loss)(params, y0s, targets)
    jitted = jax.jit(fb.grad(loss))(params, y0s, targets)
    err = max(max_diff(eager, ref), max_diff(jitted, ref))
    print(f"solver steps per initial state: {np.asarray(counts).tolist()}")
    print(f"max |fb.grad - reference| = {err:.2e} (eager and jit, "
          f"gradient scale {max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref)):.2f})")
    assert err < 1e-4, err

    # Fit k and A to the observed final states.
    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def train_step(params, state):
        value, grads = fb.value_and_grad(loss)(params, y0s, targets)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    first = None
    for i in range(args.steps):
        params, state, value = train_step(params, state)
        first = float(value) if first is None else first
        if i % 20 == 0 or i == args.steps - 1:
            steps = jax.vmap(lambda y0: integrate(params, y0)[1])(y0s)
            print(f"step {i:3d}  loss {float(value):.5f}  solver steps "
                  f"{int(steps.min())}-{int(steps.max())}")
    final = float(loss(params, y0s, targets))
    print(f"k: {float(params['k']):.3f} (true {float(true['k']):.1f}); loss {first:.4f} -> "
          f"{final:.6f} in {time.perf_counter() - t_start:.0f} s")
    assert final < first / 20, (first, final)


if __name__ == "__main__":
    main()
