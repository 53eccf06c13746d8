"""Every ```python block of README.md runs as written.

Each block runs on its own, in a fresh namespace (a reader pastes one block, not
the README so far), so every block must bring its own imports and data. A block
whose first line is the comment ``# not run by the tests`` would be skipped; the
README has none.
"""

from __future__ import annotations

import os
import re

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_MARKER = "# not run by the tests"


def python_blocks(path):
    """(first line number, source) of every ```python fenced block in a Markdown file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, re.M | re.S):
        line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((line, match.group(1)))
    return blocks


BLOCKS = python_blocks(os.path.join(ROOT, "README.md"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("line,source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, source, monkeypatch):
    if source.startswith(SKIP_MARKER):
        pytest.skip(f"README.md:{line} is marked {SKIP_MARKER!r}")
    # The multi-host block initializes jax.distributed only when this is set.
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    code = compile(source, f"README.md:{line}", "exec")
    with jax.enable_x64(False):       # a user's default (the test suite turns x64 on)
        exec(code, {"__name__": "__readme__"})


def test_readme_memory_budget_example_shows_a_trade():
    """The budget of the README's example keeps some values and recomputes others
    (neither the plain plan nor "recompute everything"), and the gradient is JAX's."""
    import fbackprop as fb
    import jax.numpy as jnp
    import numpy as np
    (line, source), = [(line, s) for line, s in BLOCKS if "memory_budget=" in s]
    namespace = {"__name__": "__readme__"}
    with jax.enable_x64(False):
        exec(compile(source, f"README.md:{line}", "exec"), namespace)
        loss, params, x = namespace["loss"], namespace["params"], namespace["x"]
        plan, = fb.saved_residuals(loss, params, x).plans
        assert plan.min_bytes < plan.kept_bytes <= plan.budget_bytes < plan.plain_bytes
        assert 0 < plan.recompute_flops < 0.5 * plan.recompute_all_flops
        assert plan.kept and plan.recomputed
        stack = namespace["stack"]
        want = jax.grad(lambda p, x: jnp.mean(stack(p, x) ** 2))(params, x)
        np.testing.assert_allclose(namespace["grads"], want, rtol=1e-5, atol=1e-7)


_WORKER = r'''
import re, sys
import numpy as np
readme, out = sys.argv[1], sys.argv[2]
with open(readme, encoding="utf-8") as f:
    text = f.read()
blocks = [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
          for m in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, re.M | re.S)]
(line, source), = [b for b in blocks if "jax.distributed.initialize" in b[1]]
namespace = {"__name__": "__readme__"}
exec(compile("\n" * (line - 1) + source, "README.md", "exec"), namespace)   # as written
import jax
loss, grads = namespace["loss"], namespace["grads"]
leaves = jax.tree_util.tree_leaves(grads)
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 2, 1)
assert loss.is_fully_replicated and all(g.is_fully_replicated for g in leaves)
np.savez(out, np.asarray(loss.addressable_data(0)),
         *[np.asarray(g.addressable_data(0)) for g in leaves])
'''


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_multi_host_block_in_two_processes(tmp_path):
    """The README's multi-host block, started as 2 processes on this machine (CPU
    collectives over TCP, one CPU device each), gives every process the gradient that
    one process computes on the global batch (the two local batches stacked)."""
    import subprocess
    import sys

    import numpy as np
    from jax._src.lib import _jax    # private: JAX has no public query for this
    from xla_flags import xla_flags

    import fbackprop as fb
    from fbackprop import nn
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        pytest.skip("this jaxlib has no CPU collectives (gloo), so two CPU processes "
                    "cannot form one mesh")
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES="2",
                   RANK=str(rank), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   PYTHONPATH=os.path.join(ROOT, "src"))
        procs.append(subprocess.Popen(
            [sys.executable, str(worker), os.path.join(ROOT, "README.md"),
             str(tmp_path / f"rank{rank}.npz")], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-5000:]}"

    # One process, the global batch: rank 0's rows, then rank 1's (P("data") order).
    def loss_fn(params, batch):
        x, y = batch
        return nn.softmax_cross_entropy(nn.mlp(params, x), y)

    with jax.enable_x64(False):
        params = nn.init_mlp(jax.random.key(0), [64, 128, 10])
        parts = [(np.random.default_rng(r).normal(size=(32, 64)).astype(np.float32),
                  np.random.default_rng(r).integers(0, 10, 32).astype(np.int32))
                 for r in range(2)]
        batch = tuple(np.concatenate([p[i] for p in parts]) for i in range(2))
        loss, grads = fb.value_and_grad(loss_fn)(params, batch)
        want = [loss] + jax.tree_util.tree_leaves(grads)
        jax_grads = jax.grad(loss_fn)(params, batch)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(jax_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            got = [got[f"arr_{i}"] for i in range(len(got.files))]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
