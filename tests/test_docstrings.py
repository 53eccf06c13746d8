"""Every ``>>>`` example in a public docstring runs and prints what it says.

The public API is everything in ``fbackprop.__all__`` and in the ``__all__`` of
``fbackprop.nn``, ``fbackprop.train``, ``fbackprop.precision``, ``fbackprop.extend``
and, with its extra installed, ``fbackprop.privacy`` (classes with their
methods). Each example runs with only what it imports itself (plus ``fbackprop``
as ``fb``, ``jax`` and ``jnp``, which the examples take as given), so pasting it
after ``help(...)`` works. Examples
marked ``# doctest: +SKIP`` are not run. They run with 64-bit types off, the
default a user has (the test suite turns them on for its own tests).
"""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import types

import jax
import jax.numpy as jnp
import pytest

import fbackprop as fb

MODULES = {"fbackprop": fb, "fbackprop.nn": fb.nn, "fbackprop.train": fb.train,
           "fbackprop.precision": fb.precision, "fbackprop.extend": fb.extend}
# fbackprop.privacy's accounting examples need its extra (dp-accounting).
if importlib.util.find_spec("dp_accounting") is not None:
    MODULES["fbackprop.privacy"] = fb.privacy


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


def public_objects():
    """(qualified name, object) for every public name, modules themselves included."""
    out = []
    for mod_name, module in MODULES.items():
        out.append((mod_name, module))
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) and f"{mod_name}.{name}" in MODULES:
                continue          # listed on its own
            out.append((f"{mod_name}.{name}", obj))
    return out


def docstring_examples():
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    tests, seen = [], set()
    for qualname, obj in public_objects():
        module = inspect.getmodule(obj) if not isinstance(obj, types.ModuleType) else obj
        try:
            found = finder.find(obj, qualname, module=module or False,
                                globs={"fb": fb, "jax": jax, "jnp": jnp})
        except ValueError:        # objects without source (e.g. some aliases)
            continue
        for test in found:
            if test.examples and id(test.docstring) not in seen and \
                    not all(ex.options.get(doctest.SKIP) for ex in test.examples):
                seen.add(id(test.docstring))
                tests.append(test)
    return tests


TESTS = docstring_examples()


def test_public_docstrings_have_examples():
    assert len(TESTS) >= 20, [t.name for t in TESTS]


@pytest.mark.parametrize("test", TESTS, ids=[t.name for t in TESTS])
def test_docstring_example(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    with jax.enable_x64(False):       # a user's default (the test suite turns x64 on)
        runner.run(test, out=report.append, clear_globs=True)
    assert runner.failures == 0, "".join(report)
