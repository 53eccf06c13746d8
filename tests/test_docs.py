"""The documentation's code runs, and its API reference lists every public name.

For each topic page under ``docs/`` (every ``.md`` file but ``docs/README.md``
and the API reference), the fenced blocks run in page order in one namespace,
as a reader goes top to bottom: ``python`` blocks are executed, ``pycon``
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
            "mixed_precision", "seeing_backprop", "nn_and_train", "extending"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[os.path.basename(p)[:-3] for p in PAGES])
def test_page_code_runs(page, tmp_path, monkeypatch):
    blocks = code_blocks(page)
    assert blocks, f"{page} has no code"
    monkeypatch.chdir(tmp_path)         # files a page writes land here
    name = os.path.relpath(page, ROOT)
    namespace = {"__name__": "__docs__"}
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with jax.enable_x64(False):
        for kind, line, source in blocks:
            if kind == "python":
                # Padded so that tracebacks give the line number in the page.
                exec(compile("\n" * (line - 1) + source, name, "exec"), namespace)
                continue
            test = parser.get_doctest(source, namespace, f"{name}:{line}", name, line - 1)
            report = []
            runner.run(test, out=report.append, clear_globs=False)
            assert runner.failures == 0, "".join(report)
            namespace.update(test.globs)      # get_doctest ran on a copy


def public_names():
    modules = {"fbackprop": fb, "fbackprop.nn": fb.nn, "fbackprop.train": fb.train,
               "fbackprop.precision": fb.precision, "fbackprop.extend": fb.extend}
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
