"""Hessian-vector products and Hessians: fbackprop against JAX in one process.

Prints, for a 3-layer MLP (784-512-512-10, batch 256, float32, softmax
cross-entropy), the compiled FLOPs and the median step time of jitted
``fb.hvp`` (forward-over-reverse) against ``jax.jvp(jax.grad(f))``, and for a
100-parameter function the agreement and times of ``fb.hessian`` against
``jax.hessian``. Times are ratios measured interleaved, after warm-up, with
``block_until_ready``; FLOPs come from XLA's cost analysis of the compiled
programs and do not depend on machine noise.

Run: python benchmarks/hvp_report.py [--repeats N]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import fbackprop as fb


def mlp_params(rng, sizes, dtype=np.float32):
    return [{"w": (rng.standard_normal((m, n)) / np.sqrt(m)).astype(dtype),
             "b": np.zeros(n, dtype)} for m, n in zip(sizes[:-1], sizes[1:])]


def xent_loss(params, x, labels):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return -jnp.mean(jnp.sum(jax.nn.one_hot(labels, logits.shape[-1]) *
                             jax.nn.log_softmax(logits), axis=-1))


def flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def interleaved_median(fns, args, repeats):
    """Median wall time of each function, runs interleaved so drift hits all alike."""
    for fn in fns:                      # warm-up (compile) and a second run
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def max_rel_diff(a, b) -> float:
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) /
                   (np.max(np.abs(np.asarray(y, np.float64))) + 1e-30))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return max(diffs)


def hvp_report(repeats: int):
    rng = np.random.default_rng(0)
    params = mlp_params(rng, (784, 512, 512, 10))
    v = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape).astype(p.dtype), params)
    x = rng.standard_normal((256, 784)).astype(np.float32)
    labels = rng.integers(0, 10, 256)

    def loss(p):
        return xent_loss(p, x, labels)

    ours = jax.jit(lambda p, v: fb.hvp(loss, (p,), (v,))[0])
    theirs = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])
    rev_rev = jax.jit(lambda p, v: fb.hvp(loss, (p,), (v,), mode="rev_rev")[0])
    err = max_rel_diff(ours(params, v), theirs(params, v))
    err_rr = max_rel_diff(rev_rev(params, v), theirs(params, v))
    f_ours, f_theirs, f_rr = flops(ours, params, v), flops(theirs, params, v), \
        flops(rev_rev, params, v)
    t_ours, t_theirs, t_rr = interleaved_median([ours, theirs, rev_rev], (params, v), repeats)
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))
    print(f"HVP, MLP 784-512-512-10, batch 256, float32, {n} parameters, jitted")
    print(f"  max relative difference vs jax.jvp(jax.grad(f)): fwd_rev {err:.1e}, "
          f"rev_rev {err_rr:.1e}")
    print(f"  compiled FLOPs   fb.hvp fwd_rev {f_ours:.4g}   jax {f_theirs:.4g}   "
          f"ratio {f_ours / f_theirs:.3f}   (rev_rev ratio {f_rr / f_theirs:.3f})")
    print(f"  median step time fb.hvp fwd_rev {t_ours * 1e3:.2f} ms   jax "
          f"{t_theirs * 1e3:.2f} ms   ratio {t_ours / t_theirs:.3f}   "
          f"(rev_rev ratio {t_rr / t_theirs:.3f}; {repeats} interleaved runs)")


def hessian_report(repeats: int):
    rng = np.random.default_rng(1)
    # 6*10 + 10 + 10*3 = 100 parameters.
    params = {"w1": rng.standard_normal((6, 10)) / 3, "b1": 0.1 * rng.standard_normal(10),
              "w2": rng.standard_normal((10, 3)) / 3}
    x = rng.standard_normal((16, 6))
    y = rng.standard_normal((16, 3))

    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

    for dtype in (np.float32, np.float64):
        if dtype == np.float64 and not jax.config.jax_enable_x64:
            continue
        p = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        ours, theirs = jax.jit(fb.hessian(loss)), jax.jit(jax.hessian(loss))
        err = max_rel_diff(ours(p), theirs(p))
        t_ours, t_theirs = interleaved_median([ours, theirs], (p,), repeats)
        f_ours, f_theirs = flops(ours, p), flops(theirs, p)
        t0 = time.perf_counter()
        jax.block_until_ready(fb.hessian(loss)(p))
        t_eager = time.perf_counter() - t0
        print(f"Hessian, 100-parameter MLP loss, {np.dtype(dtype).name}, jitted")
        print(f"  max relative difference vs jax.hessian: {err:.1e}")
        print(f"  compiled FLOPs ratio {f_ours / f_theirs:.3f}; median time fb "
              f"{t_ours * 1e3:.3f} ms, jax {t_theirs * 1e3:.3f} ms, ratio "
              f"{t_ours / t_theirs:.3f}; first eager fb.hessian call (trace + compile) "
              f"{t_eager:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--x64", action="store_true", help="also run the Hessian in float64")
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    hvp_report(args.repeats)
    hessian_report(args.repeats * 4)   # tiny programs: more runs for a stable median


if __name__ == "__main__":
    main()
