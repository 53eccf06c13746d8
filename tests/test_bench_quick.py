"""The benchmark harness runs end to end and writes a well-formed JSON report."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from fbackprop._src import compat
from fbackprop.bench import cli as bench_cli
from fbackprop.bench import harness
from fbackprop.bench.workloads import Problem, Workload

FIGURES = ("jit_step", "flops", "temp_bytes", "trace_only", "trace_lower", "eager",
           "eager_closure")


def test_quick_run_writes_json(tmp_path):
    json_path = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    proc = subprocess.run(
        [sys.executable, "-m", "fbackprop", "bench", "--quick", "--only", "mlp,deep_narrow",
         "--json", str(json_path), "--plot", str(tmp_path / "bench.png")],
        check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fb/jax" in proc.stdout and "jax " in proc.stdout

    doc = json.loads(json_path.read_text())
    meta = doc["meta"]
    for key in ("platform", "device_kind", "jax_version", "cpu_count", "date", "command"):
        assert key in meta
    assert meta["quick"] is True
    assert doc["targets"] == harness.TARGETS
    assert [w["name"] for w in doc["workloads"]] == ["mlp", "deep_narrow"]
    for res in doc["workloads"]:
        assert res["status"] in ("ok", "partial", "error")
        for figure in FIGURES:
            # Every figure is either measured or reported as an error, never lost.
            assert (figure in res["figures"]) != (figure in res["errors"]), (res["name"], figure)
        for figure, fig in res["figures"].items():
            assert fig["fb"] > 0 and fig["jax"] > 0 and fig["ratio"] > 0, (res["name"], figure)
            assert fig["target"] == harness.TARGETS[figure]
            assert isinstance(fig["passed"], bool)
        if "jit_step" in res["figures"]:
            assert res["max_rel_err"] is not None and res["max_rel_err"] < 1e-3
            assert res["fb_grad_over_fwd"] > 0
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "bench.png").stat().st_size > 0
    except ImportError:
        assert "plot skipped" in proc.stdout


def _no_rule_primitive():
    prim = compat.primitive("bench_test_no_rule")
    prim.def_impl(lambda x: x)
    prim.def_abstract_eval(lambda aval: aval)
    return prim


def test_failing_workload_is_an_error_row_not_a_crash():
    prim = _no_rule_primitive()

    def make_loss():
        def loss(params, batch):
            return jnp.sum(prim.bind(params * batch))
        return loss

    workload = Workload("broken", "uses a primitive without rules", lambda quick: Problem(
        make_loss, (jnp.ones(3, jnp.float32), jnp.ones(3, jnp.float32)), "3"))
    res = harness.run_workload(workload, harness.Settings(quick=True))
    assert res["status"] == "error"
    assert set(res["errors"]) == set(FIGURES)
    assert "bench_test_no_rule" in res["errors"]["trace_lower"]


def test_unknown_workload_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--only", "no_such_workload"])
    assert exc.value.code == 2
    assert "no_such_workload" in capsys.readouterr().err


def test_main_dispatch_lists_subcommands(capsys):
    from fbackprop.__main__ import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("bench", "demo", "explain"):
        assert name in out
    assert main(["frobnicate"]) == 2


def test_depth_scaling_reports_cost_per_layer(tmp_path, capsys):
    from fbackprop.bench import depth
    path = tmp_path / "depth.json"
    assert bench_cli.main(["--depth", "--depths", "20,60", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    assert [r["depth"] for r in rows] == [20, 60]
    for r in rows:
        assert r["fb_seconds"] > 0 and r["jax_seconds"] > 0
        assert r["fb_us_per_layer"] == pytest.approx(r["fb_seconds"] / r["depth"] * 1e6)
        assert r["ratio"] == pytest.approx(r["fb_seconds"] / r["jax_seconds"])
    assert "us/layer" in out and "1.00 = linear in depth" in out
    assert doc["meta"]["jax_version"]
    with pytest.raises(SystemExit) as exc:
        depth.main(["--depths", "10,x"])
    assert exc.value.code == 2


def test_per_example_bench_measures_errors_memory_and_time(tmp_path, capsys):
    from fbackprop.bench import per_example
    path = tmp_path / "per_example.json"
    assert bench_cli.main(["--per-example", "--quick", "--only", "mlp,rnn", "--batches", "8",
                         "--reps", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert [r["name"] for r in doc["results"]] == ["mlp", "rnn"] and doc["device"]
    for res in doc["results"]:
        row, = res["rows"]
        assert set(row["temp"]) == set(per_example.STEP_NAMES)
        assert max(row["err_norms"], row["err_clipped"], row["err_clipped_reuse"],
                   row["err_clipped_second"]) < 1e-4
        assert all(row["seconds"][k] > 0 for k in row["ran"])
    assert "temp bytes" in out and "step time" in out and "device: " in out
    with pytest.raises(SystemExit) as exc:
        per_example.main(["--only", "resnet"])
    assert exc.value.code == 2


def test_floors_script_measures_the_floors_under_the_ratios():
    # benchmarks/floors.py measures every figure and derives the two floors from them.
    # Which time is smaller is the benchmark's finding, printed by the script; it is not
    # asserted here, because a shared machine's noise can reorder two close timings.
    import importlib.util
    import math
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "floors.py")
    spec = importlib.util.spec_from_file_location("bench_floors", path)
    floors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floors)
    from fbackprop.bench import workloads
    f = floors.measure(workloads.get(["mlp"])[0].build(True), reps=1)
    for side in ("forward", "fb", "jax"):
        for stage in ("trace", "lower"):
            assert 0 < f[f"{side}_{stage}"] < 60, (side, stage, f)
    for key in ("forward_eager", "fb_jitted", "fb_eager", "jax_eager"):
        assert 0 < f[key] < 60 and math.isfinite(f[key]), (key, f)
    jax_first_call = f["jax_trace"] + f["jax_lower"]
    assert f["trace_lower_ratio"] == pytest.approx((f["fb_trace"] + f["fb_lower"]) / jax_first_call)
    assert f["trace_lower_floor"] == pytest.approx((f["forward_trace"] + f["fb_lower"]) / jax_first_call)
    assert f["eager_ratio"] == pytest.approx(f["fb_eager"] / f["jax_eager"])
    assert f["eager_floor"] == pytest.approx(f["fb_jitted"] / f["jax_eager"])


@pytest.mark.parametrize("name", ["mlp", "mlp_hvp"])
def test_quick_eager_figures_are_timed_after_warm_up(name, monkeypatch):
    # fbackprop compiles an eager program's backward sweep on its second (hvp) or
    # third (grad) call; a quick run once timed that call and printed it as the
    # eager step ("20x slower"). Every such compile must fall in the warm-up.
    from fbackprop._src import eager
    from fbackprop.bench import workloads
    events = []
    real_compile, real_warm_up = eager._compile, harness.warm_up

    def compile_(*args, **kwargs):
        events.append("compile")
        return real_compile(*args, **kwargs)

    def warm_up(calls, warmup, min_sample):
        events.append("warm-up")
        try:
            return real_warm_up(calls, warmup, min_sample)
        finally:
            events.append("timed")

    monkeypatch.setattr(eager, "_compile", compile_)
    monkeypatch.setattr(harness, "warm_up", warm_up)
    res = harness.run_workload(workloads.get([name])[0], harness.Settings(quick=True))
    assert res["status"] == "ok", res["errors"]
    assert "eager" in res["figures"]
    assert events.count("compile") >= 1, "no eager program was compiled: nothing was checked"
    warming = False
    for event in events:
        if event != "compile":
            warming = event == "warm-up"
        assert warming or event != "compile", events


def test_while_bench_rejects_unknown_problems(capsys):
    with pytest.raises(SystemExit) as info:
        bench_cli.main(["--while", "--only", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown problem(s) nope" in err and "sinkhorn" in err
