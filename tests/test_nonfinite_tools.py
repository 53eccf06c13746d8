"""Every debugging tool on functions whose values or gradients are inf or NaN.

Classification losses carry ``-inf`` constants (``jax.nn.softmax``,
``log_softmax``, ``logsumexp``, optax's cross-entropy), and the NaN cases are
what the tools exist to explain. Each tool runs over such functions and the
rule-table specs at inputs outside their domain: ``fb.explain`` and all its
renderings, ``fb.saved_residuals``, ``fb.checked_grad`` (which must name where
the NaN started), ``fb.grad_and_intermediates``, ``fb.gradient_health`` and
``fb.memory_plan``. Numbers are compared with JAX's, NaN positions included.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import fbackprop as fb
from specs import ALL_SPECS

SPECS = {s.name: s for s in ALL_SPECS}
X3 = np.array([1.0, 2.0, 3.0], np.float32)


def _total(out):
    """A spec's outputs as one real scalar."""
    return sum(jnp.sum(jnp.real(v)) for v in jax.tree.leaves(out)
               if jnp.issubdtype(v.dtype, jnp.inexact))


def _spec_case(name, poison, dtype="float32"):
    """Spec ``name`` at its usual inputs with some entries set out of its domain."""
    spec = SPECS[name]
    args = [np.array(a) for a in spec.args(dtype)]
    poison(args)
    return (lambda *xs: _total(spec.fn(*xs))), tuple(args)


def _set(i, index, value):
    def poison(args):
        args[i][index] = value
    return poison


def _both(*poisons):
    def poison(args):
        for p in poisons:
            p(args)
    return poison


def _scan_log(xs):
    def body(c, x):
        y = jnp.log(x) * c
        return c + 0.5, y
    return jnp.sum(lax.scan(body, 1.0, xs)[1])


# name -> (function, args, where the first non-finite value that matters starts:
# (primitive, phase), or None when value and gradient are finite).
CASES = {
    # The named library functions: -inf constants, finite results.
    "log_softmax": (lambda x: jax.nn.log_softmax(x)[1], (X3,), None),
    "softmax": (lambda x: jax.nn.softmax(x)[1], (X3,), None),
    "logsumexp": (jax.nn.logsumexp, (X3,), None),
    "logsumexp_masked": (jax.nn.logsumexp, (np.array([1.0, -np.inf, 3.0], np.float32),),
                         None),
    "optax_xent": (lambda x: optax.softmax_cross_entropy(x, jnp.array([0.0, 1.0, 0.0])),
                   (X3,), None),
    # A NaN made inside a library's jitted helper is reported at the line calling it.
    "log_softmax_inf_logit": (lambda x: jax.nn.log_softmax(x)[0],
                              (np.array([np.inf, 1.0, 2.0], np.float32),),
                              ("(input)", "input")),
    "var_overflow": (lambda x: jnp.var(x), (np.array([1e30, -1e30, 0.0], np.float32),),
                     ("square", "forward")),
    "log_at_0": (lambda x: jnp.log(x), (np.float32(0.0),), ("log", "forward")),
    "x_over_x_at_0": (lambda x: x / x, (np.float32(0.0),), ("div", "forward")),
    # Rule-table specs outside their domains.
    "spec_log": (*_spec_case("log", _both(_set(0, (0, 0), 0.0), _set(0, (1, 2), -1.0))),
                 ("log", "forward")),
    "spec_div_by_0": (*_spec_case("div", _both(_set(1, (0, 1), 0.0),
                                                _both(_set(0, (2, 3), 0.0),
                                                      _set(1, (2, 3), 0.0)))),
                      ("div", "forward")),
    "spec_sqrt_neg": (*_spec_case("sqrt", _set(0, (1, 1), -2.0)), ("sqrt", "forward")),
    "spec_sqrt_0": (*_spec_case("sqrt", _set(0, (1, 1), 0.0)), ("sqrt", "backward")),
    "spec_rsqrt_0": (*_spec_case("rsqrt", _set(0, (0, 3), 0.0)), ("rsqrt", "forward")),
    "spec_exp_overflow": (*_spec_case("exp", _set(0, (2, 0), 100.0)), ("exp", "forward")),
    "spec_pow_neg_base": (*_spec_case("pow", _both(_set(0, (0, 0), -1.5),
                                                    _set(1, (0, 0), 0.5))),
                          ("pow", "forward")),
    "spec_log1p_at_-1": (*_spec_case("log1p", _set(0, (1, 0), -1.0)), ("log1p", "forward")),
    "spec_atanh_at_1": (*_spec_case("atanh", _set(0, (0, 2), 1.0)), ("atanh", "forward")),
    "spec_logsumexp_all_-inf": (*_spec_case("reduce_logsumexp_max_shift",
                                            _both(*[_set(0, (1, j), -np.inf)
                                                    for j in range(4)])),
                                ("(input)", "input")),
    "spec_exp_f64_huge": (*_spec_case("exp", _set(0, (0, 0), 800.0), "float64"),
                          ("exp", "forward")),
    "spec_log_bf16": (*_spec_case("log", _set(0, (0, 1), 0.0), "bfloat16"),
                      ("log", "forward")),
    "spec_exp_f16": (*_spec_case("exp", _set(0, (1, 1), 12.0), "float16"),
                     ("exp", "forward")),
    "scan_log_at_0": (_scan_log, (np.array([1.0, 0.0, 2.0], np.float32),),
                      ("log", "forward")),
    "complex_log_at_0": (lambda x: jnp.real(jnp.log(x.astype(jnp.complex64))).sum(),
                         (np.array([0.0, 2.0], np.float32),), ("log", "forward")),
}


def _jax_answer(fun, args):
    value, grads = jax.value_and_grad(fun, argnums=tuple(range(len(args))))(*args)
    return value, grads


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    tol = {"bfloat16": 2e-2, "float16": 2e-3}.get(str(dtype), 1e-5)
    # Rounding is relative to the array's scale (1e30 - 1e30 leaves noise of 1e22).
    finite = np.abs(b[np.isfinite(b)])
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, equal_nan=True)
    # Same NaN and same-signed inf positions.
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.array_equal(np.isposinf(a), np.isposinf(b))
    assert np.array_equal(np.isneginf(a), np.isneginf(b))


def _nonfinite(*trees) -> bool:
    return any(not np.all(np.isfinite(np.asarray(v, np.float64)))
               for v in jax.tree.leaves(trees))


@pytest.mark.parametrize("name", list(CASES))
def test_every_tool_on_nonfinite_values(name, tmp_path):
    fun, args, origin = CASES[name]
    dtype = np.asarray(args[0]).dtype
    want_value, want_grads = _jax_answer(fun, args)
    assert (origin is not None) == _nonfinite(want_value, want_grads), \
        "the case's expected origin does not match whether JAX's results are finite"

    # fb.explain: its numbers are JAX's, and every rendering works.
    ex = fb.explain(fun, *args)
    _close(ex.value, want_value, dtype)
    for inp, g in zip(ex.inputs, want_grads):
        _close(inp.grad, g, dtype)
    table = str(ex)
    assert table.count("\n") > 3
    if _nonfinite(want_value, want_grads):
        assert "nan" in table or "inf" in table or "NaN" in table
    ET.fromstring(ex.to_svg(engine="builtin"))            # well-formed XML
    for fmt in ("html", "svg", "dot", "txt"):
        path = tmp_path / f"ex.{fmt}"
        ex.save(str(path), engine="builtin")
        assert path.stat().st_size > 100
    if shutil.which("dot"):
        ex.save(str(tmp_path / "ex.png"))
        ET.fromstring(ex.to_svg(engine="graphviz"))

    # fb.grad_and_intermediates: JAX's gradients, NaN positions included.
    grads, _ = fb.grad_and_intermediates(fun, argnums=tuple(range(len(args))))(*args)
    for g, w in zip(grads, want_grads):
        _close(g, w, dtype)

    # fb.gradient_health counts the non-finite elements JAX's gradient has.
    report = fb.gradient_health(list(grads))
    assert "\n" in str(report)
    assert [leaf.nonfinite for leaf in report.leaves] == [
        int(np.sum(~np.isfinite(np.asarray(w, np.float64)))) for w in want_grads]

    # fb.checked_grad: ok with JAX's gradients, or names where the NaN started.
    checked = fb.checked_grad(fun, argnums=tuple(range(len(args))))
    if origin is None:
        report, grads = checked(*args)
        assert report.ok
        for g, w in zip(grads, want_grads):
            _close(g, w, dtype)
    else:
        with pytest.raises(fb.NonFiniteError) as err:
            checked(*args)
        site = err.value.site
        assert (site.primitive, site.phase.split(" ")[0]) == origin, str(err.value)
        if site.source or site.phase != "input":
            assert "test_nonfinite_tools.py" in site.source or "specs" in site.source, \
                site.source
        report, _ = jax.jit(checked)(*args)            # the same report, compiled
        assert report.first() == site

    # fb.saved_residuals and fb.memory_plan only read types: they must not care.
    res = fb.saved_residuals(fun, *args)
    assert "residual" in str(res).lower()
    plan = fb.memory_plan(fun, *args, budgets=[0.0, 1.0], policies=())
    assert plan.plain_bytes == res.intermediate_bytes and str(plan)


def test_scalar_formatting_of_every_dtype():
    """The numbers explain prints, for each dtype and the values that broke it."""
    from fbackprop._src.tools.explain_format import _fmt_scalar, summarize, summarize_short
    cases = [
        (np.float32(np.inf), "inf"), (np.float32(-np.inf), "-inf"), (np.float32(np.nan), "nan"),
        (np.float64(1e300), "1e+300"), (np.float64(-1e-300), "-1e-300"),
        (np.float64(3.0), "3"), (np.float64(-0.0), "0"), (np.float64(2.5e15), "2.5e+15"),
        (jnp.bfloat16(np.inf), "inf"), (jnp.bfloat16(-2.5), "-2.5"),
        (np.float16(65504), "65504"), (np.float16(-np.inf), "-inf"),
        (np.int64(2**62 + 1), str(2**62 + 1)), (np.int8(-7), "-7"), (np.uint32(7), "7"),
        (np.bool_(True), "True"),
        (np.complex64(complex(np.inf, -np.nan)), "inf+nanj"),
        (np.complex128(1.5 - 2j), "1.5-2j"), (np.complex64(complex(-np.inf, -np.inf)),
                                              "-inf-infj"),
    ]
    for value, text in cases:
        assert _fmt_scalar(value) == text, (value, _fmt_scalar(value), text)
    big = np.array([1.0, np.nan, np.inf, -np.inf, 3.0, np.nan], np.float32)
    assert summarize(big) == "mean 2, |max| 3, 2 NaN, 1 inf, 1 -inf"
    assert summarize(np.full(5, np.nan)) == "5 NaN"
    assert summarize(np.full(5, 1e308)) == "mean 1e+308, |max| 1e+308"
    assert summarize_short(big) == "norm nan (2 NaN, 1 inf, 1 -inf)"
    assert summarize_short(np.full(5, 1e200)) == "norm inf"
    assert summarize(np.ones(6, jnp.bfloat16)) == "mean 1, |max| 1"
    assert summarize(np.array([True, False, True, True, False])) == "3 of 5 True"
