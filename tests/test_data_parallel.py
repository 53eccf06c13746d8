"""Data parallelism on JAX's own distribution (``Mesh`` + ``shard_map``).

The multi-device checks run in a subprocess started with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX is
imported, and this process already imported it). Run this file directly with
``--child`` to see the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from xla_flags import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {xla_flags()}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


# --------------------------------------------------------------- the child side
def _problem(jnp, jax, activation=None):
    from fbackprop import nn
    key = jax.random.key(0)
    params = nn.init_mlp(key, [16, 32, 10])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
    activation = activation or jax.nn.relu      # relu is a custom_jvp function

    def loss(p, batch):
        xb, yb = batch
        return nn.softmax_cross_entropy(nn.mlp(p, xb, activation=activation), yb)

    return params, (x, y), loss


def _max_diff(a, b, jax) -> float:
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def child(which: str) -> dict:
    """Runs on 8 devices; returns max differences against the full-batch gradient."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import Mesh, PartitionSpec as P

    import fbackprop as fb
    from fbackprop import train

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params, batch, loss = _problem(jnp, jax)
    full_loss, full = jax.jit(fb.value_and_grad(loss))(params, batch)
    ref_loss, ref = jax.jit(jax.value_and_grad(loss))(params, batch)
    out = {"devices": len(jax.devices()), "fb_vs_jax_full_batch": _max_diff(full, ref, jax)}

    if which in ("all", "helper"):
        # The library helper: per-device fb gradients + lax.pmean (check_vma=False).
        dp_loss, dp = jax.jit(train.data_parallel_value_and_grad(loss, mesh))(params, batch)
        out["helper_vs_full_batch"] = _max_diff(dp, full, jax)
        out["helper_loss_diff"] = abs(float(dp_loss) - float(full_loss))

    for name, activation in (("through", jnp.tanh), ("through_relu", jax.nn.relu)):
        if which not in ("all", name):
            continue
        # fb.grad *through* a shard_map whose body pmeans the per-shard losses.
        _, _, loss_a = _problem(jnp, jax, activation)

        def sharded_loss(p, b, loss_a=loss_a):
            per_shard = jax.shard_map(lambda p, b: lax.pmean(loss_a(p, b), "data"), mesh=mesh,
                                      in_specs=(P(), P("data")), out_specs=P())
            return per_shard(p, b)

        through = jax.jit(fb.grad(sharded_loss))(params, batch)
        reference = jax.jit(fb.grad(loss_a))(params, batch)
        out[f"{name}_shard_map_vs_full_batch"] = _max_diff(through, reference, jax)

    if which in ("all", "vma"):
        # Inside a default (check_vma=True) shard_map: make the replicated params
        # per-device values, take fb gradients, pmean them.
        def step(p, b):
            p = jax.tree_util.tree_map(lambda v: lax.pcast(v, "data", to="varying"), p)
            l, g = fb.value_and_grad(loss)(p, b)
            return lax.pmean((l, g), "data")

        f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=(P(), P())))
        _, g = f(params, batch)
        out["vma_body_vs_full_batch"] = _max_diff(g, full, jax)
    return out


def _run_child(which: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which],
                          env=_env(8), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the tests
def test_data_parallel_helper_equals_full_batch_gradient_on_8_devices():
    res = _run_child("helper")
    assert res["devices"] == 8
    assert res["fb_vs_jax_full_batch"] < 1e-6, res
    assert res["helper_vs_full_batch"] < 1e-6, res
    assert res["helper_loss_diff"] < 1e-6, res


def test_grad_through_shard_map_on_8_devices():
    res = _run_child("through")
    assert res["through_shard_map_vs_full_batch"] < 1e-6, res


def test_grad_through_shard_map_with_custom_jvp_inside_on_8_devices():
    """jax.nn.relu (a custom_jvp) inside the mapped body: zero tangents must be per-device."""
    res = _run_child("through_relu")
    assert res["through_relu_shard_map_vs_full_batch"] < 1e-6, res


def test_grad_inside_vma_typed_shard_map_on_8_devices():
    res = _run_child("vma")
    assert res["vma_body_vs_full_batch"] < 1e-6, res


def test_collective_specs_on_8_devices():
    """The spec table's shard_map rows, with 8 devices really communicating."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(HERE, "test_rules.py"), "-k", "shard_map and float64 and not eager"],
        env=_env(8), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_data_parallel_helper_single_device():
    """The same helper in this process (one device): equals the plain gradient."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    import fbackprop as fb
    from fbackprop import train

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    params, batch, loss = _problem(jnp, jax)
    _, dp = jax.jit(train.data_parallel_value_and_grad(loss, mesh))(params, batch)
    _, full = fb.value_and_grad(loss)(params, batch)
    assert _max_diff(dp, full, jax) < 1e-6


def test_axis_index_has_no_gradient_path():
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import Mesh, PartitionSpec as P

    import fbackprop as fb

    mesh = Mesh(np.array(jax.devices()[:1]), ("i",))
    f = jax.shard_map(lambda x: x * lax.axis_index("i").astype(x.dtype) + x,
                      mesh=mesh, in_specs=P("i"), out_specs=P("i"))
    g = fb.grad(lambda x: jnp.sum(f(x)))(jnp.ones((4,)))
    np.testing.assert_allclose(np.asarray(g), np.ones(4))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2] if len(sys.argv) > 2 else "all")))
    else:
        sys.exit(pytest.main([__file__, "-q"]))
