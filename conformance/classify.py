"""Classifies why a JAX test that passes with JAX fails with fbackprop.

Five classes (:data:`CLASSES`):

``wrong numbers``
    an assertion on values failed: fbackprop returned a different derivative. The
    worst class; every such test is listed loudly. An assertion the heuristics do not
    recognize lands here too ("unrecognized assertion") until a human looks at it.
``missing rule``
    fbackprop's ``MissingRuleError`` (or a ``NotImplementedError`` naming a primitive).
``API difference``
    fbackprop rejects arguments JAX accepts (``TypeError``/``ValueError`` from its
    argument checks), raises another exception type or message than the test expects
    (``assertRaises``/``assertRaisesRegex``), raises nothing where JAX raises, or
    returns another dtype or pytree structure.
``crash``
    any other exception on fbackprop's side (including tracing a Python ``if`` on a
    value, internal assertions, timeouts, a crashed worker).
``inspects JAX internals``
    the test looks at JAX's machinery (jaxprs, tracer types, cache sizes, compile
    counts, residuals...), which fbackprop legitimately does differently.

:func:`heuristic` decides from the failure record written by :mod:`conformance.plugin`
(exception chain, frames, the failing test line, the internals the test's source
mentions). :func:`classify` applies the committed list ``classification.toml`` first,
where a human has explained a test or the heuristic is wrong.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

WRONG_NUMBERS = "wrong numbers"
MISSING_RULE = "missing rule"
API_DIFFERENCE = "API difference"
CRASH = "crash"
INTERNALS = "inspects JAX internals"
CLASSES = (WRONG_NUMBERS, MISSING_RULE, API_DIFFERENCE, CRASH, INTERNALS)

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSIFICATION_FILE = os.path.join(HERE, "classification.toml")

# Functions whose failing assertion compares values (numpy's and JAX's test helpers).
VALUE_ASSERTS = frozenset({
    "assert_allclose", "assert_array_almost_equal", "assert_array_equal",
    "assert_array_compare", "assert_almost_equal", "assert_equal", "assertArraysAllClose",
    "assertArraysEqual", "check_close", "_assert_numpy_allclose", "_assert_numpy_close",
    "check_jvp", "check_vjp", "numerical_jvp",
})
TEST_HELPERS = frozenset({"jax/_src/test_util.py", "jax/_src/public_test_util.py"})
DTYPE_ASSERTS = frozenset({"assertDtypesMatch", "_check_dtypes_match", "assertDtypesEqual"})
VALUE_MESSAGES = re.compile(
    r"Not equal to tolerance|Arrays are not|Mismatched elements|nan location mismatch|"
    r"inf location mismatch|not almost equal|Max absolute difference|Items are not equal")
SHAPE_MESSAGE = re.compile(r"\(shapes .*\) mismatch|shape mismatch", re.I)
TRACING_ERRORS = ("ConcretizationTypeError", "TracerBoolConversionError",
                  "TracerIntegerConversionError", "TracerArrayConversionError")
# Attributes of JAX's returned functions (``jax.tree_util.Partial`` and VJP objects) that
# expose JAX's own representation; reading them is inspecting JAX internals.
INTERNAL_ATTRIBUTES = frozenset({"args", "func", "keywords", "args_res", "opaque_residuals",
                                 "jaxpr", "eqns", "fun", "in_tree", "out_tree"})
# JAX attaches the user's stack as a pseudo-exception; it is never the cause.
STACK_PSEUDO_EXCEPTIONS = ("JaxStackTraceBeforeTransformation",)
# fbackprop modules whose TypeError/ValueError are argument checks (user errors).
ARGUMENT_CHECK_FILES = ("fbackprop/_src/api.py", "fbackprop/_src/derivatives.py",
                        "fbackprop/_src/tools/gradcheck.py", "fbackprop/_src/trace.py")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A failure's class, a short reason, and the root cause it is grouped under."""
    cls: str
    reason: str
    group: str
    source: str = "heuristic"   # or "list" (classification.toml)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One entry of ``classification.toml``."""
    tests: tuple[str, ...]
    cls: str
    why: str
    match: str | None = None    # optional regex on the failure's text

    def applies(self, test_id: str, text: str) -> bool:
        if not any(fnmatch.fnmatchcase(test_id, pattern) for pattern in self.tests):
            return False
        return self.match is None or re.search(self.match, text) is not None


# ------------------------------------------------------------------ helpers
def _short_type(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def _first_line(text: str, limit: int = 160) -> str:
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line[:limit]
    return ""


def normalize(text: str, limit: int = 110) -> str:
    """A message with its numbers, addresses and quoted values blurred, for grouping."""
    text = _first_line(text, 400)
    text = re.sub(r"0x[0-9a-fA-F]+", "0x_", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", text)
    text = re.sub(r"\[[N, ]*\]", "[..]", text)
    return text[:limit]


def _is_fb_frame(frame) -> bool:
    return str(frame[0]).startswith("fbackprop/")


def _deepest_fb_frame(exceptions):
    """The deepest fbackprop frame, searching the root cause first."""
    for exc in reversed(exceptions):
        for frame in reversed(exc.get("frames") or []):
            if _is_fb_frame(frame):
                return frame
    return None


def _frame_names(exc) -> set[str]:
    return {frame[2] for frame in exc.get("frames") or []}


def _where(frame) -> str:
    return f"{frame[0]}:{frame[2]}" if frame else "?"


def failure_text(record: dict) -> str:
    """Everything a rule's ``match`` regex may look at."""
    parts = [f"{e.get('type')}: {e.get('message')}" for e in record.get("exceptions") or []]
    parts.append(record.get("longrepr") or "")
    return "\n".join(parts)


# --------------------------------------------------------------- heuristics
def heuristic(record: dict) -> Verdict:
    """Classifies one failure record (a test that passed with JAX, failed rerouted)."""
    excs = record.get("exceptions") or []
    internals = record.get("internals") or []
    if not excs:
        text = record.get("longrepr") or ""
        if re.search(r"worker '?\w+'? crashed|node down|Segmentation fault", text, re.I):
            return Verdict(CRASH, "the test process crashed", "worker crashed")
        if "Timeout" in text:
            return Verdict(CRASH, "timeout", "timeout")
        if record.get("outcome") == "skipped":
            return Verdict(API_DIFFERENCE, f"skipped: {record.get('skip_reason', '')[:100]}",
                           "skipped under fbackprop")
        return Verdict(CRASH, _first_line(text) or "failed without a traceback",
                       "failure without an exception record")
    real = [e for e in excs if _short_type(e["type"]) not in STACK_PSEUDO_EXCEPTIONS] or excs
    outer, root = real[0], real[-1]
    outer_type, root_type = _short_type(outer["type"]), _short_type(root["type"])
    fb_frame = _deepest_fb_frame(real)
    message = outer.get("message") or ""

    # Missing rules: fbackprop's own error, wherever it sits in the chain.
    for exc in excs:
        if _short_type(exc["type"]) == "MissingRuleError" or (
                _short_type(exc["type"]) == "NotImplementedError" and fb_frame is not None
                and re.search(r"\brule\b|primitive", exc.get("message") or "")):
            msg = exc.get("message") or ""
            prim = re.search(r"primitive '([^']+)'", msg)
            mode = re.search(r"no ([\w-]+)-mode", msg)
            prim = prim.group(1) if prim else normalize(msg, 60)
            mode = mode.group(1) if mode else "?"
            return Verdict(MISSING_RULE, f"no {mode}-mode rule for '{prim}'",
                           f"missing {mode}-mode rule: {prim}")

    if outer_type == "Failed" and message.startswith("Timeout"):
        return Verdict(CRASH, _first_line(message, 60), "timeout")

    if outer_type == "AssertionError" or outer["type"].endswith(".AssertionError"):
        return _assertion_verdict(record, outer, fb_frame, internals)

    # Not an assertion: an exception escaped.
    last = (outer.get("frames") or [None])[-1]
    if (outer_type == "AttributeError" and last is not None and not _is_fb_frame(last)
            and str(last[0]).endswith("_test.py")):
        attr = re.search(r"has no attribute '([^']+)'", message)
        attr = attr.group(1) if attr else "?"
        if attr in INTERNAL_ATTRIBUTES or record.get("failing_line_internals"):
            return Verdict(INTERNALS, f"reads .{attr} of a function JAX returned: "
                           f"`{record.get('failing_line', '')[:70]}`",
                           "reads the fields of JAX's returned vjp/linearize function")
        return Verdict(API_DIFFERENCE, f"fbackprop's result has no .{attr}: "
                       f"`{record.get('failing_line', '')[:70]}`",
                       f"result lacks JAX's attribute .{attr}")
    if record.get("failing_line_internals") and fb_frame is None:
        return Verdict(INTERNALS, f"{outer_type} at `{record.get('failing_line', '')[:80]}`",
                       "inspects: " + ", ".join(record["failing_line_internals"]))
    if record.get("in_assert_raises"):
        return Verdict(API_DIFFERENCE,
                       f"raised {root_type} where the test expects another exception: "
                       f"{normalize(root.get('message'), 90)}",
                       "another exception than the test expects")
    if re.search(r"of type '?<class 'function'>'?[^.]*is not a valid JAX type",
                 " ".join(e.get("message") or "" for e in real)):
        return Verdict(API_DIFFERENCE, _first_line(root.get("message"), 120),
                       "a function fbackprop returned is not a JAX type (JAX returns a "
                       "jax.tree_util.Partial, which can cross jit)")
    if root_type == "RecursionError":
        return Verdict(CRASH, _first_line(root.get("message"), 120),
                       "RecursionError (maximum recursion depth exceeded)"
                       + (f" through {_where(fb_frame)}" if fb_frame else ""))
    for exc in real:
        short = _short_type(exc["type"])
        if short in TRACING_ERRORS and fb_frame is not None:
            return Verdict(CRASH, f"{short}: {normalize(exc.get('message'), 90)}",
                           "traced abstractly: Python control flow or conversion on a "
                           f"traced value ({short})")
        if short == "UnexpectedTracerError":
            return Verdict(CRASH, f"{short}: {normalize(exc.get('message'), 90)}",
                           "leaked tracer (UnexpectedTracerError)")
    if fb_frame is not None:
        if (root_type in ("TypeError", "ValueError") and fb_frame[0] in ARGUMENT_CHECK_FILES
                and str(fb_frame[3]).startswith("raise")):
            return Verdict(API_DIFFERENCE,
                           f"{root_type}: {_first_line(root.get('message'), 120)}",
                           f"fbackprop rejects the arguments ({_where(fb_frame)})")
        return Verdict(CRASH, f"{root_type}: {_first_line(root.get('message'), 120)}",
                       f"{root_type} in {_where(fb_frame)}: {normalize(root.get('message'), 80)}")
    if internals:
        return Verdict(INTERNALS, f"{outer_type} in a test that inspects "
                       f"{', '.join(internals)}",
                       "inspects: " + ", ".join(internals))
    deepest = (root.get("frames") or [None])[-1]
    return Verdict(CRASH, f"{root_type}: {_first_line(root.get('message'), 120)}",
                   f"{root_type} outside fbackprop ({_where(deepest)}): "
                   f"{normalize(root.get('message'), 60)}")


def _assertion_verdict(record, outer, fb_frame, internals) -> Verdict:
    message = outer.get("message") or ""
    names = _frame_names(outer)
    last = (outer.get("frames") or [None])[-1]
    if last is not None and _is_fb_frame(last):
        return Verdict(CRASH, f"assertion inside fbackprop: {_first_line(message, 100)}",
                       f"internal assertion in {_where(last)}")
    if (last is not None and str(last[0]).startswith("jax/") and last[0] not in TEST_HELPERS
            and fb_frame is not None):
        return Verdict(CRASH, f"JAX's internal assertion: {_first_line(message, 100)}",
                       f"JAX's internal assertion at {_where(last)} (reached through "
                       f"{_where(fb_frame)})")
    if re.search(r" not raised\b", message):
        return Verdict(API_DIFFERENCE, _first_line(message, 120),
                       "expected exception not raised")
    if re.search(r'does not match|Regex pattern did not match|regex.*not found', message):
        return Verdict(API_DIFFERENCE, "error message differs: " + _first_line(message, 100),
                       "error message text differs (assertRaisesRegex)")
    if names & DTYPE_ASSERTS or re.search(r"dtype\(|dtypes? (do not )?match", message):
        return Verdict(API_DIFFERENCE, "dtype differs: " + _first_line(message, 100),
                       "result dtype differs")
    if SHAPE_MESSAGE.search(message):
        return Verdict(WRONG_NUMBERS, "shape differs: " + _first_line(message, 100),
                       "result shape differs")
    if names & VALUE_ASSERTS or VALUE_MESSAGES.search(message) or (
            re.match(r"assert .* == ", message) and not internals):
        where = "check_grads" if names & {"check_jvp", "check_vjp"} else "values"
        return Verdict(WRONG_NUMBERS, f"{where} differ: " + _value_summary(message),
                       f"{where} differ")
    if re.search(r"Expected (sequence|array-like)|PyTreeDef|tree structure", message):
        return Verdict(API_DIFFERENCE, "output structure differs: " + _first_line(message, 90),
                       "output pytree structure differs")
    if re.search(r"is not an instance of", message):
        return Verdict(API_DIFFERENCE, "result type differs: " + _first_line(message, 90),
                       "result type differs")
    if internals:
        return Verdict(INTERNALS, f"assertion `{_first_line(message, 60)}` in a test that "
                       f"inspects {', '.join(internals)}", "inspects: " + ", ".join(internals))
    return Verdict(WRONG_NUMBERS, "unrecognized assertion (review): " +
                   _first_line(message, 100), "unrecognized assertion")


def _value_summary(message: str) -> str:
    found = []
    for key in ("Mismatched elements", "Max absolute difference", "Max relative difference"):
        m = re.search(re.escape(key) + r"[^:]*:\s*([^\n]+)", message)
        if m:
            found.append(f"{key.lower()} {m.group(1).strip()[:40]}")
    return "; ".join(found) or _first_line(message, 100)


# -------------------------------------------------------------- the list
def load_rules(path: str = CLASSIFICATION_FILE) -> list[Rule]:
    """The human-maintained classification list (``classification.toml``)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = tomllib.load(f)
    rules = []
    for i, entry in enumerate(data.get("entry", [])):
        tests = entry.get("tests")
        if isinstance(tests, str):
            tests = [tests]
        cls = entry.get("class")
        if not tests or cls not in CLASSES or not entry.get("why"):
            raise ValueError(f"{path}: entry {i + 1} needs `tests`, `why` and a `class` out "
                             f"of {CLASSES}; got {entry}")
        rules.append(Rule(tuple(tests), cls, entry["why"], entry.get("match")))
    return rules


def classify(test_id: str, record: dict, rules: list[Rule]) -> Verdict:
    """The list's verdict where an entry applies, otherwise the heuristic's."""
    text = failure_text(record)
    for rule in rules:
        if rule.applies(test_id, text):
            return Verdict(rule.cls, rule.why, rule.why, source="list")
    return heuristic(record)


# ------------------------------------------------------- recorded verdicts
def read_recorded(path: str) -> dict[str, tuple[str, str]]:
    """``recorded/<file>.tsv``: test id, class and root cause of each known failure."""
    recorded = {}
    if not os.path.exists(path):
        return recorded
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            test_id, cls, group = (line.rstrip("\n").split("\t") + ["", ""])[:3]
            recorded[test_id] = (cls, group)
    return recorded


def write_recorded(path: str, verdicts: dict[str, Verdict], header: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for line in header:
            f.write(f"# {line}\n")
        for test_id in sorted(verdicts):
            v = verdicts[test_id]
            group = v.group.replace("\t", " ").replace("\n", " ")
            f.write(f"{test_id}\t{v.cls}\t{group}\n")


def compare_recorded(recorded: dict[str, tuple[str, str]], verdicts: dict[str, Verdict],
                     passed: set[str]) -> dict[str, list]:
    """What changed against the recorded run.

    ``new``: failures not recorded; ``fixed``: recorded failures that now pass;
    ``reclassified``: another class than recorded; ``gone``: recorded tests that were
    not run this time (renamed or removed in JAX's tests, or deselected).
    """
    changes = {"new": [], "fixed": [], "reclassified": [], "gone": []}
    for test_id, v in sorted(verdicts.items()):
        if test_id not in recorded:
            changes["new"].append((test_id, v.cls))
        elif recorded[test_id][0] != v.cls:
            changes["reclassified"].append((test_id, recorded[test_id][0], v.cls))
    for test_id, (cls, _) in sorted(recorded.items()):
        if test_id in verdicts:
            continue
        changes["fixed" if test_id in passed else "gone"].append((test_id, cls))
    return changes
