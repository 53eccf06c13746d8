"""``python -m fbackprop bench``: the command line of every benchmark.

The default run is :mod:`.harness`'s (fbackprop against JAX on the workloads,
tables from :mod:`.report`); ``--memplan``, ``--depth``, ``--while`` and
``--per-example`` hand the rest of the command line to those benchmarks'
modules. This module sits above all of them, so none imports another's command
line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import harness
from . import workloads as workloads_mod


def build_parser(prog: str = "python -m fbackprop bench") -> argparse.ArgumentParser:
    from fbackprop._src.cli import ArgumentParser
    names = ", ".join(w.name for w in workloads_mod.WORKLOADS)
    parser = ArgumentParser(
        prog=prog, description="Benchmark fbackprop against jax on the same functions:\n"
        "jitted step time, compiled FLOPs and temp bytes, trace+lower time, eager step\n"
        "time, and gradient/forward time, as fb/jax ratios next to their targets.")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test of every figure: tiny sizes, few repetitions and "
                             f"XLA_FLAGS+={harness.QUICK_XLA_FLAG}; its eager steps are still "
                             "timed after warm-up. About 1 to 1.5 minutes of CPU time, "
                             "mostly XLA compiling each eager operation once; more wall "
                             "time on a busy machine")
    parser.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                        help=f"run only these workloads (repeatable). Known: {names}")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help="interleaved rounds for the jitted step time "
                             "(default 21, quick 3)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="directory for bench.json and bench.png "
                             "(default: benchmarks/results, or ./bench_results)")
    parser.add_argument("--json", default=None, metavar="PATH", help="JSON output path (default: DIR/bench.json; bench_quick.json with --quick)")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="PNG output path, or 'none' to skip the plot (default: "
                             "DIR/bench.png; bench_quick.png with --quick)")
    parser.add_argument("--aa", action="store_true",
                        help="A/A run: time jax against itself to see the noise floor")
    parser.add_argument("--verbose", action="store_true",
                        help="print full tracebacks of failing workloads")
    parser.add_argument("--memplan", action="store_true",
                        help="instead: memory-budget plans against JAX's checkpoint policies "
                             "(compiled temp bytes and FLOPs, the trade-off curve PNG in out/; "
                             "see fbackprop/bench/memplan.py)")
    parser.add_argument("--depth", action="store_true",
                        help="instead: tracing time against depth (1k/10k/100k layers of "
                             "deep_narrow, cost per layer; see fbackprop/bench/depth.py)")
    parser.add_argument("--while", dest="while_loops", action="store_true",
                        help="instead: reverse mode through while loops (solver loops "
                             "against references and Equinox: errors, recompute, compiled "
                             "memory, time; see fbackprop/bench/while_loop.py)")
    parser.add_argument("--per-example", action="store_true",
                        help="instead: per-example gradient norms and clipping against "
                             "jax.vmap(jax.grad) and jax.grad (see "
                             "fbackprop/bench/per_example.py)")
    return parser


def _output_paths(args) -> tuple[str, str | None]:
    out = args.out
    if out is None:
        out = os.path.join("benchmarks", "results") if os.path.isdir("benchmarks") \
            else "bench_results"
    stem = "bench_quick" if args.quick else "bench"
    if args.aa:
        stem += "_aa"
    json_path = args.json or os.path.join(out, stem + ".json")
    plot_path = args.plot or os.path.join(out, stem + ".png")
    if plot_path.lower() == "none":
        plot_path = None
    return json_path, plot_path


def main(argv: list[str] | None = None, prog: str = "python -m fbackprop bench") -> int:
    """Command-line entry point; returns the process exit code."""
    from . import report
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if "--memplan" in argv_list:
        from . import memplan
        rest = [a for a in argv_list if a != "--memplan"]
        return memplan.main(rest, prog=f"{prog} --memplan")
    if "--depth" in argv_list:
        from . import depth
        rest = [a for a in argv_list if a != "--depth"]
        return depth.main(rest, prog=f"{prog} --depth")
    if "--while" in argv_list:
        from . import while_loop
        rest = [a for a in argv_list if a != "--while"]
        return while_loop.main(rest, prog=f"{prog} --while", environment=harness.environment)
    if "--per-example" in argv_list:
        from . import per_example
        rest = [a for a in argv_list if a != "--per-example"]
        return per_example.main(rest, prog=f"{prog} --per-example")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list:
        for w in workloads_mod.WORKLOADS:
            print(f"{w.name:<18} {w.description}")
        return 0
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    try:
        workloads_mod.get(names)
    except ValueError as exc:
        parser.error(str(exc))
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    json_path, plot_path = _output_paths(args)
    from fbackprop._src.cli import check_output_path
    check_output_path(parser, "--json" if args.json else "--out", json_path)
    if plot_path:
        check_output_path(parser, "--plot" if args.plot else "--out", plot_path)
    if args.quick:
        harness._use_quick_compiler_flags()
    meta = harness.environment()
    print(report.header(meta, args.quick, args.aa), flush=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    doc = harness.run(names, quick=args.quick, reps=args.reps, aa=args.aa, verbose=args.verbose,
              command=" ".join([prog] + argv))
    print(report.table(doc))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, default=report.json_default)
    print(f"\nJSON: {json_path}")
    if plot_path:
        note = report.plot(doc, plot_path)
        print(note)
    return 0
