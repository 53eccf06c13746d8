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
    eagerly, under jit and under vmap (over a batch of two parameter sets)."""
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
                   {"h": jnp.zeros(5)})
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
                   {"h": jnp.zeros((3, 4, 2)), "c": jnp.zeros((3, 2))})
    assert inter["h"].shape == (3, 4, 2)


def test_tag_in_fori_loop_with_static_trip_count():
    def model(w, eps, mark):
        def body(i, h):
            return mark(jnp.cos(w * h) + 0.1 * i, "h", eps["h"][i])
        return lax.fori_loop(0, 4, body, 0.5) ** 2

    _check(model, jnp.float32(1.3), {"h": jnp.zeros(4)})


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
    inter = _check(model, ws, {"z": jnp.zeros((4, 3))})
    assert inter["z"].shape == (4, 3)


def test_same_name_in_two_branches_is_one_tag():
    def model(x, eps, mark):
        def pos(v):
            return mark(jnp.sin(v) * 2.0, "b", eps["b"])

        def neg(v):
            return mark(v ** 3, "b", eps["b"])
        y = lax.cond(jnp.sum(x) > 0, pos, neg, x)
        return jnp.sum(y ** 2)

    _check(model, jnp.array([0.5, 1.0]), {"b": jnp.zeros(2)}, modes=["eager", "jit"])
    _check(model, jnp.array([-0.5, -1.0]), {"b": jnp.zeros(2)}, modes=["eager"])


def test_switch_branch_not_taken_reports_zeros():
    def model(x, eps, mark):
        branches = [lambda v: mark(v * 2.0, "a", eps["a"]),
                    lambda v: v + 1.0,
                    lambda v: mark(jnp.exp(v), "c", eps["c"])]
        return jnp.sum(lax.switch(2, branches, x) ** 2)

    inter = _check(model, jnp.array([0.1, 0.2]), {"a": jnp.zeros(2), "c": jnp.zeros(2)})
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

    _check(model, jnp.array([0.4, -0.3]), {"r": jnp.zeros(2), "s": jnp.zeros(3)})


def test_tags_inside_and_outside_a_scan_together():
    def model(w, eps, mark):
        h0 = fb.tag(w * 2.0, "h0") if mark is fb_mark else w * 2.0 + eps["h0"]

        def body(h, e):
            h = mark(h * w + 0.5, "h", e)
            return h, None
        h, _ = lax.scan(body, h0, eps["h"])
        return h ** 2

    _check(model, jnp.float32(0.9), {"h0": jnp.zeros((), jnp.float32), "h": jnp.zeros(6, jnp.float32)})


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

    with pytest.raises(NotImplementedError, match="while_loop"):
        fb.grad_and_intermediates(looped)(2.0)
