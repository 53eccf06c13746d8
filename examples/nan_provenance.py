"""Where did the NaN in my gradient come from? fbackprop.checked_grad answers.

The bug: the Euclidean norm sqrt(sum(x**2)) is fine at x = 0 going forward (it is
0), but its gradient is NaN: sqrt's derivative 1/(2 sqrt(0)) is infinite, and
inf * 0 = NaN on the way back. checked_grad points at the sqrt's backward step
and the source line. A NaN that never reaches the result (the masked branch of
jnp.where(x > 0, jnp.log(x), 0.)) is not reported.

Run: python examples/nan_provenance.py
"""

import jax
import jax.numpy as jnp

import fbackprop as fb


def norm(v):
    return jnp.sqrt(jnp.sum(v ** 2))


def loss(params, x):
    pred = x @ params["w"]
    penalty = norm(params["w"] - params["w_ref"])     # zero when w == w_ref: NaN gradient
    return jnp.mean(pred ** 2) + 0.1 * penalty


def masked_log(x):
    return jnp.sum(jnp.where(x > 0, jnp.log(x), 0.0))


def safe_norm(v):
    sq = jnp.sum(v ** 2)
    safe = jnp.where(sq > 0, sq, 1.0)                 # never differentiate sqrt at 0
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def main():
    w = jnp.array([[0.5], [-1.0]])
    params = {"w": w, "w_ref": w}
    x = jnp.ones((4, 2))

    print("fb.grad gives:", fb.grad(loss)(params, x)["w"].ravel())

    # Eagerly, checked_grad raises with the report.
    try:
        fb.checked_grad(loss)(params, x)
    except fb.NonFiniteError as err:
        print("\n--- eager: NonFiniteError ---")
        print(err)
        assert err.site.primitive == "sqrt" and err.site.phase == "backward"

    # Under jax.jit the report is returned, like checkify's error value.
    report, grads = jax.jit(fb.checked_grad(loss))(params, x)
    print("\n--- under jax.jit: report.get() ---")
    print(report.get())
    site = report.first()
    assert site.primitive == "sqrt" and "norm" in site.source

    # A masked NaN (x < 0 in the log branch) does not reach the gradient: no report.
    report, g = fb.checked_grad(masked_log)(jnp.array([-1.0, 2.0]))
    print("\nmasked log: ok =", report.ok, "gradient", g)
    assert report.ok

    # The fix.
    fixed = lambda p, x: jnp.mean((x @ p["w"]) ** 2) + 0.1 * safe_norm(p["w"] - p["w_ref"])
    report, grads = fb.checked_grad(fixed)(params, x)
    print("with a safe norm: ok =", report.ok, "gradient", grads["w"].ravel())


if __name__ == "__main__":
    main()
