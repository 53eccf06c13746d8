"""``fbackprop.explain``: the backward pass of a function, one row per equation.

The function runs eagerly through fbackprop's own sweeps with an observer
attached. Each equation becomes a row with its forward value, the gradient
arriving from above (upstream), its local derivatives (for scalars: upstream x
local = downstream) and the gradients it sends to its inputs (downstream). A
value used twice receives two downstream gradients, which add up.

Checkpoint regions (``jax.checkpoint``/``fb.checkpoint``, with a policy or a
memory budget) are swept in place so their equations are rows too; the rows
whose values the checkpointed backward sweep recomputes are marked (``↻``).
A ``lax.scan`` (or ``lax.while_loop``) is swept step by step: its body's
equations are rows once (marked ``⟳``), holding their values and gradients at
every step (iteration), shown as first, last, min and max over the steps; the
loop itself stays a row too.

The result renders as a text table, Graphviz DOT, a self-contained SVG (no
Graphviz needed; Graphviz's ``dot`` is used when installed) and an HTML page.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from . import api, compat, memplan, trace
from .engine import recording, sweeps
from .debug import (_trace_state, inlined_jaxpr, observing, short_aval, source_code,
                    source_parts, stepping)
from .rules import foreign
from .rules import scan as scan_rules
from .rules.debug import NAMED_PRIMITIVES


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


# ---------------------------------------------------------------- the model
@dataclasses.dataclass
class Row:
    """One equation of the explained function.

    ``inputs`` holds one reference per operand: ``("input", j)``,
    ``("row", r, k)`` (output ``k`` of row ``r``), ``("literal", value)``,
    ``("const", k)`` (a constant the function captured) or ``("step", ref)``
    (a scan's per-step slice of ``ref``).
    """
    index: int
    primitive: str
    op: str
    label: str
    file: str
    line: int | None
    code: str
    shapes: list
    inputs: list
    value: Any = None
    upstream: Any = None          # list, one per output (None = no gradient arrives)
    downstream: Any = None        # list, one per operand (None = no gradient)
    local: Any = None             # list of d out / d operand for scalar equations
    is_output: bool = False
    kept: bool = True             # values kept for display
    recomputed: str = ""          # why the checkpointed backward recomputes it ("" if not)
    loop: str = ""                # inside a scan body: "the scan at f.py:12" ("" if not)
    steps: Any = None             # inside a scan body: step -> {"value", "up", "down"}
    whole: bool = False           # a scan whose body has rows of its own
    plumbing: bool = False        # only integer/bool outputs (index arithmetic): no gradient

    @property
    def source(self) -> str:
        if self.line is None:
            return self.file
        return f"{os.path.basename(self.file)}:{self.line}"


@dataclasses.dataclass
class InputInfo:
    name: str
    aval: str
    value: Any
    grad: Any
    differentiated: bool
    uses: list = dataclasses.field(default_factory=list)   # (row index, downstream grad)


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


def _stepped(eqn) -> bool:
    """Whether explain sweeps this loop step by step (its body gets rows). A
    while loop's trip count is known only when it runs: it is stepped unless its
    body has side effects (or, when it runs, the iterations exceed the limit:
    then the loop stays one row)."""
    if eqn.primitive.name == "while":
        p = eqn.params
        return not (p["body_jaxpr"].jaxpr.effects or p["cond_jaxpr"].jaxpr.effects)
    return eqn.primitive.name == "scan" and scan_rules._steppable(eqn)


def _swept_in_place(eqn):
    """The sub-jaxpr explain sweeps in place: nested jit and checkpoint regions."""
    inner = inlined_jaxpr(eqn)
    if inner is None and eqn.primitive.name in compat.REMAT_NAMES:
        inner, _ = compat.remat_inner(eqn.params)
        inner = getattr(inner, "jaxpr", inner)
    return inner


class _Observer:
    """Makes the rows as the recording and its backward sweep run.

    Values are kept for the rows the table and the graph show: the first
    ``head`` rows shown, and a window of the last ``window`` ones (``None``:
    every row keeps its values); a row that leaves the window drops them.
    """

    def __init__(self, head, window, input_objs, marks=None, show_integer_ops=False):
        self.head, self.window = head, window
        self.show_integer_ops = show_integer_ops
        self.shown = 0               # rows shown so far
        self.marks = marks if marks is not None else {}
        self.state = _trace_state()
        self.rows: list[Row] = []
        self.by_key: dict = {}
        self.ref: dict = {}
        self.alive: list = []
        self.paused = False
        self.kinds: list = []        # the enclosing steps and custom rules, innermost last
        self.context: list = []      # enclosing scan steps, outermost first
        self.row_of_eqn: dict = {}   # equations of scan bodies -> their one row
        self.tail: collections.deque = collections.deque()   # kept rows past the head
        self.n_consts = 0
        for j, x in enumerate(input_objs):
            self.ref[id(x)] = ("input", j)

    def _skip(self, eqn) -> bool:
        # A custom rule's own equations (its JVP rule, run by the handler) are
        # not the program's.
        return (self.paused or len(self.kinds) > len(self.context)
                or _swept_in_place(eqn) is not None
                or (self.state is not None and _trace_state() != self.state))

    # -- events of the handlers: scan steps, custom rules
    def enter(self, kind, step, where):
        self.kinds.append(kind)
        if kind in ("scan", "while"):
            self.context.append((step, where, kind))

    def exit(self):
        if self.kinds.pop() in ("scan", "while"):
            self.context.pop()

    def _operand(self, v, x):
        """The reference of an operand; a value produced by no equation seen is a
        literal (a scalar) or a constant the function captured, as in a staged
        program."""
        if type(v) is compat.Literal:
            return ("literal", v.val)
        ref = self.ref.get(id(x))
        if ref is None:
            ref = self._constant(x)
        return ref

    def _constant(self, x):
        if np.shape(x) == ():
            ref = ("literal", x)
        else:
            ref = ("const", self.n_consts)
            self.n_consts += 1
        self.ref[id(x)] = ref
        self.alive.append(x)
        return ref

    def _staged_away(self, eqn, invals, outvals) -> bool:
        """An equation a staged program would not hold (a Python scalar made an
        array, a no-op conversion): no row; its outputs read as its operand or
        a constant."""
        away = compat.staged_away(eqn, invals)
        if away is None:
            return False
        for x, k in zip(outvals, away):
            if k is None:
                self._constant(x)
            else:
                self.ref[id(x)] = self._operand(eqn.invars[k], invals[k])
                self.alive.append(x)
        return True

    def _drop(self, r):
        """Row ``r`` is neither among the first nor the last rows shown: its
        values (and its code, which names rows) are not kept."""
        row = self.rows[r]
        row.kept, row.value, row.code = False, None, ""
        if row.steps is not None:
            row.steps = {}

    def link(self, total, parts):
        """``total`` is computed from ``parts`` outside any equation: a step's slice
        of ``xs`` reads as ``xs[t]``, the stacked ``ys`` as the body's output."""
        if id(total) in self.ref or not parts:
            return
        ref = self.ref.get(id(parts[0]))
        if ref is None:
            return
        self.ref[id(total)] = ("step", ref) if len(parts) == 1 and ref[0] != "step" else ref
        self.alive.append(total)

    def _step_key(self):
        return tuple(c[0] for c in self.context)

    def on_forward(self, eqn, invals, outvals):
        if self._skip(eqn):
            return
        if self.context and id(eqn) in self.row_of_eqn:
            r = self.row_of_eqn[id(eqn)]
            row = self.rows[r]
            for k, (v, x) in enumerate(zip(eqn.invars, invals)):
                # A carry that came in as a literal reads as the body value it is later.
                if row.inputs[k][0] in ("literal", "const") and type(v) is not compat.Literal \
                        and self.ref.get(id(x), ("const",))[0] not in ("literal", "const"):
                    row.inputs[k] = self.ref[id(x)]
            if row.kept:
                row.steps.setdefault(self._step_key(), {})["value"] = list(outvals)
            for k, x in enumerate(outvals):
                self.ref[id(x)] = ("row", r, k)
                self.alive.append(x)
            if outvals:
                self.by_key[(id(eqn), id(outvals[0]))] = r
            return
        if self._staged_away(eqn, invals, outvals):
            return
        r = len(self.rows)
        plumbing = _integer_only(eqn)
        # Values are kept for the rows the table and the graph show.
        shown = not plumbing or self.show_integer_ops
        keep = shown
        if shown:
            if self.window is not None and self.shown >= self.head:
                self.tail.append(r)
                if len(self.tail) > self.window:
                    self._drop(self.tail.popleft())
            self.shown += 1
        inputs = [self._operand(v, x) for v, x in zip(eqn.invars, invals)]
        file, line, _ = source_parts(eqn)
        name = eqn.primitive.name
        op = name + _short_params(eqn)
        if name in NAMED_PRIMITIVES:
            op = f"{'tag' if name != 'name' else 'checkpoint_name'}['{eqn.params['name']}']"
        owner = foreign.rule_owner(eqn.primitive)
        if owner is not None:
            op = f"{name}<{owner}>"         # the rule is that library's
        row = Row(index=r + 1, primitive=name, op=op, label="", file=file, line=line,
                  code=source_code(eqn) if keep else "",
                  shapes=[short_aval(x) for x in outvals], inputs=inputs, kept=keep,
                  recomputed=self.marks.get(id(eqn), ""), plumbing=plumbing)
        if self.context:
            step, where, kind = self.context[-1]
            row.loop = f"the {'while_loop' if kind == 'while' else 'scan'} at {where}"
            row.steps = {self._step_key(): {"value": list(outvals)} if keep else {}}
            self.row_of_eqn[id(eqn)] = r
        elif keep:
            row.value = list(outvals)
        if name in ("scan", "while") and _stepped(eqn):
            row.whole = True
        self.rows.append(row)
        for k, x in enumerate(outvals):
            self.ref[id(x)] = ("row", r, k)
            self.alive.append(x)
        if outvals:
            self.by_key[(id(eqn), id(outvals[0]))] = r

    def on_backward(self, eqn, cts_out, cts_in, record):
        if self._skip(eqn) or not record.outvals:
            return
        r = self.by_key.get((id(eqn), id(record.outvals[0])))
        if r is None:
            return
        row = self.rows[r]
        down = [ct if a else None for ct, a in zip(cts_in, record.active)]
        if row.steps is not None:
            if row.kept:
                step = row.steps.setdefault(self._step_key(), {})
                step["up"], step["down"] = list(cts_out), down
            # Summed over the steps: what the row sends to each operand in all.
            total = row.downstream or [None] * len(down)
            row.downstream = [t if d is None else d if t is None else t + d
                              for t, d in zip(total, down)]
            return
        # Only gradients sent to the function's inputs are needed for hidden rows.
        row.downstream = down if row.kept else [
            d if ref[0] == "input" else None for d, ref in zip(down, row.inputs)]
        if not row.kept:
            return
        row.upstream = list(cts_out)
        if len(cts_out) == 1 and _is_scalar(record.outvals[0]) and all(
                _is_scalar(x) for x, a in zip(record.invals, record.active) if a):
            one = jnp.ones_like(record.outvals[0])
            self.paused = True
            try:
                local = sweeps.apply_rule(record, [one])
                row.local = [l if a else None for l, a in zip(local, record.active)]
            except Exception:      # a local derivative is a nicety; never fail on it
                row.local = None
            finally:
                self.paused = False


def _input_names(fun, args, kwargs, static) -> list[str]:
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = []
    paths = [p for p, _ in tree_util.tree_flatten_with_path((tuple(args), kwargs))[0]]
    for path, s in zip(paths, static):
        if s:
            continue
        if path[0].idx == 0:
            i = path[1].idx
            head = positional[i] if i < len(positional) else f"args[{i}]"
            names.append(head + tree_util.keystr(path[2:]))
        else:
            names.append(tree_util.keystr(path[1:]).strip("[]'\""))
    return names


_ASSIGN_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)")


def _label_rows(rows: list[Row], taken: set, show_integer_ops: bool):
    """Names rows after the variable their source line assigns (the last row shown
    of that line), else t1, t2, ..."""
    used = collections.Counter(taken)

    def unique(base):
        used[base] += 1
        return base if used[base] == 1 else f"{base}_{used[base]}"

    shown = [row for row in rows if show_integer_ops or not row.plumbing]
    for r, row in enumerate(shown):
        if row.primitive in NAMED_PRIMITIVES:
            continue
        nxt = shown[r + 1] if r + 1 < len(shown) else None
        last_of_line = nxt is None or (nxt.file, nxt.line) != (row.file, row.line)
        m = _ASSIGN_RE.match(row.code) if row.code and last_of_line else None
        if m:
            row.label = unique(m.group(1))
    for row in rows:
        if row.primitive in NAMED_PRIMITIVES:
            row.label = str(row.op.split("'")[1])
        elif not row.label:
            row.label = "out" if row.is_output and not used["out"] else f"t{row.index}"
            used[row.label] += 1


class Explanation:
    """The backward pass of one call, ready to print or render.

    Attributes:
      rows: one :class:`Row` per equation (forward order).
      inputs: one :class:`InputInfo` per array input leaf.
      value: the function's output.
      total_rows: the number of equations (rows beyond ``max_rows`` keep no values).
      show_integer_ops: whether rows computing only integers or booleans (index
        arithmetic, comparisons, ``iota``: no gradient flows through them) are
        shown; when they are not, a value they compute reads ``«label»``: an
        integer computed from ``label``.
    """

    def __init__(self, name, rows, inputs, value, total_rows, max_rows, max_nodes,
                 show_integer_ops=False):
        self.name = name
        self.rows = rows
        self.inputs = inputs
        self.value = value
        self.total_rows = total_rows
        self.max_rows = max_rows
        self.max_nodes = max_nodes
        self.show_integer_ops = show_integer_ops
        self._folded: dict = {}

    def _visible(self, r: int) -> bool:
        return self.show_integer_ops or not self.rows[r].plumbing

    def _visible_rows(self) -> list[int]:
        return [r for r in range(len(self.rows)) if self._visible(r)]

    def _sources(self, r: int) -> tuple[list, list]:
        """What a hidden integer row is computed from, through other hidden rows:
        the shown values (inputs, shown rows), and the primitives of the hidden
        rows that start from nothing else (``iota``)."""
        if r in self._folded:
            return self._folded[r]
        found, roots, stack, seen = [], [], [r], {r}
        while stack:
            here = stack.pop()
            fed = False
            for ref in self.rows[here].inputs:
                if ref[0] == "row" and not self._visible(ref[1]):
                    fed = True
                    if ref[1] not in seen:
                        seen.add(ref[1])
                        stack.append(ref[1])
                elif ref[0] in ("input", "row", "step"):
                    fed = True
                    if ref not in found:
                        found.append(ref)
            if not fed and self.rows[here].primitive not in roots:
                roots.append(self.rows[here].primitive)
        self._folded[r] = found, roots
        return found, roots

    # ---------------------------------------------------------- references
    def _ref_name(self, ref) -> str:
        kind = ref[0]
        if kind == "input":
            return self.inputs[ref[1]].name
        if kind == "row":
            row = self.rows[ref[1]]
            if not self._visible(ref[1]):
                found, roots = self._sources(ref[1])
                return f"«{', '.join([self._ref_name(s) for s in found] + roots)}»"
            return row.label if len(row.shapes) == 1 else f"{row.label}[{ref[2]}]"
        if kind == "literal":
            return _fmt_scalar(ref[1]) if np.size(ref[1]) == 1 else "const"
        if kind == "const":
            return f"const{ref[1]}"
        if kind == "step":
            return f"{self._ref_name(ref[1])}[t]"
        return "?"

    def _args_text(self, row) -> str:
        return f"{row.op.split('[')[0] if row.primitive not in NAMED_PRIMITIVES else row.op}" \
               f"({', '.join(self._ref_name(r) for r in row.inputs)})"

    def _local_parts(self, row, d="d/d") -> list[str]:
        if row.local is None:
            return []
        return [f"{d}{self._ref_name(ref)}={summarize(l)}"
                for ref, l in zip(row.inputs, row.local)
                if l is not None and ref[0] != "literal"]

    def _local_text(self, row, sep=", ", d="d/d") -> str:
        return sep.join(self._local_parts(row, d))

    def _per_step(self, row, what):
        """Per step (in step order), the list kept under ``what`` ('value', 'up', 'down')."""
        return [row.steps[k].get(what) for k in sorted(row.steps)]

    def _steps_text(self, row, what, position, short):
        vals = [v[position] if v is not None else None for v in self._per_step(row, what)]
        return _steps_summary(vals, short)

    def _down_parts(self, row, short=True) -> list[str]:
        """Per operand that receives one, ``name:gradient``."""
        if row.steps is not None and row.kept:
            return [f"{self._ref_name(ref)}:{self._steps_text(row, 'down', k, short)}"
                    for k, ref in enumerate(row.inputs)
                    if row.downstream is not None and row.downstream[k] is not None
                    and ref[0] in ("input", "row", "step")]
        if row.downstream is None:
            return []
        return [f"{self._ref_name(ref)}:{summarize(g)}"
                for ref, g in zip(row.inputs, row.downstream)
                if g is not None and ref[0] in ("input", "row")]

    def _down_text(self, row, sep=", ", short=True) -> str:
        return sep.join(self._down_parts(row, short))

    def _up_text(self, row, short=True) -> str:
        if row.steps is not None and row.kept:
            if not any(v is not None for v in self._per_step(row, "up")):
                return "-"
            ups = [self._steps_text(row, "up", k, short) for k in range(len(row.shapes))]
            return ups[0] if len(ups) == 1 else "(" + ", ".join(ups) + ")"
        if row.upstream is None:
            return "-"
        ups = [summarize(u) if u is not None else "0" for u in row.upstream]
        return ups[0] if len(ups) == 1 else "(" + ", ".join(ups) + ")"

    def _value_text(self, row, short=True) -> str:
        if row.steps is not None and row.kept:
            vals = [self._steps_text(row, "value", k, short) for k in range(len(row.shapes))]
            return vals[0] if len(vals) == 1 else "(" + ", ".join(vals) + ")"
        if row.value is None:
            return ""
        vals = [summarize(v) for v in row.value]
        return vals[0] if len(vals) == 1 else "(" + ", ".join(vals) + ")"

    def _input_grad_text(self, inp, d="") -> str:
        if not inp.differentiated:
            return "(not differentiated)"
        text = summarize(inp.grad)
        uses = [(r, g) for r, g in inp.uses if g is not None]
        if len(uses) > 1:
            text += " = " + " + ".join(
                f"{summarize(g)} (#{self.rows[r].index} {self.rows[r].primitive})"
                for r, g in uses)
        return text

    # --------------------------------------------------------------- table
    def _shown_rows(self):
        """Row indices to show (integer rows folded unless asked for), with None
        marking the elided middle."""
        rows = self._visible_rows()
        n = len(rows)
        if self.max_rows is None or n <= self.max_rows:
            return rows
        head = self.max_rows // 2
        tail = self.max_rows - head
        return rows[:head] + [None] + rows[n - tail:]

    def table(self, width: int = TABLE_WIDTH) -> str:
        """The rows as a text table at most ``width`` columns wide, with the inputs'
        gradients below. Rows are grouped under the source line that made them;
        a cell too wide for its column wraps onto more lines (nothing is cut)."""
        header = ["#", "op", "out", "shape", "value", "upstream", "local", "downstream"]
        shown = self._shown_rows()
        data = []
        for r in shown:
            if r is None:
                data.append(None)
                continue
            row = self.rows[r]
            data.append((r, [
                [str(row.index)], [self._args_text(row)],
                [row.label + (" *" if row.is_output else "") + (" ↻" if row.recomputed else "")
                 + (" ⟳" if row.loop else "")],
                row.shapes, [self._value_text(row)], [self._up_text(row)],
                self._local_parts(row), self._down_parts(row)]))
        widths = _fit_widths(header, [cells for _, cells in filter(None, data)], width)
        legend = "'*' marks the output"
        if any(row.recomputed for row in self.rows):
            legend += ", '↻' a value the checkpointed backward sweep recomputes"
        if any(row.loop for row in self.rows):
            legend += ", '⟳' a row of a loop body (first..last step; details below)"
        folded = sum(1 for r in range(len(self.rows)) if not self._visible(r))
        if folded:
            legend += (f"; «i»: an integer computed from i by {folded} operations not "
                       f"shown (index arithmetic, no gradient; show_integer_ops=True "
                       f"shows them)")
        out = _wrap(f"fbackprop.explain: {self.name}   (upstream x local = downstream; "
                    f"{legend})", width, "    ")
        out.append("")
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        out.append("  ".join("-" * w for w in widths))
        visible = self._visible_rows()
        indent = " " * (widths[0] + 2)
        where = None
        for d in data:
            if d is None:
                where = None
                hidden = len(visible) - self.max_rows
                middle = visible[self.max_rows // 2:len(visible) - (self.max_rows -
                                                                     self.max_rows // 2)]
                ops = collections.Counter(self.rows[r].primitive for r in middle)
                top = ", ".join(f"{k} x{v}" for k, v in ops.most_common(6))
                out += _wrap(f"... {hidden} rows not shown (of {len(visible)}; {top}); "
                             f"pass max_rows=None to see all", width, "    ")
                continue
            r, cells = d
            row = self.rows[r]
            if (row.file, row.line) != where:
                where = (row.file, row.line)
                out += _wrap(f"{indent}{row.source}" + (f"  {row.code}" if row.code else ""),
                             width, indent + "    ")
            lines = [_wrap_cell(c, w) for c, w in zip(cells, widths)]
            for k in range(max(len(c) for c in lines)):
                out.append("  ".join((c[k] if k < len(c) else "").ljust(w)
                                     for c, w in zip(lines, widths)).rstrip())
        looped = [r for r in shown if r is not None and self.rows[r].loop
                  and self.rows[r].kept]
        if looped:
            out.append("")
            out.append("rows of loop bodies, over the steps (first, last, min, max; norms for "
                       "arrays):")
            for r in looped:
                row = self.rows[r]
                out += _wrap(f"  #{row.index} {row.label} in {row.loop}, {len(row.steps)} "
                             f"steps:", width, "      ")
                for what, text in (("value", self._value_text(row, short=False)),
                                   ("upstream", self._up_text(row, short=False)),
                                   ("downstream", self._down_text(row, sep="; ", short=False)
                                    or "-")):
                    out += _wrap(f"      {what:<11}{text}", width, " " * 17)
        out.append("")
        out.append("inputs (a value used several times adds the gradients of all its uses):")
        w = max([len(i.name) for i in self.inputs] + [4])
        for inp in self.inputs:
            out += _wrap(f"  {inp.name.ljust(w)}  {inp.aval:<10} value "
                         f"{summarize(inp.value):<12} grad {self._input_grad_text(inp)}",
                         width, " " * (w + 16))
        out += _wrap(f"output: {summarize(self.value)}", width, "    ")
        return "\n".join(out)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"<Explanation of {self.name}: {len(self.rows)} rows>\n{self.table()}"

    # --------------------------------------------------------------- graph
    def _graph(self):
        """Nodes and edges to draw: the inputs, the last ``max_nodes`` shown rows and
        an elision note. An edge from a folded integer row is drawn from what that
        row was computed from (no gradient label: none flows there)."""
        visible = self._visible_rows()
        first = 0 if self.max_nodes is None or len(visible) <= self.max_nodes \
            else len(visible) - self.max_nodes
        drawn = visible[first:]
        drawn_set = set(drawn)
        edges, seen = [], set()
        for r in drawn:
            row = self.rows[r]
            for k, ref in enumerate(row.inputs):
                g = row.downstream[k] if row.downstream is not None else None
                folded = ref[0] == "row" and not self._visible(ref[1])
                label = "" if folded else summarize_short(g)
                for src_ref in (self._sources(ref[1])[0] if folded else [ref]):
                    if src_ref[0] == "input":
                        src = ("in", src_ref[1])
                    elif src_ref[0] == "row":
                        src = ("row", src_ref[1]) if src_ref[1] in drawn_set \
                            else ("elided", first)
                    else:
                        continue
                    if (src, r, label) not in seen:
                        seen.add((src, r, label))
                        edges.append((src, ("row", r), label, k))
        used = {src for src, _, _, _ in edges}
        nodes = [("in", j) for j in range(len(self.inputs)) if ("in", j) in used]
        if ("elided", first) in used:
            nodes.append(("elided", first))
        nodes += [("row", r) for r in drawn]
        return nodes, edges

    def _node_lines(self, node) -> tuple[list[str], str]:
        lines, kind = self._node_text(node)
        wrapped = []
        for line in lines:
            wrapped += _wrap(line, NODE_CHARS, "  ") or [""]
        return wrapped, kind

    def _node_text(self, node) -> tuple[list[str], str]:
        kind = node[0]
        if kind == "in":
            inp = self.inputs[node[1]]
            lines = [f"{inp.name}  (input {inp.aval})", f"value {summarize(inp.value)}"]
            if inp.differentiated:
                lines.append(f"grad {summarize(inp.grad)}")
                uses = [g for _, g in inp.uses if g is not None]
                if len(uses) > 1:
                    lines.append("= " + " + ".join(summarize(g) for g in uses))
            return lines, "input"
        if kind == "elided":
            return [f"{node[1]} earlier operations", "not drawn (max_nodes)"], "elided"
        row = self.rows[node[1]]
        lines = [f"#{row.index} {row.label} = {self._args_text(row)}"]
        if row.code:
            lines.append(row.code if len(row.code) <= NODE_CHARS
                         else row.code[:NODE_CHARS - 1] + "~")
        lines.append(f"{', '.join(row.shapes)}  value {self._value_text(row)}")
        lines.append(f"upstream grad {self._up_text(row)}")
        local = self._local_text(row, sep="  ", d="∂/∂")
        if local:
            lines.append(f"local {local}")
        if row.recomputed:
            lines.append(f"↻ {row.recomputed}")
        lines.append(row.source)
        if row.is_output:
            return lines, "output"
        return lines, "recomputed" if row.recomputed else "op"

    def to_dot(self) -> str:
        """Graphviz DOT source: forward edges (top to bottom), each labelled with the
        gradient sent back."""
        nodes, edges = self._graph()

        def nid(node):
            return f"{node[0]}{node[1]}"

        def esc(s):
            return s.replace("\\", "\\\\").replace('"', '\\"')

        style = {"input": 'style=filled, fillcolor="#e8f0fe"',
                 "output": 'style="filled,bold", fillcolor="#fde8e8"',
                 "elided": 'style=dashed, color="#999999"', "op": "",
                 "recomputed": 'style="filled,dashed", fillcolor="#fff6e0", color="#b7791f"'}
        out = [f'digraph "{esc(self.name)}" {{', "  rankdir=TB;",
               '  node [shape=box, fontname="monospace", fontsize=10];',
               '  edge [fontname="monospace", fontsize=10, fontcolor="#c0392b"];']
        for node in nodes:
            lines, kind = self._node_lines(node)
            label = "\\l".join(esc(line) for line in lines) + "\\l"
            extra = f", {style[kind]}" if style[kind] else ""
            out.append(f'  {nid(node)} [label="{label}"{extra}];')
        for src, dst, label, _ in edges:
            lab = f' [label="grad {esc(label)}"]' if label else " [style=dashed]"
            out.append(f"  {nid(src)} -> {nid(dst)}{lab};")
        out.append("}")
        return "\n".join(out)

    def to_svg(self, engine: str = "auto") -> str:
        """A self-contained SVG picture of the graph.

        Args:
          engine: ``"builtin"`` (pure Python layout), ``"graphviz"`` (needs the
            ``dot`` program) or ``"auto"`` (Graphviz when installed).
        """
        if engine not in ("auto", "builtin", "graphviz"):
            raise ValueError(f"to_svg: engine must be 'auto', 'builtin' or 'graphviz', "
                             f"got {engine!r}.")
        dot = shutil.which("dot")
        if engine == "graphviz" and dot is None:
            raise RuntimeError(f"to_svg(engine='graphviz'): {GRAPHVIZ_MISSING}; use "
                               f"engine='builtin'.")
        if dot is not None and engine != "builtin":
            done = subprocess.run([dot, "-Tsvg"], input=self.to_dot().encode(),
                                  capture_output=True, timeout=60)
            if done.returncode == 0:
                return done.stdout.decode()
            if engine == "graphviz":
                raise RuntimeError(f"Graphviz failed: {done.stderr.decode()[:500]}")
        return self._builtin_svg()

    def _builtin_svg(self) -> str:
        """The graph laid out in pure Python: forward edges top to bottom, layer by
        layer (a value's depth from the inputs), in side-by-side bands when the
        layers are many. Gradient labels sit in the gap above the operation that
        sends them, where no box is, and are drawn last."""
        nodes, edges = self._graph()
        layout = _Layout(nodes, edges, {n: self._node_lines(n) for n in nodes})
        fill = {"input": "#e8f0fe", "output": "#fde8e8", "op": "#ffffff", "elided": "#f4f4f4",
                "recomputed": "#fff6e0"}
        stroke = {"input": "#3b6fd4", "output": "#c0392b", "op": "#555555", "elided": "#999999",
                  "recomputed": "#b7791f"}
        e = html.escape
        width, height = layout.width, layout.height
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
               f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
               f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="12">',
               '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
               'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
               '<path d="M 0 0 L 10 5 L 0 10 z" fill="#777"/></marker></defs>',
               '<rect width="100%" height="100%" fill="white"/>',
               f'<text x="20" y="24" font-size="14" font-weight="bold">{e(self.name)}: '
               f'forward edges top to bottom; red labels = gradient sent back along the '
               f'edge</text>']
        for path, label in layout.paths:
            dash = "" if label else ' stroke-dasharray="3 3"'
            out.append(f'<path d="{path}" fill="none" stroke="#777" stroke-width="1.3"'
                       f'{dash} marker-end="url(#arrow)"/>')
        for node in nodes:
            d = layout.boxes[node]
            kind = d["kind"]
            dash = ' stroke-dasharray="4 3"' if kind in ("elided", "recomputed") else ""
            width_px = 2.2 if kind == "output" else 1.2
            out.append(f'<rect x="{d["x"]:.1f}" y="{d["y"]:.1f}" width="{d["w"]:.1f}" '
                       f'height="{d["h"]:.1f}" rx="5" fill="{fill[kind]}" '
                       f'stroke="{stroke[kind]}" stroke-width="{width_px}"{dash}/>')
            for i, line in enumerate(d["lines"]):
                weight = ' font-weight="bold"' if i == 0 else ""
                color = ' fill="#c0392b"' if line.startswith(("grad", "upstream", "= ")) \
                    else ""
                out.append(f'<text x="{d["x"] + _PAD:.1f}" '
                           f'y="{d["y"] + _PAD + (i + 0.8) * _LINE_H:.1f}"{weight}{color}>'
                           f'{e(line)}</text>')
        for x, y, w, text in layout.labels:
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{_LABEL_H}" '
                       f'fill="white" opacity="0.9"/>')
            out.append(f'<text x="{x + 3:.1f}" y="{y + _LABEL_H - 4:.1f}" '
                       f'fill="#c0392b">{e(text)}</text>')
        out.append("</svg>")
        return "\n".join(out)

    def to_html(self, engine: str = "auto") -> str:
        """A self-contained HTML page: the graph (inline SVG) and the table."""
        e = html.escape
        note = ""
        shown = len(self._visible_rows())
        if self.max_nodes is not None and shown > self.max_nodes:
            note = (f"<p><b>Note:</b> the graph shows the last {self.max_nodes} of "
                    f"{shown} operations (raise <code>max_nodes</code> to draw "
                    f"more); the table lists them.</p>")
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>fbackprop.explain: {e(self.name)}</title><style>"
            "body{font-family:sans-serif;margin:24px;color:#222}"
            "pre{background:#f7f7f7;padding:12px;overflow-x:auto;font-size:12px}"
            ".graph{overflow-x:auto;border:1px solid #ddd;padding:4px}</style></head><body>"
            f"<h2>Backward pass of <code>{e(self.name)}</code></h2>"
            "<p>Each box is one operation of the forward pass (value computed going "
            "forward). Going backward, the gradient arriving at a box (<i>upstream</i>) "
            "times its <i>local</i> derivative gives the gradient it sends to each input "
            "(<span style=\"color:#c0392b\">red edge labels</span>). A value used twice "
            "receives two gradients, and they add up.</p>"
            f"{note}<div class=\"graph\">{self.to_svg(engine)}</div>"
            f"<h3>Table</h3><pre>{e(self.table())}</pre></body></html>\n")

    def save(self, path: str, format: str | None = None, engine: str = "auto") -> str:
        """Writes the explanation to ``path`` and returns the path.

        The file's folder is created if it does not exist.

        Args:
          path: file name; its suffix picks the format unless ``format`` is given.
          format: ``"html"``, ``"svg"``, ``"dot"``, ``"txt"``, or ``"png"`` (a picture
            of the graph; needs the Graphviz ``dot`` program).
          engine: SVG layout, see :meth:`to_svg`.
        """
        fmt = output_format(path, format)
        if fmt == "png":
            data = self._graphviz_png()
        else:
            text = {"html": lambda: self.to_html(engine), "svg": lambda: self.to_svg(engine),
                    "dot": self.to_dot, "txt": lambda: self.table() + "\n"}[fmt]()
            data = text.encode("utf-8")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def _graphviz_png(self) -> bytes:
        dot = shutil.which("dot")
        if dot is None:
            raise RuntimeError(PNG_NEEDS_GRAPHVIZ)
        done = subprocess.run([dot, "-Tpng"], input=self.to_dot().encode(), capture_output=True,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"Graphviz failed: {done.stderr.decode()[:500]}")
        return done.stdout


# ------------------------------------------------------------- graph layout
# Sizes of the pure-Python SVG layout, in pixels.
NODE_CHARS = 40          # a box's text lines wrap at this many characters
_CHAR_W, _LINE_H, _PAD = 7.0, 15, 8
_LABEL_H = 15            # an edge label's height
_GAP_X = 24              # between boxes of a layer
_BAND_GAP = 40           # between bands
_PORT_X, _PORT_STEP = 24, 36   # where edges leave and enter a box (from its left side)
_LANE_STEP = 10          # between the runs of edges that do not go to the next layer
_TITLE_H = 40
_ASPECT = 1.2            # the width/height the bands aim at


class _Layout:
    """Where the pure-Python SVG puts boxes, edges and labels.

    Each node gets a layer, its depth from the inputs (an input sits just above
    its first use). Layers go top to bottom; when there are many, they are cut
    into bands placed side by side (like newspaper columns), as many as make
    the picture about ``_ASPECT`` times as wide as high. An edge to the next
    layer of the same band is a curve; any other edge leaves its box on the
    right into a lane of its own, runs down (to a later band: up to a channel
    above the bands, across, and down in front of that band), then across the
    gap above its target and into it. Each label sits in that gap, beside the
    point where its edge enters the target, on a row where no other label is:
    gaps hold no boxes and grow with their rows, so no label is hidden.

    Attributes:
      boxes: node -> {"lines", "kind", "x", "y", "w", "h"}.
      paths: per edge, ``(svg path, label)``.
      labels: ``(x, y, width, text)`` per labelled edge.
      width, height: the picture's size.
    """

    def __init__(self, nodes, edges, texts):
        boxes = self.boxes = {}
        for node in nodes:
            lines, kind = texts[node]
            boxes[node] = {"lines": lines, "kind": kind,
                           "w": max(len(s) for s in lines) * _CHAR_W + 2 * _PAD,
                           "h": len(lines) * _LINE_H + 2 * _PAD}
        depth = self._depths(nodes, edges)
        layers = [[] for _ in range(max(depth.values(), default=0) + 1)]
        # In a layer: operations first (in program order, so a chain runs down
        # one line), then inputs.
        for node in sorted(nodes, key=lambda n: n[0] in ("in", "elided")):
            layers[depth[node]].append(node)
        layers = [layer for layer in layers if layer]
        depth = {n: k for k, layer in enumerate(layers) for n in layer}
        bands = self._bands(layers)
        # Inputs of a band's first layer sit above it, not at the previous band's end.
        for b in range(len(bands) - 1):
            last = layers[bands[b][-1]]
            moved = [n for n in last if n[0] in ("in", "elided")]
            if moved:
                last[:] = [n for n in last if n not in moved]
                layers.append(moved)
                bands[b + 1].insert(0, len(layers) - 1)
        bands = [[d for d in band if layers[d]] for band in bands]
        order = [d for band in bands for d in band]
        layers = [layers[d] for d in order]
        position = {d: k for k, d in enumerate(order)}
        bands = [[position[d] for d in band] for band in bands]
        depth = {n: k for k, layer in enumerate(layers) for n in layer}
        band_of = {n: b for b, band in enumerate(bands) for d in band for n in layers[d]}
        # Where each edge enters its target: left to right in argument order.
        port = {}
        incoming = collections.defaultdict(list)
        for i, edge in enumerate(edges):
            incoming[edge[1]].append(i)
        for dst, ids in incoming.items():
            for slot, i in enumerate(sorted(ids, key=lambda i: edges[i][3])):
                port[i] = min(_PORT_X + slot * _PORT_STEP, boxes[dst]["w"] - 8)
        direct = {i for i, (src, dst, _, _) in enumerate(edges)
                  if band_of[src] == band_of[dst] and depth[dst] == depth[src] + 1}
        # x, band by band: boxes left-aligned, then labels, then lanes.
        label_at, label_rows, lane_x = {}, collections.defaultdict(list), {}
        left = 20.0
        self.band_left = []
        for b, band in enumerate(bands):
            self.band_left.append(left)
            right = left
            for d in band:
                x = left
                for n in layers[d]:
                    boxes[n]["x"] = x
                    x += boxes[n]["w"] + _GAP_X
                right = max(right, x - _GAP_X)
            for i, (src, dst, label, _) in enumerate(edges):
                if label and band_of[dst] == b:
                    text = f"grad {label}"
                    x, w = boxes[dst]["x"] + port[i] + 5, len(text) * _CHAR_W + 6
                    rows = label_rows[depth[dst]]
                    row = next((k for k, taken in enumerate(rows)
                                if all(x >= hi or x + w <= lo for lo, hi in taken)),
                               len(rows))
                    if row == len(rows):
                        rows.append([])
                    rows[row].append((x, x + w))
                    label_at[i] = (row, x, w, text)
                    right = max(right, x + w)
            lanes = [i for i, (src, dst, _, _) in enumerate(edges)
                     if band_of[src] == b and i not in direct]
            for k, i in enumerate(lanes):
                lane_x[i] = right + 14 + k * _LANE_STEP
            left = right + (14 + len(lanes) * _LANE_STEP if lanes else 0) + _BAND_GAP
        self.width = max(left - _BAND_GAP + 20, 600.0)
        # y: a channel per edge into a later band, then each band's layers, each
        # under the gap holding its labels.
        crossing = [i for i, (src, dst, _, _) in enumerate(edges)
                    if band_of[src] != band_of[dst]]
        channel = {i: _TITLE_H + 4 + k * _LANE_STEP for k, i in enumerate(crossing)}
        top = _TITLE_H + 14 + len(crossing) * _LANE_STEP
        gap_top, bottom = {}, top
        for band in bands:
            y = top
            for d in band:
                gap_top[d] = y
                y += max(30.0, len(label_rows[d]) * (_LABEL_H + 3) + 14)
                for n in layers[d]:
                    boxes[n]["y"] = y
                y += max(boxes[n]["h"] for n in layers[d])
            bottom = max(bottom, y)
        self.height = bottom + 30
        # The edges and labels.
        self.paths, self.labels = [], []
        for i, (src, dst, label, _) in enumerate(edges):
            a, b = boxes[src], boxes[dst]
            px, py = b["x"] + port[i], b["y"]
            run_y = py - 12
            if i in label_at:
                row, lx, w, text = label_at[i]
                ly = gap_top[depth[dst]] + 7 + row * (_LABEL_H + 3)
                self.labels.append((lx, ly, w, text))
                run_y = ly + _LABEL_H / 2
            if i in direct:
                sx, sy = a["x"] + min(_PORT_X, a["w"] - 8), a["y"] + a["h"]
                dy = max(12.0, (py - sy) / 2)
                path = (f"M {sx:.1f} {sy:.1f} C {sx:.1f} {sy + dy:.1f}, {px:.1f} "
                        f"{py - dy:.1f}, {px:.1f} {py:.1f}")
            else:
                sx, sy, lx = a["x"] + a["w"], a["y"] + a["h"] / 2, lane_x[i]
                points = [(sx, sy), (lx, sy)]
                if i in channel:
                    entry = self.band_left[band_of[dst]] - 8 - (crossing.index(i) % 4) * 5
                    points += [(lx, channel[i]), (entry, channel[i]), (entry, run_y)]
                else:
                    points.append((lx, run_y))
                points += [(px, run_y), (px, py)]
                path = "M " + " L ".join(f"{x:.1f} {y:.1f}" for x, y in points)
            self.paths.append((path, label))

    @staticmethod
    def _depths(nodes, edges) -> dict:
        preds, succs = collections.defaultdict(list), collections.defaultdict(list)
        for src, dst, _, _ in edges:
            preds[dst].append(src)
            succs[src].append(dst)
        depth = {}
        for node in nodes:                   # nodes are in topological order
            depth[node] = 1 + max((depth[p] for p in preds[node] if p in depth), default=-1)
        # A value sits just above its first use (a bias's broadcast beside the add
        # that reads it, an input above the operation that first reads it).
        for node in reversed(nodes):
            if succs[node]:
                lowest = min(depth[s] for s in succs[node]) - 1
                depth[node] = lowest if node[0] in ("in", "elided") \
                    else max(depth[node], lowest)
        return depth

    def _bands(self, layers) -> list[list[int]]:
        """Consecutive layers cut into bands of about equal height."""
        heights = [max([self.boxes[n]["h"] for n in layer] + [0]) + 40 for layer in layers]
        widths = [sum(self.boxes[n]["w"] + _GAP_X for n in layer) for layer in layers]
        total, band_w = sum(heights), max(widths + [1.0]) + 80
        count = max(1, min(len(layers), round(math.sqrt(_ASPECT * total / band_w))))
        target = total / count
        bands, current, height = [], [], 0.0
        for d, h in enumerate(heights):
            if current and height + h / 2 > target and len(bands) < count - 1:
                bands.append(current)
                current, height = [], 0.0
            current.append(d)
            height += h
        bands.append(current)
        return bands


FORMATS = ("html", "svg", "dot", "txt", "png")
_FORMAT_ALIASES = {"htm": "html", "gv": "dot", "text": "txt"}
GRAPHVIZ_MISSING = ("the Graphviz `dot` program is not installed "
                    "(apt-get, brew or conda install graphviz)")
PNG_NEEDS_GRAPHVIZ = (f"a .png picture needs Graphviz, and {GRAPHVIZ_MISSING}; without it, "
                      f"write .html, .svg, .dot or .txt")


def output_format(path: str, format: str | None = None) -> str:
    """The format :meth:`Explanation.save` writes for ``path``: html, svg, dot, txt or png.

    Raises:
      ValueError: for any other suffix or ``format``.
    """
    fmt = (format or os.path.splitext(path)[1].lstrip(".") or "html").lower()
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"Explanation.save: unknown format {fmt!r} for {path!r}; use a "
                         f".html, .svg, .dot, .txt or .png file name (or format=...).")
    return fmt


def explain(fun: Callable, *args, argnums: int | Sequence[int] | None = None,
            max_rows: int | None = 200, max_nodes: int | None = 60,
            show_integer_ops: bool = False, **kwargs) -> Explanation:
    """Runs ``fun(*args, **kwargs)`` forward and backward and explains every step.

    One row per equation: the operation, the user's source line, the output
    shape and value (a summary for arrays), the gradient arriving from the
    output side (upstream), the local derivatives (scalar equations) and the
    gradients sent to each operand (downstream). Where a value is used more
    than once, its gradient is the sum of what each use sends back.

    Args:
      fun: a function returning a scalar.
      *args: its positional arguments (concrete arrays or numbers).
      argnums: which positional arguments to differentiate (default: all).
      max_rows: rows shown in the table (the first and last halves); ``None``
        for all. Values are only kept for these rows.
      max_nodes: operations drawn in the graph (the last ones, nearest the
        output); ``None`` for all.
      show_integer_ops: also show the operations whose outputs are all integers
        or booleans (index arithmetic, comparisons, ``iota``), which no gradient
        flows through. By default they are folded: a value they compute reads
        ``«label»`` (an integer computed from ``label``).
      **kwargs: keyword arguments for ``fun`` (not differentiated).

    Returns:
      An :class:`Explanation`: ``print`` it for the table, or use ``to_dot()``,
      ``to_svg()``, ``to_html()``, ``save(path)``.

    Example:
      >>> import fbackprop as fb
      >>> def f(x, y):
      ...     z = x * y
      ...     w = z + x
      ...     loss = w ** 2
      ...     return loss
      >>> ex = fb.explain(f, 2.0, 3.0)
      >>> float(ex.value), [float(i.grad) for i in ex.inputs]
      (64.0, [64.0, 32.0])
      >>> print(ex)               # the table: one row per operation  # doctest: +SKIP
    """
    api._check_callable(fun, "explain")
    for x in tree_util.tree_leaves((args, kwargs)):
        if compat.is_tracer(x):
            raise TypeError(
                "fbackprop.explain shows concrete values, but it was called with a traced "
                "value (inside jax.jit, jax.vmap or a gradient). Call it outside the "
                "transformation, on example inputs.")
    for opt, val in (("max_rows", max_rows), ("max_nodes", max_nodes)):
        if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
            raise ValueError(f"explain: `{opt}` must be a positive int or None, got {val!r}.")
    nums = tuple(range(len(args))) if argnums is None else argnums
    nums = api._normalize_argnums(nums, len(args), "explain")
    inputs = api._Inputs(args, kwargs, nums, "explain", allow_int=True)
    static = inputs.static()
    names = _input_names(fun, args, kwargs, static)
    # Fresh copies: every input is a distinct object, so uses are told apart.
    leaves = [x if s else jnp.array(x, copy=True) for x, s in zip(inputs.leaves, static)]
    dyn = [x for x, s in zip(leaves, static) if not s]
    active = inputs.active()
    head = window = None
    if max_rows is not None and max_nodes is not None:
        head, window = max_rows // 2, max(max_rows - max_rows // 2, max_nodes)
    what = getattr(fun, "__name__", "fun")
    with memplan.explaining() as marks, stepping(checkpoints=False):
        obs = _Observer(head, window, dyn, marks, show_integer_ops)
        with observing(obs):
            run = recording.record(fun, inputs.in_tree, leaves, active)
            trace.check_outputs(run.out_tree, run.out_vals, what)
            api.split_scalar_output(run.out_tree, run.out_vals, False, "explain")
            outs = run.out_vals
            one = jnp.ones((), api._dtype_of(outs[0]))
            cts = sweeps.backward(run.tape, [one] + [None] * (len(outs) - 1))
    cts = [ct for ct, s in zip(cts, static) if not s]
    active = [a for a, s in zip(active, static) if not s]
    rows = obs.rows
    out_ref = obs.ref.get(id(outs[0]))
    if out_ref is not None and out_ref[0] == "row":
        rows[out_ref[1]].is_output = True
    inputs = [InputInfo(name, short_aval(x), x, ct, a)
              for name, x, ct, a in zip(names, dyn, cts, active)]
    for r, row in enumerate(rows):
        if row.downstream is None or row.whole:
            continue                 # a stepped scan's body rows count its uses
        for ref, g in zip(row.inputs, row.downstream):
            if ref[0] == "input":
                inputs[ref[1]].uses.append((r, g))
    _label_rows(rows, {i.name for i in inputs}, show_integer_ops)
    return Explanation(what, rows, inputs, outs[0], len(rows), max_rows, max_nodes,
                       bool(show_integer_ops))


# ------------------------------------------------------------ the command line
# The graph every backprop tutorial starts with (loss 64, dloss/dx 64, dloss/dy 32
# at x=2, y=3). It is compiled from text under its own file name (registered with
# linecache) because source lines inside fbackprop itself are hidden from reports.
SEED_EXAMPLE_FILE = "seed_example.py"
SEED_EXAMPLE_SOURCE = """\
def seed_example(x, y):
    z = x * y
    w = z + x
    loss = w ** 2
    return loss
"""


def _make_seed_example():
    import linecache
    linecache.cache[SEED_EXAMPLE_FILE] = (len(SEED_EXAMPLE_SOURCE), None,
                                          SEED_EXAMPLE_SOURCE.splitlines(True),
                                          SEED_EXAMPLE_FILE)
    namespace: dict = {}
    exec(compile(SEED_EXAMPLE_SOURCE, SEED_EXAMPLE_FILE, "exec"), namespace)
    return namespace["seed_example"]


seed_example = _make_seed_example()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fbackprop explain``: render the seed example's backward pass."""
    from .cli import ArgumentParser, check_output_path
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv and argv[0] == "explain":
        argv = argv[1:]
    parser = ArgumentParser(
        prog="python -m fbackprop explain",
        description="Explain the backward pass of  z = x*y; w = z + x; loss = w**2  "
                    "(at x=2, y=3 unless given):\nprints a table of every operation's "
                    "upstream, local and downstream gradients and writes the graph to a "
                    "file.")
    parser.add_argument("--out", default=os.path.join("out", "fbackprop_explain.html"),
                        metavar="FILE",
                        help="output file, its folder created if missing; the suffix picks "
                             "the format: .html (graph and table), .svg, .dot, .txt, or .png "
                             "(needs Graphviz)")
    parser.add_argument("--x", type=float, default=2.0, help="value of x")
    parser.add_argument("--y", type=float, default=3.0, help="value of y")
    parser.add_argument("--engine", choices=("auto", "builtin", "graphviz"), default="auto",
                        help="graph layout for .html/.svg: Graphviz when installed (auto), "
                             "pure Python (builtin), or Graphviz only (graphviz)")
    opts = parser.parse_args(argv)
    try:
        fmt = output_format(opts.out)
    except ValueError:
        parser.error(f"--out {opts.out!r}: unknown format; use a .html, .svg, .dot, .txt or "
                     f".png file name")
    has_dot = shutil.which("dot") is not None
    if fmt == "png" and not has_dot:
        parser.error(f"--out {opts.out!r}: {PNG_NEEDS_GRAPHVIZ}")
    if opts.engine == "graphviz" and not has_dot:
        parser.error(f"--engine graphviz: {GRAPHVIZ_MISSING}; use --engine auto or builtin")
    check_output_path(parser, "--out", opts.out)
    ex = explain(seed_example, opts.x, opts.y)
    print(ex.table())
    path = ex.save(opts.out, engine=opts.engine)
    print(f"\nwrote {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
