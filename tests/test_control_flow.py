"""Control flow: scan, cond/switch, while_loop/fori_loop, against JAX.

The spec table (tests/specs/control.py) compares VJPs, JVPs and second order
for the basic forms; these tests cover what a table row cannot: symbolic-zero
cotangents, activity that only appears inside the loop, what a scan keeps per
step, the shape of the backward program, and the errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fbackprop as fb
from fbackprop._src.testing import assert_allclose


def _rand(seed, *shape, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(dtype))


def _assert_trees_close(a, b, dtype=np.float64):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert_allclose(x, y, dtype)


def _check_grad(f, *args, argnums=None):
    argnums = tuple(range(len(args))) if argnums is None else argnums
    want = jax.grad(f, argnums)(*args)
    _assert_trees_close(fb.grad(f, argnums)(*args), want)
    _assert_trees_close(jax.jit(fb.grad(f, argnums))(*args), want)


def _primitive_names(jaxpr, acc=None):
    acc = [] if acc is None else acc
    for eqn in jaxpr.eqns:
        acc.append(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(
                jax.core, "jaxprs_in_params") else []:
            _primitive_names(sub, acc)
    return acc


# ------------------------------------------------------------------------ scan
def test_scan_ys_only_cotangent_and_carry_only_cotangent():
    w, h0, xs = _rand(0, 3, 3), _rand(1, 3), _rand(2, 6, 3)

    def run(w, h0, xs):
        return lax.scan(lambda h, x: (jnp.tanh(w @ h + x), jnp.sin(h) * x), h0, xs)

    # only the ys reach the loss: the final-carry cotangent is a symbolic zero
    _check_grad(lambda w, h0, xs: jnp.sum(run(w, h0, xs)[1] ** 2), w, h0, xs)
    # only the final carry: the ys cotangents are symbolic zeros (never stacked)
    _check_grad(lambda w, h0, xs: jnp.sum(run(w, h0, xs)[0] ** 2), w, h0, xs)


def test_scan_vjp_with_structured_cotangent():
    w, h0, xs = _rand(0, 3, 3), _rand(1, 3), _rand(2, 5, 3)

    def f(w, h0, xs):
        def body(c, x):
            h, s = c
            h = jnp.sin(w @ h) + x
            return (h, s + h.sum()), (h, jnp.cos(x))
        return lax.scan(body, (h0, jnp.zeros(())), xs)

    out, vjp_ours = fb.vjp(f, w, h0, xs)
    out_jax, vjp_jax = jax.vjp(f, w, h0, xs)
    _assert_trees_close(out, out_jax)
    ct = jax.tree_util.tree_map(lambda o: _rand(7, *o.shape), out_jax)
    _assert_trees_close(vjp_ours(ct), vjp_jax(ct))
    _assert_trees_close(jax.jit(lambda *a: fb.vjp(f, *a)[1](ct))(w, h0, xs), vjp_jax(ct))


def test_scan_carry_becomes_active_inside_the_loop():
    # the initial carry is a constant; it picks up a gradient from xs at step 1
    xs = _rand(3, 4, 2)

    def f(xs):
        h, _ = lax.scan(lambda h, x: (jnp.sin(h) + x * h + x, None), jnp.zeros(2), xs)
        return jnp.sum(h ** 2)

    _check_grad(f, xs)


def test_scan_body_traced_once_and_loops_built_directly(monkeypatch):
    # The body's equations tell that the carry becomes active in the first step
    # (through a jitted helper and a custom_jvp function), so the body's sweeps
    # are traced once, not once more after finding that out; a body whose
    # activity cannot be read off its equations (a nested scan) takes two.
    from fbackprop._src import residuals
    calls = []
    real = residuals.trace_joint
    monkeypatch.setattr(residuals, "trace_joint",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    w, xs = _rand(6, 2, 2), _rand(7, 4, 2)

    def rnn(w, xs):
        h, _ = lax.scan(lambda h, x: (jax.nn.relu(jnp.tanh(h @ w) + x), None),
                        jnp.zeros(2), xs)
        return jnp.sum(h ** 2)

    _assert_trees_close(jax.jit(fb.grad(rnn))(w, xs), jax.grad(rnn)(w, xs))
    assert calls == [[True, True, False]]          # w, h (active from step 1), x

    # Both loops' bodies are built from the split jaxpr, not traced again.
    from fbackprop._src.rules import scan as scan_rules, scan_bodies

    def no_trace(*args, **kwargs):
        raise AssertionError("a loop body was traced")
    import types
    for module in (scan_rules, scan_bodies):
        monkeypatch.setattr(module, "lax",
                            types.SimpleNamespace(**dict(vars(lax), scan=no_trace)))
    _assert_trees_close(jax.jit(fb.grad(rnn, argnums=(0, 1)))(w, xs),
                        jax.grad(rnn, argnums=(0, 1))(w, xs))
    for module in (scan_rules, scan_bodies):
        monkeypatch.setattr(module, "lax", lax)

    def nested(w, xs):
        def body(h, x):
            inner, _ = lax.scan(lambda c, _: (c * w[0], None), h, None, length=2)
            return inner + x, None
        h, _ = lax.scan(body, jnp.zeros(2), xs)
        return jnp.sum(h ** 2)

    calls.clear()
    _assert_trees_close(jax.jit(fb.grad(nested))(w, xs), jax.grad(nested)(w, xs))
    outer = [a for a in calls if len(a) == 3]      # w, h, x of the outer body
    assert len(outer) == 2 and not outer[0][1] and outer[1][1]


def test_scan_carry_reset_each_step():
    # the carry's initial value is differentiated but the body overwrites it
    h0, xs = _rand(4, 3), _rand(5, 4, 3)

    def f(h0, xs):
        h, ys = lax.scan(lambda h, x: (x * 2.0, h * x), h0, xs)
        return jnp.sum(h) + jnp.sum(ys ** 2)

    _check_grad(f, h0, xs)


def test_scan_with_only_some_arguments_differentiated():
    w, h0, xs = _rand(0, 3, 3), _rand(1, 3), _rand(2, 5, 3)

    def f(w, h0, xs):
        h, _ = lax.scan(lambda h, x: (jnp.tanh(w @ h + x), None), h0, xs)
        return jnp.sum(h)

    for argnums in [(0,), (1,), (2,), (0, 2)]:
        _check_grad(f, w, h0, xs, argnums=argnums)


def test_scan_length_zero():
    h0 = _rand(1, 3)

    def f(h0):
        h, _ = lax.scan(lambda h, _: (jnp.sin(h), None), h0, None, length=0)
        return jnp.sum(h ** 2)

    _check_grad(f, h0)


def test_scan_with_float32_int_and_bool_carries():
    x = _rand(0, 3, dtype=np.float32)

    def f(x):
        def body(c, _):
            i, flag, h = c
            h = jnp.where(flag, jnp.sin(h), h * 0.5) * (i + 1).astype(h.dtype)
            return (i + 1, jnp.logical_not(flag), h), None
        (_, _, h), _ = lax.scan(body, (jnp.int32(0), True, x), None, length=4)
        return jnp.sum(h)

    got = jax.jit(fb.grad(f))(x)
    assert got.dtype == jnp.float32
    assert_allclose(got, jax.grad(f)(x), np.float32)


def test_scan_unroll_matches_rolled():
    w, h0, xs = _rand(0, 3, 3), _rand(1, 3), _rand(2, 7, 3)

    def f(unroll):
        def loss(w, h0, xs):
            h, ys = lax.scan(lambda h, x: (jnp.tanh(w @ h) * x, h), h0, xs, unroll=unroll)
            return jnp.sum(h) + jnp.sum(ys ** 2)
        return loss

    for unroll in (1, 3, True):
        _check_grad(f(unroll), w, h0, xs)


def test_scan_third_order():
    xs = _rand(2, 4)

    def f(a):
        h, _ = lax.scan(lambda h, x: (jnp.sin(h * x + a), None), a, xs)
        return h

    want = jax.grad(jax.grad(jax.grad(f)))(0.3)
    assert_allclose(jax.jit(fb.grad(fb.grad(fb.grad(f))))(0.3), want, np.float64)


# ------------------------------------------------- what a scan keeps per step
def test_scan_keeps_loop_invariants_once_not_per_step():
    # sin(w) depends only on a constant of the loop: recomputed in the backward
    # loop, not stacked once per step
    w, h0, xs = _rand(0, 8, 8), _rand(1, 8), _rand(2, 16, 8)

    def f(w, h0, xs):
        h, _ = lax.scan(lambda h, x: (jnp.tanh(jnp.sin(w) @ h + x), None), h0, xs)
        return jnp.sum(h)

    _check_grad(f, w, h0, xs)
    shapes = [r.shape for r in fb.saved_residuals(f, w, h0, xs)]
    assert (16, 8, 8) not in shapes
    assert (8, 8) in shapes           # w itself, as an argument


def test_scan_reads_xs_and_ys_instead_of_copying_them():
    h0, xs = _rand(1, 8), _rand(2, 16, 8)

    def f(h0, xs):
        # the backward needs x (for h * x) and the ys value exp(h)
        h, ys = lax.scan(lambda h, x: (h * x, jnp.exp(h)), h0, xs)
        return jnp.sum(h) + jnp.sum(ys)

    _check_grad(f, h0, xs)
    rows = fb.saved_residuals(f, h0, xs)
    stacked = [r for r in rows if r.shape == (16, 8)]
    # xs is an argument row; h (the carry) and exp(h) (a ys output) are kept
    # once each, and xs is not copied into the loop's residuals
    assert sorted(r.kind for r in stacked) == ["argument", "intermediate", "intermediate"]


def test_scan_per_step_residuals_are_what_the_backward_reads():
    w, h0, xs = _rand(0, 4, 4), _rand(1, 4), _rand(2, 10, 4)

    def f(w, h0, xs):
        h, _ = lax.scan(lambda h, x: (jnp.tanh(h @ w + x), None), h0, xs)
        return jnp.sum(h)

    rows = fb.saved_residuals(f, w, h0, xs)
    per_step = sorted((r.primitive, r.shape) for r in rows if r.kind == "intermediate")
    # per step: the carry (for the weight's cotangent) and tanh's output
    assert per_step == [("scan", (10, 4)), ("tanh", (10, 4))]
    assert "its carry, x10 steps" in next(r for r in rows if r.primitive == "scan").detail


# ------------------------------------------------------------------ cond/switch
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cond_grad_and_second_order(sign):
    x, y = sign * _rand(0, 3) ** 2 + sign * 0.1, _rand(1, 3)

    def f(x, y):
        return jnp.sum(lax.cond(jnp.sum(x) > 0,
                                lambda a, b: jnp.sin(a) * jnp.exp(b),
                                lambda a, b: a ** 3 + b, x, y))

    _check_grad(f, x, y)
    hess = jax.jit(fb.hessian(f))(x, y)
    _assert_trees_close(hess, jax.hessian(f)(x, y))


def test_cond_backward_runs_only_the_taken_branch():
    x = _rand(0, 3)

    def f(x):
        return jnp.sum(lax.cond(x[0] > 0, jnp.sin, jnp.cos, x))

    jaxpr = jax.make_jaxpr(fb.grad(f))(x).jaxpr
    conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    # one cond for the forward (outputs + residual slots), one for the backward
    assert len(conds) == 2
    backward = conds[1]
    producers = {v: e for e in jaxpr.eqns for v in e.outvars}

    def source_index(v):   # look through lax.switch's clamp/convert of the index
        while v in producers and producers[v].primitive.name in (
                "clamp", "convert_element_type"):
            e = producers[v]
            v = e.invars[1] if e.primitive.name == "clamp" else e.invars[0]
        return v

    assert source_index(backward.invars[0]) is source_index(conds[0].invars[0])
    for branch in backward.params["branches"]:
        names = [e.primitive.name for e in branch.jaxpr.eqns]
        assert "cos" not in names or "sin" not in names  # each branch: its own VJP only


def test_cond_branches_share_residual_slots():
    x = _rand(0, 5)

    def f(x):
        return jnp.sum(lax.cond(x[0] > 0, lambda a: jnp.sin(jnp.sin(a)),
                                lambda a: jnp.cos(jnp.cos(a)), x))

    jaxpr = jax.make_jaxpr(fb.grad(f))(x).jaxpr
    fwd = next(e for e in jaxpr.eqns if e.primitive.name == "cond")
    # one output plus one shared f64[5] slot (each branch keeps one value)
    assert len(fwd.outvars) == 2


def test_cond_with_inactive_branch_outputs_and_integer_operands():
    x = _rand(0, 3)

    def f(x, n):
        out, count = lax.cond(n > 2, lambda a, k: (jnp.sin(a), k + 1),
                              lambda a, k: (jnp.zeros_like(a), k - 1), x, n)
        return jnp.sum(out) * count.astype(x.dtype)

    for n in (1, 5):
        _check_grad(lambda x, n=n: f(x, n), x)


def test_switch_with_traced_index():
    x = _rand(0, 4)
    branches = [jnp.sin, lambda a: a ** 2, lambda a: jnp.exp(a) * a]

    def f(x, i):
        return jnp.sum(lax.switch(i, branches, x))

    for i in range(3):
        got = jax.jit(fb.grad(f))(x, jnp.int32(i))
        assert_allclose(got, jax.grad(f)(x, i), np.float64)


# ----------------------------------------------------------- while / fori_loop
def _while_fn(x, y):
    def body(c):
        i, h = c
        return i + 1, jnp.sin(h) * y + h
    return lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]


def test_while_loop_forward_mode_matches_jax():
    x, y = _rand(0, 3), jnp.float64(0.7)
    tx, ty = _rand(1, 3), jnp.float64(-0.4)
    _assert_trees_close(fb.jvp(_while_fn, (x, y), (tx, ty)),
                        jax.jvp(_while_fn, (x, y), (tx, ty)))
    _assert_trees_close(jax.jit(lambda *a: fb.jvp(_while_fn, a[:2], a[2:]))(x, y, tx, ty),
                        jax.jvp(_while_fn, (x, y), (tx, ty)))
    _assert_trees_close(jax.jit(fb.jacfwd(_while_fn))(x, y), jax.jacfwd(_while_fn)(x, y))


def test_while_loop_reverse_mode_matches_the_unrolled_loop():
    # JAX cannot reverse a while_loop; the reference is the same loop unrolled.
    def unrolled(x, y):
        h = x
        for _ in range(3):
            h = jnp.sin(h) * y + h
        return h

    x, y = _rand(0, 3), jnp.float64(0.7)
    loss = lambda x, y: jnp.sum(_while_fn(x, y) ** 2)  # noqa: E731
    ref = jax.grad(lambda x, y: jnp.sum(unrolled(x, y) ** 2), (0, 1))(x, y)
    _assert_trees_close(fb.grad(loss, (0, 1))(x, y), ref)
    _assert_trees_close(jax.jit(fb.grad(loss, (0, 1)))(x, y), ref)


def test_fori_loop_with_dynamic_bounds_differentiates():
    def f(x, n):
        return jnp.sum(lax.fori_loop(0, n, lambda i, c: jnp.sin(c), x))

    ref = jax.grad(lambda x: jnp.sum(lax.fori_loop(0, 4, lambda i, c: jnp.sin(c), x)))
    x = _rand(0, 3)
    assert_allclose(jax.jit(fb.grad(f))(x, 4), ref(x), np.float64)
    assert_allclose(fb.grad(f)(x, jnp.int32(4)), ref(x), np.float64)


def test_fori_loop_with_static_bounds_differentiates():
    def f(x, y):
        return jnp.sum(lax.fori_loop(1, 5, lambda i, c: jnp.sin(c) * y + c / i, x))

    _check_grad(f, _rand(0, 3), jnp.float64(0.6))


def test_while_loop_whose_carry_is_not_differentiated():
    # the differentiated value only decides when to stop: no gradient flows
    def f(x):
        count = lax.while_loop(lambda c: c * 1.5 < x, lambda c: c + 1.0, 0.0)
        return count + x

    assert_allclose(fb.grad(f)(4.0), jax.grad(f)(4.0), np.float32)


# -------------------------------------------------------- truncated backprop
def test_truncated_backprop_through_time_with_stop_gradient():
    w, h0, xs = _rand(0, 3, 3) * 0.5, _rand(1, 3), _rand(2, 12, 3)

    def loss(w, h0, xs, window=4):
        def chunk(h, xs_chunk):
            h = lax.stop_gradient(h)    # no gradient flows into earlier chunks
            def step(h, x):
                h = jnp.tanh(w @ h + x)
                return h, jnp.sum(h ** 2)
            return lax.scan(step, h, xs_chunk)
        _, losses = lax.scan(chunk, h0, xs.reshape(-1, window, xs.shape[-1]))
        return jnp.sum(losses)

    _check_grad(loss, w, h0, xs)
    # nothing reaches the initial state through the stop_gradient
    assert_allclose(fb.grad(loss, 1)(w, h0, xs), np.zeros(3), np.float64)


# ------------------------------------------------------------ no JAX autodiff
def test_control_flow_never_calls_jax_autodiff(request):
    w, h0, xs = _rand(0, 3, 3), _rand(1, 3), _rand(2, 4, 3)

    def f(w, h0, xs):
        body = jax.checkpoint(lambda h, x: (jnp.tanh(w @ h + x), None))
        h, _ = lax.scan(body, h0, xs)
        return jnp.sum(lax.cond(h[0] > 0, jnp.sin, jnp.cos, h))

    def second(grad):
        return lambda *a: sum(jnp.sum(jnp.sin(g)) for g in grad(f, (0, 1, 2))(*a))

    want = jax.grad(f, (0, 1, 2))(w, h0, xs)
    want2 = jax.grad(second(jax.grad), (0, 1, 2))(w, h0, xs)
    request.getfixturevalue("no_jax_autodiff")   # JAX's references are computed above
    _assert_trees_close(fb.grad(f, (0, 1, 2))(w, h0, xs), want)
    _assert_trees_close(jax.jit(fb.grad(second(fb.grad), (0, 1, 2)))(w, h0, xs), want2)
    _assert_trees_close(fb.jvp(f, (w, h0, xs), (w, h0, xs))[1],
                        sum(jnp.sum(g * t) for g, t in zip(want, (w, h0, xs))))


def test_everything_nested_to_second_order():
    # a checkpointed scan body holding a cond, an inner scan and a fori_loop
    w, h0, xs = _rand(0, 3, 3) * 0.5, _rand(1, 3), _rand(2, 4, 3)

    def f(w, h0, xs):
        @jax.checkpoint
        def body(h, x):
            h = lax.cond(jnp.sum(x) > 0, lambda a: jnp.tanh(w @ a), lambda a: jnp.sin(a) * x, h)
            g, ys = lax.scan(lambda g, z: (g * jnp.cos(z) + z, g), h, xs[:2])
            g = lax.fori_loop(0, 2, lambda i, c: c + jnp.sin(c) * 0.1, g)
            return g, jnp.sum(ys)
        h, ys = lax.scan(body, h0, xs, reverse=True)
        return jnp.sum(h ** 2) + jnp.sum(ys)

    _check_grad(f, w, h0, xs)
    hess = jax.jit(fb.hessian(f, 1))(w, h0, xs)
    _assert_trees_close(hess, jax.hessian(f, 1)(w, h0, xs))
