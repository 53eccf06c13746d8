"""A complete training loop: AdamW, cosine schedule, label smoothing, accumulation, clipping, bf16.

Every piece of a modern loop, with fbackprop computing the gradients:

* model: 64 -> 256 -> 256 -> 10 MLP with GELU and a LayerNorm (logits out);
* loss: softmax cross-entropy on logits with label smoothing 0.1;
* optimizer: AdamW (lr 2e-3, weight decay 1e-2) on a warmup + cosine schedule,
  after clipping the gradient's global norm to 1.0;
* gradient accumulation over 2 micro-batches per update (``optax.MultiSteps``);
* bf16 compute: parameters are kept in float32 ("master weights") and cast to
  bfloat16 inside the forward pass; fbackprop casts each cotangent back to its
  primal's dtype, so the gradients arrive in float32. (bf16 has float32's
  exponent range, so no loss scaling is needed; see mixed_precision.py for float16.)
* evaluation every epoch, without gradients.

Data: scikit-learn's 8x8 digits. Target: >= 95% test accuracy.

Run: python examples/training_loop.py [--quick] [--out out]
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fbackprop import nn, train
from fbackprop.demo import load_digits


def init_net(key, d_in=64, d_h=256, d_out=10):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"fc1": nn.init_dense(k1, d_in, d_h), "fc2": nn.init_dense(k2, d_h, d_h),
            "norm": nn.init_layer_norm(d_h), "fc3": nn.init_dense(k3, d_h, d_out)}


def net(params, x, compute_dtype=jnp.bfloat16):
    p = jax.tree_util.tree_map(lambda v: v.astype(compute_dtype), params)
    h = jax.nn.gelu(nn.dense(p["fc1"], x.astype(compute_dtype)))
    h = nn.layer_norm(p["norm"], jax.nn.gelu(nn.dense(p["fc2"], h)))
    return nn.dense(p["fc3"], h)                      # logits (CE applies the softmax)


def loss_fn(params, batch):
    x, y = batch
    return nn.softmax_cross_entropy(net(params, x), y, label_smoothing=0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, no plot")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="out")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs

    (x_tr, y_tr), (x_te, y_te) = load_digits()
    micro_batch, accum_steps = 32, 2
    micro_per_epoch = len(x_tr) // micro_batch
    updates = epochs * micro_per_epoch // accum_steps
    optimizer = train.make_optimizer(2e-3, total_steps=updates, warmup_steps=updates // 10,
                                     weight_decay=1e-2, clip_norm=1.0,
                                     accumulate_steps=accum_steps)
    params = init_net(jax.random.key(0))
    opt_state = optimizer.init(params)
    step = train.make_train_step(loss_fn, optimizer)
    evaluate = jax.jit(lambda p, x, y: nn.accuracy(net(p, x), y))

    history = {"step": [], "loss": [], "epoch": [], "train_acc": [], "test_acc": []}
    rng = np.random.default_rng(0)
    bar = train.progress(epochs * micro_per_epoch, "training")
    n = 0
    for epoch in range(1, epochs + 1):
        for idx in train.batches(len(x_tr), micro_batch, rng):
            params, opt_state, loss = step(params, opt_state, (x_tr[idx], y_tr[idx]))
            n += 1
            history["step"].append(n)
            history["loss"].append(float(loss))
            bar.update(1)
        history["epoch"].append(epoch)
        history["train_acc"].append(float(evaluate(params, x_tr, y_tr)))
        history["test_acc"].append(float(evaluate(params, x_te, y_te)))
        bar.set_postfix_str(f"epoch {epoch} test acc {history['test_acc'][-1]:.3f}")
    bar.close()
    for e, acc in zip(history["epoch"], history["test_acc"]):
        print(f"epoch {e:2d} val acc: {acc:.3f}")
    dtypes = {str(v.dtype) for v in jax.tree_util.tree_leaves(params)}
    print(f"master weights stay {dtypes}; {n} micro-batches, {n // accum_steps} optimizer "
          f"updates; final test accuracy {history['test_acc'][-1]:.4f}")
    assert dtypes == {"float32"}
    assert history["test_acc"][-1] >= (0.9 if args.quick else 0.95)
    if not args.quick:
        path = train.plot_history(history, os.path.join(args.out, "training_loop.png"),
                                  title="AdamW + cosine + label smoothing + accumulation + "
                                        "clipping + bf16")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
