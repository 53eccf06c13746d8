"""Data-parallel training on 8 (simulated) devices: per-device gradients + all-reduce.

Each device gets 1/8 of the batch, computes the loss and the fbackprop gradient
of its shard, and ``lax.pmean`` averages the gradients across devices (the
all-reduce of DistributedDataParallel). With equal shards and a mean loss the
result equals the single-device full-batch gradient -- checked here.

Runs on CPU by simulating 8 devices (``--xla_force_host_platform_device_count``,
which must be set before JAX is imported). On real accelerators, drop that flag:
the same code shards over ``jax.devices()``. For several hosts, call
``jax.distributed.initialize()`` first on every host (see the README).

Run: python examples/data_parallel.py [--quick] [--devices 8]
"""

import argparse
import os
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if "jax" not in sys.modules:       # must happen before JAX initializes its backends
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import fbackprop as fb
    from fbackprop import nn, train
    from fbackprop.demo import load_digits

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    print(f"{len(devices)} devices: {devices[0].platform}; mesh axis 'data' of size {mesh.size}")

    def loss_fn(params, batch):
        x, y = batch
        return nn.softmax_cross_entropy(nn.mlp(params, x), y)

    (x_tr, y_tr), (x_te, y_te) = load_digits()
    params = nn.init_mlp(jax.random.key(0), [64, 128, 10])
    batch_size = 16 * mesh.size                     # 16 examples per device
    batch = (x_tr[:batch_size], y_tr[:batch_size])

    dp_grad = jax.jit(train.data_parallel_value_and_grad(loss_fn, mesh))
    loss_dp, g_dp = dp_grad(params, batch)
    loss_1, g_1 = jax.jit(fb.value_and_grad(loss_fn))(params, batch)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree_util.tree_leaves(g_dp), jax.tree_util.tree_leaves(g_1)))
    print(f"batch {batch_size} split over {mesh.size} devices: loss {float(loss_dp):.6f} vs "
          f"{float(loss_1):.6f} on one device; max |data-parallel grad - full-batch grad| = "
          f"{diff:.2e}")
    assert diff < 1e-6

    # Train with the data-parallel gradient.
    steps = 60 if args.quick else 300
    optimizer = train.make_optimizer(3e-3, total_steps=steps, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = train.data_parallel_value_and_grad(loss_fn, mesh)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree_util.tree_map(jnp.add, params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(x_tr), batch_size)
        params, opt_state, loss = step(params, opt_state, (x_tr[idx], y_tr[idx]))
        # One step in flight at a time: the simulated devices share the CPU's threads,
        # and with several steps queued (JAX dispatches asynchronously) XLA:CPU can
        # deadlock in an all-reduce on a busy machine. Real accelerators do not need it.
        loss.block_until_ready()
    acc = float(nn.accuracy(nn.mlp(params, x_te), y_te))
    print(f"{steps} data-parallel steps: loss {float(loss):.4f}, test accuracy {acc:.3f}")
    assert acc > (0.9 if args.quick else 0.95)


if __name__ == "__main__":
    main()
