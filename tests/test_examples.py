"""Every script in examples/ runs at its default length and its assertions hold.

Each example is one test, marked ``examples`` (``pytest -m examples`` runs only
them, ``-m "not examples"`` skips them). Each runs once, in a fresh Python
process, in a temporary working directory, exactly as ``make examples`` runs it
(no ``--quick``): the claims an example prints are the ones checked here. The
test also checks that the example wrote files only under ``out/``. An example
that imports a package of an optional extra which is not installed (e.g.
``neural_ode.py`` and the ``ecosystem`` extra) is skipped, naming the extra.
``python -m fbackprop demo`` runs too, shortened.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


# Distributions whose import name is not their name.
_IMPORT_NAMES = {"scikit-learn": "sklearn", "dm-haiku": "haiku"}


def _extra_of_module() -> dict:
    """``import name -> extra`` for pyproject.toml's optional dependencies (the
    examples' own extra first, then the libraries' one)."""
    try:
        import tomllib
    except ImportError:          # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            return {}
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    order = sorted(extras, key=lambda e: (e != "examples", e != "ecosystem"))
    out = {}
    for extra in order:
        for requirement in extras[extra]:
            dist = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
            out.setdefault(_IMPORT_NAMES.get(dist, dist.replace("-", "_")), extra)
    return out


def missing_extra(path) -> str | None:
    """Why an example cannot run here: a package it imports at module level is not
    installed and comes with an optional extra (named, with the install command)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    modules = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.append(node.module.split(".")[0])
    extras = _extra_of_module()
    for module in modules:
        if module in extras and importlib.util.find_spec(module) is None:
            extra = extras[module]
            return (f"{os.path.basename(path)} needs the `{extra}` extra ({module} is not "
                    f"installed): pip install -e '.[{extra}]'")
    return None


def _env():
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags()   # examples add their own device count
    src = os.path.join(ROOT, "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(args, cwd, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _check(args, result):
    code, out, err = result
    assert code == 0, (f"{' '.join(args)} failed (exit {code}):\n{out[-4000:]}\n"
                       f"{err[-6000:]}")
    return out


def _files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files)


def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    for required in ("scalar_graphs.py", "two_layer_by_hand.py", "single_neuron.py",
                     "local_rules.py", "relu_mask.py", "saliency.py", "gradient_penalty.py",
                     "custom_swish.py", "straight_through.py", "ema_stop_gradient.py",
                     "residual_vs_plain.py", "numerical_vs_backprop.py",
                     "gradient_accumulation.py", "retain_graph.py", "training_loop.py",
                     "data_parallel.py", "truncated_bptt.py"):
        assert required in names, f"examples/{required} is missing"


@pytest.mark.examples
@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p)[:-3] for p in EXAMPLES])
def test_example_runs(path, tmp_path, record_property):
    reason = missing_extra(path)
    if reason:
        pytest.skip(reason)
    start = time.perf_counter()
    out = _check([path], _launch([path], cwd=str(tmp_path)))
    record_property("seconds", round(time.perf_counter() - start, 1))
    assert out.strip(), f"{os.path.basename(path)} printed nothing"
    stray = [f for f in _files_under(str(tmp_path)) if not f.startswith("out" + os.sep)]
    assert not stray, f"{os.path.basename(path)} wrote files outside out/: {stray}"


def test_an_example_whose_extra_is_missing_is_skipped_naming_it(tmp_path, monkeypatch):
    path = os.path.join(ROOT, "examples", "neural_ode.py")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffrax" else real(name, *a))
    assert missing_extra(path) == ("neural_ode.py needs the `ecosystem` extra (diffrax is not "
                                   "installed): pip install -e '.[ecosystem]'")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    # what this environment has decides; an example of core imports needs nothing
    assert missing_extra(os.path.join(ROOT, "examples", "scalar_graphs.py")) is None
    fake = tmp_path / "needs_sklearn.py"
    fake.write_text("import numpy as np\nfrom sklearn.datasets import load_digits\n")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert "the `examples` extra (sklearn is not installed)" in missing_extra(str(fake))


@pytest.mark.examples
def test_demo_runs_quickly(tmp_path):
    args = ["-m", "fbackprop", "demo", "--epochs", "3", "--target", "0.9", "--no-progress",
            "--out", str(tmp_path / "out")]
    out = _check(args, _launch(args, cwd=str(tmp_path)))
    assert "gradient check at step 0: max |fb.grad - jax.grad|" in out
    assert "test accuracy" in out
    for name in ("digits_report.md", "digits_metrics.json"):
        assert (tmp_path / "out" / name).exists()
