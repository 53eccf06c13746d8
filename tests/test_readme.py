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
