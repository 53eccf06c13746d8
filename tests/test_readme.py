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
