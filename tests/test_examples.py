"""Every script in examples/ runs (in its quick mode when it has one) and its assertions hold.

Each runs in a fresh Python process, in a temporary working directory so that
figures and reports land there; the processes run a few at a time (one per CPU
core), started together when the first example test runs. ``python -m fbackprop
demo`` runs too, shortened.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


def _env():
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)      # examples choose their own device count
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


def _example_args(path):
    with open(path) as f:
        source = f.read()
    return [path] + (["--quick"] if "--quick" in source else [])


@pytest.fixture(scope="module")
def example_runs():
    """Starts every example at once on a small process pool; maps path -> future."""
    workdir = tempfile.mkdtemp(prefix="fbackprop-examples-")
    workers = max(2, min(4, os.cpu_count() or 2))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    futures = {}
    for path in EXAMPLES:
        cwd = os.path.join(workdir, os.path.basename(path)[:-3])
        os.makedirs(cwd)
        futures[path] = pool.submit(_launch, _example_args(path), cwd)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(workdir, ignore_errors=True)


def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    for required in ("scalar_graphs.py", "two_layer_by_hand.py", "single_neuron.py",
                     "local_rules.py", "relu_mask.py", "saliency.py", "gradient_penalty.py",
                     "custom_swish.py", "straight_through.py", "ema_stop_gradient.py",
                     "residual_vs_plain.py", "numerical_vs_backprop.py",
                     "gradient_accumulation.py", "retain_graph.py", "training_loop.py",
                     "data_parallel.py"):
        assert required in names, f"examples/{required} is missing"


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p)[:-3] for p in EXAMPLES])
def test_example_runs(path, example_runs):
    out = _check(_example_args(path), example_runs[path].result())
    assert out.strip(), f"{os.path.basename(path)} printed nothing"


def test_demo_runs_quickly(tmp_path):
    args = ["-m", "fbackprop", "demo", "--epochs", "3", "--target", "0.9", "--no-progress",
            "--out", str(tmp_path / "out")]
    out = _check(args, _launch(args, cwd=str(tmp_path)))
    assert "gradient check at step 0: max |fb.grad - jax.grad|" in out
    assert "test accuracy" in out
    for name in ("digits_report.md", "digits_metrics.json"):
        assert (tmp_path / "out" / name).exists()
