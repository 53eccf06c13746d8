"""Mixed precision on the digits MLP: float32 vs bfloat16 compute vs float16 + dynamic loss scaling.

Trains the same MLP three ways with fbackprop gradients and optax, prints test
accuracy for each, the compiled temporary memory of the bf16 vs f32 gradient step,
and asserts that both reduced-precision runs land within 1 point of float32.

Run: python examples/mixed_precision.py [--quick]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fbackprop as fb
from fbackprop import precision as mp


def load(seed=0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                          stratify=digits.target)
    return xtr, xte, ytr.astype(np.int32), yte.astype(np.int32)


def init(key, sizes=(64, 256, 256, 10)):
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append({"w": jax.random.normal(k, (m, n), jnp.float32) * jnp.sqrt(2.0 / m),
                       "b": jnp.zeros((n,), jnp.float32)})
    return params


def logits_fn(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logits = logits_fn(params, x).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def train(policy, loss_scale, data, steps, batch=128, seed=0):
    xtr, xte, ytr, yte = data
    params = init(jax.random.PRNGKey(seed))
    tx = optax.adamw(2e-3, weight_decay=1e-4)
    opt_state = tx.init(params)
    vg = mp.value_and_grad(loss_fn, policy)

    @jax.jit
    def step(params, opt_state, scale, x, y):
        loss, grads, scale, finite = vg(params, x, y, loss_scale=scale)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params = mp.select_tree(finite, new_params, params)
        opt_state = mp.select_tree(finite, new_opt, opt_state)
        return params, opt_state, scale, loss, finite

    rng = np.random.default_rng(seed)
    skipped = 0
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        params, opt_state, loss_scale, loss, finite = step(params, opt_state, loss_scale,
                                                           xtr[idx], ytr[idx])
        skipped += int(not bool(finite))
    compute = policy.cast_to_compute
    pred = jnp.argmax(logits_fn(compute(params), compute(jnp.asarray(xte))), -1)
    acc = float(jnp.mean(pred == yte))
    return acc, skipped, loss_scale, step, (params, opt_state)


def temp_bytes(policy, data, batch=1024):
    xtr = jnp.asarray(data[0][:batch])
    ytr = jnp.asarray(data[2][:batch])
    params = init(jax.random.PRNGKey(0), (64, 1024, 1024, 10))
    vg = mp.value_and_grad(loss_fn, policy)
    f = jax.jit(lambda p, x, y: vg(p, x, y, loss_scale=mp.NoOpLossScale())[1])
    compiled = f.lower(params, xtr, ytr).compile()
    return compiled.memory_analysis().temp_size_in_bytes, f, (params, xtr, ytr)


def median_time(f, args, reps=15):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    steps = 300 if args.quick else 1500
    data = load()
    runs = [
        ("float32", mp.Policy.parse("p=f32,c=f32,o=f32"), mp.NoOpLossScale()),
        ("bfloat16 compute", mp.Policy.parse("p=f32,c=bf16,o=f32"), mp.NoOpLossScale()),
        ("float16 + dynamic loss scale", mp.Policy.parse("p=f32,c=f16,o=f32"),
         mp.DynamicLossScale.create(2.0 ** 15, period=200)),
    ]
    accs = {}
    for name, policy, scale in runs:
        acc, skipped, final_scale, _, _ = train(policy, scale, data, steps)
        accs[name] = acc
        print(f"{name:32s} test accuracy {acc * 100:6.2f}%  skipped steps {skipped:3d}  "
              f"final loss scale {float(final_scale.loss_scale):g}")
    base = accs["float32"]
    for name in list(accs)[1:]:
        assert abs(accs[name] - base) <= 0.01 + 1e-9 or accs[name] >= base, \
            f"{name}: {accs[name]:.4f} vs float32 {base:.4f}"

    f32_bytes, f32_fn, f32_args = temp_bytes(runs[0][1], data)
    bf16_bytes, bf16_fn, bf16_args = temp_bytes(runs[1][1], data)
    print(f"compiled temp bytes of the gradient step (MLP 64-1024-1024-10, batch 1024): "
          f"float32 {f32_bytes:,}  bfloat16 {bf16_bytes:,}  ratio {bf16_bytes / f32_bytes:.2f}")
    residual = {}
    for name, policy, _ in runs[:2]:
        x, y = jnp.asarray(data[0][:1024]), jnp.asarray(data[2][:1024])
        big = init(jax.random.PRNGKey(0), (64, 1024, 1024, 10))
        report = fb.saved_residuals(
            lambda p: loss_fn(policy.cast_to_compute(p), policy.cast_to_compute(x), y), big)
        residual[name] = report.intermediate_bytes
    ratio = residual["bfloat16 compute"] / residual["float32"]
    print(f"activations kept for backward (fb.saved_residuals): float32 "
          f"{residual['float32']:,} bytes, bfloat16 {residual['bfloat16 compute']:,} bytes, "
          f"ratio {ratio:.2f} (boolean ReLU masks do not shrink)")
    assert ratio < 0.75
    if not args.quick:
        t32, t16 = median_time(f32_fn, f32_args), median_time(bf16_fn, bf16_args)
        print(f"step time on {jax.devices()[0].device_kind}: float32 {t32 * 1e3:.2f} ms, "
              f"bfloat16 {t16 * 1e3:.2f} ms, ratio {t16 / t32:.2f}")
    print("OK")


if __name__ == "__main__":
    main()
