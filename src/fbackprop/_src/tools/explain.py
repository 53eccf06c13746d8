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
import inspect
import os
import re
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from jax import tree_util

from .. import api, compat, registry, trace
from ..engine import recording, sweeps
from ..planning import frames
from ..rules import scan as scan_rules
from ..rules.debug import NAMED_PRIMITIVES
from .common import (_trace_state, fold_staged_away, inlined_jaxpr, observing, short_aval,
                     source_code, source_parts, stepping)
from .explain_format import _integer_only, _is_scalar, _short_params
from .explanation import Explanation


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
        return fold_staged_away(self, self.ref, eqn, invals, outvals)

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
        owner = registry.rule_owner(eqn.primitive)
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
    with frames.explaining() as marks, stepping(checkpoints=False):
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
