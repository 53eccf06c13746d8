"""Gradient checking for users: fbackprop's derivatives against finite differences.

``check_grads`` follows :func:`jax.test_util.check_grads` (central differences
along random directions; for reverse mode the inner-product identity
``<u, J v> == <J^T u, v>``) and adds a report a person can read: one row per
check and differentiated input leaf, with the relative error, the worst element
and pass/fail. It raises ``AssertionError`` with that report when a check fails.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from ..registry import jax_float0

# Default tolerance per dtype (used as both atol and rtol) for comparing
# derivatives with central differences; the same values as JAX's gradient checks.
GRADIENT_TOLERANCES = {
    np.dtype("float64"): 1e-5,
    np.dtype("complex128"): 1e-5,
    np.dtype("float32"): 2e-3,
    np.dtype("complex64"): 2e-3,
    np.dtype("float16"): 5e-2,
    np.dtype(jnp.bfloat16): 1e-1,
}

# Default finite-difference step per dtype: about the cube root of the machine
# epsilon, which balances the truncation error of central differences (eps^2)
# against rounding (machine epsilon / eps).
DEFAULT_EPS = {
    np.dtype("float64"): 1e-6,
    np.dtype("complex128"): 1e-6,
    np.dtype("float32"): 1e-3,
    np.dtype("complex64"): 1e-3,
    np.dtype("float16"): 3e-2,
    np.dtype(jnp.bfloat16): 1e-1,
}


# -------------------------------------------------------------------- report
@dataclasses.dataclass
class CheckRow:
    """One comparison: one check (e.g. ``"VJP"``) for one input leaf.

    Attributes:
      check: which derivative was checked: ``"JVP"`` (forward mode against central
        differences), ``"VJP"`` (reverse mode against central differences),
        ``"JVP/VJP"`` (our own JVP and VJP against each other through
        ``<u, J v> == <J^T u, v>``), and ``"... of ..."`` for higher orders.
      leaf: the input leaf, as ``argname[path]``.
      aval: its dtype and shape, e.g. ``float64[4, 8]``.
      rel_error: the largest relative error ``|a - n| / (|a| + |n| + atol/rtol)``
        (``a`` analytic, ``n`` numeric or the other mode).
      worst: where that error occurs (an output element for JVP, an input
        element for VJP, ``<u, J v>`` for inner products).
      analytic, numeric: the two values at ``worst``.
      atol, rtol: the tolerance used.
      passed: whether every element is within tolerance.
    """
    check: str
    leaf: str
    aval: str
    rel_error: float
    worst: str
    analytic: complex | float
    numeric: complex | float
    atol: float
    rtol: float
    passed: bool


def _fmt_num(x) -> str:
    if isinstance(x, complex) or np.iscomplexobj(x):
        return f"{complex(x):.6g}"
    return f"{float(x):.6g}"


@dataclasses.dataclass
class GradCheckReport:
    """The outcome of :func:`check_grads`: one :class:`CheckRow` per comparison.

    ``str(report)`` is a table; ``report.passed`` says whether all passed.
    """
    rows: list
    order: int
    modes: tuple

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.passed]

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.rows), default=0.0)

    def __str__(self) -> str:
        n_fail = len(self.failures)
        head = (f"check_grads {'passed' if not n_fail else 'FAILED'}: "
                f"{len(self.rows) - n_fail} of {len(self.rows)} checks passed "
                f"(order={self.order}, modes={tuple(self.modes)}); "
                f"max relative error {self.max_rel_error:.2e}")
        cols = ["check", "input leaf", "dtype[shape]", "rel.error", "rtol/atol",
                "worst element: analytic vs numeric", "ok"]
        table = [[r.check, r.leaf, r.aval, f"{r.rel_error:.2e}", f"{r.rtol:.0e}/{r.atol:.0e}",
                  f"{r.worst}: {_fmt_num(r.analytic)} vs {_fmt_num(r.numeric)}",
                  "ok" if r.passed else "FAIL"] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c)
                  for i, c in enumerate(cols)]
        lines = [head, "  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                  for row in table]
        lines.append(
            "relative error = |analytic - numeric| / (|analytic| + |numeric| + atol/rtol); "
            "a check passes when it is <= rtol, i.e. |a - n| <= rtol*(|a| + |n|) + atol. "
            "'numeric' is a central difference, except in JVP/VJP rows where it is "
            "<u, J v> from our own JVP and 'analytic' is <J^T u, v> from our own VJP.")
        if n_fail:
            lines.append(
                "A failing row names the input whose derivative is wrong; rerun with a "
                "smaller function (or fbackprop's debugging tools) to find the rule, or "
                "loosen eps/atol/rtol if the function is badly conditioned there.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"GradCheckReport(passed={self.passed}, checks={len(self.rows)}, "
                f"max_rel_error={self.max_rel_error:.2e})")


# ------------------------------------------------------------------- numerics
_NOT_JITTABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                 jax.errors.TracerIntegerConversionError, jax.errors.TracerBoolConversionError)

def _canonical_dtype(x):
    return jax.dtypes.canonicalize_dtype(np.result_type(x) if not hasattr(x, "dtype")
                                         else x.dtype)


def _is_inexact(dtype) -> bool:
    return dtype != jax_float0 and jnp.issubdtype(dtype, jnp.inexact)


def _lookup(table_or_value, dtype, default_table):
    if table_or_value is None:
        return default_table.get(np.dtype(dtype), 1e-3)
    if isinstance(table_or_value, dict):
        merged = {np.dtype(k): v for k, v in table_or_value.items()}
        return merged.get(np.dtype(dtype), default_table.get(np.dtype(dtype), 1e-3))
    return float(table_or_value)


def _wide(x):
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _rand_like(rng, x):
    shape, dtype = np.shape(x), np.dtype(x.dtype)
    r = rng.standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        r = r + 1j * rng.standard_normal(shape)
    return np.asarray(r).astype(dtype)


def _inner(xs, ys) -> tuple[float, float]:
    """Real inner product sum(conj(x) * y) over paired arrays, and its magnitude
    sum(|conj(x) * y|) (the scale against which rounding is judged)."""
    total, scale = 0.0, 0.0
    for x, y in zip(xs, ys):
        terms = np.conj(_wide(x)).reshape(-1) * _wide(y).reshape(-1)
        total += float(np.real(np.sum(terms)))
        scale += float(np.sum(np.abs(terms)))
    return total, scale


def _elementwise(a, n, atol, rtol):
    """(max relative error, flat index of it, passed) comparing arrays a, n."""
    a, n = _wide(a), _wide(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.where(a == n, 0.0, np.abs(a - n))
        floor = atol / rtol if rtol > 0 else 0.0
        denom = np.abs(a) + np.abs(n) + floor
        rel = np.where(diff == 0, 0.0, diff / np.where(denom == 0, 1.0, denom))
    rel = np.where(np.isnan(rel), np.inf, rel).reshape(-1)
    if rel.size == 0:
        return 0.0, None, True
    k = int(np.argmax(rel))
    ok = bool(np.all(rel <= rtol)) if rtol > 0 else bool(np.all(diff <= atol))
    return float(rel[k]), k, ok


def _index_str(shape, flat) -> str:
    if not shape:
        return ""
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


# --------------------------------------------------------------------- points
class _Point:
    """A function's positional arguments as flat leaves, with readable labels."""

    def __init__(self, args, labels):
        self.leaves, self.treedef = tree_util.tree_flatten(tuple(args))
        self.labels = labels
        assert len(self.labels) == len(self.leaves)

    def args(self, leaves=None):
        return tree_util.tree_unflatten(self.treedef, self.leaves if leaves is None else leaves)

    def replace(self, i, value):
        leaves = list(self.leaves)
        leaves[i] = value
        return self.args(leaves)

    def inexact(self):
        return [i for i, x in enumerate(self.leaves) if _is_inexact(np.dtype(x.dtype))]

    def zero_tangents(self):
        return [np.zeros(np.shape(x), x.dtype if _is_inexact(np.dtype(x.dtype)) else jax_float0)
                for x in self.leaves]


def _prepare_args(args):
    """Inexact leaves as numpy arrays of their JAX dtype; others unchanged."""
    def conv(x):
        if getattr(x, "dtype", None) == jax_float0:
            return x
        return np.asarray(x, dtype=_canonical_dtype(x))
    return tree_util.tree_map(conv, tuple(args))


def _top_labels(fun, args) -> list[str]:
    try:
        params = [p for p in inspect.signature(fun).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:len(args)]]
    except (TypeError, ValueError):
        names = []
    if len(names) != len(args):
        names = [f"args[{i}]" for i in range(len(args))]
    labels = []
    for name, a in zip(names, args):
        for path, _ in tree_util.tree_flatten_with_path(a)[0]:
            labels.append(name + tree_util.keystr(path))
    return labels


def _out_leaves(out):
    leaves_with_path, _ = tree_util.tree_flatten_with_path(out)
    return [("out" + tree_util.keystr(p), np.asarray(x)) for p, x in leaves_with_path]


def _perturb(x, direction, eps):
    """x +- eps*direction in x's dtype, and the direction actually realized after
    rounding, ((x+) - (x-)) / (2 eps), in float64."""
    x_plus = (x + np.asarray(eps * _wide(direction)).astype(x.dtype)).astype(x.dtype)
    x_minus = (x - np.asarray(eps * _wide(direction)).astype(x.dtype)).astype(x.dtype)
    realized = (_wide(x_plus) - _wide(x_minus)) / (2 * eps)
    return x_plus, x_minus, realized


class _Checker:
    def __init__(self, modes, eps, atol, rtol, seed, max_elements):
        self.modes, self.eps, self.atol, self.rtol = modes, eps, atol, rtol
        self.seed, self.max_elements = seed, max_elements
        self.rows: list[CheckRow] = []
        self._jitted: dict = {}

    def tol(self, dtypes):
        atol = max(_lookup(self.atol, d, GRADIENT_TOLERANCES) for d in dtypes)
        rtol = max(_lookup(self.rtol, d, GRADIENT_TOLERANCES) for d in dtypes)
        return atol, rtol

    def eps_for(self, dtype):
        return _lookup(self.eps, dtype, DEFAULT_EPS)

    # ------------------------------------------------------------- recursion
    def check(self, f, point: _Point, order: int, prefix: str):
        from .. import api, derivatives
        if "fwd" in self.modes:
            label = f"JVP of {prefix}" if prefix else "JVP"
            self.check_jvp(f, point, label)
            if order > 1:
                def f_jvp(primals, tangents):
                    return derivatives.jvp(f, primals, tangents)
                rng = np.random.default_rng(self.seed + 1)
                tangents = [(_rand_like(rng, x) if _is_inexact(np.dtype(x.dtype)) else t)
                            for x, t in zip(point.leaves, point.zero_tangents())]
                inner = _Point((point.args(), point.args(tangents)),
                               point.labels + [f"tangent of {l}" for l in point.labels])
                self.check(f_jvp, inner, order - 1, label)
        if "rev" in self.modes:
            label = f"VJP of {prefix}" if prefix else "VJP"
            self.check_vjp(f, point, label)
            if order > 1:
                def f_vjp(*args):
                    out, vjp_fn = api.vjp(f, *args)
                    ct = tree_util.tree_map(
                        lambda o: o if _is_inexact(np.dtype(o.dtype))
                        else np.zeros(np.shape(o), jax_float0), out)
                    return vjp_fn(ct)
                self.check(f_vjp, point, order - 1, label)

    # ------------------------------------------------------------ forward mode
    def check_jvp(self, f, point: _Point, label: str):
        from .. import derivatives
        rng = np.random.default_rng(self.seed)
        for i in point.inexact():
            x = point.leaves[i]
            eps = self.eps_for(x.dtype)
            x_plus, x_minus, realized = _perturb(x, _rand_like(rng, x), eps)
            tangents = point.zero_tangents()
            tangents[i] = np.asarray(realized).astype(x.dtype)
            _, t_out = derivatives.jvp(f, point.args(), point.args(tangents))
            outs_plus = _out_leaves(self.evaluate(f, point.replace(i, x_plus)))
            outs_minus = _out_leaves(self.evaluate(f, point.replace(i, x_minus)))
            analytic = _out_leaves(t_out)
            worst = (0.0, "-", 0.0, 0.0)
            ok = True
            dtypes = [x.dtype]
            for (name, a), (_, yp), (_, ym) in zip(analytic, outs_plus, outs_minus):
                if not _is_inexact(np.dtype(yp.dtype)):
                    continue
                dtypes.append(yp.dtype)
            atol, rtol = self.tol(dtypes)
            for (name, a), (_, yp), (_, ym) in zip(analytic, outs_plus, outs_minus):
                if not _is_inexact(np.dtype(yp.dtype)):
                    continue
                numeric = (_wide(yp) - _wide(ym)) / (2 * eps)
                rel, k, leaf_ok = _elementwise(a, numeric, atol, rtol)
                ok &= leaf_ok
                if k is not None and rel >= worst[0]:
                    worst = (rel, name + _index_str(np.shape(a), k),
                             _wide(a).reshape(-1)[k], numeric.reshape(-1)[k])
            self._add(label, point, i, worst, atol, rtol, ok)

    # ------------------------------------------------------------ reverse mode
    def evaluate(self, f, args):
        """``f(*args)`` through ``jax.jit`` (compiled once per function and level,
        so the many finite-difference evaluations are cheap), or directly when
        ``f`` cannot be jitted (Python control flow on values)."""
        fn = self._jitted.get(id(f))
        if fn is None:
            fn = self._jitted[id(f)] = (f, jax.jit(f))
        if fn[1] is not None:
            try:
                return fn[1](*args)
            except _NOT_JITTABLE:
                self._jitted[id(f)] = (f, None)
        return f(*args)

    def _scalar(self, f, point, i, u, xi) -> float:
        """<u, f(x with leaf i = xi)> in float64."""
        out = tree_util.tree_leaves(self.evaluate(f, point.replace(i, xi)))
        return _inner([uo for uo in u if uo is not None],
                      [o for o, uo in zip(out, u) if uo is not None])[0]

    def _partial(self, f, point, i, u, k, eps) -> float:
        """d<u, f>/dx_k for element k of leaf i, by a central difference."""
        x = point.leaves[i]
        flat = x.reshape(-1)
        plus, minus = flat.copy(), flat.copy()
        plus[k] = np.asarray(_wide(flat[k]) + eps).astype(x.dtype)
        minus[k] = np.asarray(_wide(flat[k]) - eps).astype(x.dtype)
        step = float(np.real(_wide(plus[k]) - _wide(minus[k])))  # after rounding
        if step == 0:
            return float("nan")
        return (self._scalar(f, point, i, u, plus.reshape(x.shape)) -
                self._scalar(f, point, i, u, minus.reshape(x.shape))) / step

    def check_vjp(self, f, point: _Point, label: str):
        from .. import api, derivatives
        rng = np.random.default_rng(self.seed)
        out, vjp_fn = api.vjp(f, *point.args())
        out_leaves, out_tree = tree_util.tree_flatten(out)
        u = [(_rand_like(rng, np.asarray(o)) if _is_inexact(np.dtype(o.dtype))
              else np.zeros(np.shape(o), jax_float0)) for o in out_leaves]
        # JAX's convention for complex values: the adjoint is conj . vjp . conj.
        cts = vjp_fn(tree_util.tree_unflatten(
            out_tree, [np.conj(c) if _is_inexact(np.dtype(c.dtype)) else c for c in u]))
        cts = [np.conj(np.asarray(c)) if _is_inexact(np.dtype(c.dtype)) else c
               for c in tree_util.tree_leaves(cts)]
        u_inexact = [c if _is_inexact(np.dtype(c.dtype)) else None for c in u]
        out_dtypes = [np.dtype(o.dtype) for o in out_leaves if _is_inexact(np.dtype(o.dtype))]

        for i in point.inexact():
            x = point.leaves[i]
            eps = self.eps_for(x.dtype)
            atol, rtol = self.tol([x.dtype, *out_dtypes])
            ct = cts[i]
            # The inner-product identity along a random direction v:
            # <u, (f(x + eps v) - f(x - eps v)) / 2 eps>  ==  <J^T u, v>.
            x_plus, x_minus, realized = _perturb(x, _rand_like(rng, x), eps)
            numeric = (self._scalar(f, point, i, u_inexact, x_plus) -
                       self._scalar(f, point, i, u_inexact, x_minus)) / (2 * eps)
            analytic, scale = _inner([ct], [realized])
            rel, _, ok = _elementwise(analytic, numeric, atol + rtol * scale, rtol)
            worst = (rel, "<J^T u, v>", analytic, numeric)
            # Element by element (all of a small leaf, a random sample of a big one):
            # d<u, f>/dx_k by central differences against (J^T u)_k, to point at an index.
            if not jnp.issubdtype(x.dtype, jnp.complexfloating) and np.size(x) > 0:
                size = int(np.size(x))
                ks = np.arange(size) if size <= self.max_elements else \
                    np.sort(rng.choice(size, self.max_elements, replace=False))
                numeric_k = np.array([self._partial(f, point, i, u_inexact, int(k), eps)
                                      for k in ks])
                analytic_k = _wide(ct).reshape(-1)[ks]
                rel_k, j, ok_k = _elementwise(analytic_k, numeric_k, atol, rtol)
                # Point at an element unless only the random direction caught the error
                # (a sampled leaf whose sample missed the wrong entries).
                if j is not None and (not ok_k or ok):
                    worst = (rel_k, _index_str(np.shape(x), int(ks[j])) or "[]",
                             analytic_k[j], numeric_k[j])
                ok &= ok_k
            self._add(label, point, i, worst, atol, rtol, ok)

            if "fwd" in self.modes:
                # Our own JVP against our own VJP: <u, J v> == <J^T u, v>, no numerics.
                tangents = point.zero_tangents()
                tangents[i] = np.asarray(realized).astype(x.dtype)
                _, t_out = derivatives.jvp(f, point.args(), point.args(tangents))
                t_leaves = tree_util.tree_leaves(t_out)
                pairs = [(c, t) for c, t in zip(u, t_leaves) if _is_inexact(np.dtype(c.dtype))]
                fwd_ip, fwd_scale = _inner([c for c, _ in pairs], [t for _, t in pairs])
                ct_cast = np.asarray(ct)
                rev_ip, rev_scale = _inner([ct_cast], [tangents[i]])
                scale = max(fwd_scale, rev_scale)
                rel, _, ok_ip = _elementwise(rev_ip, fwd_ip, atol + rtol * scale, rtol)
                self._add(label.replace("VJP", "JVP/VJP", 1), point, i,
                          (rel, "<u, J v>", rev_ip, fwd_ip), atol, rtol, ok_ip)

    def _add(self, label, point, i, worst, atol, rtol, ok):
        x = point.leaves[i]
        rel, where, a, n = worst
        aval = f"{np.dtype(x.dtype).name}{list(np.shape(x))}"
        if where.startswith("["):
            where = point.labels[i] + where
        self.rows.append(CheckRow(label, point.labels[i], aval, float(rel), where,
                                  complex(a) if np.iscomplexobj(a) else float(np.real(a)),
                                  complex(n) if np.iscomplexobj(n) else float(np.real(n)),
                                  float(atol), float(rtol), bool(ok)))


# ------------------------------------------------------------------------ API
def check_grads(fun: Callable, args: Sequence, order: int = 1,
                modes: Sequence[str] = ("fwd", "rev"), eps=None, atol=None, rtol=None, *,
                seed: int = 0, max_elements: int = 64) -> GradCheckReport:
    """Checks fbackprop's derivatives of ``fun`` at ``args`` against finite differences.

    Like :func:`jax.test_util.check_grads`: for every differentiated input leaf,
    forward mode (``"fwd"``) compares the JVP along a random direction with a
    central difference; reverse mode (``"rev"``) checks the inner-product
    identity ``<u, J v> == <J^T u, v>`` for random ``u``, ``v`` with ``J v`` from
    central differences, and, element by element (all elements of a leaf up to
    ``max_elements``, a random sample beyond), each entry of ``J^T u``; with both
    modes it also checks our JVP against our VJP through the same identity.
    ``order=2`` repeats the checks on the JVP and VJP functions themselves
    (``"JVP of JVP"``, ``"VJP of JVP"``, ...).

    Args:
      fun: function of ``*args`` returning a pytree of arrays.
      args: tuple of positional arguments (pytrees of arrays). Only float and
        complex leaves are perturbed.
      order: highest derivative order to check (1, 2, ...).
      modes: any of ``"fwd"`` and ``"rev"``.
      eps: finite-difference step: a float, a ``{dtype: eps}`` dict, or None for
        :data:`DEFAULT_EPS` (about the cube root of the dtype's machine epsilon).
      atol, rtol: tolerances: floats, ``{dtype: tol}`` dicts, or None for
        :data:`GRADIENT_TOLERANCES` (float64 1e-5, float32 2e-3, ...).
      seed: seed of the random directions.
      max_elements: largest number of elements per leaf checked one by one.

    Returns:
      A :class:`GradCheckReport` (when every check passes).

    Raises:
      AssertionError: when a check fails, with the report as the message.

    Example:
      >>> import fbackprop as fb, numpy as np, jax.numpy as jnp
      >>> report = fb.check_grads(lambda x: jnp.sin(x) * x, (np.array([0.5, 1.0]),))
      >>> report.passed
      True
    """
    from .. import api
    api._check_callable(fun, "check_grads")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"check_grads: `args` must be a tuple of positional arguments, "
                        f"e.g. (x,) for one argument; got {type(args).__name__}.")
    if isinstance(modes, str):
        modes = (modes,)
    bad = [m for m in modes if m not in ("fwd", "rev")]
    if bad or not modes:
        raise ValueError(f"check_grads: modes must be a non-empty subset of ('fwd', 'rev'), "
                         f"got {tuple(modes)!r}.")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"check_grads: order must be a positive integer, got {order!r}.")
    args = _prepare_args(args)
    point = _Point(args, _top_labels(fun, args))
    if not point.inexact():
        raise TypeError("check_grads: none of `args` has a float or complex leaf, so there "
                        "is nothing to differentiate.")
    checker = _Checker(tuple(modes), eps, atol, rtol, seed, max_elements)
    checker.check(fun, point, order, "")
    report = GradCheckReport(checker.rows, order, tuple(modes))
    if not report.passed:
        raise AssertionError(str(report))
    return report
