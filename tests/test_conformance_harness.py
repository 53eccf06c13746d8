"""The conformance harness's classifier and router on synthetic outcomes.

No JAX test file is needed: the records below have the shape that
``conformance/plugin.py`` writes for a failing test.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from conformance import classify as C  # noqa: E402
from conformance import plugin, reroute, run  # noqa: E402


def record(exc_type, message, frames=(), **extra):
    rec = {"outcome": "failed", "when": "call",
           "exceptions": [{"type": exc_type, "message": message, "frames": list(frames)}],
           "failing_line": "", "in_assert_raises": False, "internals": [],
           "failing_line_internals": []}
    rec.update(extra)
    return rec


TEST_FRAME = ["api_test.py", 10, "test_x", "self.assertAllClose(ans, expected)"]
JTU_CLOSE = ["jax/_src/test_util.py", 1369, "assertArraysAllClose", "..."]
NP_CLOSE = ["numpy/testing/_private/utils.py", 800, "assert_array_compare", "raise"]
FB_RULE = ["fbackprop/_src/rules/control.py", 120, "_scan_vjp", "out = lax.add(a, b)"]
JAX_DEEP = ["jax/_src/lax/lax.py", 500, "add", "return add_p.bind(x, y)"]


def verdict(rec):
    return C.heuristic(rec)


def test_missing_rule_names_the_primitive():
    msg = ("fbackprop has no reverse-mode (VJP) rule for primitive 'cumlogsumexp'.\n"
           "  used at: x.py:3")
    v = verdict(record("fbackprop._src.registry.MissingRuleError", msg,
                       [TEST_FRAME, ["fbackprop/_src/reverse.py", 90, "backward", "raise"]]))
    assert v.cls == C.MISSING_RULE
    assert "cumlogsumexp" in v.reason and v.group == "missing reverse-mode rule: cumlogsumexp"


def test_missing_rule_found_anywhere_in_the_chain():
    rec = record("builtins.RuntimeError", "while tracing", [TEST_FRAME])
    rec["exceptions"].append({"type": "fbackprop._src.registry.MissingRuleError",
                              "message": "fbackprop has no forward-mode (JVP) rule for "
                                         "primitive 'sort'.", "frames": [FB_RULE]})
    assert verdict(rec).cls == C.MISSING_RULE


def test_value_assertions_are_wrong_numbers():
    msg = ("\nNot equal to tolerance rtol=1e-06, atol=1e-06\n\nMismatched elements: 3 / 4 "
           "(75%)\nMax absolute difference among violations: 0.5\n")
    v = verdict(record("builtins.AssertionError", msg, [TEST_FRAME, JTU_CLOSE, NP_CLOSE]))
    assert v.cls == C.WRONG_NUMBERS
    assert "3 / 4" in v.reason and v.group == "values differ"


def test_check_grads_failure_is_wrong_numbers():
    frames = [TEST_FRAME, ["jax/_src/public_test_util.py", 361, "check_vjp", "check_close"],
              ["jax/_src/public_test_util.py", 170, "check_close", "..."], NP_CLOSE]
    v = verdict(record("builtins.AssertionError", "Arrays are not almost equal", frames))
    assert (v.cls, v.group) == (C.WRONG_NUMBERS, "check_grads differ")


def test_unrecognized_assertion_is_loud():
    v = verdict(record("builtins.AssertionError", "False is not true", [TEST_FRAME]))
    assert v.cls == C.WRONG_NUMBERS and "review" in v.reason


def test_dtype_and_structure_differences_are_api_differences():
    dtype = verdict(record("builtins.AssertionError", "dtype('float32') != dtype('float64')",
                           [TEST_FRAME, ["jax/_src/test_util.py", 1300, "assertDtypesMatch",
                                         "..."]]))
    assert (dtype.cls, dtype.group) == (C.API_DIFFERENCE, "result dtype differs")
    tree = verdict(record("builtins.AssertionError", "Expected sequence, got 3", [TEST_FRAME]))
    assert tree.cls == C.API_DIFFERENCE


def test_shape_mismatch_is_wrong_numbers():
    msg = "\nNot equal to tolerance\n\n(shapes (3,), (3, 1) mismatch)\n x: array([1.])"
    assert verdict(record("builtins.AssertionError", msg, [TEST_FRAME, NP_CLOSE])).group == \
        "result shape differs"


def test_expected_errors():
    not_raised = verdict(record("builtins.AssertionError", "TypeError not raised",
                                [TEST_FRAME]))
    assert (not_raised.cls, not_raised.group) == (C.API_DIFFERENCE,
                                                  "expected exception not raised")
    regex = verdict(record("builtins.AssertionError",
                           '"grad requires real-valued" does not match "fbackprop: ..."',
                           [TEST_FRAME]))
    assert regex.cls == C.API_DIFFERENCE and "message" in regex.group
    other_type = verdict(record("builtins.ValueError", "bad", [TEST_FRAME, FB_RULE],
                                in_assert_raises=True))
    assert other_type.cls == C.API_DIFFERENCE


def test_argument_checks_are_api_differences_other_errors_crashes():
    check = ["fbackprop/_src/api.py", 40, "_normalize_argnums", "raise TypeError(msg)"]
    v = verdict(record("builtins.TypeError", "argnums must be int", [TEST_FRAME, check]))
    assert v.cls == C.API_DIFFERENCE and "rejects" in v.group
    crash = verdict(record("builtins.TypeError", "unsupported operand", [TEST_FRAME, FB_RULE,
                                                                         JAX_DEEP]))
    assert crash.cls == C.CRASH and "fbackprop/_src/rules/control.py:_scan_vjp" in crash.group


def test_tracing_errors_and_internal_asserts_are_crashes():
    trace = verdict(record("jax.errors.TracerBoolConversionError",
                           "Attempted boolean conversion of traced array",
                           [TEST_FRAME, ["fbackprop/_src/trace.py", 50, "trace", "..."],
                            JAX_DEEP]))
    assert trace.cls == C.CRASH and trace.group.startswith("traced abstractly")
    internal = verdict(record("builtins.AssertionError", "", [TEST_FRAME,
                                                              ["fbackprop/_src/forward.py",
                                                               77, "jvp_sweep", "assert x"]]))
    assert internal.cls == C.CRASH and "forward.py" in internal.group


def test_internals_inspection():
    rec = record("builtins.AssertionError", "4 != 7", [TEST_FRAME],
                 internals=["eqns", "make_jaxpr"])
    assert verdict(rec).cls == C.INTERNALS
    rec = record("builtins.AttributeError", "no attribute 'jaxpr'", [TEST_FRAME],
                 failing_line="jaxpr = f_jvp.args[0].jaxpr",
                 failing_line_internals=["jaxpr"])
    assert verdict(rec).cls == C.INTERNALS
    # A value mismatch stays wrong numbers even in a test that also looks at jaxprs.
    rec = record("builtins.AssertionError", "Not equal to tolerance", [TEST_FRAME, NP_CLOSE],
                 internals=["make_jaxpr"])
    assert verdict(rec).cls == C.WRONG_NUMBERS


def test_timeouts_and_crashed_workers():
    timeout = verdict(record("_pytest.outcomes.Failed", "Timeout (>300.0s) from pytest-timeout."))
    assert (timeout.cls, timeout.group) == (C.CRASH, "timeout")
    crashed = {"outcome": "failed", "longrepr": "worker 'gw1' crashed while running 'x'"}
    assert C.heuristic(crashed).group == "worker crashed"


def test_every_heuristic_class_is_a_known_class():
    for rec in [record("builtins.KeyError", "x"), record("builtins.AssertionError", "x"),
                {"outcome": "skipped", "skip_reason": "no"}, {"outcome": "failed"}]:
        assert C.heuristic(rec).cls in C.CLASSES


def test_the_list_overrides_the_heuristic(tmp_path):
    path = tmp_path / "classification.toml"
    path.write_text('[[entry]]\ntests = ["api_test.py::APITest::test_cache*"]\n'
                    'class = "inspects JAX internals"\nwhy = "counts compiles"\n\n'
                    '[[entry]]\ntests = "api_test.py::*"\nclass = "API difference"\n'
                    'why = "message"\nmatch = "does not match"\n')
    rules = C.load_rules(str(path))
    rec = record("builtins.AssertionError", "False is not true", [TEST_FRAME])
    v = C.classify("api_test.py::APITest::test_cache_hits", rec, rules)
    assert (v.cls, v.reason, v.source) == (C.INTERNALS, "counts compiles", "list")
    assert C.classify("api_test.py::APITest::test_other", rec, rules).source == "heuristic"
    rec = record("builtins.AssertionError", '"a" does not match "b"', [TEST_FRAME])
    assert C.classify("api_test.py::APITest::test_other", rec, rules).source == "list"


def test_bad_list_entries_are_rejected(tmp_path):
    path = tmp_path / "classification.toml"
    path.write_text('[[entry]]\ntests = ["x"]\nclass = "flaky"\nwhy = "?"\n')
    with pytest.raises(ValueError, match="class"):
        C.load_rules(str(path))


def test_the_committed_list_is_valid():
    rules = C.load_rules()
    assert all(rule.cls in C.CLASSES and rule.tests for rule in rules)


def test_recorded_verdicts_round_trip_and_compare(tmp_path):
    path = str(tmp_path / "recorded" / "api_test.tsv")
    before = {"f.py::T::a": C.Verdict(C.CRASH, "r", "g1"),
              "f.py::T::b": C.Verdict(C.MISSING_RULE, "r", "g2"),
              "f.py::T::c": C.Verdict(C.CRASH, "r", "g3")}
    C.write_recorded(path, before, ["header"])
    recorded = C.read_recorded(path)
    assert recorded["f.py::T::b"] == (C.MISSING_RULE, "g2")
    now = {"f.py::T::a": C.Verdict(C.WRONG_NUMBERS, "r", "g"),
           "f.py::T::d": C.Verdict(C.CRASH, "r", "g")}
    changes = C.compare_recorded(recorded, now, passed={"f.py::T::b"})
    assert changes == {"new": [("f.py::T::d", C.CRASH)],
                       "fixed": [("f.py::T::b", C.MISSING_RULE)],
                       "reclassified": [("f.py::T::a", C.CRASH, C.WRONG_NUMBERS)],
                       "gone": [("f.py::T::c", C.CRASH)]}


def test_summary_counts_add_up():
    calls = {"grad": {"jax (test side)": 1}}
    baseline = {"results": {"f.py::T::a": {"outcome": "passed", "calls": calls},
                            "f.py::T::b": {"outcome": "passed", "calls": calls},
                            "f.py::T::c": {"outcome": "passed", "calls": {}},
                            "f.py::T::d": {"outcome": "failed"},
                            "f.py::T::e": {"outcome": "passed", "calls": calls}}}
    fb = {"results": {
        "f.py::T::a": {"outcome": "passed", "calls": {"grad": {"fbackprop": 1}}},
        "f.py::T::b": record("builtins.AssertionError", "Not equal to tolerance",
                             [TEST_FRAME, NP_CLOSE])}}
    s = run.summarize_file("f", baseline, fb, rules=[], run_all=False)
    assert s["row"] == {"tests": 5, "JAX pass": 4, "use AD": 3, "fb pass": 1, "other": 1,
                        C.WRONG_NUMBERS: 1, C.MISSING_RULE: 0, C.API_DIFFERENCE: 0,
                        C.CRASH: 0, C.INTERNALS: 0}
    assert s["not_reported"] == ["f.py::T::e"]
    table = run.format_table({"f.py": s["row"]})
    assert "TOTAL" in table and "wrong num" in table


# ------------------------------------------------------------------ router
def _frame_in(module: str, body: str):
    namespace = {"__name__": module}
    # The name is referenced (so it is in the code's co_names) but never needs to exist.
    exec(f"import sys\ndef f():\n    try:\n        {body}\n    except NameError:\n"
         f"        pass\n    return sys._getframe(0)\n", namespace)
    return namespace["f"]()


@pytest.mark.parametrize("module, body, test_side", [
    ("api_test", "jvp", True),                         # a JAX test file
    ("jax._src.public_test_util", "api.jvp", True),    # check_grads acts for the test
    ("jax._src.lax.lax", "api.jvp", False),            # JAX's own JVP rule calls it by name
    ("jax._src.linear_util", "pass", True),            # tracing a partial(api.jvp, f)
    ("fbackprop._src.api", "grad", False),
])
def test_router_decides_by_caller(module, body, test_side):
    assert reroute.called_from_test_side(_frame_in(module, body), "jvp" if "jvp" in body
                                         else "grad") is test_side


def test_plugin_helpers():
    lines = ["  def test_x(self):", "    with self.assertRaisesRegex(TypeError, 'x'):",
             "      f(", "          1)", "    g()"]
    assert plugin._in_assert_raises(lines, 3) and plugin._in_assert_raises(lines, 4)
    assert not plugin._in_assert_raises(lines, 5)
    assert plugin.internals_features("n = len(jax.make_jaxpr(f)(x).eqns)") == [
        "eqns", "jaxpr", "make_jaxpr"]
    assert plugin.internals_features("self.assertAllClose(jax.grad(f)(x), 2.)") == []
    assert plugin.test_id("a/b/api_test.py::T::t[1]") == "api_test.py::T::t[1]"


# ------------------------------------------------------- the libraries' suites
def test_library_summary_counts_not_exercised_tests_apart():
    from conformance import run_libs
    calls = {"jvp": {"jax (test side)": 2}}
    baseline = {"results": {"test_jvp.py::a": {"outcome": "passed", "calls": calls},
                            "test_jvp.py::b": {"outcome": "passed", "calls": calls},
                            "test_jvp.py::c": {"outcome": "passed", "calls": {}},
                            "test_jvp.py::d": {"outcome": "passed", "calls": calls}}}
    fb = {"results": {
        "test_jvp.py::a": {"outcome": "passed", "calls": {"jvp": {"fbackprop": 2}}},
        # passed, but only JAX's internal calls happened: fbackprop was never reached
        "test_jvp.py::b": {"outcome": "passed", "calls": {"jvp": {"jax (internal)": 1}}},
        "test_jvp.py::d": record("builtins.AssertionError", "Not equal to tolerance",
                                 [TEST_FRAME, NP_CLOSE])}}
    s = run_libs.summarize("lineax/test_jvp", "lineax", baseline, fb, rules=[],
                           run_all=False)
    assert s["row"] == {"tests": 4, "JAX pass": 4, "use AD": 3, "fb pass": 1,
                        run_libs.NOT_EXERCISED: 1, C.WRONG_NUMBERS: 1, C.MISSING_RULE: 0,
                        C.API_DIFFERENCE: 0, C.CRASH: 0, C.INTERNALS: 0, "other": 0}
    # Test ids name the library: file names repeat across libraries.
    assert s["not_exercised"] == ["lineax/test_jvp.py::b"]
    assert list(s["verdicts"]) == ["lineax/test_jvp.py::d"]
    assert s["fb_passed"] == {"lineax/test_jvp.py::a"}
    table = run.format_table({"lineax/test_jvp.py": s["row"]}, run_libs.COLUMNS)
    assert "not exercised" in table and "TOTAL" in table
    assert any("not exercised" in line for line in run.failure_lists("lineax/test_jvp.py", s))


def test_library_list_is_valid_and_library_sources_are_named():
    from conformance import get_lib_tests, run_libs
    assert all(rule.cls in C.CLASSES for rule in C.load_rules(run_libs.CLASSIFICATION_FILE))
    assert get_lib_tests._pairs(["lineax=/src/lineax"], "git") == {"lineax": "/src/lineax"}
    with pytest.raises(SystemExit, match="LIBRARY=PATH"):
        get_lib_tests._pairs(["/src/lineax"], "git")
    with pytest.raises(SystemExit, match="one of equinox, lineax, optimistix"):
        get_lib_tests._pairs(["numpy=/src/numpy"], "git")


def test_library_code_is_the_test_side():
    """Library code that calls an entry point by name (eqx.filter_jvp calling
    jax.jvp) is rerouted; JAX's own code calling it by name is not."""
    assert reroute.called_from_test_side(_frame_in("equinox._ad", "jvp"), "jvp")
    assert reroute.called_from_test_side(_frame_in("optimistix._solver.bfgs", "linearize"),
                                         "linearize")
    assert not reroute.called_from_test_side(_frame_in("jax._src.lax.lax", "api.jvp"), "jvp")
