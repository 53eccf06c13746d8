"""The floors under fbackprop's first-call and eager figures, measured.

A ratio target can be out of reach for reasons no engine controls; this prints,
for each benchmark workload, the best ratio fbackprop could reach:

- **trace+lower floor**: (time to trace the forward pass alone + fbackprop's
  lowering time) / (JAX's trace time + JAX's lowering time). Any engine runs the
  user's code under ``jit`` once (the forward trace), and lowering to StableHLO
  costs about the same per equation whoever wrote the program; the floor is the
  trace+lower ratio fbackprop would reach if differentiating took no time at all.
- **eager floor**: fbackprop's jitted step / JAX's eager step: the eager ratio if
  an eager call cost no more than the whole step compiled into one program (it
  costs more: the forward pass runs op by op, on concrete values, to keep
  ``jax.grad``'s semantics).

Each figure is the median of ``--reps`` interleaved samples, with a fresh loss
function, fbackprop's caches cleared and a full garbage collection before each
tracing sample (as ``python -m fbackprop bench`` does).

Run: python benchmarks/floors.py [--only NAME[,NAME]] [--reps N] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import jax

try:
    from fbackprop.bench import harness, workloads
except ImportError:   # running from a source checkout without installing
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from fbackprop.bench import harness, workloads


def _first_call(problem, which: str) -> tuple[float, float]:
    """Seconds to trace and to lower one fresh step (``which``: "forward", "fb", "jax")."""
    loss = problem.make_loss()
    harness.clear_fb_caches()
    if which == "forward":
        fn = harness.forward_of(problem.kind, loss)
    else:
        fn = harness.differentiate(problem.kind, which, loss)
    gc.collect()
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(*problem.args)
    t1 = time.perf_counter()
    traced.lower()
    return t1 - t0, time.perf_counter() - t1


def _call_time(fn, args, reps: int) -> float:
    # Warm-up: compiling, and for an eager fbackprop call, the calls after which
    # its repeated program runs compiled.
    for _ in range(4):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(problem, reps: int) -> dict:
    """The figures of one built workload, in seconds, and its two floors."""
    sides = ("forward", "fb", "jax")
    for side in sides:           # first traces pay one-time set-up costs
        _first_call(problem, side)
    samples: dict = {side: [] for side in sides}
    for r in range(reps):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            samples[side].append(_first_call(problem, side))
    out = {}
    for side, s in samples.items():
        out[f"{side}_trace"] = statistics.median(t for t, _ in s)
        out[f"{side}_lower"] = statistics.median(lo for _, lo in s)
    loss = problem.make_loss()
    kind, args = problem.kind, problem.args
    out["forward_eager"] = _call_time(harness.forward_of(kind, loss), args, reps)
    out["fb_jitted"] = _call_time(jax.jit(harness.differentiate(kind, "fb", loss)), args, reps)
    out["fb_eager"] = _call_time(harness.differentiate(kind, "fb", loss), args, reps)
    out["jax_eager"] = _call_time(harness.differentiate(kind, "jax", loss), args, reps)
    out["trace_lower_ratio"] = ((out["fb_trace"] + out["fb_lower"])
                                / (out["jax_trace"] + out["jax_lower"]))
    out["trace_lower_floor"] = ((out["forward_trace"] + out["fb_lower"])
                                / (out["jax_trace"] + out["jax_lower"]))
    out["eager_ratio"] = out["fb_eager"] / out["jax_eager"]
    out["eager_floor"] = out["fb_jitted"] / out["jax_eager"]
    return out


def _ms(s: float) -> str:
    return f"{s * 1e3:8.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/floors.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated workload names")
    parser.add_argument("--reps", type=int, default=9, help="samples per figure (default 9)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    opts = parser.parse_args(argv)
    names = opts.only.split(",") if opts.only else None
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; times in ms, medians "
          f"of {opts.reps}" + ("; quick sizes" if opts.quick else ""))
    print(f"{'workload':18s} {'fwd trace':>9s} {'fb trace':>9s} {'jax trace':>9s} "
          f"{'fb lower':>9s} {'jax lower':>9s}  T+L ratio  floor | {'fwd eager':>9s} "
          f"{'fb jit':>8s} {'fb eager':>8s} {'jax eager':>9s}  eager ratio  floor")
    for wl in workloads.get(names):
        problem = wl.build(opts.quick)
        f = measure(problem, opts.reps)
        print(f"{wl.name:18s} {_ms(f['forward_trace']):>9s} {_ms(f['fb_trace']):>9s} "
              f"{_ms(f['jax_trace']):>9s} {_ms(f['fb_lower']):>9s} {_ms(f['jax_lower']):>9s}"
              f"  {f['trace_lower_ratio']:9.2f}  {f['trace_lower_floor']:5.2f} | "
              f"{_ms(f['forward_eager']):>9s} {_ms(f['fb_jitted'])} {_ms(f['fb_eager'])} {_ms(f['jax_eager']):>9s}"
              f"  {f['eager_ratio']:11.2f}  {f['eager_floor']:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
