"""fbackprop.explain: the backward pass as a table, DOT, SVG and HTML."""

import re
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbackprop as fb
from fbackprop._src import cli as explain_cli
from fbackprop._src.tools import explain_format


def seed(x, y):
    z = x * y
    w = z + x
    loss = w ** 2
    return loss


@pytest.fixture(scope="module")
def ex():
    return fb.explain(seed, 2.0, 3.0)


def test_seed_numbers(ex):
    assert float(ex.value) == 64.0
    assert [i.name for i in ex.inputs] == ["x", "y"]
    assert [float(i.grad) for i in ex.inputs] == [64.0, 32.0]
    mul, add, square = ex.rows
    assert [r.primitive for r in ex.rows] == ["mul", "add", "integer_pow"]
    assert [r.label for r in ex.rows] == ["z", "w", "loss"]
    assert [float(r.value[0]) for r in ex.rows] == [6.0, 8.0, 64.0]
    # upstream x local = downstream, at every node
    assert [float(r.upstream[0]) for r in ex.rows] == [16.0, 16.0, 1.0]
    assert [float(v) for v in square.local] == [16.0]
    assert [float(v) for v in mul.local] == [3.0, 2.0]
    assert [float(v) for v in mul.downstream] == [48.0, 32.0]
    assert [float(v) for v in add.downstream] == [16.0, 16.0]
    assert square.is_output and square.line is not None


def test_fan_out_adds_two_paths(ex):
    x = ex.inputs[0]
    assert sorted(float(g) for _, g in x.uses) == [16.0, 48.0]
    table = ex.table()
    assert "grad 64 = 48 (#1 mul) + 16 (#2 add)" in table
    assert "test_explain.py" in table and "z = x * y" in table


def test_dot_svg_html(ex, tmp_path):
    dot = ex.to_dot()
    assert dot.startswith('digraph "seed"') and dot.count("->") == 5
    assert 'label="grad 48"' in dot and 'label="grad 16"' in dot
    svg = ex.to_svg(engine="builtin")
    root = ET.fromstring(svg)                    # well-formed XML
    assert root.tag.endswith("svg")
    texts = "".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    assert "grad 48" in texts and "= 48 + 16" in texts and "upstream grad 16" in texts
    html = ex.to_html(engine="builtin")
    assert "<svg" in html and "grad 64 = 48" in html
    for suffix in ("html", "svg", "dot", "txt"):
        path = ex.save(str(tmp_path / f"g.{suffix}"), engine="builtin")
        assert (tmp_path / f"g.{suffix}").read_text().strip()
        assert path.endswith(suffix)


def test_arrays_tags_and_jitted_helpers():
    helper = jax.jit(lambda h: jnp.tanh(h))

    def f(params, x):
        h = fb.tag(x @ params["w"], "hidden")
        return jnp.mean(helper(h) ** 2) + jnp.sum(params["b"] * 0.0)

    params = {"w": jnp.ones((3, 2)) * 0.5, "b": jnp.ones(2)}
    x = jnp.arange(6.0).reshape(2, 3) / 6.0
    ex = fb.explain(f, params, x)
    prims = [r.primitive for r in ex.rows]
    assert "fbackprop_tag" in prims and "tanh" in prims and "jit" not in prims
    assert any(r.label == "hidden" for r in ex.rows)
    grads = fb.grad(f)(params, x)
    by_name = {i.name: i for i in ex.inputs}
    np.testing.assert_allclose(by_name["params['w']"].grad, grads["w"], rtol=1e-6)
    assert "mean" in ex.table()                 # arrays are summarized
    ET.fromstring(ex.to_svg(engine="builtin"))


def test_large_function_is_summarized():
    def long(x):
        for _ in range(200):
            x = jnp.sin(x) * 1.01
        return jnp.sum(x)

    ex = fb.explain(long, jnp.ones(2), max_rows=20, max_nodes=8)
    assert len(ex.rows) == ex.total_rows == 401
    table = ex.table()
    assert "381 rows not shown" in table and "sin x" in table
    assert len(table.splitlines()) < 40
    svg = ex.to_svg(engine="builtin")
    assert "393 earlier operations" in svg
    ET.fromstring(svg)
    assert sum(1 for r in ex.rows if r.value is not None) <= 30   # values kept only for shown rows
    np.testing.assert_allclose(ex.inputs[0].grad, fb.grad(long)(jnp.ones(2)), rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(TypeError, match="concrete values"):
        jax.jit(lambda x: fb.explain(seed, x, 3.0).value)(2.0)
    with pytest.raises(TypeError, match="scalar-output"):
        fb.explain(lambda x: x * 2.0, jnp.ones(3))
    with pytest.raises(ValueError, match="max_rows"):
        fb.explain(seed, 2.0, 3.0, max_rows=0)
    with pytest.raises(TypeError, match="callable"):
        fb.explain(3, 2.0)
    ex = fb.explain(seed, 2.0, 3.0)
    with pytest.raises(ValueError, match="unknown format"):
        ex.save("graph.pdf")
    with pytest.raises(ValueError, match="engine"):
        ex.to_svg(engine="fancy")


def test_argnums_and_integer_inputs():
    def f(x, n):
        return x ** 2 * n

    ex = fb.explain(f, 3.0, 2, argnums=0)
    assert float(ex.inputs[0].grad) == 12.0
    assert "(not differentiated)" in ex.table() or len(ex.inputs) == 1


def test_command_line(tmp_path, capsys):
    out = tmp_path / "seed.html"
    assert explain_cli.explain_main(["explain", "--out", str(out), "--engine", "builtin"]) == 0
    printed = capsys.readouterr().out
    assert "grad 64 = 48" in printed and "seed_example.py:2" in printed
    assert "z = x * y" in printed and str(out) in printed
    assert "<svg" in out.read_text()


# ------------------------------------------------------------------ readability
def classify(w, b, x, label):
    """A small classifier's loss: 15 operations with gradients, and the integer
    arithmetic of ``logp[label]``."""
    h = jnp.tanh(x @ w + b)
    logits = h @ w.T
    logp = jax.nn.log_softmax(logits)
    return -logp[label]


CLASSIFY_ARGS = (jnp.linspace(-0.5, 0.5, 9).reshape(3, 3), jnp.array([0.1, -0.2, 0.3]),
                 jnp.array([1.0, 2.0, -1.0]), 1)


@pytest.fixture(scope="module")
def classified():
    return fb.explain(classify, *CLASSIFY_ARGS)


def _collapse(text):
    return " ".join(text.split())


def _table_cells(table):
    """The table's rows as {column: text}, a wrapped cell's lines joined."""
    lines = table.splitlines()
    sep = next(k for k, line in enumerate(lines) if line.startswith("--"))
    starts = [m.start() for m in re.finditer(r"-+", lines[sep])]
    names = [lines[sep - 1][a:b].strip()
             for a, b in zip(starts, starts[1:] + [len(lines[sep - 1])])]
    rows = []
    for line in lines[sep + 1:]:
        if not line.strip():
            break
        parts = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [len(line)])]
        if not parts[0] and re.match(r"\s*\S+\.py:\d+", line):
            continue                                   # a source line's heading
        if parts[0]:
            rows.append({n: [] for n in names})
        for n, text in zip(names, parts):
            if text:
                rows[-1][n].append(text)
    return [{n: " ".join(t) for n, t in row.items()} for row in rows]


def test_table_fits_120_columns_and_cuts_no_gradient(classified):
    ex = classified
    table = ex.table()
    assert max(len(line) for line in table.splitlines()) <= explain_format.TABLE_WIDTH == 120
    # Cells wrap at spaces only: joined again, each cell is the whole text.
    cells = _table_cells(table)
    shown = ex._visible_rows()
    assert [c["#"] for c in cells] == [str(ex.rows[r].index) for r in shown]
    for r, c in zip(shown, cells):
        row = ex.rows[r]
        assert c["op"] == ex._args_text(row)
        assert c["upstream"] == ex._up_text(row)
        assert c["local"] == ", ".join(ex._local_parts(row))
        assert c["downstream"] == ", ".join(ex._down_parts(row)) or (
            c["downstream"] == " ".join(ex._down_parts(row))), (c, ex._down_parts(row))
    flat = _collapse(table)
    for inp in ex.inputs:
        assert _collapse(ex._input_grad_text(inp)) in flat
    grads = jax.grad(classify, argnums=(0, 1, 2))(*CLASSIFY_ARGS)
    for inp, g in zip(ex.inputs, grads):
        np.testing.assert_allclose(inp.grad, g, rtol=1e-6)


def test_integer_plumbing_is_folded_unless_asked(classified):
    ex = classified
    plumbing = [row for row in ex.rows if row.plumbing]
    assert {row.primitive for row in plumbing} >= {"lt", "select_n"}
    table = ex.table()
    assert "lt(" not in table and "select_n(" not in table
    assert "dynamic_slice(logp, «label»)" in [c["op"] for c in _table_cells(table)]
    assert f"{len(plumbing)} operations not shown" in _collapse(table)
    nodes, edges = ex._graph()
    assert all(node[0] != "row" or not ex.rows[node[1]].plumbing for node in nodes)
    # The index still reaches the slice in the picture: from `label`, unlabelled.
    label_in = ("in", [i.name for i in ex.inputs].index("label"))
    assert [lab for src, _, lab, _ in edges if src == label_in] == [""]
    everything = fb.explain(classify, *CLASSIFY_ARGS, show_integer_ops=True)
    full = everything.table()
    assert "lt(label, 0)" in full and "«" not in full
    assert len(everything._graph()[0]) == len(nodes) + len(plumbing)
    for a, b in zip(everything.inputs, ex.inputs):
        np.testing.assert_array_equal(a.grad, b.grad)


def _rects(svg):
    root = ET.fromstring(svg)
    boxes, labels = [], []
    for el in root.iter():
        if not el.tag.endswith("rect") or el.get("x") is None:
            continue
        r = tuple(float(el.get(k)) for k in ("x", "y", "width", "height"))
        (boxes if el.get("rx") else labels).append(r)
    return root, boxes, labels


def _overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and \
        b[1] < a[1] + a[3]


def test_svg_is_compact_and_no_label_is_hidden(classified):
    svg = classified.to_svg(engine="builtin")
    root, boxes, labels = _rects(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    # One long line of 18 boxes was 7,760 px wide; wrapped into bands it is about square.
    assert width <= 1600 and height <= 1600, (width, height)
    assert all(x >= 0 and y >= 0 and x + w <= width and y + h <= height
               for x, y, w, h in boxes + labels)
    n_labelled = sum(1 for _, _, lab, _ in classified._graph()[1] if lab)
    assert len(labels) == n_labelled > 10
    assert not [(a, b) for a in labels for b in boxes if _overlap(a, b)]
    assert not [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:] if _overlap(a, b)]
    # Labels come after the boxes, so nothing is drawn over them.
    tags = [el.tag.rsplit("}", 1)[-1] + ("-label" if el.get("rx") is None else "")
            for el in root.iter() if el.tag.endswith("rect") and el.get("x") is not None]
    assert tags.index("rect-label") > max(k for k, t in enumerate(tags) if t == "rect")
    dot = classified.to_dot()
    assert "rankdir=TB" in dot and dot.count('label="grad ') == n_labelled


def test_long_function_is_drawn_in_bands():
    def long(x):
        for _ in range(30):
            x = jnp.sin(x) * 1.01
        return jnp.sum(x)

    svg = fb.explain(long, jnp.ones(2)).to_svg(engine="builtin")
    root, boxes, labels = _rects(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    assert len(boxes) == 61 and 0.5 < width / height < 2.5, (width, height)
    assert not [(a, b) for a in labels for b in boxes if _overlap(a, b)]


def test_library_helpers_are_not_marked_as_libraries_and_name_the_users_line(classified):
    # Comparisons and index arithmetic are JAX's own primitives: no <owner> marker.
    everything = fb.explain(classify, *CLASSIFY_ARGS, show_integer_ops=True)
    assert "<" not in "".join(row.op for row in everything.rows)
    # No primitive JAX defines is taken for another library's (JAX registers most
    # of its rules as functools.partial objects).
    import sys
    from jax._src import core
    from fbackprop._src.rules import foreign
    own = {id(v): v for name, module in list(sys.modules.items())
           if name == "jax" or name.startswith("jax.")
           for v in list(vars(module).values()) if isinstance(v, core.Primitive)}
    assert len(own) > 100
    # (A library may register a transpose rule for one of JAX's primitives, as
    # lineax does for stop_gradient: that one is the library's, used in linear maps.)
    taken = [p.name for p in own.values()
             if (r := foreign.rules_for(p)) is not None and not (
                 r.jvp is None and r.owner not in ("jax", "jaxlib"))]
    assert sorted(taken) == []
    # log_softmax is a jitted JAX function: its rows name the line that called it.
    rows = [row for row in classified.rows if row.primitive in ("reduce_max", "exp", "log")]
    assert rows and all(row.source.startswith("test_explain.py:") and
                        "log_softmax" in row.code for row in rows)


def test_saved_residuals_name_the_line_calling_a_jitted_helper():
    def layernorm(h):
        v = jnp.var(h, -1, keepdims=True)
        return jnp.sum(jnp.tanh((h - h.mean(-1, keepdims=True)) / jnp.sqrt(v + 1e-5)))

    def twice(h):
        a = jnp.var(h, -1, keepdims=True)
        b = jnp.var(2 * h, -1, keepdims=True)
        return jnp.sum(jnp.sqrt(a) * jnp.sqrt(b))

    res = fb.saved_residuals(layernorm, jnp.ones((2, 3)))
    text = str(res)
    assert "<unknown source>" not in text and "functools" not in text
    assert all("test_explain.py:" in r.source for r in res if r.kind == "intermediate")
    var_line = layernorm.__code__.co_firstlineno + 1
    assert any(f"test_explain.py:{var_line}" in r.source for r in res)
    # The same jitted helper called from two lines: both are named.
    res = fb.saved_residuals(twice, jnp.ones((2, 3)))
    first = twice.__code__.co_firstlineno + 1
    both = [r for r in res if r.primitive == "sub"]
    assert both and all(f"test_explain.py:{first}" in r.source and
                        f"test_explain.py:{first + 1}" in r.source for r in both)


def test_the_tools_run_python_control_flow_on_values_as_fb_grad_does():
    # The tools record the function as fb.grad runs it: eagerly, a branch on a
    # differentiated value takes the side the value selects.
    def f(x):
        if x > 0:
            return jnp.sin(x) * 2.0
        return jnp.cos(x)

    for x in (0.5, -0.5):
        want = jax.grad(f)(x)
        ex = fb.explain(f, x)
        assert [r.primitive for r in ex.rows if r.primitive in ("sin", "cos")] == \
            (["sin"] if x > 0 else ["cos"])
        np.testing.assert_allclose(ex.inputs[0].grad, want, rtol=1e-6)
        report, g = fb.checked_grad(f)(x)
        assert report.ok
        np.testing.assert_allclose(g, want, rtol=1e-6)
        g, inter = fb.grad_and_intermediates(lambda x: fb.tag(f(x), "y") ** 2)(x)
        np.testing.assert_allclose(inter["y"], 2 * f(x), rtol=1e-6)
        np.testing.assert_allclose(g, 2 * f(x) * want, rtol=1e-6)
    res = fb.saved_residuals(lambda x: jnp.sum(jnp.sin(jnp.sin(x))), jnp.ones(3))
    assert [(r.kind, r.primitive) for r in res] == [("argument", None), ("intermediate", "sin")]
