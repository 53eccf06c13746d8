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

from . import api, compat, memplan, reverse
from .debug import (_split_output, _trace_state, inlined_jaxpr, observing,
                    short_aval, source_code, source_parts, stepping)
from .rules import foreign
from .rules.debug import NAMED_PRIMITIVES


# ----------------------------------------------------------------- formatting
def _fmt_scalar(v) -> str:
    v = complex(v) if np.iscomplexobj(v) else float(v)
    if isinstance(v, complex):
        return f"{v.real:.4g}{v.imag:+.4g}j"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v)) if not (v == 0 and np.signbit(v)) else "0"
    return f"{v:.4g}"


def summarize(x) -> str:
    """A short text for a value: the number for scalars, a few stats for arrays."""
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
    if np.issubdtype(a.dtype, np.number) and not np.iscomplexobj(a):
        f = a.astype(np.float64)
        return f"mean {f.mean():.3g}, |max| {np.abs(f).max():.3g}"
    return f"{a.dtype.name}{list(a.shape)}"


def summarize_short(x) -> str:
    """A compact text for an edge label: the number for scalars, else the norm."""
    if x is None:
        return ""
    a = np.asarray(x)
    if a.size == 1 or a.dtype == jax.dtypes.float0:
        return summarize(a)
    if np.issubdtype(a.dtype, np.number):
        wide = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)
        return f"norm {np.linalg.norm(wide.reshape(-1)):.3g}"
    return summarize(a)


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


# ---------------------------------------------------------------- the model
@dataclasses.dataclass
class Row:
    """One equation of the explained function.

    ``inputs`` holds one reference per operand: ``("input", j)``,
    ``("row", r, k)`` (output ``k`` of row ``r``), ``("literal", value)``,
    ``("const", k)`` or ``("unknown",)``.
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
            nums.append(float(np.linalg.norm(a.astype(
                np.complex128 if np.iscomplexobj(a) else np.float64).reshape(-1))))
    if not nums:
        return ""
    kind = "" if scalar else "norm "
    if short:
        return f"{kind}{_fmt_scalar(nums[0])}..{_fmt_scalar(nums[-1])}"
    return (f"{kind}first {_fmt_scalar(nums[0])}, last {_fmt_scalar(nums[-1])}, "
            f"min {_fmt_scalar(min(nums))}, max {_fmt_scalar(max(nums))}")


def _stepped(eqn) -> bool:
    """Whether explain sweeps this loop step by step (its body gets rows). A
    while loop's trip count is known only when it runs: it is stepped unless its
    body has side effects (or, when it runs, the iterations exceed the limit:
    then the loop stays one row)."""
    from . import debug
    if eqn.primitive.name == "while":
        p = eqn.params
        return not (p["body_jaxpr"].jaxpr.effects or p["cond_jaxpr"].jaxpr.effects)
    return (eqn.primitive.name == "scan" and eqn.params["length"] > 0
            and eqn.params["length"] * debug._unrolled_size(eqn.params["jaxpr"].jaxpr)
            <= debug.UNROLL_LIMIT)


def _loop_body(eqn):
    return eqn.params["body_jaxpr" if eqn.primitive.name == "while" else "jaxpr"].jaxpr


def _swept_in_place(eqn):
    """The sub-jaxpr explain sweeps in place: nested jit and checkpoint regions."""
    inner = inlined_jaxpr(eqn)
    if inner is None and eqn.primitive.name in compat.REMAT_NAMES:
        inner, _ = compat.remat_inner(eqn.params)
        inner = getattr(inner, "jaxpr", inner)
    return inner


class _Observer:
    def __init__(self, expected, keep, input_objs, consts, marks=None):
        self.expected = expected
        self.marks = marks if marks is not None else {}
        self.keep = keep
        self.state = _trace_state()
        self.rows: list[Row] = []
        self.by_key: dict = {}
        self.ref: dict = {}
        self.alive: list = []
        self.paused = False
        self.context: list = []      # enclosing scan steps, outermost first
        self.row_of_eqn: dict = {}   # equations of scan bodies -> their one row
        for j, x in enumerate(input_objs):
            self.ref[id(x)] = ("input", j)
        for k, c in enumerate(consts):
            self.ref[id(c)] = ("const", k)

    def _skip(self, eqn) -> bool:
        return (self.paused or id(eqn) not in self.expected or _swept_in_place(eqn) is not None
                or (self.state is not None and _trace_state() != self.state))

    # -- called by the stepped scan around each step's sweeps
    def enter(self, kind, step, where):
        self.context.append((step, where, kind))

    def exit(self):
        self.context.pop()

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
                if row.inputs[k] == ("unknown",) and type(v) is not compat.Literal:
                    row.inputs[k] = self.ref.get(id(x), ("unknown",))
            if row.kept:
                row.steps.setdefault(self._step_key(), {})["value"] = list(outvals)
            for k, x in enumerate(outvals):
                self.ref[id(x)] = ("row", r, k)
                self.alive.append(x)
            if outvals:
                self.by_key[(id(eqn), id(outvals[0]))] = r
            return
        r = len(self.rows)
        keep = self.keep(r)
        inputs = []
        for v, x in zip(eqn.invars, invals):
            if type(v) is compat.Literal:
                inputs.append(("literal", v.val))
            else:
                inputs.append(self.ref.get(id(x), ("unknown",)))
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
                  recomputed=self.marks.get(id(eqn), ""))
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
                local = reverse.apply_rule(record, [one])
                row.local = [l if a else None for l, a in zip(local, record.active)]
            except Exception:      # a local derivative is a nicety; never fail on it
                row.local = None
            finally:
                self.paused = False


def _walk_expected(jaxpr):
    """Ids of the equations the observer reports (call bodies flattened) and the row count."""
    ids, rows = set(), 0
    stack = [jaxpr]
    while stack:
        j = stack.pop()
        for eqn in j.eqns:
            ids.add(id(eqn))
            inner = _swept_in_place(eqn)
            if inner is not None:
                stack.append(inner)
            else:
                rows += 1
                if _stepped(eqn):
                    stack.append(_loop_body(eqn))
    return ids, rows


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


def _label_rows(rows: list[Row], taken: set):
    """Names rows after the variable their source line assigns, else t1, t2, ..."""
    used = collections.Counter(taken)

    def unique(base):
        used[base] += 1
        return base if used[base] == 1 else f"{base}_{used[base]}"

    for r, row in enumerate(rows):
        if row.primitive in NAMED_PRIMITIVES:
            continue
        nxt = rows[r + 1] if r + 1 < len(rows) else None
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
    """

    def __init__(self, name, rows, inputs, value, total_rows, max_rows, max_nodes):
        self.name = name
        self.rows = rows
        self.inputs = inputs
        self.value = value
        self.total_rows = total_rows
        self.max_rows = max_rows
        self.max_nodes = max_nodes

    # ---------------------------------------------------------- references
    def _ref_name(self, ref) -> str:
        kind = ref[0]
        if kind == "input":
            return self.inputs[ref[1]].name
        if kind == "row":
            row = self.rows[ref[1]]
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

    def _local_text(self, row, sep=", ", d="d/d") -> str:
        if row.local is None:
            return ""
        parts = []
        for ref, l in zip(row.inputs, row.local):
            if l is not None and ref[0] != "literal":
                parts.append(f"{d}{self._ref_name(ref)}={summarize(l)}")
        return sep.join(parts)

    def _per_step(self, row, what):
        """Per step (in step order), the list kept under ``what`` ('value', 'up', 'down')."""
        return [row.steps[k].get(what) for k in sorted(row.steps)]

    def _steps_text(self, row, what, position, short):
        vals = [v[position] if v is not None else None for v in self._per_step(row, what)]
        return _steps_summary(vals, short)

    def _down_text(self, row, sep=", ", short=True) -> str:
        if row.steps is not None and row.kept:
            parts = [f"{self._ref_name(ref)}:{self._steps_text(row, 'down', k, short)}"
                     for k, ref in enumerate(row.inputs)
                     if row.downstream is not None and row.downstream[k] is not None
                     and ref[0] in ("input", "row", "step")]
            return sep.join(parts)
        if row.downstream is None:
            return ""
        parts = [f"{self._ref_name(ref)}:{summarize(g)}"
                 for ref, g in zip(row.inputs, row.downstream)
                 if g is not None and ref[0] in ("input", "row")]
        return sep.join(parts)

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
        """Row indices to show, with None marking the elided middle."""
        n = len(self.rows)
        if self.max_rows is None or n <= self.max_rows:
            return list(range(n))
        head = self.max_rows // 2
        tail = self.max_rows - head
        return list(range(head)) + [None] + list(range(n - tail, n))

    def table(self) -> str:
        """The rows as a fixed-width text table, with the inputs' gradients below."""
        header = ["#", "op", "out", "shape", "value", "upstream", "local", "downstream",
                  "source"]
        lines_data = []
        for r in self._shown_rows():
            if r is None:
                lines_data.append(None)
                continue
            row = self.rows[r]
            src = row.source + (f"  {row.code}" if row.code else "")
            lines_data.append([
                str(row.index), self._args_text(row),
                row.label + (" *" if row.is_output else "") + (" ↻" if row.recomputed else "")
                + (" ⟳" if row.loop else ""),
                ", ".join(row.shapes), self._value_text(row), self._up_text(row),
                self._local_text(row), self._down_text(row), src])
        caps = [5, 32, 12, 16, 24, 16, 30, 34, 60]
        cells = [[c if len(c) <= cap else c[:cap - 1] + "~" for c, cap in zip(d, caps)]
                 if d is not None else None for d in lines_data]
        widths = [max([len(h)] + [len(c[i]) for c in cells if c is not None])
                  for i, h in enumerate(header)]
        legend = "'*' marks the output"
        if any(row.recomputed for row in self.rows):
            legend += ", '↻' a value the checkpointed backward sweep recomputes"
        if any(row.loop for row in self.rows):
            legend += ", '⟳' a row of a loop body (first..last step; details below)"
        out = [f"fbackprop.explain: {self.name}   (upstream x local = downstream; "
               f"{legend})", ""]
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        out.append("  ".join("-" * w for w in widths))
        for c in cells:
            if c is None:
                hidden = len(self.rows) - self.max_rows
                ops = collections.Counter(
                    row.primitive for row in self.rows[self.max_rows // 2:
                                                       len(self.rows) - (self.max_rows -
                                                                         self.max_rows // 2)])
                top = ", ".join(f"{k} x{v}" for k, v in ops.most_common(6))
                out.append(f"... {hidden} rows not shown (of {len(self.rows)}; {top}); "
                           f"pass max_rows=None to see all")
                continue
            out.append("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())
        looped = [r for r in self._shown_rows() if r is not None and self.rows[r].loop
                  and self.rows[r].kept]
        if looped:
            out.append("")
            out.append("rows of loop bodies, over the steps (first, last, min, max; norms for "
                       "arrays):")
            for r in looped:
                row = self.rows[r]
                out.append(f"  #{row.index} {row.label} in {row.loop}, {len(row.steps)} steps: "
                           f"value {self._value_text(row, short=False)}; upstream "
                           f"{self._up_text(row, short=False)}; downstream "
                           f"{self._down_text(row, short=False) or '-'}")
        out.append("")
        out.append("inputs (a value used several times adds the gradients of all its uses):")
        w = max([len(i.name) for i in self.inputs] + [4])
        for inp in self.inputs:
            out.append(f"  {inp.name.ljust(w)}  {inp.aval:<10} value {summarize(inp.value):<12}"
                       f" grad {self._input_grad_text(inp)}")
        out.append(f"output: {summarize(self.value)}")
        return "\n".join(out)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"<Explanation of {self.name}: {len(self.rows)} rows>\n{self.table()}"

    # --------------------------------------------------------------- graph
    def _graph(self):
        """Nodes and edges to draw: inputs, the last ``max_nodes`` rows, an elision note."""
        n = len(self.rows)
        first = 0 if self.max_nodes is None or n <= self.max_nodes else n - self.max_nodes
        drawn = list(range(first, n))
        nodes, edges = [], []
        input_used = set()
        elided = False
        for r in drawn:
            for ref in self.rows[r].inputs:
                if ref[0] == "input":
                    input_used.add(ref[1])
                elif ref[0] == "row" and ref[1] < first:
                    elided = True
        for j, inp in enumerate(self.inputs):
            if j in input_used:
                nodes.append(("in", j))
        if elided:
            nodes.append(("elided", first))
        for r in drawn:
            nodes.append(("row", r))
            row = self.rows[r]
            for k, ref in enumerate(row.inputs):
                g = row.downstream[k] if row.downstream is not None else None
                label = summarize_short(g)
                if ref[0] == "input":
                    edges.append((("in", ref[1]), ("row", r), label, k))
                elif ref[0] == "row":
                    src = ("row", ref[1]) if ref[1] >= first else ("elided", first)
                    edges.append((src, ("row", r), label, k))
        return nodes, edges

    def _node_lines(self, node) -> tuple[list[str], str]:
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
            lines.append(row.code if len(row.code) <= 38 else row.code[:37] + "~")
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
        """Graphviz DOT source: forward edges, each labelled with the gradient sent back."""
        nodes, edges = self._graph()

        def nid(node):
            return f"{node[0]}{node[1]}"

        def esc(s):
            return s.replace("\\", "\\\\").replace('"', '\\"')

        style = {"input": 'style=filled, fillcolor="#e8f0fe"',
                 "output": 'style="filled,bold", fillcolor="#fde8e8"',
                 "elided": 'style=dashed, color="#999999"', "op": "",
                 "recomputed": 'style="filled,dashed", fillcolor="#fff6e0", color="#b7791f"'}
        out = [f'digraph "{esc(self.name)}" {{', "  rankdir=LR;",
               '  node [shape=box, fontname="monospace", fontsize=10];',
               '  edge [fontname="monospace", fontsize=10, fontcolor="#c0392b"];']
        for node in nodes:
            lines, kind = self._node_lines(node)
            label = "\\l".join(esc(line) for line in lines) + "\\l"
            extra = f", {style[kind]}" if style[kind] else ""
            out.append(f'  {nid(node)} [label="{label}"{extra}];')
        for src, dst, label, _ in edges:
            lab = f' [label="grad {esc(label)}"]' if label else ""
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
        nodes, edges = self._graph()
        char_w, line_h, pad, gap_y = 7.0, 15, 8, 26
        gap_x = max([90.0] + [(len(label) + 6) * char_w + 30 for _, _, label, _ in edges])
        info = {}
        for node in nodes:
            lines, kind = self._node_lines(node)
            w = max(len(s) for s in lines) * char_w + 2 * pad
            h = len(lines) * line_h + 2 * pad
            info[node] = {"lines": lines, "kind": kind, "w": w, "h": h}
        # Columns by longest path from the inputs.
        preds = collections.defaultdict(list)
        for src, dst, _, _ in edges:
            preds[dst].append(src)
        depth = {}
        for node in nodes:                       # nodes are in topological order
            depth[node] = 1 + max((depth[p] for p in preds[node] if p in depth), default=-1)
        columns = collections.defaultdict(list)
        for node in nodes:
            columns[depth[node]].append(node)
        x = 20.0
        col_bottom = {}
        for c in sorted(columns):
            col_w = max(info[nd]["w"] for nd in columns[c])
            y = 50.0
            for nd in columns[c]:
                info[nd]["x"], info[nd]["y"] = x, y
                y += info[nd]["h"] + gap_y
            col_bottom[c] = y - gap_y
            x += col_w + gap_x
        width = x - gap_x + 40
        # An edge that skips columns runs in its own lane below the boxes it passes.
        lanes = {}
        lane_y = max(col_bottom.values(), default=50.0) + 22
        for src, dst, _, k in edges:
            if depth[dst] - depth[src] > 1:
                lanes[(src, dst, k)] = lane_y
                lane_y += 22
        height = max([info[nd]["y"] + info[nd]["h"] for nd in nodes] + [100, lane_y]) + 30
        fill = {"input": "#e8f0fe", "output": "#fde8e8", "op": "#ffffff", "elided": "#f4f4f4",
                "recomputed": "#fff6e0"}
        stroke = {"input": "#3b6fd4", "output": "#c0392b", "op": "#555555", "elided": "#999999",
                  "recomputed": "#b7791f"}
        e = html.escape
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
               f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
               f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="12">',
               '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" '
               'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
               '<path d="M 0 0 L 10 5 L 0 10 z" fill="#777"/></marker></defs>',
               '<rect width="100%" height="100%" fill="white"/>',
               f'<text x="20" y="24" font-size="14" font-weight="bold">{e(self.name)}: '
               f'forward edges left to right; red labels = gradient sent back along the '
               f'edge</text>']
        incoming = collections.Counter(dst for _, dst, _, _ in edges)
        seen_in = collections.Counter()
        for src, dst, label, k in edges:
            a, b = info[src], info[dst]
            seen_in[dst] += 1
            x1, y1 = a["x"] + a["w"], a["y"] + a["h"] / 2
            x2 = b["x"]
            y2 = b["y"] + b["h"] * seen_in[dst] / (incoming[dst] + 1)
            lane = lanes.get((src, dst, k))
            if lane is None:
                dx = max(30.0, (x2 - x1) / 2)
                path = (f"M {x1:.1f} {y1:.1f} C {x1 + dx:.1f} {y1:.1f}, {x2 - dx:.1f} "
                        f"{y2:.1f}, {x2:.1f} {y2:.1f}")
                mx, my = (x1 + x2) / 2, (y1 + y2) / 2
            else:
                q = gap_x / 3
                path = (f"M {x1:.1f} {y1:.1f} C {x1 + q:.1f} {y1:.1f}, {x1 + q:.1f} "
                        f"{lane:.1f}, {x1 + 2 * q:.1f} {lane:.1f} L {x2 - 2 * q:.1f} "
                        f"{lane:.1f} C {x2 - q:.1f} {lane:.1f}, {x2 - q:.1f} {y2:.1f}, "
                        f"{x2:.1f} {y2:.1f}")
                mx, my = (x1 + x2) / 2, lane
            out.append(f'<path d="{path}" fill="none" stroke="#777" stroke-width="1.3" '
                       f'marker-end="url(#arrow)"/>')
            if label:
                text = f"grad {label}"
                tw = len(text) * char_w + 6
                out.append(f'<rect x="{mx - tw / 2:.1f}" y="{my - 10:.1f}" width="{tw:.1f}" '
                           f'height="15" fill="white" opacity="0.9"/>')
                out.append(f'<text x="{mx:.1f}" y="{my + 1.5:.1f}" text-anchor="middle" '
                           f'fill="#c0392b">{e(text)}</text>')
        for node in nodes:
            d = info[node]
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
                out.append(f'<text x="{d["x"] + pad:.1f}" '
                           f'y="{d["y"] + pad + (i + 0.8) * line_h:.1f}"{weight}{color}>'
                           f'{e(line)}</text>')
        out.append("</svg>")
        return "\n".join(out)

    def to_html(self, engine: str = "auto") -> str:
        """A self-contained HTML page: the graph (inline SVG) and the table."""
        e = html.escape
        note = ""
        if self.max_nodes is not None and len(self.rows) > self.max_nodes:
            note = (f"<p><b>Note:</b> the graph shows the last {self.max_nodes} of "
                    f"{len(self.rows)} operations (raise <code>max_nodes</code> to draw "
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
            max_rows: int | None = 200, max_nodes: int | None = 60, **kwargs) -> Explanation:
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
    prog = api._Program(fun, args, kwargs, nums, "explain", allow_int=True)
    traced = prog.traced
    _split_output(traced, False, "explain")
    closed = traced.closed
    names = _input_names(fun, args, kwargs, prog.static)
    # Fresh copies: every input is a distinct object, so uses are told apart.
    dyn = [jnp.array(x, copy=True) for x in prog.dyn]
    active = list(prog.active)
    expected, total = _walk_expected(closed.jaxpr)
    if max_rows is None or total <= max_rows:
        keep = lambda r: True  # noqa: E731
    else:
        head, tail = max_rows // 2, max_rows - max_rows // 2
        last_drawn = total - (max_nodes if max_nodes is not None else total)
        keep = lambda r: r < head or r >= total - tail or r >= last_drawn  # noqa: E731
    with memplan.explaining() as marks, stepping(checkpoints=False):
        obs = _Observer(expected, keep, dyn, closed.consts, marks)
        with observing(obs):
            outs, tape = reverse.forward(closed.jaxpr, closed.consts, dyn, active)
            one = jnp.ones((), api._dtype_of(outs[0]))
            cts = reverse.backward(tape, [one] + [None] * (len(outs) - 1))
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
    _label_rows(rows, {i.name for i in inputs})
    return Explanation(getattr(fun, "__name__", "fun"), rows, inputs, outs[0], total,
                       max_rows, max_nodes)


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
