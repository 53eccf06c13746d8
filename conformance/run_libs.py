"""Runs Equinox's, lineax's and optimistix's own test files with JAX and with fbackprop.

    python -m conformance.run_libs                                  # every file of the three
    python -m conformance.run_libs --libs lineax --files test_jvp -n 2 -k matrix

The same harness as for JAX's test files (:mod:`conformance.run`): per test file a
baseline run with JAX (cached in ``out/conformance/libs/baseline/``), then a run of
the tests that passed and called a differentiation entry point, with those entry
points rerouted to fbackprop. Here "the test side" is everything outside JAX's own
code: the tests *and the libraries' code* (``eqx.filter_jvp`` calling ``jax.jvp``,
optimistix calling ``jax.linearize``) reach fbackprop, while JAX's internal calls
stay JAX's (:func:`conformance.reroute.called_from_test_side`). Calls are counted
per test: a test that passes without reaching fbackprop is *not exercised*, not a
pass. Failures are classified as for JAX's files, with the list
``conformance/libs/classification.toml`` first; ``--record`` writes the verdicts to
``conformance/libs/recorded/<library>/<file>.tsv``. Reports go to
``out/conformance/libs/report.{json,md}``.

The libraries' tests must be in ``conformance/lib_tests/`` first, copied from the
release tag of each installed version (:mod:`conformance.get_lib_tests`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from conformance import classify as C
from conformance import reroute
from conformance import run as R
from conformance.get_lib_tests import (DEFAULT_DEST, LIBRARIES, VERSION_FILE,
                                       installed_version, tests_dir)

HERE = os.path.dirname(os.path.abspath(__file__))
PYTEST_INI = os.path.join(HERE, "pytest_libs.ini")
LIBS_DIR = os.path.join(HERE, "libs")
CLASSIFICATION_FILE = os.path.join(LIBS_DIR, "classification.toml")
RECORDED_DIR = os.path.join(LIBS_DIR, "recorded")
DEFAULT_OUT = os.path.join(R.DEFAULT_OUT, "libs")

NOT_EXERCISED = "not exercised"
COLUMNS = ("tests", "JAX pass", "use AD", "fb pass", NOT_EXERCISED) + C.CLASSES + ("other",)
HELP_COLUMNS = """\
tests: collected by JAX's run; JAX pass: passed with JAX; use AD: of those, the tests
whose test or library code called a differentiation entry point (only these run with
fbackprop); fb pass: passed with fbackprop and reached it; not exercised: passed
without reaching fbackprop; then why the others failed (other = not reported)."""


def test_files(library: str, root: str) -> list[str]:
    folder = tests_dir(library, root)
    return sorted(f[:-3] for f in os.listdir(folder)
                  if f.startswith("test_") and f.endswith(".py"))


def _prefixed(data: dict | None, library: str) -> dict | None:
    """A results file with its test ids prefixed by the library
    (``lineax/test_jvp.py::test_x``): file names repeat across libraries."""
    if data is None:
        return None
    out = dict(data)
    out["results"] = {f"{library}/{t}": r for t, r in data.get("results", {}).items()}
    return out


def summarize(name: str, library: str, baseline: dict, fb: dict | None, rules, run_all):
    """:func:`conformance.run.summarize_file`, with the tests that passed without
    reaching fbackprop counted as not exercised instead of passed."""
    summary = R.summarize_file(name, _prefixed(baseline, library), _prefixed(fb, library),
                               rules, run_all)
    not_exercised = summary.pop("unrouted")
    summary["unrouted"] = []
    summary["not_exercised"] = not_exercised
    summary["fb_passed"] -= set(not_exercised)
    row = summary["row"]
    row["fb pass"] -= len(not_exercised)
    row[NOT_EXERCISED] = len(not_exercised)
    summary["row"] = {c: row[c] for c in COLUMNS}
    return summary


def _check_versions(libraries, root) -> str | None:
    problems = []
    for library in libraries:
        folder = tests_dir(library, root)
        stamp = os.path.join(folder, VERSION_FILE)
        if not os.path.isdir(folder):
            problems.append(f"{library}: no tests in {folder}")
            continue
        have = open(stamp).read().strip() if os.path.exists(stamp) else "unknown"
        want = installed_version(library)
        if have != want:
            problems.append(f"{library}: {folder} holds the tests of {have}, but {want} is "
                            f"installed")
    if not problems:
        return None
    return ("\n".join(problems) + "\nCopy the installed versions' tests first (nothing is "
            "downloaded here), e.g.\n  python -m conformance.get_lib_tests "
            + " ".join(f"--git {lib}=<clone of {url}>" for lib, url in LIBRARIES.items())
            + "\n(see the README, 'Conformance with JAX's test suite').")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libs", default=",".join(LIBRARIES),
                        help=f"comma-separated libraries (default {','.join(LIBRARIES)})")
    parser.add_argument("--files", default=None,
                        help="comma-separated test files (test_jvp or lineax/test_jvp); "
                             "default: every test_*.py of the libraries")
    parser.add_argument("-n", "--workers", type=int, default=2,
                        help="pytest-xdist workers per run (0: in process); default 2")
    parser.add_argument("-k", default=None, help="pytest -k expression for both runs")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test")
    parser.add_argument("--tests-dir", default=DEFAULT_DEST)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--rerun-baseline", action="store_true",
                        help="run JAX's baseline again even if a cached one matches")
    parser.add_argument("--reclassify", action="store_true",
                        help="reuse the last JAX and fbackprop runs' results and only "
                             "classify and report again")
    parser.add_argument("--all", action="store_true",
                        help="also run the JAX-passing tests that never differentiate")
    parser.add_argument("--record", action="store_true",
                        help="rewrite conformance/libs/recorded/ with this run's verdicts")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 on wrong numbers or on failures not recorded")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = parser.parse_args(argv)

    libraries = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    unknown = [lib for lib in libraries if lib not in LIBRARIES]
    if unknown:
        print(f"unknown libraries {unknown}; choose from {', '.join(LIBRARIES)}",
              file=sys.stderr)
        return 2
    problem = _check_versions(libraries, args.tests_dir)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    wanted = None
    if args.files:
        wanted = {f.strip().removesuffix(".py") for f in args.files.split(",") if f.strip()}
    files = []      # (library, file)
    for library in libraries:
        for name in test_files(library, args.tests_dir):
            if wanted is None or name in wanted or f"{library}/{name}" in wanted:
                files.append((library, name))
    if not files:
        print(f"no test file of {', '.join(libraries)} matches --files {args.files}",
              file=sys.stderr)
        return 2
    rules = C.load_rules(CLASSIFICATION_FILE)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    import fbackprop

    start = time.time()
    summaries, changes, fb_records, timings = {}, {}, {}, {}
    for library, file in files:
        name = f"{library}/{file}"
        tag = name.replace("/", ".")
        test_file = os.path.join(tests_dir(library, args.tests_dir), file + ".py")
        key = dict(R._baseline_key(test_file, args.k), library=library,
                   library_version=installed_version(library))
        base_dir = os.path.join(args.out, "baseline")
        os.makedirs(base_dir, exist_ok=True)
        base_path = os.path.join(base_dir, tag + ".json")
        baseline = R._load(base_path) if os.path.exists(base_path) else None
        reuse = args.reclassify and baseline is not None and not args.rerun_baseline
        if not reuse and (baseline is None or baseline.get("key") != key
                          or args.rerun_baseline):
            print(f"[{name}] running with JAX ...", flush=True)
            secs = R.run_pytest(test_file, "jax", base_path,
                                os.path.join(args.out, "logs", tag + ".jax.log"),
                                workers=args.workers, timeout=args.timeout, k=args.k,
                                select=None, extra=args.pytest_args, ini=PYTEST_INI)
            baseline = R._load(base_path)
            baseline["key"], baseline["wall_seconds"] = key, round(secs, 1)
            with open(base_path, "w") as f:
                json.dump(baseline, f, indent=1)
        else:
            print(f"[{name}] JAX baseline from {os.path.relpath(base_path)} (cached; "
                  f"--rerun-baseline to redo)", flush=True)
        base_results = baseline["results"]
        selected = sorted(t for t, r in base_results.items() if r["outcome"] == "passed"
                          and (args.all or reroute.test_side_calls(r.get("calls", {}))))
        select_path = os.path.join(args.out, tag + ".selected.txt")
        with open(select_path, "w") as f:
            f.write("\n".join(selected) + "\n")
        fb, fb_secs = None, 0.0
        fb_path = os.path.join(args.out, tag + ".fbackprop.json")
        if selected and args.reclassify and os.path.exists(fb_path):
            fb = R._load(fb_path)
            fb_secs = fb.get("seconds", 0.0)
            print(f"[{name}] fbackprop results from {os.path.relpath(fb_path)} (reused)")
        elif selected:
            print(f"[{name}] running {len(selected)} tests with fbackprop ...", flush=True)
            fb_secs = R.run_pytest(test_file, "fbackprop", fb_path,
                                   os.path.join(args.out, "logs", tag + ".fbackprop.log"),
                                   workers=args.workers, timeout=args.timeout, k=args.k,
                                   select=select_path, extra=args.pytest_args, ini=PYTEST_INI)
            fb = R._load(fb_path)
        timings[name] = {"jax": baseline.get("wall_seconds"), "fbackprop": round(fb_secs, 1)}
        fb_records[name] = (_prefixed(fb, library) or {}).get("results", {})
        summary = summarize(name, library, baseline, fb, rules, args.all)
        summaries[name] = summary
        rec_path = os.path.join(RECORDED_DIR, library, file + ".tsv")
        if args.k is None and os.path.exists(rec_path):
            changes[name] = C.compare_recorded(C.read_recorded(rec_path), summary["verdicts"],
                                               summary["fb_passed"])
        if args.record:
            if args.k is not None:
                print("--record ignored with -k (a partial run)", file=sys.stderr)
            else:
                r = summary["row"]
                C.write_recorded(rec_path, summary["verdicts"], [
                    f"fbackprop conformance verdicts for {library} "
                    f"{installed_version(library)}'s tests/{file}.py",
                    "test id <TAB> class <TAB> root cause; written by "
                    "`make conformance-libs-record`",
                    ", ".join(f"{c}: {r[c]}" for c in COLUMNS)])
        r = summary["row"]
        print(f"[{name}] {r['JAX pass']}/{r['tests']} pass with JAX, {r['use AD']} use AD, "
              f"{r['fb pass']} pass with fbackprop, {r[NOT_EXERCISED]} not exercised "
              f"({fb_secs:.0f} s)", flush=True)

    seconds = time.time() - start
    meta = {"jax_version": R.installed_jax_version(),
            "libraries": {lib: installed_version(lib) for lib in libraries},
            "fbackprop_version": fbackprop.__version__, "commit": R._git_commit(),
            "python": sys.version.split()[0], "workers": args.workers,
            "seconds": round(seconds, 1), "timings": timings, "k": args.k, "all": args.all}
    rows = {n + ".py": s["row"] for n, s in summaries.items()}
    print("\n" + R.format_table(rows, COLUMNS))
    print(HELP_COLUMNS)
    for name, s in summaries.items():
        for line in R.failure_lists(name + ".py", s):
            print(line)
    wrong = [(t, v) for s in summaries.values() for t, v in s["verdicts"].items()
             if v.cls == C.WRONG_NUMBERS]
    if wrong:
        print(f"\n!!! {len(wrong)} test(s) get WRONG NUMBERS from fbackprop:")
        for t, v in wrong:
            print(f"!!!   {t}: {v.reason}")
    changed = {n: ch for n, ch in changes.items() if any(ch.values())}
    if changed:
        print("\nChanges against conformance/libs/recorded/ (`make conformance-libs-record` "
              "to accept):")
        for name, ch in changed.items():
            for kind, items in ch.items():
                for item in items:
                    print(f"  {name}.py {kind}: " + " ".join(str(x) for x in item))
    json_path, md_path = R.write_reports(
        args.out, meta, summaries, changes, fb_records,
        title="Conformance with Equinox's, lineax's and optimistix's test suites",
        columns=COLUMNS, help_text=HELP_COLUMNS)
    print(f"\nwrote {os.path.relpath(json_path)} and {os.path.relpath(md_path)}; "
          f"{seconds:.0f} s in all")
    if args.strict and (wrong or any(ch["new"] or ch["reclassified"]
                                     for ch in changes.values())):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
