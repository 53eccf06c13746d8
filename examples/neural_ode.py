"""A neural ODE (diffrax) behind an implicit layer (optimistix), trained on fbackprop gradients.

The data is a damped spiral, dy/dt = A y, observed at 40 times. The model:

    z0  = the root of  z - tanh(W z + U y_obs(0) + c)       (an implicit layer: optimistix Newton)
    z(t) solves  dz/dt = MLP(z)  from z0                    (a neural ODE: diffrax Tsit5)
    loss = mean |z(t_i) - y_obs(t_i)|^2

Both libraries bind primitives of their own (lineax's ``linear_solve`` in the
implicit function theorem of the root find, Equinox's helpers inside diffrax);
fbackprop differentiates them with the libraries' own JVP rules, transposed by its
own backward sweep, and everything else with its own rules. The script checks
that fbackprop's gradient equals ``jax.grad``'s (eagerly and under ``jax.jit``)
before and after training, then trains with optax's Adam on ``fb.value_and_grad``.

Run: python examples/neural_ode.py [--steps N] [--quick]
"""

import argparse
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx

import fbackprop as fb

TS = jnp.linspace(0.0, 4.0, 40)
A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])


def _solve(vector_field, y0, args):
    term = diffrax.ODETerm(vector_field)
    sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), TS[0], TS[-1], 0.05, y0, args=args,
                              saveat=diffrax.SaveAt(ts=TS),
                              stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-6),
                              max_steps=512)
    return sol.ys


def make_data():
    ys = _solve(lambda t, y, a: a @ y, jnp.array([2.0, 0.0]), A)
    noise = 0.02 * jax.random.normal(jax.random.key(0), ys.shape)
    return ys + noise


def init_params(key, width=32):
    k = jax.random.split(key, 5)
    return {
        "implicit": {"W": 0.3 * jax.random.normal(k[0], (2, 2)),
                     "U": jax.random.normal(k[1], (2, 2)) / 2, "c": jnp.zeros(2)},
        "ode": {"w1": jax.random.normal(k[2], (2, width)) / np.sqrt(2), "b1": jnp.zeros(width),
                "w2": jax.random.normal(k[3], (width, 2)) / np.sqrt(width) / 4,
                "b2": jnp.zeros(2)},
        "scale": jnp.array(2.0),
    }


def implicit_layer(p, x):
    """The root of z - tanh(W z + U x + c): differentiated by the implicit function theorem."""
    residual = lambda z, args: z - jnp.tanh(args["W"] @ z + args["U"] @ x + args["c"])
    sol = optx.root_find(residual, optx.Newton(rtol=1e-6, atol=1e-6), jnp.zeros(2), args=p)
    return sol.value


def vector_field(t, z, p):
    return jnp.tanh(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss(params, ys):
    z0 = params["scale"] * implicit_layer(params["implicit"], ys[0])
    zs = _solve(vector_field, z0, params["ode"])
    return jnp.mean((zs - ys) ** 2)


def max_difference(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_against_jax(params, ys, label):
    reference = jax.grad(loss)(params, ys)
    eager = fb.grad(loss)(params, ys)
    jitted = jax.jit(fb.grad(loss))(params, ys)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(reference))
    d_eager, d_jit = max_difference(eager, reference), max_difference(jitted, reference)
    print(f"{label}: max |fb.grad - jax.grad| = {d_eager:.2e} eager, {d_jit:.2e} under jit "
          f"(largest gradient entry {scale:.3g})")
    assert d_eager <= 1e-4 * scale and d_jit <= 1e-4 * scale, "fbackprop disagrees with JAX"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--quick", action="store_true", help="60 steps")
    args = parser.parse_args()
    steps = 60 if args.quick else args.steps
    if steps < 1:
        parser.error("--steps must be at least 1")

    ys = make_data()
    params = init_params(jax.random.key(1))
    check_against_jax(params, ys, "initial parameters")

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        value, grads = fb.value_and_grad(loss)(params, ys)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    start = time.perf_counter()
    first = None
    for i in range(steps):
        params, opt_state, value = step(params, opt_state)
        first = float(value) if first is None else first
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(value):.4f}")
    final = float(loss(params, ys))
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s: loss {first:.4f} -> "
          f"{final:.4f}")
    check_against_jax(params, ys, "trained parameters")
    target = 0.5 if args.quick else 0.2
    assert final < target * first, f"the loss fell only from {first:.4f} to {final:.4f}"
    print(f"the loss fell by more than {1 / target:.0f}x; gradients agree with JAX")


if __name__ == "__main__":
    main()
