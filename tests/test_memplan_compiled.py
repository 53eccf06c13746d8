"""Memory-budget plans in compiled figures, against JAX's checkpoint policies.

Runs ``python -m fbackprop bench --memplan --quick`` (small sizes of the two
scan-over-layers models of the benchmark: the 4-block transformer and the
64-layer residual MLP) in a subprocess and asserts the claims on its JSON. The
figures are deterministic: compiled temp bytes
(``memory_analysis().temp_size_in_bytes``) and compiled FLOPs with every loop
trip counted (XLA's ``cost_analysis`` counts a loop body once; see
``fbackprop/bench/hloflops.py``, checked against it here). The quick run
compiles with LLVM's optimizations off, which changes neither figure.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from fbackprop.bench import hloflops
from fbackprop.bench import memplan as bench

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("memplan")
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    proc = subprocess.run(
        [sys.executable, "-m", "fbackprop", "bench", "--memplan", "--quick", "--no-curve",
         "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "memplan_quick.json").read_text())
    assert (out / "memplan_quick_curve.png").exists() or "plot skipped" in proc.stdout
    return {r["name"]: r for r in doc["results"]}


# one worker runs both models, so the module's bench run happens once
@pytest.mark.xdist_group("memplan_compiled")
@pytest.mark.parametrize("model", ["transformer", "mlp"])
def test_plans_against_jax_policies(results, model):
    res = results[model]
    verdicts = bench.checks(res)
    failed = [text for text, ok in verdicts if not ok]
    assert not failed, failed
    budgets = sorted((r for r in res["rows"] if r["kind"] == "budget"), key=lambda r: r["budget"])
    assert [r["budget"] for r in budgets] == [0.25, 0.5, 0.75]
    for r in budgets:
        assert r["kept_bytes"] <= r["budget_bytes"]
        assert r["max_abs_err"] <= 1e-4 * max(res["grad_scale"], 1.0)
    temps = [r["temp"] for r in budgets]
    assert temps == sorted(temps) and len(set(temps)) == 3
    jax_plain = next(r for r in res["rows"] if r["kind"] == "plain" and r["engine"] == "jax")
    nothing = next(r for r in res["rows"] if r["kind"] == "policy" and r["name"] ==
                   "nothing_saveable" and r["engine"] == "jax")
    # every plan recomputes less than saving nothing, and saves memory over plain
    assert all(r["flops"] < nothing["flops"] for r in budgets)
    assert all(r["temp"] < jax_plain["temp"] for r in budgets)
    half = budgets[1]
    assert half["recompute_flops"] < 2 / 3 * half["recompute_all_flops"]


def test_hlo_flops_reproduce_xla_cost_analysis_with_one_trip_per_loop():
    def f(w, x):
        y, _ = lax.scan(lambda c, w: (jnp.tanh(c @ w) * 2.0 + 1.0, None), x, w)
        return jnp.sum(y ** 2)

    w, x = jnp.ones((8, 16, 16), jnp.float32), jnp.ones((4, 16), jnp.float32)
    c = jax.jit(jax.grad(f)).lower(w, x).compile()
    xla = c.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert hloflops.compiled_flops(c, trips=False) == pytest.approx(xla["flops"], rel=0.02)
    # with every trip counted: eight times the loop bodies
    once, every = hloflops.compiled_flops(c, trips=False), hloflops.compiled_flops(c)
    dots = 3 * 2 * 4 * 16 * 16          # forward dot, two backward dots per step
    assert every - once == pytest.approx(7 * dots, rel=0.1)
