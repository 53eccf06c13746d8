"""How :func:`fbackprop.explain` prints values, parameters and table cells."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------- formatting
def _fmt_real(x: float, digits: int = 4) -> str:
    """A float, short: whole numbers exactly, others to ``digits`` significant
    digits; ``inf``, ``-inf`` and ``nan`` as such (a loss is often one of them)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))          # -0.0 reads as 0
    return f"{x:.{digits}g}"


def _fmt_scalar(v) -> str:
    """One value of any dtype: bools and integers exactly, floats (bfloat16 and
    float16 too) and complex numbers short."""
    a = np.asarray(v)
    if a.dtype == np.bool_:
        return str(bool(a))
    if np.issubdtype(a.dtype, np.integer):
        return str(int(a))
    if np.iscomplexobj(a):
        c = complex(a)
        imag = _fmt_real(c.imag)
        return f"{_fmt_real(c.real)}{'' if imag.startswith('-') else '+'}{imag}j"
    return _fmt_real(float(a))


def _nonfinite_counts(f: np.ndarray) -> list[str]:
    """``["2 NaN", "1 inf", "1 -inf"]`` for a float array (empty when all are finite)."""
    counts = ((np.isnan(f).sum(), "NaN"), (np.isposinf(f).sum(), "inf"),
              (np.isneginf(f).sum(), "-inf"))
    return [f"{n} {what}" for n, what in counts if n]


def summarize(x) -> str:
    """A short text for a value: the number for scalars, a few stats for arrays
    (over the finite elements, with the count of NaN, inf and -inf ones)."""
    if x is None:
        return "0"
    try:
        a = np.asarray(x)
    except Exception:
        return type(x).__name__
    if a.dtype == jax.dtypes.float0:
        return "-"
    if a.size == 1:
        return _fmt_scalar(a.reshape(()))
    if a.size == 0:
        return "[]"
    if a.size <= 4:
        return "[" + ", ".join(_fmt_scalar(v) for v in a.reshape(-1)) + "]"
    if a.dtype == np.bool_:
        return f"{int(a.sum())} of {a.size} True"
    if jnp.issubdtype(a.dtype, jnp.number) and not np.iscomplexobj(a):   # bfloat16 too
        f = a.astype(np.float64)
        finite = f[np.isfinite(f)]
        parts = []
        if finite.size:
            biggest = float(np.abs(finite).max())
            # Scaled, so that a sum of huge values does not overflow.
            mean = float((finite / biggest).mean()) * biggest if biggest else 0.0
            parts.append(f"mean {_fmt_real(mean, 3)}, |max| {_fmt_real(biggest, 3)}")
        return ", ".join(parts + _nonfinite_counts(f))
    return f"{a.dtype.name}{list(a.shape)}"


def _norm(a: np.ndarray) -> float:
    """The 2-norm, inf when it overflows float64 and nan when an element is nan."""
    wide = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64).reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.linalg.norm(wide))


def summarize_short(x) -> str:
    """A compact text for an edge label: the number for scalars, else the norm
    (and how many elements are NaN, inf or -inf)."""
    if x is None:
        return ""
    a = np.asarray(x)
    if a.size == 1 or a.dtype == jax.dtypes.float0:
        return summarize(a)
    if jnp.issubdtype(a.dtype, jnp.number):
        text = f"norm {_fmt_real(_norm(a), 3)}"
        bad = _nonfinite_counts(a.astype(np.complex128).real) if np.iscomplexobj(a) \
            else _nonfinite_counts(a.astype(np.float64))
        return f"{text} ({', '.join(bad)})" if bad else text
    return summarize(a)


def _integer_only(eqn) -> bool:
    """Whether all of an equation's outputs are integers or booleans (index
    arithmetic, comparisons, ``iota``): no gradient flows through it."""
    dtypes = [getattr(v.aval, "dtype", None) for v in eqn.outvars]
    return bool(dtypes) and not any(d is not None and jnp.issubdtype(d, jnp.inexact)
                                    for d in dtypes)


def _is_scalar(x) -> bool:
    return x is not None and np.size(x) == 1


def _short_params(eqn) -> str:
    parts = []
    for k, v in eqn.params.items():
        if k in ("hook", "hook_batch_dims", "accuracy", "precision", "out_sharding",
                 "preferred_element_type", "out_dtype", "sharding"):
            continue
        if isinstance(v, (bool, int, float, str)) or (
                isinstance(v, tuple) and len(v) <= 4
                and all(isinstance(i, (int, float, str, tuple)) for i in v)):
            if v is None:
                continue
            parts.append(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")
    text = ",".join(parts)
    return f"[{text}]" if text and len(text) <= 40 else ""


# The text table's width: cells wrap (never cut) to fit it.
TABLE_WIDTH = 120
# Columns the table narrows last (their least width before wrapping).
_MIN_WIDTHS = {"op": 24, "shape": 8, "value": 14, "upstream": 14, "local": 14,
               "downstream": 18}   # "#" and "out" are never narrowed


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces (a word
    longer than a line is split, never dropped); continuation lines start with
    ``indent``, the first keeps ``text``'s own leading spaces."""
    import textwrap
    if len(text) <= width:
        return [text] if text else []
    body = text.lstrip(" ")
    return textwrap.wrap(body, width, initial_indent=text[:len(text) - len(body)],
                         subsequent_indent=indent, break_long_words=True,
                         break_on_hyphens=False)


def _pieces(part: str, width: int) -> list[str]:
    """A cell part whose first word (``params['b']:[0.5,``) is too wide for its
    column, as ``["name:", " value"]``, so that no word is split."""
    head, colon, tail = part.partition(":")
    if not colon or len(part.split(" ")[0]) <= width or len(head) + 1 > width:
        return [part]
    return [head + ":", " " + tail]


def _wrap_cell(parts: list[str], width: int) -> list[str]:
    """A table cell's parts (one per operand) on one line when they fit, else one
    part per line, each wrapped."""
    joined = ", ".join(parts)
    if len(joined) <= width:
        return [joined]
    return [line for part in parts for piece in _pieces(part, width)
            for line in _wrap(piece, width, " ")]


def _cell_cost(parts: list[str], width: int) -> int:
    """The lines :func:`_wrap_cell` makes of a cell at ``width`` (counted the way
    it fills them), plus a penalty for each word it must split (a number cut in
    two reads worse than an extra line)."""
    if len(", ".join(parts)) <= width:
        return 1
    cost = 0
    for piece in (piece for part in parts for piece in _pieces(part, width)):
        lines, used = 1, 0
        for word in piece.split(" "):
            if len(word) > width:
                cost += 4
                lines += len(word) // width
                used = len(word) % width
                continue
            need = len(word) + (1 if used else 0)
            if used + need > width:
                lines, used = lines + 1, len(word) + 1      # continuation indent
            else:
                used += need
        cost += lines
    return cost


def _fit_widths(header: list, rows: list, width: int) -> list[int]:
    """Column widths summing (with two spaces between columns) to at most
    ``width``: each column starts as wide as its widest cell, and the table
    narrows one character at a time where that adds the fewest wrapped lines
    (a mostly empty column goes first), no column below its least width
    (``_MIN_WIDTHS``)."""
    columns = [[row[i] for row in rows] for i in range(len(header))]
    widths = [max([len(h)] + [len(", ".join(c)) for c in col])
              for h, col in zip(header, columns)]
    least = [min(w, _MIN_WIDTHS.get(h, w)) for w, h in zip(widths, header)]
    budget = width - 2 * (len(header) - 1)
    lines = [sum(_cell_cost(c, w) for c in col) for col, w in zip(columns, widths)]
    while sum(widths) > budget:
        best = None
        for i, col in enumerate(columns):
            if widths[i] <= least[i]:
                continue
            added = sum(_cell_cost(c, widths[i] - 1) for c in col) - lines[i]
            key = (added, -widths[i])
            if best is None or key < best[0]:
                best = (key, i)
        if best is None:
            break
        i = best[1]
        widths[i] -= 1
        lines[i] += best[0][0]
    return widths


def _steps_summary(values, short=False) -> str:
    """Per-step values of one output (None = zero) as first/last/min/max over the steps
    (norms for arrays)."""
    nums, scalar = [], True
    for v in values:
        if v is None:
            nums.append(0.0)
            continue
        a = np.asarray(v)
        if a.size == 1:
            nums.append(float(np.real(a.reshape(()))))
        else:
            scalar = False
            nums.append(_norm(a))
    if not nums:
        return ""
    kind = "" if scalar else "norm "
    # min/max skip NaN steps (Python's min and max would depend on their order).
    finite = [v for v in nums if not math.isnan(v)] or [math.nan]
    if short:
        return f"{kind}{_fmt_scalar(nums[0])}..{_fmt_scalar(nums[-1])}"
    return (f"{kind}first {_fmt_scalar(nums[0])}, last {_fmt_scalar(nums[-1])}, "
            f"min {_fmt_scalar(min(finite))}, max {_fmt_scalar(max(finite))}")
