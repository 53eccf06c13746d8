"""fbackprop.explain: the backward pass as a table, DOT, SVG and HTML."""

import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbackprop as fb
from fbackprop._src import explain as explain_mod


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
    assert explain_mod.main(["explain", "--out", str(out), "--engine", "builtin"]) == 0
    printed = capsys.readouterr().out
    assert "grad 64 = 48" in printed and "seed_example.py:2" in printed
    assert "z = x * y" in printed and str(out) in printed
    assert "<svg" in out.read_text()
