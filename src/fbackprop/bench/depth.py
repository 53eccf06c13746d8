"""Tracing cost against depth: ``python -m fbackprop bench --depth``.

Traces the gradient of the ``deep_narrow`` net (tanh layers of width 16, batch 32)
at several depths, with fbackprop and with JAX, and prints the time and the cost per
layer of each: tracing that grows linearly with depth keeps the per-layer cost flat.
The figure is ``jax.jit(value_and_grad(loss)).trace(params, batch)``, the tracing part
of the first call (fbackprop's forward and backward sweeps, or JAX's linearize and
transpose), with a fresh loss function and fbackprop's jaxpr cache cleared each time;
the two engines alternate and the fastest of the repetitions counts (contention only
ever adds time). The target is fb/jax <= 0.50 at 10,000 layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

TARGET_DEPTH, TARGET_RATIO = 10_000, 0.50
DEFAULT_DEPTHS = (1_000, 10_000, 100_000)
QUICK_DEPTHS = (50, 200)


def _problem(depth: int):
    from . import workloads
    return workloads.deep_args(depth, width=16, batch=32)


def trace_seconds(engine: str, params, data) -> float:
    """One trace of the gradient step, from a fresh function."""
    import jax

    import fbackprop as fb
    from fbackprop._src import trace

    from . import workloads
    loss = workloads.make_deep_loss()
    trace.clear_cache()
    step = fb.value_and_grad(loss) if engine == "fb" else jax.value_and_grad(loss)
    gc.collect()
    t0 = time.perf_counter()
    jax.jit(step).trace(params, data)
    return time.perf_counter() - t0


def reps_for(depth: int) -> int:
    return 5 if depth <= 2_000 else 3 if depth <= 20_000 else 1


def measure(depths, log=sys.stderr) -> list[dict]:
    rows = []
    warm = _problem(10)
    for engine in ("fb", "jax"):       # one-time imports and rule tables
        trace_seconds(engine, *warm)
    for depth in depths:
        params, data = _problem(depth)
        times: dict = {"fb": [], "jax": []}
        for r in range(reps_for(depth)):
            order = ("fb", "jax") if r % 2 == 0 else ("jax", "fb")
            for engine in order:
                times[engine].append(trace_seconds(engine, params, data))
        fb_s, jax_s = min(times["fb"]), min(times["jax"])
        row = {"depth": depth, "fb_seconds": fb_s, "jax_seconds": jax_s,
               "fb_us_per_layer": fb_s / depth * 1e6, "jax_us_per_layer": jax_s / depth * 1e6,
               "ratio": fb_s / jax_s, "samples": times}
        rows.append(row)
        print(f"  depth {depth}: fb {fb_s:.2f} s, jax {jax_s:.2f} s", file=log, flush=True)
        del params, data
        gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'layers':>8}  {'fb s':>8}  {'fb us/layer':>11}  {'jax s':>8}  "
             f"{'jax us/layer':>12}  {'fb/jax':>6}"]
    for r in rows:
        lines.append(f"{r['depth']:>8}  {r['fb_seconds']:>8.3f}  {r['fb_us_per_layer']:>11.0f}  "
                     f"{r['jax_seconds']:>8.3f}  {r['jax_us_per_layer']:>12.0f}  "
                     f"{r['ratio']:>6.2f}")
    first, last = rows[0], rows[-1]
    growth = last["fb_us_per_layer"] / first["fb_us_per_layer"]
    lines.append(f"fbackprop's cost per layer at {last['depth']} layers is {growth:.2f}x "
                 f"its cost at {first['depth']} (1.00 = linear in depth)")
    at = [r for r in rows if r["depth"] == TARGET_DEPTH]
    if at:
        ok = round(at[0]["ratio"], 2) <= TARGET_RATIO
        lines.append(f"target fb/jax <= {TARGET_RATIO:.2f} at {TARGET_DEPTH} layers: "
                     f"{at[0]['ratio']:.2f} {'PASS' if ok else 'MISS'}")
    return "\n".join(lines)


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts such as 1000,10000, got {text!r}") from None
    if not depths or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"layer counts must be positive, got {text!r}")
    return depths


def main(argv=None, prog: str = "python -m fbackprop bench --depth") -> int:
    from fbackprop._src.cli import ArgumentParser, check_output_path

    from .harness import environment
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=_depths, default=None, metavar="N[,N]",
                        help="layer counts (default 1000,10000,100000; quick 50,200)")
    parser.add_argument("--quick", action="store_true",
                        help="small depths: checks that the figure can be measured")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="JSON output (default benchmarks/results/depth.json, "
                             "depth_quick.json with --quick)")
    args = parser.parse_args(argv)
    depths = args.depths or list(QUICK_DEPTHS if args.quick else DEFAULT_DEPTHS)
    out = os.path.join("benchmarks", "results") if os.path.isdir("benchmarks") \
        else "bench_results"
    json_path = args.json or os.path.join(out, "depth_quick.json" if args.quick
                                          else "depth.json")
    check_output_path(parser, "--json", json_path)
    meta = environment()
    meta.update(command=" ".join([prog] + list(sys.argv[1:] if argv is None else argv)))
    print(f"tracing the gradient of deep_narrow (width 16, batch 32) on "
          f"{meta.get('device_kind', '?')}, jax {meta.get('jax_version', '?')}", flush=True)
    rows = measure(depths)
    print(table(rows))
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {json_path}")
    return 0
