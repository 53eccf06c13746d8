"""The documentation's code runs, and its API reference lists every public name.

For each topic page under ``docs/`` (every ``.md`` file but ``docs/README.md``
and the API reference), every fenced block runs on its own, in a fresh
namespace (a reader copies one block, not the page so far), so each block
brings its own imports and data: ``python`` blocks are executed, ``pycon``
blocks (``>>>`` prompts) are doctests whose output must match. Everything runs
with 64-bit types off, a user's default. Sphinx is not needed for this test.
"""

from __future__ import annotations

import doctest
import glob
import os
import re
import types

import jax
import pytest

import fbackprop as fb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(p for p in glob.glob(os.path.join(DOCS, "*.md"))
               if os.path.basename(p) != "README.md")
API_PAGES = sorted(glob.glob(os.path.join(DOCS, "api", "*.md")))
FENCE = re.compile(r"^```(python|pycon)[^\n]*\n(.*?)^```", re.M | re.S)


@pytest.fixture(autouse=True)
def _restore_rule_tables():
    """Rules that an example registers (its own primitives) are removed after it."""
    from fbackprop._src import registry
    saved = (dict(registry.vjp_rules), dict(registry.jvp_rules),
             set(registry.nondiff_primitives))
    yield
    for table, before in zip((registry.vjp_rules, registry.jvp_rules), saved[:2]):
        table.clear()
        table.update(before)
    registry.nondiff_primitives.clear()
    registry.nondiff_primitives.update(saved[2])


def code_blocks(path):
    """(kind, first line number, source) of each python/pycon block of a page."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in FENCE.finditer(text)]


def test_every_topic_page_exists():
    names = {os.path.basename(p)[:-3] for p in PAGES}
    assert {"index", "differentiation", "forward_and_higher_order", "checkpointing_and_memory",
            "mixed_precision", "seeing_backprop", "nn_and_train", "extending",
            "per_example"} <= names


def _blocks_of_every_page():
    for page in PAGES:
        name = os.path.relpath(page, ROOT)
        for kind, line, source in code_blocks(page):
            yield pytest.param(name, kind, line, source, id=f"{name[5:-3]}:{line}")


def test_every_topic_page_has_code():
    for page in PAGES:
        assert code_blocks(page), f"{page} has no code"


@pytest.mark.parametrize("name,kind,line,source", list(_blocks_of_every_page()))
def test_block_runs_on_its_own(name, kind, line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)         # files a block writes land here
    namespace = {"__name__": "__docs__"}
    with jax.enable_x64(False):
        if kind == "python":
            # Padded so that tracebacks give the line number in the page.
            exec(compile("\n" * (line - 1) + source, name, "exec"), namespace)
            return
        test = doctest.DocTestParser().get_doctest(source, namespace, f"{name}:{line}", name,
                                                   line - 1)
        runner = doctest.DocTestRunner(
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report = []
        runner.run(test, out=report.append)
        assert runner.failures == 0, "".join(report)


def public_names():
    modules = {"fbackprop": fb, "fbackprop.nn": fb.nn, "fbackprop.train": fb.train,
               "fbackprop.precision": fb.precision, "fbackprop.extend": fb.extend,
               "fbackprop.privacy": fb.privacy}
    names = []
    for mod_name, module in modules.items():
        for name in module.__all__:
            if isinstance(getattr(module, name), types.ModuleType) and \
                    f"{mod_name}.{name}" in modules:
                continue
            names.append(f"{mod_name}.{name}")
    return names


def test_api_reference_lists_every_public_name():
    text = ""
    for path in API_PAGES:
        with open(path, encoding="utf-8") as f:
            text += f.read()
    documented = set()
    for name, module in re.findall(r"^\.\. (?:auto)?(?:function|class|data|module|exception)"
                                   r":: ([\w.]+)[^\n]*\n(?:   :module: ([\w.]+))?", text, re.M):
        documented.add(f"{module}.{name}" if module else name)
    missing = [n for n in public_names() if n not in documented]
    assert not missing, f"not in docs/api/: {missing}"


def test_sphinx_build_has_no_warnings(tmp_path):
    """What ``make docs`` does, when the ``docs`` extra is installed."""
    for name in ("sphinx", "myst_parser", "sphinx_book_theme"):
        pytest.importorskip(name, reason="the docs extra is not installed (make docs)")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                           "html", DOCS, str(tmp_path / "html")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for page in ("index", "differentiation", "api/fbackprop", "api/nn"):
        assert (tmp_path / "html" / f"{page}.html").exists()
