"""Every script in examples/ runs at its default length and its assertions hold.

Each example is one test, marked ``examples`` (``pytest -m examples`` runs only
them, ``-m "not examples"`` skips them). Each runs once, in a fresh Python
process, in a temporary working directory, exactly as ``make examples`` runs it
(no ``--quick``): the claims an example prints are the ones checked here. The
test also checks that the example wrote files only under ``out/``.
``python -m fbackprop demo`` runs too, shortened.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


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
    start = time.perf_counter()
    out = _check([path], _launch([path], cwd=str(tmp_path)))
    record_property("seconds", round(time.perf_counter() - start, 1))
    assert out.strip(), f"{os.path.basename(path)} printed nothing"
    stray = [f for f in _files_under(str(tmp_path)) if not f.startswith("out" + os.sep)]
    assert not stray, f"{os.path.basename(path)} wrote files outside out/: {stray}"


@pytest.mark.examples
def test_demo_runs_quickly(tmp_path):
    args = ["-m", "fbackprop", "demo", "--epochs", "3", "--target", "0.9", "--no-progress",
            "--out", str(tmp_path / "out")]
    out = _check(args, _launch(args, cwd=str(tmp_path)))
    assert "gradient check at step 0: max |fb.grad - jax.grad|" in out
    assert "test accuracy" in out
    for name in ("digits_report.md", "digits_metrics.json"):
        assert (tmp_path / "out" / name).exists()
