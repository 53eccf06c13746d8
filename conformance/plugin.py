"""pytest plugin that runs JAX's test files with (or without) fbackprop rerouting.

Loaded by :mod:`conformance.run` as ``-p conformance.plugin``. Options:

``--fbconf-mode=jax|fbackprop``
    ``jax`` runs the tests as they are but counts the test side's calls of the
    differentiation entry points; ``fbackprop`` reroutes those calls to fbackprop.
``--fbconf-results=PATH``
    where the controller writes every test's outcome (JSON, see :func:`_write_results`).
``--fbconf-select=PATH``
    a file of test ids (one a line); other collected tests are deselected.

For every failing test the worker records what the classifier needs
(:mod:`conformance.classify`): the exception chain, the traceback frames, the line of
the test file that failed, whether it sits in an ``assertRaises`` block, and which
JAX internals the test's source mentions. It travels to the controller in the
report's ``user_properties``, which pytest-xdist serializes.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
import traceback

import pytest

from conformance import reroute

_PROPERTY = "fbconf"
MESSAGE_LIMIT = 1500
FRAME_LIMIT = 80
LONGREPR_LIMIT = 6000

# Words in a test's source that mean it looks at JAX's machinery, not only at values.
INTERNALS_PATTERNS = {
    "make_jaxpr": r"\bmake_jaxpr\b",
    "jaxpr": r"jaxpr",
    "eqns": r"\.eqns\b",
    "count_*": r"\bcount_[a-z_]+\(",
    "cache size": r"_cache_size|cache_info|cache_clear|_cache\b",
    "tracer types": r"\bTracer\b|JVPTracer|JaxprTracer|DynamicJaxprTracer|LinearizeTracer|"
                    r"BatchTracer",
    "ad internals": r"\bad\.|\bad_internal\.|\bpe\.|\bpartial_eval\b|\bbatching\.|\blu\.",
    "core internals": r"\bcore\.(?!get_aval|ShapedArray|concrete|Primitive)",
    "lowering text": r"\.lower\(|as_text\(|\.compile\(\)|mlir\b|hlo\b",
    "jaxpr text": r"assertMultiLineStrippedEqual|pretty_print|pprint",
    "debug info": r"debug_info|source_info|name_stack|traceback_util|tb_info",
    "saved residuals": r"saved_residuals|print_saved_residuals|fwd_bwd_jaxprs",
    "weakref/gc": r"\bweakref\b|\bgc\.|getrefcount",
    "primitive impl calls": r"_p\.impl\b|\.def_impl\(|impl_rule",
    "compile logs": r"log_compiles|assertLogs|explain_cache_misses|capture_stderr",
    "returned function's fields": r"\.func\.args|\.args\[\d\]|\.args_res\b|opaque_residuals|"
                                  r"\.keywords\b",
}


def pytest_addoption(parser):
    group = parser.getgroup("fbackprop conformance")
    group.addoption("--fbconf-mode", choices=("jax", "fbackprop"), default="jax",
                    help="run with JAX's differentiation (jax) or rerouted to fbackprop")
    group.addoption("--fbconf-results", default=None, help="write outcomes to this JSON file")
    group.addoption("--fbconf-select", default=None,
                    help="file of test ids to run (one a line); others are deselected")


def test_id(nodeid: str) -> str:
    """``some/dir/api_test.py::APITest::test_x`` -> ``api_test.py::APITest::test_x``."""
    path, sep, rest = nodeid.partition("::")
    return os.path.basename(path) + sep + rest


def pytest_configure(config):
    # Before collection, so ``from jax import grad`` in a test module gets the router.
    reroute.install(config.getoption("fbconf_mode"))
    config._fbconf = {"results": {}, "collect_errors": [], "start": time.time()}


def pytest_collection_modifyitems(config, items):
    path = config.getoption("fbconf_select")
    if not path:
        return
    with open(path) as f:
        wanted = {line.strip() for line in f if line.strip()}
    keep, drop = [], []
    for item in items:
        (keep if test_id(item.nodeid) in wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    reroute.reset_counts()


# ------------------------------------------------------------------ worker side
def _short_path(filename: str) -> str:
    """Site-packages and source paths as ``jax/...`` / ``fbackprop/...``."""
    norm = filename.replace(os.sep, "/")
    for marker in ("/site-packages/", "/src/"):
        if marker in norm:
            tail = norm.rsplit(marker, 1)[1]
            if tail.split("/", 1)[0] in ("jax", "jaxlib", "fbackprop", "numpy", "absl",
                                           "_pytest", "pytest_timeout", "scipy"):
                return tail
    if "/conformance/" in norm:
        return norm.rsplit("/conformance/", 1)[1].removeprefix("jax_tests/")
    return os.path.basename(norm)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain


def _qualified_type(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _frames(tb) -> list[list]:
    """The frames of a traceback; of a very deep one (a recursion) its two ends."""
    frames = traceback.extract_tb(tb)
    if len(frames) > FRAME_LIMIT:
        head = FRAME_LIMIT // 4
        frames = frames[:head] + frames[-(FRAME_LIMIT - head):]
    return [[_short_path(f.filename), f.lineno, f.name, (f.line or "").strip()[:200]]
            for f in frames]


def _in_assert_raises(lines: list[str], lineno: int) -> bool:
    """Whether line ``lineno`` (1-based) lies in ``assertRaises``'s reach in a test file."""
    if not 0 < lineno <= len(lines):
        return False
    line = lines[lineno - 1]
    if re.search(r"assertRaises|pytest\.raises|assertWarns", line):
        return True
    indent = len(line) - len(line.lstrip())
    for prev in reversed(lines[:lineno - 1]):
        stripped = prev.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        prev_indent = len(prev) - len(stripped)
        if prev_indent < indent:
            if stripped.startswith("with ") and re.search(r"assertRaises|pytest\.raises",
                                                          stripped):
                return True
            if stripped.startswith(("def ", "class ", "@")):
                return False
            indent = prev_indent
    return False


def _test_source(item) -> str:
    fn = getattr(item, "obj", None)
    try:
        return inspect.getsource(inspect.unwrap(fn))
    except (TypeError, OSError):
        return ""


def internals_features(source: str) -> list[str]:
    return sorted(name for name, pat in INTERNALS_PATTERNS.items() if re.search(pat, source))


def describe_failure(item, excinfo) -> dict:
    chain = _exception_chain(excinfo.value)
    test_file = str(getattr(item, "path", "") or item.fspath)
    exceptions = []
    for exc in chain:
        exceptions.append({"type": _qualified_type(exc),
                           "message": str(exc)[:MESSAGE_LIMIT],
                           "frames": _frames(exc.__traceback__)})
    # The deepest line of the test file in the outermost exception: what the test did.
    failing_line, failing_lineno, in_raises = "", 0, False
    for f in reversed(traceback.extract_tb(excinfo.tb)):
        if os.path.abspath(f.filename) == os.path.abspath(test_file):
            failing_line, failing_lineno = (f.line or "").strip(), f.lineno
            try:
                with open(test_file) as src:
                    in_raises = _in_assert_raises(src.read().splitlines(), f.lineno)
            except OSError:
                pass
            break
    source = _test_source(item)
    return {"exceptions": exceptions, "failing_line": failing_line[:300],
            "failing_lineno": failing_lineno, "in_assert_raises": in_raises,
            "internals": internals_features(source),
            "failing_line_internals": internals_features(failing_line)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" and not report.failed:
        return
    info = {"when": call.when, "calls": reroute.snapshot_counts()}
    if report.failed and call.excinfo is not None:
        try:
            info.update(describe_failure(item, call.excinfo))
        except Exception as e:  # never let the harness hide the test's own outcome
            info["harness_error"] = f"{type(e).__name__}: {e}"
    # A copy: pytest shares one list between an item's reports.
    report.user_properties = list(report.user_properties) + [(_PROPERTY, json.dumps(info))]


# -------------------------------------------------------------- controller side
def _info(report) -> dict:
    for key, value in reversed(report.user_properties):
        if key == _PROPERTY:
            try:
                info = json.loads(value)
            except (TypeError, ValueError):
                continue
            if info.get("when") == report.when:
                return info
    return {}


def pytest_runtest_logreport(report):
    config = _CONFIG.get("config")
    if config is None or not hasattr(config, "_fbconf"):
        return
    results = config._fbconf["results"]
    tid = test_id(report.nodeid)
    rec = results.setdefault(tid, {"outcome": "passed", "duration": 0.0})
    rec["duration"] = round(rec["duration"] + getattr(report, "duration", 0.0), 3)
    info = _info(report)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        rec["calls"] = info.get("calls", rec.get("calls", {}))
    if report.passed and report.when == "call":
        if hasattr(report, "wasxfail"):
            rec["outcome"] = "xpassed"
        return
    if report.skipped:
        if hasattr(report, "context"):
            return  # a skipped subtest; the test itself goes on
        if rec["outcome"] == "passed":
            rec["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            longrepr = report.longrepr
            rec["skip_reason"] = (str(longrepr[2]) if isinstance(longrepr, tuple)
                                  else str(longrepr))[:300]
        return
    if report.failed:
        if rec["outcome"] in ("failed", "error"):
            return  # keep the first failure (call) over a later teardown error
        rec["outcome"] = "failed" if report.when == "call" else "error"
        rec["when"] = report.when
        rec.update({k: v for k, v in info.items() if k not in ("when", "calls")})
        text = getattr(report, "longreprtext", "") or str(report.longrepr)
        rec["longrepr"] = text[-LONGREPR_LIMIT:]


def pytest_collectreport(report):
    config = _CONFIG.get("config")
    if report.failed and config is not None and hasattr(config, "_fbconf"):
        text = getattr(report, "longreprtext", "") or str(report.longrepr)
        config._fbconf["collect_errors"].append(
            {"nodeid": test_id(report.nodeid), "longrepr": text[-LONGREPR_LIMIT:]})


_CONFIG: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG["config"] = session.config


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker; the controller writes
        return
    path = config.getoption("fbconf_results")
    if path:
        _write_results(config, path, exitstatus)


def _write_results(config, path, exitstatus):
    import jax

    data = {
        "mode": config.getoption("fbconf_mode"),
        "jax_version": jax.__version__,
        "python": sys.version.split()[0],
        "exitstatus": int(exitstatus),
        "seconds": round(time.time() - config._fbconf["start"], 1),
        "collect_errors": config._fbconf["collect_errors"],
        "results": dict(sorted(config._fbconf["results"].items())),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
