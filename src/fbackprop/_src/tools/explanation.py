"""The :class:`fbackprop.Explanation` of a backward pass: its text table, and its graph
as Graphviz DOT, SVG (Graphviz's ``dot`` when installed, else a pure-Python layout)
and an HTML page."""

from __future__ import annotations

import collections
import html
import os
import shutil
import subprocess

import numpy as np

from ..rules.debug import NAMED_PRIMITIVES
from .explain_format import (TABLE_WIDTH, _fit_widths, _fmt_scalar, _steps_summary, _wrap,
                             _wrap_cell, summarize, summarize_short)
from .explain_layout import NODE_CHARS, _LABEL_H, _LINE_H, _Layout, _PAD


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
