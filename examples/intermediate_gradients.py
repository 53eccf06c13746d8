"""Gradients of intermediate values (retain_grad) and hooks that clamp them (register_hook).

fb.tag names a value inside a pure function; fb.grad_and_intermediates returns
d loss / d value for every tagged value next to the parameter gradients (checked
here against JAX's perturbation trick), and a tag's hook can read or replace the
cotangent during the backward sweep, e.g. clamp it to [-1, 1] per tensor. All
of it works under jax.jit and jax.vmap.

Run: python examples/intermediate_gradients.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


def mlp(params, x, mark=fb.tag):
    h1 = mark(jax.nn.relu(x @ params["w1"] + params["b1"]), "h1")
    h2 = mark(jnp.tanh(h1 @ params["w2"]), "h2")
    logits = h2 @ params["w3"]
    return jnp.mean((logits - 1.0) ** 2)


def clamped_mlp(params, x):
    clamp = lambda ct: jnp.clip(ct, -1e-2, 1e-2)                       # noqa: E731
    h1 = fb.tag(jax.nn.relu(x @ params["w1"] + params["b1"]), "h1", hook=clamp)
    return jnp.mean((jnp.tanh(h1 @ params["w2"]) @ params["w3"] - 1.0) ** 2)


def main():
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((4, 16)).astype(np.float32),
              "b1": np.zeros(16, np.float32),
              "w2": rng.standard_normal((16, 8)).astype(np.float32) / 4,
              "w3": rng.standard_normal((8, 1)).astype(np.float32)}
    x = rng.standard_normal((32, 4)).astype(np.float32)

    grads, inter = jax.jit(fb.grad_and_intermediates(mlp))(params, x)
    for name, ct in inter.items():
        print(f"d loss / d {name}: shape {ct.shape}, norm {jnp.linalg.norm(ct):.4g}, "
              f"fraction zero {float(jnp.mean(ct == 0)):.2f}")

    # The same numbers from JAX by the perturbation trick: add eps at each tag.
    eps = {"h1": jnp.zeros((32, 16)), "h2": jnp.zeros((32, 8))}
    d_eps = jax.grad(lambda e: mlp(params, x, mark=lambda v, n: v + e[n]))(eps)
    for name in inter:
        np.testing.assert_allclose(inter[name], d_eps[name], rtol=1e-5, atol=1e-6)
    print("matches jax.grad's perturbation trick")

    # Per-example intermediate gradients with vmap (one example per row).
    per_example = jax.vmap(fb.grad_and_intermediates(mlp), in_axes=(None, 0))(params, x[:, None])
    print("per-example d loss / d h2:", per_example[1]["h2"].shape)

    # A hook clamps the cotangent of h1 per element before it flows on to w1, b1.
    g_plain = fb.grad(mlp)(params, x)
    g_clamped = jax.jit(fb.grad(clamped_mlp))(params, x)
    print(f"|d loss / d w1|: plain {jnp.linalg.norm(g_plain['w1']):.4g}, "
          f"with the clamp hook {jnp.linalg.norm(g_clamped['w1']):.4g}")
    assert jnp.linalg.norm(g_clamped["w1"]) < jnp.linalg.norm(g_plain["w1"])


if __name__ == "__main__":
    main()
