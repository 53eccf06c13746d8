"""fbackprop's modules form layers, and no import goes up or round in a cycle.

Every ``import`` in ``src/fbackprop`` counts, at module level or inside a
function (a function-level import that goes up a layer is the same dependency,
only hidden). A module may import its own layer and the ones below; the layers,
lowest first, are listed in ``LAYERS`` (docs/architecture.md explains them).
"""

from __future__ import annotations

import ast
import collections
import fnmatch
import os

import pytest

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")

# Lowest first. A module belongs to the first layer with a pattern it matches.
LAYERS = [
    ("sweep context", ["fbackprop._src.context"]),
    ("JAX shim", ["fbackprop._src.compat", "fbackprop._src.compat.*", "fbackprop._src.staging",
                  "fbackprop._src.plotting"]),
    ("rule tables", ["fbackprop._src.registry"]),
    ("engine", ["fbackprop._src.engine", "fbackprop._src.engine.*"]),
    ("programs", ["fbackprop._src.trace", "fbackprop._src.residuals",
                  "fbackprop._src.planning", "fbackprop._src.planning.*"]),
    ("rules", ["fbackprop._src.rules", "fbackprop._src.rules.*"]),
    ("front ends", ["fbackprop._src.api", "fbackprop._src.derivatives",
                    "fbackprop._src.eager", "fbackprop._src.linearization",
                    "fbackprop._src.remat", "fbackprop._src.testing",
                    "fbackprop._src.per_example", "fbackprop._src.per_example.*"]),
    ("tools", ["fbackprop._src.tools", "fbackprop._src.tools.*"]),
    ("libraries", ["fbackprop.nn", "fbackprop.nn.*", "fbackprop.train", "fbackprop.privacy",
                   "fbackprop.precision", "fbackprop.extend", "fbackprop.demo",
                   "fbackprop._src.cli"]),
    ("benchmarks and command line", ["fbackprop.bench", "fbackprop.bench.*",
                                     "fbackprop.__main__"]),
    ("public API", ["fbackprop"]),
]


def _modules() -> dict[str, str]:
    mods = {}
    for dirpath, _, files in os.walk(os.path.join(SRC, "fbackprop")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(mods) -> dict[str, set]:
    graph = collections.defaultdict(set)
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target + "." + a.name if target + "." + a.name in mods else target
                           for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod and t.startswith("fbackprop"):
                    graph[mod].add(t)
    return graph


def _layer(mod: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(mod, p) for p in patterns):
            return i
    raise AssertionError(f"module {mod} is in no layer of tests/test_layers.py: add it")


def _cycles(graph, mods) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(n):
        index[n] = low[n] = counter[0]
        counter[0] += 1
        stack.append(n)
        on.add(n)
        for w in graph.get(n, ()):
            if w not in index:
                visit(w)
                low[n] = min(low[n], low[w])
            elif w in on:
                low[n] = min(low[n], index[w])
        if low[n] == index[n]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == n:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for n in sorted(mods):
        if n not in index:
            visit(n)
    return found


def test_no_import_cycles():
    mods = _modules()
    assert _cycles(_imports(mods), mods) == []


def test_every_import_goes_down_the_layers():
    mods = _modules()
    up = []
    for mod, targets in sorted(_imports(mods).items()):
        for t in sorted(targets):
            if _layer(t) > _layer(mod) and not mod.startswith(t + "."):
                up.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {t} "
                          f"({LAYERS[_layer(t)][0]})")
    assert up == [], "imports that go up a layer:\n  " + "\n  ".join(up)


@pytest.mark.parametrize("mod", sorted(_modules()))
def test_module_is_in_a_layer(mod):
    _layer(mod)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph, ["a", "b", "c"]) == [["a", "b"]]
    assert _layer("fbackprop._src.engine.sweeps") < _layer("fbackprop._src.rules.calls")
