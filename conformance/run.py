"""Runs JAX's test files with JAX and with fbackprop, and reports the differences.

    python -m conformance.run                         # every file of DEFAULT_FILES
    python -m conformance.run --files api_test,nn_test -n 2 -k grad

For each file: a baseline run with JAX (cached in ``out/conformance/baseline/`` per
file content, JAX version and environment), then a run of the tests that passed with
JAX and call a differentiation entry point, with those entry points rerouted to
fbackprop. Every fbackprop failure is classified (:mod:`conformance.classify`). The
table and the failure lists go to stdout; ``out/conformance/report.json`` and
``report.md`` keep them. ``--record`` rewrites ``conformance/recorded/<file>.tsv``,
the committed verdicts that the next run (or the next JAX version) is compared to.

Nothing is downloaded here: JAX's tests must already be in ``conformance/jax_tests/``
(see :mod:`conformance.get_jax_tests`).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import subprocess
import sys
import time

from conformance import classify as C
from conformance import reroute
from conformance.get_jax_tests import DEFAULT_DEST, VERSION_FILE, installed_jax_version

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTEST_INI = os.path.join(HERE, "pytest.ini")
RECORDED_DIR = os.path.join(HERE, "recorded")
DEFAULT_OUT = os.path.join(ROOT, "out", "conformance")

DEFAULT_FILES = ("api_test", "custom_api_test", "lax_control_flow_test", "nn_test",
                 "lax_autodiff_test", "linalg_test", "lax_scipy_test",
                 "custom_root_test", "custom_linear_solve_test", "ode_test")
# Bump when the plugin records outcomes differently: cached baselines are then redone.
HARNESS_VERSION = 2
# Environment variables that change which tests exist or how they run.
KEY_ENV = ("JAX_ENABLE_X64", "JAX_NUM_GENERATED_CASES", "JAX_PLATFORMS", "XLA_FLAGS",
           "JAX_DEFAULT_MATMUL_PRECISION", "JAX_TEST_NUM_THREADS")

COLUMNS = ("tests", "JAX pass", "use AD", "fb pass") + C.CLASSES + ("other",)
SHORT = {"tests": "tests", "JAX pass": "JAX pass", "use AD": "use AD", "fb pass": "fb pass",
         C.WRONG_NUMBERS: "wrong num", C.MISSING_RULE: "missing rule",
         C.API_DIFFERENCE: "API diff", C.CRASH: "crash", C.INTERNALS: "internals",
         "other": "other"}
HELP_COLUMNS = """\
tests: collected by JAX's run; JAX pass: passed with JAX; use AD: of those, the tests
that call a differentiation entry point (only these are run with fbackprop);
fb pass: passed with fbackprop; then why the others failed (other = not reported)."""


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _baseline_key(test_file: str, select_k: str | None) -> dict:
    from importlib.metadata import version

    with open(test_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"harness": HARNESS_VERSION, "file_sha256": digest, "jax": version("jax"),
            "jaxlib": version("jaxlib"), "k": select_k or "",
            "env": {k: os.environ.get(k, "") for k in KEY_ENV}}


def run_pytest(test_file: str, mode: str, results: str, log: str, *, workers: int,
               timeout: float, k: str | None, select: str | None, extra: list[str],
               ini: str = PYTEST_INI) -> float:
    """One pytest run of ``test_file`` (with the pytest configuration ``ini``);
    returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "pytest", "-c", ini, "-p", "conformance.plugin",
           f"--fbconf-mode={mode}", f"--fbconf-results={results}", "-q", "--tb=short",
           "-o", "console_output_style=count"]
    if workers > 0:
        cmd += ["-n", str(workers)]
    if timeout > 0:
        cmd += [f"--timeout={timeout}"]
    if k:
        cmd += ["-k", k]
    if select:
        cmd += [f"--fbconf-select={select}"]
    cmd += extra + [test_file]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if os.path.exists(results):
        os.remove(results)
    start = time.time()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.time() - start
    if not os.path.exists(results):
        raise SystemExit(f"pytest wrote no results for {test_file} ({mode}, exit "
                         f"{proc.returncode}); see {log}")
    return seconds


def _load(path):
    with open(path) as f:
        return json.load(f)


def summarize_file(name: str, baseline: dict, fb: dict | None, rules, run_all: bool):
    """Counts, verdicts and the ids of the passing tests for one file."""
    base_results = baseline["results"]
    jax_passed = {t for t, r in base_results.items() if r["outcome"] == "passed"}
    use_ad = {t for t in jax_passed if reroute.test_side_calls(base_results[t].get("calls", {}))}
    selected = jax_passed if run_all else use_ad
    fb_results = (fb or {}).get("results", {})
    verdicts, fb_passed, not_reported, unrouted = {}, set(), [], []
    for test_id in sorted(selected):
        rec = fb_results.get(test_id)
        if rec is None:
            not_reported.append(test_id)
            continue
        if rec["outcome"] == "passed":
            fb_passed.add(test_id)
            if test_id in use_ad and not _fb_calls(rec):
                unrouted.append(test_id)
            continue
        verdicts[test_id] = C.classify(test_id, rec, rules)
    counts = collections.Counter(v.cls for v in verdicts.values())
    row = {"tests": len(base_results), "JAX pass": len(jax_passed), "use AD": len(use_ad),
           "fb pass": len(fb_passed & use_ad), "other": len(not_reported)}
    row.update({cls: counts.get(cls, 0) for cls in C.CLASSES})
    return {"row": row, "verdicts": verdicts, "fb_passed": fb_passed,
            "not_reported": not_reported, "unrouted": unrouted,
            "collect_errors": (baseline.get("collect_errors") or [])
            + ((fb or {}).get("collect_errors") or [])}


def _fb_calls(rec) -> int:
    return sum(c.get("fbackprop", 0) for c in (rec.get("calls") or {}).values())


# ------------------------------------------------------------------ output
def format_table(rows: dict[str, dict], columns=COLUMNS) -> str:
    names = list(rows)
    total = {c: sum(rows[n][c] for n in names) for c in columns}
    short = {c: SHORT.get(c, c) for c in columns}
    width = max([len(n) for n in names] + [5]) + 2
    head = "file".ljust(width) + "".join(short[c].rjust(max(len(short[c]), 5) + 2)
                                        for c in columns)
    lines = [head, "-" * len(head)]
    for n, r in list(rows.items()) + [("TOTAL", total)]:
        if n == "TOTAL":
            lines.append("-" * len(head))
        lines.append(n.ljust(width) + "".join(str(r[c]).rjust(max(len(short[c]), 5) + 2)
                                              for c in columns))
    return "\n".join(lines)


def format_markdown_table(rows: dict[str, dict], columns=COLUMNS) -> str:
    names = list(rows)
    total = {c: sum(rows[n][c] for n in names) for c in columns}
    lines = ["| file | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for n, r in list(rows.items()) + [("**total**", total)]:
        lines.append(f"| {n} | " + " | ".join(str(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def failure_lists(name: str, summary: dict, markdown: bool = False) -> list[str]:
    out = []
    by_class = collections.defaultdict(list)
    for test_id, v in summary["verdicts"].items():
        by_class[v.cls].append((test_id, v))
    for cls in C.CLASSES:
        items = by_class.get(cls)
        if not items:
            continue
        title = f"{name}: {cls} ({len(items)})"
        out.append(f"\n### {title}\n" if markdown else f"\n  {title}")
        for test_id, v in items:
            tag = " [list]" if v.source == "list" else ""
            short_id = test_id.split("::", 1)[-1]
            out.append(f"- `{short_id}`: {v.reason}{tag}" if markdown
                       else f"    {short_id}: {v.reason}{tag}")
    if summary["not_reported"]:
        out.append(f"\n  {name}: not reported by the fbackprop run "
                   f"({len(summary['not_reported'])})")
        out += [f"    {t}" for t in summary["not_reported"]]
    if summary["unrouted"]:
        out.append(f"\n  {name}: WARNING: passed without calling fbackprop although JAX's "
                   f"run called an entry point ({len(summary['unrouted'])})")
        out += [f"    {t}" for t in summary["unrouted"]]
    if summary.get("not_exercised"):
        out.append(f"\n  {name}: not exercised: passed without reaching fbackprop although "
                   f"JAX's run called an entry point ({len(summary['not_exercised'])})")
        out += [f"    {t}" for t in summary["not_exercised"]]
    for err in summary["collect_errors"]:
        out.append(f"\n  {name}: collection error in {err['nodeid']}:\n"
                   + "\n".join("    " + l for l in err["longrepr"].splitlines()[-8:]))
    return out


def root_causes(summaries: dict[str, dict]) -> list[tuple[str, str, list[str]]]:
    """(class, root cause, test ids) over all files, biggest groups first."""
    groups = collections.defaultdict(list)
    for name, s in summaries.items():
        for test_id, v in s["verdicts"].items():
            groups[(v.cls, v.group)].append(test_id)
    order = {cls: i for i, cls in enumerate(C.CLASSES)}
    return sorted(((cls, g, ids) for (cls, g), ids in groups.items()),
                  key=lambda x: (order[x[0]], -len(x[2]), x[1]))


def write_reports(out_dir, meta, summaries, changes, fb_records, *,
                  title="Conformance with JAX's test suite", columns=COLUMNS,
                  help_text=HELP_COLUMNS) -> tuple[str, str]:
    rows = {n: s["row"] for n, s in summaries.items()}
    data = {"meta": meta, "columns": list(columns), "files": {}}
    for name, s in summaries.items():
        failures = []
        for test_id, v in s["verdicts"].items():
            rec = fb_records[name].get(test_id, {})
            excs = rec.get("exceptions") or [{}]
            failures.append({"id": test_id, "class": v.cls, "reason": v.reason,
                             "root_cause": v.group, "source": v.source,
                             "exception": excs[-1].get("type"),
                             "message": (excs[-1].get("message") or "")[:600],
                             "failing_line": rec.get("failing_line", ""),
                             "fbackprop_frame": C._where(C._deepest_fb_frame(excs))
                             if C._deepest_fb_frame(excs) else None})
        data["files"][name] = {"counts": s["row"], "failures": failures,
                               "not_reported": s["not_reported"], "unrouted": s["unrouted"],
                               "not_exercised": s.get("not_exercised", []),
                               "changes_vs_recorded": changes.get(name)}
    json_path = os.path.join(out_dir, "report.json")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)

    md = [f"# {title}", "",
          f"JAX {meta['jax_version']}, fbackprop {meta['fbackprop_version']} "
          f"(commit {meta['commit']}), python {meta['python']}; "
          f"{meta['seconds']:.0f} s on {meta['workers']} worker(s).", "",
          format_markdown_table(rows, columns), "", help_text, ""]
    wrong = [(n, t, v) for n, s in summaries.items() for t, v in s["verdicts"].items()
             if v.cls == C.WRONG_NUMBERS]
    if wrong:
        md += [f"## WRONG NUMBERS ({len(wrong)})", ""]
        md += [f"- `{t}`: {v.reason}" for _, t, v in wrong]
        md.append("")
    md += ["## Root causes", ""]
    for cls, group, ids in root_causes(summaries):
        md.append(f"- **{cls}** -- {group} ({len(ids)}): "
                  + ", ".join(f"`{i}`" for i in ids[:12]) + (" ..." if len(ids) > 12 else ""))
    md += ["", "## Failures per file"]
    for name, s in summaries.items():
        md += failure_lists(name, s, markdown=True)
    if any(changes.values()):
        md += ["", "## Changes against conformance/recorded/"]
        for name, ch in changes.items():
            md += [f"- {name}: " + ", ".join(f"{len(v)} {k}" for k, v in ch.items())]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    return json_path, md_path


# -------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default=",".join(DEFAULT_FILES),
                        help="comma-separated test files (api_test or api_test.py)")
    parser.add_argument("-n", "--workers", type=int, default=2,
                        help="pytest-xdist workers per run (0: in process); default 2")
    parser.add_argument("-k", default=None, help="pytest -k expression for both runs")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per test")
    parser.add_argument("--tests-dir", default=DEFAULT_DEST)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--rerun-baseline", action="store_true",
                        help="run JAX's baseline again even if a cached one matches")
    parser.add_argument("--reclassify", action="store_true",
                        help="reuse the last JAX and fbackprop runs' results (out/conformance/"
                             "<file>.fbackprop.json, baseline/) and only classify and report "
                             "again")
    parser.add_argument("--all", action="store_true",
                        help="also run the JAX-passing tests that never differentiate")
    parser.add_argument("--record", action="store_true",
                        help="rewrite conformance/recorded/<file>.tsv with this run's verdicts")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 on wrong numbers or on failures not recorded")
    parser.add_argument("--allow-version-mismatch", action="store_true")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = parser.parse_args(argv)

    version = installed_jax_version()
    stamp = os.path.join(args.tests_dir, VERSION_FILE)
    if not os.path.isdir(args.tests_dir):
        print(f"JAX's tests are not in {args.tests_dir}.\n"
              f"Copy tests/ of JAX {version} there first (nothing is downloaded here):\n"
              f"  git clone --depth 1 --branch jax-v{version} <JAX's repository> /tmp/jax\n"
              f"  python -m conformance.get_jax_tests --git /tmp/jax\n"
              f"(see the README, 'Conformance with JAX's test suite').", file=sys.stderr)
        return 2
    tests_version = open(stamp).read().strip() if os.path.exists(stamp) else "unknown"
    if tests_version != version and not args.allow_version_mismatch:
        print(f"{args.tests_dir} holds the tests of JAX {tests_version}, but JAX {version} "
              f"is installed; copy the matching tests (python -m conformance.get_jax_tests) "
              f"or pass --allow-version-mismatch.", file=sys.stderr)
        return 2

    names = [f.strip().removesuffix(".py") for f in args.files.split(",") if f.strip()]
    missing = [n for n in names if not os.path.exists(os.path.join(args.tests_dir, n + ".py"))]
    if missing:
        print(f"not in {args.tests_dir}: {', '.join(missing)}", file=sys.stderr)
        return 2
    rules = C.load_rules()
    os.makedirs(os.path.join(args.out, "baseline"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    import fbackprop

    start = time.time()
    summaries, changes, fb_records, timings = {}, {}, {}, {}
    for name in names:
        test_file = os.path.join(args.tests_dir, name + ".py")
        key = _baseline_key(test_file, args.k)
        base_path = os.path.join(args.out, "baseline", name + ".json")
        baseline = _load(base_path) if os.path.exists(base_path) else None
        reuse = args.reclassify and baseline is not None and not args.rerun_baseline
        if reuse and baseline.get("key") != key:
            print(f"[{name}] reusing a JAX baseline made with other settings: "
                  f"{baseline.get('key')}", flush=True)
        if not reuse and (baseline is None or baseline.get("key") != key
                          or args.rerun_baseline):
            print(f"[{name}] running with JAX ...", flush=True)
            secs = run_pytest(test_file, "jax", base_path,
                              os.path.join(args.out, "logs", name + ".jax.log"),
                              workers=args.workers, timeout=args.timeout, k=args.k,
                              select=None, extra=args.pytest_args)
            baseline = _load(base_path)
            baseline["key"], baseline["wall_seconds"] = key, round(secs, 1)
            with open(base_path, "w") as f:
                json.dump(baseline, f, indent=1)
        else:
            print(f"[{name}] JAX baseline from {os.path.relpath(base_path)} (cached; "
                  f"--rerun-baseline to redo)", flush=True)
        base_results = baseline["results"]
        selected = sorted(t for t, r in base_results.items() if r["outcome"] == "passed"
                          and (args.all or reroute.test_side_calls(r.get("calls", {}))))
        select_path = os.path.join(args.out, name + ".selected.txt")
        with open(select_path, "w") as f:
            f.write("\n".join(selected) + "\n")
        fb = None
        fb_secs = 0.0
        fb_path = os.path.join(args.out, name + ".fbackprop.json")
        if selected and args.reclassify and os.path.exists(fb_path):
            fb = _load(fb_path)
            fb_secs = fb.get("seconds", 0.0)
            print(f"[{name}] fbackprop results from {os.path.relpath(fb_path)} (reused)")
        elif selected:
            print(f"[{name}] running {len(selected)} tests with fbackprop ...", flush=True)
            fb_secs = run_pytest(test_file, "fbackprop", fb_path,
                                 os.path.join(args.out, "logs", name + ".fbackprop.log"),
                                 workers=args.workers, timeout=args.timeout, k=args.k,
                                 select=select_path, extra=args.pytest_args)
            fb = _load(fb_path)
        timings[name] = {"jax": baseline.get("wall_seconds"), "fbackprop": round(fb_secs, 1)}
        fb_records[name] = (fb or {}).get("results", {})
        summary = summarize_file(name, baseline, fb, rules, args.all)
        summaries[name] = summary
        rec_path = os.path.join(RECORDED_DIR, name + ".tsv")
        if args.k is None and os.path.exists(rec_path):
            changes[name] = C.compare_recorded(C.read_recorded(rec_path), summary["verdicts"],
                                               summary["fb_passed"])
        if args.record:
            if args.k is not None:
                print("--record ignored with -k (a partial run)", file=sys.stderr)
            else:
                r = summary["row"]
                C.write_recorded(rec_path, summary["verdicts"], [
                    f"fbackprop conformance verdicts for JAX {version}'s tests/{name}.py",
                    "test id <TAB> class <TAB> root cause; written by "
                    "`make conformance-record`",
                    ", ".join(f"{c}: {r[c]}" for c in COLUMNS)])
        r = summary["row"]
        print(f"[{name}] {r['JAX pass']}/{r['tests']} pass with JAX, {r['use AD']} use AD, "
              f"{r['fb pass']} pass with fbackprop ({fb_secs:.0f} s)", flush=True)

    seconds = time.time() - start
    meta = {"jax_version": version, "fbackprop_version": fbackprop.__version__,
            "commit": _git_commit(), "python": sys.version.split()[0],
            "workers": args.workers, "seconds": round(seconds, 1), "timings": timings,
            "k": args.k, "all": args.all}
    rows = {n + ".py": s["row"] for n, s in summaries.items()}
    print("\n" + format_table(rows))
    print(HELP_COLUMNS)
    for name, s in summaries.items():
        for line in failure_lists(name + ".py", s):
            print(line)
    wrong = [t for s in summaries.values() for t, v in s["verdicts"].items()
             if v.cls == C.WRONG_NUMBERS]
    if wrong:
        print(f"\n!!! {len(wrong)} test(s) get WRONG NUMBERS from fbackprop:")
        for s in summaries.values():
            for t, v in s["verdicts"].items():
                if v.cls == C.WRONG_NUMBERS:
                    print(f"!!!   {t}: {v.reason}")
    unrecorded = [n for n in names if n not in changes]
    if unrecorded and args.k is None and not args.record:
        print(f"\nNo recorded verdicts for {', '.join(unrecorded)} "
              f"(`make conformance-record` writes conformance/recorded/).")
    changed = {n: ch for n, ch in changes.items() if any(ch.values())}
    if changed:
        print("\nChanges against conformance/recorded/ (`make conformance-record` to accept):")
        for name, ch in changed.items():
            for kind, items in ch.items():
                for item in items:
                    print(f"  {name}.py {kind}: " + " ".join(str(x) for x in item))
    json_path, md_path = write_reports(args.out, meta, summaries, changes, fb_records)
    print(f"\nwrote {os.path.relpath(json_path)} and {os.path.relpath(md_path)}; "
          f"{seconds:.0f} s in all")
    if args.strict and (wrong or any(ch["new"] or ch["reclassified"]
                                     for ch in changes.values())):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
