"""Tags, hooks and NaN/Inf provenance inside loops, branches and checkpoints.

Oracle for a tag's cotangent: the perturbation trick under ``jax.grad``. Each
model takes its perturbations as an argument and a ``mark(h, name, eps)``
function: fbackprop's run marks ``h`` with a tag (the perturbation is zeros and
unused), JAX's run adds ``eps`` to ``h`` and differentiates with respect to it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import fbackprop as fb
from fbackprop._src.testing import assert_allclose

MODES = ["eager", "jit", "vmap"]


def fb_mark(h, name, eps):
    return fb.tag(h, name)


def jax_mark(h, name, eps):
    return h + eps


def _check(model, params, eps, modes=MODES):
    """fb.grad_and_intermediates(model) against jax.grad of the perturbed model,
    eagerly, under jit and under vmap (over a batch of two parameter sets); the
    main cases run all three, the others one each."""
    names = list(eps)
    first = None

    def ours(p):
        return fb.grad_and_intermediates(lambda p: model(p, eps, fb_mark))(p)

    def theirs(p):
        return jax.grad(lambda p, e: model(p, e, jax_mark), argnums=(0, 1))(p, eps)

    for mode in modes:
        if mode == "vmap":
            batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, 0.7 * x]), params)
            (g, inter) = jax.vmap(ours)(batch)
            g_ref, inter_ref = jax.vmap(theirs)(batch)
        else:
            run = jax.jit(ours) if mode == "jit" else ours
            g, inter = run(params)
            g_ref, inter_ref = theirs(params)
        assert sorted(inter) == sorted(names), mode
        for n in names:
            assert inter[n].shape == inter_ref[n].shape, (mode, n)
            assert_allclose(inter[n], inter_ref[n], err_msg=f"{mode} {n}")
        jax.tree_util.tree_map(lambda a, b: assert_allclose(a, b), g, g_ref)
        first = inter if first is None else first
    return first


XS = jnp.linspace(-1.0, 1.0, 5)


def rnn(w, eps, mark, reverse=False):
    def body(h, a):
        x, e = a
        h = mark(jnp.tanh(w * h + x), "h", e)
        return h, h ** 2
    h, ys = lax.scan(body, 0.3, (XS, eps["h"]), reverse=reverse)
    return jnp.sum(ys) + h


@pytest.mark.parametrize("reverse", [False, True])
def test_tag_in_scan_body_one_cotangent_per_step(reverse):
    inter = _check(lambda w, e, m: rnn(w, e, m, reverse), jnp.float32(0.8),
                   {"h": jnp.zeros(5)}, modes=["jit"] if reverse else MODES)
    assert inter["h"].shape == (5,)
    assert np.all(np.asarray(inter["h"]) != 0)


def test_tag_in_nested_scans_stacks_both_step_axes():
    def model(w, eps, mark):
        def outer(c, a):
            row, e_row, e_c = a

            def inner(h, b):
                x, e = b
                h = mark(jnp.sin(w @ h + x), "h", e)
                return h, None
            c, _ = lax.scan(inner, c, (row, e_row))
            return mark(c * 1.5, "c", e_c), None
        c, _ = lax.scan(outer, jnp.ones(2), (jnp.ones((3, 4, 2)), eps["h"], eps["c"]))
        return jnp.sum(c ** 2)

    inter = _check(model, jnp.array([[0.5, -0.2], [0.1, 0.9]]),
                   {"h": jnp.zeros((3, 4, 2)), "c": jnp.zeros((3, 2))}, modes=["jit"])
    assert inter["h"].shape == (3, 4, 2)


def test_tag_in_fori_loop_with_static_trip_count():
    def model(w, eps, mark):
        def body(i, h):
            return mark(jnp.cos(w * h) + 0.1 * i, "h", eps["h"][i])
        return lax.fori_loop(0, 4, body, 0.5) ** 2

    _check(model, jnp.float32(1.3), {"h": jnp.zeros(4)}, modes=["eager"])


def test_checkpoint_name_in_scan_over_layers():
    # The scan-over-layers pattern: a checkpointed layer body, stacked weights.
    def model(ws, eps, mark):
        def layer(x, a):
            w, e = a
            z = x @ w
            z = checkpoint_name(z, "z") if mark is fb_mark else z + e
            return jnp.tanh(z), None
        body = jax.checkpoint(layer)
        x, _ = lax.scan(body, jnp.ones(3), (ws, eps["z"]))
        return jnp.sum(x ** 2)

    ws = jax.random.normal(jax.random.key(0), (4, 3, 3)) * 0.5
    inter = _check(model, ws, {"z": jnp.zeros((4, 3))}, modes=["jit"])
    assert inter["z"].shape == (4, 3)


def test_same_name_in_two_branches_is_one_tag():
    def model(x, eps, mark):
        def pos(v):
            return mark(jnp.sin(v) * 2.0, "b", eps["b"])

        def neg(v):
            return mark(v ** 3, "b", eps["b"])
        y = lax.cond(jnp.sum(x) > 0, pos, neg, x)
        return jnp.sum(y ** 2)

    _check(model, jnp.array([0.5, 1.0]), {"b": jnp.zeros(2)}, modes=["jit"])
    _check(model, jnp.array([-0.5, -1.0]), {"b": jnp.zeros(2)}, modes=["eager"])


def test_switch_branch_not_taken_reports_zeros():
    def model(x, eps, mark):
        branches = [lambda v: mark(v * 2.0, "a", eps["a"]),
                    lambda v: v + 1.0,
                    lambda v: mark(jnp.exp(v), "c", eps["c"])]
        return jnp.sum(lax.switch(2, branches, x) ** 2)

    inter = _check(model, jnp.array([0.1, 0.2]), {"a": jnp.zeros(2), "c": jnp.zeros(2)},
                   modes=["eager"])
    assert np.all(np.asarray(inter["a"]) == 0) and np.all(np.asarray(inter["c"]) != 0)


def test_tag_in_checkpoint_region_and_jit_inside_scan():
    def model(x, eps, mark):
        @fb.checkpoint
        def block(v):
            return jnp.sin(mark(v * 3.0, "r", eps["r"]))

        @jax.jit
        def step(c, a):
            xi, e = a
            return c + mark(jnp.sin(c * xi), "s", e), None
        c, _ = lax.scan(step, jnp.sum(block(x)), (jnp.arange(3.0), eps["s"]))
        return c ** 2

    _check(model, jnp.array([0.4, -0.3]), {"r": jnp.zeros(2), "s": jnp.zeros(3)},
           modes=["vmap"])


def test_tags_inside_and_outside_a_scan_together():
    def model(w, eps, mark):
        h0 = fb.tag(w * 2.0, "h0") if mark is fb_mark else w * 2.0 + eps["h0"]

        def body(h, e):
            h = mark(h * w + 0.5, "h", e)
            return h, None
        h, _ = lax.scan(body, h0, eps["h"])
        return h ** 2

    _check(model, jnp.float32(0.9),
           {"h0": jnp.zeros((), jnp.float32), "h": jnp.zeros(6, jnp.float32)}, modes=["jit"])


def _halving_identity():
    @jax.custom_vjp
    def half(x):
        return x

    half.defvjp(lambda x: (x, None), lambda _, ct: (ct * 0.5,))
    return half


def test_hook_in_scan_runs_at_every_step():
    half = _halving_identity()

    def ours(w):
        def body(h, _):
            return fb.tag(h * w, "h", hook=lambda ct: ct * 0.5), None
        return lax.scan(body, 1.0, None, length=6)[0]

    def theirs(w):
        def body(h, _):
            return half(h * w), None
        return lax.scan(body, 1.0, None, length=6)[0]

    w = jnp.float32(1.1)
    assert_allclose(fb.grad(ours)(w), jax.grad(theirs)(w))
    assert_allclose(jax.jit(fb.grad(ours))(w), jax.grad(theirs)(w))
    ws = jnp.array([1.1, 0.9])
    assert_allclose(jax.vmap(fb.grad(ours))(ws), jax.vmap(jax.grad(theirs))(ws))
    # The reported cotangent is the one arriving at the tag, before its hook:
    # step t receives the halved cotangents of the steps after it.
    _, inter = fb.grad_and_intermediates(ours)(w)
    expected = [(0.5 * 1.1) ** (5 - t) for t in range(6)]
    assert_allclose(inter["h"], jnp.array(expected, jnp.float32))


def test_unsupported_bodies_are_clear_errors():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(fb.tag(x * 2.0, "in_rule"))

    f.defjvp(lambda p, t: (f(p[0]), jnp.cos(2.0 * p[0]) * 2.0 * t[0]))
    with pytest.raises(NotImplementedError, match="custom rule replaces the derivative"):
        fb.grad_and_intermediates(f)(1.0)

    def bad(x):
        def pos(v):
            return fb.tag(v * 2.0, "b")[0]

        def neg(v):
            return fb.tag(jnp.sum(v), "b")
        return lax.cond(x[0] > 0, pos, neg, x)

    with pytest.raises(ValueError, match="different types"):
        fb.grad_and_intermediates(bad)(jnp.ones(2))

    def twice(x):
        def body(c, xi):
            return c + fb.tag(xi, "t") + fb.tag(xi * 2.0, "t"), None
        return lax.scan(body, 0.0, x)[0]

    with pytest.raises(ValueError, match="used 2 times"):
        fb.grad_and_intermediates(twice)(jnp.ones(3))

    def looped(x):
        def body(c):
            return c[0] + 1, fb.tag(c[1] * x, "w")
        return lax.while_loop(lambda c: c[0] < 3, body, (0, 1.0))[1]

    # One cotangent per iteration eagerly; under jit the count is unknown.
    assert fb.grad_and_intermediates(looped)(2.0)[1]["w"].shape == (3,)
    with pytest.raises(NotImplementedError, match="while_loop"):
        jax.jit(fb.grad_and_intermediates(looped))(2.0)

    def nested(x):
        def body(c, _):
            return lax.while_loop(lambda c: c[0] < 3,
                                  lambda c: (c[0] + 1, fb.tag(c[1] * x, "w")), (0, c))[1], None
        return lax.scan(body, 1.0, None, length=2)[0]

    with pytest.raises(NotImplementedError, match="while_loop"):
        fb.grad_and_intermediates(nested)(2.0)


# ------------------------------------------------- NaN/Inf provenance in loops
def _line_of(fn, text):
    import inspect
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def norm_rnn(w, xs):
    def body(h, x):
        h = w * h + x
        n = jnp.sqrt(h ** 2)
        return h, n
    h, ns = lax.scan(body, 0.0, xs)
    return jnp.sum(ns)


SQRT_LINE = _line_of(norm_rnn, "jnp.sqrt")
SCAN_LINE = _line_of(norm_rnn, "lax.scan")


@pytest.mark.parametrize("mode", MODES)
def test_checked_grad_names_the_equation_and_step_inside_a_scan(mode):
    xs = jnp.array([1.0, 2.0, -3.0, 0.5])        # h = 1, 3, 0, 0.5: sqrt'(0) at step 2
    checked = fb.checked_grad(norm_rnn)
    if mode == "eager":
        with pytest.raises(fb.NonFiniteError) as info:
            checked(1.0, xs)
        site, message = info.value.site, str(info.value)
    elif mode == "jit":
        report, _ = jax.jit(checked)(1.0, xs)
        site, message = report.first(), report.get()
    else:
        report, _ = jax.vmap(checked, (None, 0))(1.0, jnp.stack([xs + 10.0, xs]))
        site, message = report.first(), report.get()
        assert site.batch_index == (1,)
    assert (site.primitive, site.phase) == ("sqrt", "backward")
    assert f"test_seeing_loops.py:{SQRT_LINE}" in site.source
    assert site.steps == ((2, site.steps[0][1]),)
    assert site.steps[0][1].startswith(f"test_seeing_loops.py:{SCAN_LINE}")
    assert f"in step 2 of the scan at test_seeing_loops.py:{SCAN_LINE}" in message
    assert "checked only as a whole" not in message


def test_checked_grad_in_nested_checkpointed_and_reversed_scans():
    def nested(w, xs):
        @jax.checkpoint
        def inner(h, x):
            return jnp.log(h * x + 1.0), None

        def outer(h, row):
            return lax.scan(inner, h, row, reverse=True)[0], None
        return lax.scan(outer, w, xs)[0]

    xs = jnp.array([[1.0, 1.0], [-2.0, 1.0], [1.0, 1.0]])
    report, _ = jax.jit(fb.checked_grad(nested))(1.0, xs)
    site = report.first()
    # Outer step 2, and its inner scan runs backwards: xs[2, 1] first.
    assert (site.primitive, site.phase) == ("log", "forward")
    assert [t for t, _ in site.steps] == [2, 1]
    assert "in step 1 of the scan at" in report.get()


def test_checked_grad_through_stepped_scans_matches_jax():
    def model(p, xs):
        w, b = p

        def body(carry, x):
            i, h, acc = carry
            h = jnp.tanh(w @ h + x * b + 0.1 * i)
            return (i + 1, h, acc + jnp.sum(h)), (h ** 2, jnp.sin(h[0]))
        (_, h, acc), (ys, zs) = lax.scan(body, (0, jnp.ones(2), 0.0), xs)
        h2 = lax.fori_loop(0, 3, lambda k, h: jnp.cos(h) * b, h)
        return jnp.sum(ys) + jnp.sum(zs) * acc + jnp.sum(h2)

    p = (jnp.array([[0.5, -0.3], [0.2, 0.8]]), jnp.array([0.1, -0.2]))
    xs = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
    report, g = jax.jit(fb.checked_grad(model, argnums=(0, 1)))(p, xs)
    assert report.ok
    g_ref = jax.grad(model, argnums=(0, 1))(p, xs)
    jax.tree_util.tree_map(lambda a, b: assert_allclose(a, b), g, g_ref)


def test_checked_grad_checks_a_large_scan_as_a_whole(monkeypatch):
    from fbackprop._src.rules import control
    monkeypatch.setattr(control, "UNROLL_LIMIT", 3)
    report, _ = jax.jit(fb.checked_grad(norm_rnn))(1.0, jnp.array([1.0, 2.0, -3.0, 0.5]))
    assert report.first().primitive == "scan" and report.first().steps == ()
    assert "checked only as a whole" in report.get()


# ------------------------------------------------------ gradient flow through time
def test_gradient_flow_norms_equal_the_perturbation_trick():
    w = jnp.array([[0.9, -0.4], [0.3, 0.7]], jnp.float32)
    xs = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(6, 2)

    def model(w, eps, mark):
        def body(h, a):
            x, e = a
            h = mark(jnp.tanh(h @ w + x), "h", e)
            return h, None
        h, _ = lax.scan(body, jnp.ones(2, jnp.float32), (xs, eps["h"]))
        return jnp.sum(h ** 2)

    eps = {"h": jnp.zeros((6, 2), jnp.float32)}
    flow = fb.gradient_flow(lambda w: model(w, eps, fb_mark), w)
    ref = jax.grad(lambda e: model(w, e, jax_mark))(eps)["h"]
    assert list(flow) == ["h"] and flow["h"].shape == (6,)
    assert_allclose(flow["h"].astype(np.float32), jnp.linalg.norm(ref, axis=1))
    assert "test_seeing_loops.py" in flow.loops["h"]
    assert "6 steps" in repr(flow)


def test_gradient_flow_plot_one_line_per_tag_log_scale(tmp_path):
    pytest.importorskip("matplotlib")
    flow = fb.GradientFlow({"a": np.array([1e-6, 1e-3, 1.0]), "b": np.array([0.0, 0.5, 1.0])})
    path = tmp_path / "flow.png"
    ax = flow.plot(path=str(path), labels={"a": "tanh RNN"})
    assert path.stat().st_size > 0 and ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == ["tanh RNN", "b"]
    assert np.isnan(ax.get_lines()[1].get_ydata()[0])      # a zero leaves a gap


def test_gradient_flow_rejects_tags_outside_scans():
    with pytest.raises(ValueError, match="not inside a lax.scan"):
        fb.gradient_flow(lambda x: fb.tag(x * 2.0, "a") ** 2, 1.0, names="a")
    with pytest.raises(ValueError, match="no tagged value inside"):
        fb.gradient_flow(lambda x: fb.tag(x * 2.0, "a") ** 2, 1.0)
    with pytest.raises(TypeError, match="`names`"):
        fb.gradient_flow(lambda x: x ** 2, 1.0, names=[3])
    with pytest.raises(TypeError, match="traced value"):
        jax.jit(lambda x: fb.gradient_flow(lambda x: x ** 2, x)["h"])(1.0)


# ------------------------------------------------------------- explain of a scan
def explained_rnn(w, xs):
    def step(h, x):
        a = w * h + x
        h = jnp.tanh(a)
        return h, h
    h, hs = lax.scan(step, 0.5, xs)
    return jnp.sum(hs) + h


def test_explain_shows_scan_body_rows_once_with_per_step_values():
    w, xs = 0.9, jnp.array([0.1, -0.2, 0.3, 0.4])
    ex = fb.explain(explained_rnn, w, xs)
    body = [row for row in ex.rows if row.loop]
    tanh_rows = [row for row in body if row.primitive == "tanh"]
    assert len(tanh_rows) == 1 and tanh_rows[0].label == "h"
    row = tanh_rows[0]
    assert sorted(row.steps) == [(0,), (1,), (2,), (3,)]
    _, hs = lax.scan(lambda h, x: (jnp.tanh(w * h + x),) * 2, 0.5, xs)
    assert_allclose(jnp.stack([row.steps[(t,)]["value"][0] for t in range(4)]), hs)

    def perturbed(e):
        def step(h, a):
            x, e_t = a
            h = jnp.tanh(w * h + x) + e_t
            return h, h
        h, hs = lax.scan(step, 0.5, (xs, e))
        return jnp.sum(hs) + h
    ct_ref = jax.grad(perturbed)(jnp.zeros(4, jnp.float32))
    assert_allclose(jnp.stack([row.steps[(t,)]["up"][0] for t in range(4)]), ct_ref)
    g_ref = jax.grad(explained_rnn, argnums=(0, 1))(w, xs)
    assert_allclose(ex.inputs[0].grad, g_ref[0])
    assert_allclose(ex.inputs[1].grad, g_ref[1])
    text = ex.table()
    assert "rows of loop bodies" in text and "⟳" in text
    lines = text.splitlines()
    head = next(k for k, t in enumerate(lines) if t.startswith(f"  #{row.index} h in the scan"))
    line = lines[head + 1]
    assert line.split()[0] == "value"
    assert f"first {float(hs[0]):.4g}, last {float(hs[-1]):.4g}" in line
    assert f"max {float(jnp.max(hs)):.4g}" in line
    assert any(r.primitive == "scan" and r.whole for r in ex.rows)
    # The input w is used in every step and counted once per body row, not again
    # by the scan row as a whole.
    uses = ex.inputs[0].uses
    assert_allclose(sum(g for _, g in uses), g_ref[0])


def cond_model(x):
    def pos(v):
        return jnp.sqrt(v)
    def neg(v):
        return jnp.log(v + 10.0)
    return jnp.sum(lax.cond(x[0] > 0, pos, neg, x))


COND_SQRT_LINE = _line_of(cond_model, "jnp.sqrt")
COND_LINE = _line_of(cond_model, "lax.cond")


def test_checked_grad_reports_only_the_branch_taken():
    # sqrt of negative numbers in the branch not taken: not reported.
    x = jnp.array([-1.0, -2.0])
    report, g = jax.jit(fb.checked_grad(cond_model))(x)
    assert report.ok
    assert_allclose(g, jax.grad(cond_model)(x))
    # sqrt'(0) in the branch taken, for the second example of a batch.
    report, _ = jax.vmap(fb.checked_grad(cond_model))(jnp.array([[-1.0, -2.0], [1.0, 0.0]]))
    site = report.first()
    assert (site.primitive, site.phase, site.batch_index) == ("sqrt", "backward", (1,))
    assert f"test_seeing_loops.py:{COND_SQRT_LINE}" in site.source
    assert site.context[0][:2] == ("cond", 1)
    assert f"in the true branch of the cond at test_seeing_loops.py:{COND_LINE}" \
        in report.get()


def test_checked_grad_looks_inside_custom_rules():
    @jax.custom_jvp
    def f(x):
        y = jnp.log(x)
        return y * 2.0

    f.defjvp(lambda p, t: (f(p[0]), 2.0 * t[0] / p[0]))

    @jax.custom_vjp
    def g(x):
        return jnp.sin(x) * 2.0

    def g_bwd(x, ct):
        return (ct * 2.0 * jnp.cos(x) / jnp.abs(x),)

    g.defvjp(lambda x: (g(x), x), g_bwd)

    def both(x):
        return jnp.sum(f(x + 2.0)) + jnp.sum(g(x))

    x = jnp.array([0.5, 1.5])
    report, grads = jax.jit(fb.checked_grad(both))(x)
    assert report.ok
    assert_allclose(grads, jax.grad(both)(x))
    report, _ = jax.jit(fb.checked_grad(both))(jnp.array([-3.0, 1.0]))    # log(-1)
    site = report.first()
    assert (site.primitive, site.phase) == ("log", "forward")
    assert site.context[0][0] == "custom_jvp" and "in the custom_jvp function" in report.get()
    report, _ = jax.jit(fb.checked_grad(both))(jnp.array([0.0, 1.0]))     # ct / |0|
    site = report.first()
    assert site.primitive == "div" and site.context[0][0] == "custom_vjp bwd"
    assert f"test_seeing_loops.py:{_line_of(g_bwd, 'jnp.abs')}" in site.source
    assert "x / 0 is inf" in report.get()


def test_checked_grad_looks_inside_scans_nothing_differentiates():
    def model(w, xs):
        def body(c, x):
            return c + jnp.log(x), None
        total, _ = lax.scan(body, 0.0, xs)           # xs is not differentiated
        return w * total

    report, _ = jax.jit(fb.checked_grad(model))(1.0, jnp.array([1.0, 2.0, -1.0]))
    site = report.first()
    assert (site.primitive, site.phase) == ("log", "forward")
    assert [t for t, _ in site.steps] == [2]


def newton_like(w, x0):
    def body(c):
        i, x = c
        x = x - jnp.log(x) * 3.0
        return i + 1, x
    _, x = lax.while_loop(lambda c: c[0] < 10, body, (0, x0))
    return w * jnp.sum(x)


def test_checked_grad_names_the_iteration_of_a_while_loop():
    # x: 3 -> -0.296 -> log(-0.296) = NaN in iteration 1.
    for run in (jax.jit(fb.checked_grad(newton_like)),
                lambda w, x: jax.vmap(fb.checked_grad(newton_like), (None, 0))(
                    w, jnp.stack([jnp.ones(2), x]))):
        report, _ = run(1.0, jnp.array([0.3, 3.0]))
        site = report.first()
        assert (site.primitive, site.phase) == ("log", "forward")
        assert f"test_seeing_loops.py:{_line_of(newton_like, 'jnp.log')}" in site.source
        assert site.context[-1][:2] == ("while", 1)
        assert "in iteration 1 of the while_loop at test_seeing_loops.py" in report.get()
    report, g = jax.jit(fb.checked_grad(newton_like))(1.0, jnp.ones(2))
    assert report.ok and float(g) == 2.0


def test_tag_in_equinox_scan_over_layers():
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 4)
    layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 3, key=k))(keys)
    params, static = eqx.partition(layers, eqx.is_array)

    def model(params, eps, mark):
        def step(x, a):
            p, e = a
            return mark(jnp.tanh(eqx.combine(p, static)(x)), "act", e), None
        x, _ = lax.scan(step, jnp.ones(3), (params, eps["act"]))
        return jnp.sum(x ** 2)

    inter = _check(model, params, {"act": jnp.zeros((4, 3), jnp.float32)}, modes=["jit"])
    assert inter["act"].shape == (4, 3)
