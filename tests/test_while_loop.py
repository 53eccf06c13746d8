"""Reverse mode through lax.while_loop (rules/while_loop/), against references.

JAX cannot reverse a while loop, so a reference gradient is ``jax.grad`` of the
same computation with the loop replaced by a ``lax.scan`` of the trip count the
loop actually ran (the same body, the same arithmetic), or ``jax.jacfwd`` (forward
mode does go through while loops) where the loop sits inside library code.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fbackprop as fb
from fbackprop._src import context
from fbackprop._src.rules import while_loop as wl


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(1.0, float(jnp.max(jnp.abs(y))))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol * scale,
                                   rtol=tol)


# ------------------------------------------------ loops and their references
def _trip_count(fn, *args):
    """How many iterations the (single) while loop of ``fn(*args, loop=...)`` runs."""
    cell = {}

    def loop(cond, body, init):
        def counted(c):
            x, i = c
            return body(x), i + 1
        out, cell["n"] = lax.while_loop(lambda c: cond(c[0]), counted, (init, 0))
        return out
    fn(*args, loop=loop)
    return int(cell["n"])


def _scan_loop(n):
    def loop(cond, body, init):
        return lax.scan(lambda c, _: (body(c), None), init, None, length=n)[0]
    return loop


def _reference(fn, args, argnums=0):
    """jax.grad of ``fn`` with its loop as a scan of the trip count it runs."""
    n = _trip_count(fn, *args)
    return jax.grad(functools.partial(fn, loop=_scan_loop(n)), argnums)(*args), n


def newton(theta, loop=lax.while_loop):
    """Roots of z**3 + a z - b = 0 (elementwise) by Newton's method."""
    a, b = jnp.exp(theta[0]), theta[1:]

    def g(z):
        return z ** 3 + a * z - b

    def body(c):
        (z,) = c
        return (z - g(z) / (3 * z ** 2 + a),)

    (z,) = loop(lambda c: jnp.max(jnp.abs(g(c[0]))) > 1e-6, body, (jnp.zeros_like(b),))
    return jnp.sum(z ** 2)


def fixed_point(params, x, loop=lax.while_loop):
    """An implicit layer: iterate z = tanh(W z + U x + c) to a tolerance."""
    W, U, c = params

    def body(s):
        z, _ = s
        z2 = jnp.tanh(W @ z + U @ x + c)
        return z2, jnp.max(jnp.abs(z2 - z))

    z, _ = loop(lambda s: s[1] > 1e-5, body, (jnp.zeros(W.shape[0]), jnp.asarray(jnp.inf)))
    return jnp.sum(z * jnp.arange(1, z.shape[0] + 1))


def ode(params, y0, loop=lax.while_loop):
    """dy/dt = -k y + A sin(y) to t = 2 with an adaptive Heun-Euler stepper."""
    k, A = params
    t1, rtol, atol = 2.0, 1e-3, 1e-5

    def f(y):
        return -k * y + A @ jnp.sin(y)

    def body(s):
        t, y, dt = s
        dt = jnp.minimum(dt, t1 - t)
        k1 = f(y)
        k2 = f(y + dt * k1)
        y_new = y + dt * (k1 + k2) / 2
        err = jnp.max(jnp.abs(dt * (k2 - k1) / 2) / (atol + rtol * jnp.abs(y_new)))
        ok = err <= 1.0
        factor = jnp.clip(0.9 * lax.rsqrt(jnp.maximum(err, 1e-10)), 0.2, 5.0)
        return jnp.where(ok, t + dt, t), jnp.where(ok, y_new, y), dt * factor

    _, y, _ = loop(lambda s: s[0] < t1, body, (jnp.asarray(0.0), y0, jnp.asarray(0.01)))
    return jnp.sum(y ** 2)


def power_iteration(M, loop=lax.while_loop):
    """The top eigenvalue of a symmetric matrix, iterating to a tolerance."""
    A = M @ M.T + jnp.diag(jnp.arange(M.shape[0], dtype=M.dtype))

    def body(s):
        v, _ = s
        w = A @ v
        w = w / jnp.linalg.norm(w)
        return w, jnp.max(jnp.abs(w - v))

    v0 = jnp.ones(M.shape[0]) / math.sqrt(M.shape[0])
    v, _ = loop(lambda s: s[1] > 1e-6, body, (v0, jnp.asarray(jnp.inf)))
    return v @ A @ v


def sinkhorn(x, y, loop=lax.while_loop):
    """Entropic optimal transport cost, Sinkhorn iterations to a tolerance."""
    C = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, -1)
    K = jnp.exp(-C / 0.5)
    a = jnp.ones(x.shape[0]) / x.shape[0]
    b = jnp.ones(y.shape[0]) / y.shape[0]

    def body(s):
        u, v, _ = s
        u = a / (K @ v)
        v = b / (K.T @ u)
        return u, v, jnp.sum(jnp.abs(u * (K @ v) - a))

    u, v, _ = loop(lambda s: s[2] > 1e-4, body, (a, b, jnp.asarray(jnp.inf)))
    return jnp.sum(u[:, None] * K * v[None, :] * C)


_K = jax.random.split(jax.random.PRNGKey(0), 4)
PROBLEMS = {
    "newton": (newton, (jnp.array([0.3, 1.0, -2.0, 0.5]),)),
    "fixed_point": (fixed_point, ((jax.random.normal(_K[0], (5, 5)) * 0.3,
                                   jax.random.normal(_K[1], (5, 3)),
                                   jax.random.normal(_K[2], (5,)) * 0.1),
                                  jnp.array([0.5, -1.0, 2.0]))),
    "adaptive_ode": (ode, ((jnp.float32(0.7), jax.random.normal(_K[0], (3, 3)) * 0.5),
                           jnp.array([1.0, -0.5, 0.3]))),
    "power_iteration": (power_iteration, (jax.random.normal(_K[1], (5, 5)),)),
    "sinkhorn": (sinkhorn, (jax.random.normal(_K[2], (4, 2)), jax.random.normal(_K[3], (5, 2)))),
}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_solver_gradients_match_the_realized_scan(name):
    fn, args = PROBLEMS[name]
    ref, n = _reference(fn, args)
    assert n > 3, n                   # the loop really iterates
    _close(fb.grad(fn)(*args), ref)
    _close(jax.jit(fb.grad(fn))(*args), ref)


# ----------------------------------------------------------------- the schedule
def _offline_cost(T, S):
    """Fewest backward body evaluations for T steps and S slots when the kept
    states may be chosen knowing T (dynamic program over the kept set)."""
    @functools.lru_cache(None)
    def F(l, s):
        best = wl.schedule.cost_exact(l, s)
        if s > 1:
            for m in range(1, l):
                best = min(best, wl.schedule.cost_exact(m, s) + F(l - m, s - 1))
        return best
    return T + F(T, S + 1)


def test_binomial_split_is_optimal():
    @functools.lru_cache(None)
    def t_dp(l, s):
        if l <= 1:
            return 0
        if s == 1:
            return l * (l - 1) // 2
        return min(m + t_dp(l - m, s - 1) + t_dp(m, s) for m in range(1, l))

    for s in range(1, 6):
        for l in range(1, 45):
            assert wl.schedule.cost_exact(l, s) == t_dp(l, s), (l, s)
            if s >= 2 and l >= 3:
                m = wl.schedule.split_exact(l, s)
                assert m + t_dp(l - m, s - 1) + t_dp(m, s) == t_dp(l, s), (l, s, m)


def test_online_schedule_is_near_the_offline_optimum():
    for S in (2, 4, 8):
        for T in (10, 37, 120, 300):
            got = wl.reference_schedule(T, S)["backward_evals"]
            assert got <= 1.06 * _offline_cost(T, S) + 2, (T, S, got, _offline_cost(T, S))
    # At 10^4 steps with the default 64 slots: within 0.5% of the lower bound.
    big = wl.reference_schedule(10_000, 64)
    assert big["backward_evals"] <= 1.005 * big["lower_bound"]
    assert big["backward_evals"] / 10_000 < 2.8


@pytest.fixture
def loop_stats():
    with wl.stats() as sink:
        yield sink


def test_compiled_schedule_counts_what_the_reference_counts(loop_stats):
    def make(S):
        def f(x, n):
            with context.using(while_slots=("count", S)):
                return jnp.sum(lax.fori_loop(0, n, lambda i, h: jnp.sin(h) * 0.9 + 0.1 * h, x))
        return jax.jit(fb.grad(f))

    def ref(x, n):
        return jnp.sum(lax.fori_loop(0, n, lambda i, h: jnp.sin(h) * 0.9 + 0.1 * h, x))

    x = jnp.linspace(0.1, 1.0, 3)
    for S in (1, 3, 8):
        g = make(S)
        for n in (0, 1, 2, 7, 40, 130):
            loop_stats.clear()
            _close(g(x, n), jax.grad(ref)(x, n))
            (st,) = loop_stats
            assert (st["trip_count"], st["slots"]) == (n, S)
            assert st["backward_evals"] == wl.reference_schedule(n, S)["backward_evals"]


def test_while_loop_checkpoints_sets_the_slots(loop_stats):
    def loop(x):
        return lax.while_loop(lambda c: c[0] < 50, lambda c: (c[0] + 1, jnp.sin(c[1])),
                              (0, x))[1]

    def ref(x):
        return jnp.sum(lax.fori_loop(0, 50, lambda i, h: jnp.sin(h), x))

    x = jnp.ones(3)
    few = fb.checkpoint(loop, while_loop_checkpoints=4)
    _close(fb.grad(lambda x: jnp.sum(few(x)))(x), jax.grad(ref)(x))
    _close(jax.jit(fb.grad(lambda x: jnp.sum(loop(x))))(x), jax.grad(ref)(x))
    (st,) = loop_stats            # the loop in the region is not reported
    assert st["slots"] == wl.DEFAULT_SLOTS and st["backward_evals"] == 50
    with pytest.raises(ValueError, match="while_loop_checkpoints"):
        fb.checkpoint(loop, while_loop_checkpoints=0)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_is_flat_in_the_trip_count():
    def body(h):
        return jnp.tanh(h * 1.01 + 0.1)

    def with_while(n, S):
        def f(x):
            loop = lambda x: lax.while_loop(  # noqa: E731
                lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[1])), (jnp.int32(0), x))[1]
            return jnp.sum(fb.checkpoint(loop, while_loop_checkpoints=S)(x))
        return fb.grad(f)

    def with_scan(n):
        return jax.grad(lambda x: jnp.sum(lax.scan(lambda h, _: (body(h), None), x, None,
                                                   length=n)[0]))

    x = jnp.ones(256, jnp.float32)                 # one loop state: 1 KiB (and a counter)
    ours = [_temp_bytes(with_while(n, 16), x) for n in (100, 10_000)]
    assert ours[0] == ours[1]
    # The 16 slots (and a spare) and small change; a scan of 10^4 steps keeps 10^4 states.
    assert 17 * 1024 <= ours[0] < 40 * 1024
    assert _temp_bytes(with_scan(10_000), x) > 100 * ours[0]
    assert _temp_bytes(with_while(100, 64), x) - ours[0] >= 48 * 1024


def test_memory_budget_decides_the_slots():
    x = jnp.ones(256, jnp.float32)                 # one loop state: 1028 bytes

    def loss(budget):
        def f(x):
            loop = lambda x: lax.while_loop(  # noqa: E731
                lambda c: c[0] < 300, lambda c: (c[0] + 1, jnp.tanh(c[1] + 0.1)),
                (jnp.int32(0), x))[1]
            return jnp.sum(fb.checkpoint(loop, memory_budget=budget)(x))
        return f

    ref = jax.grad(lambda x: jnp.sum(lax.fori_loop(0, 300, lambda i, h: jnp.tanh(h + 0.1),
                                                   x)))(x)
    _close(fb.grad(loss(8 * 1028))(x), ref)
    small, large = (_temp_bytes(fb.grad(loss(b)), x) for b in (8 * 1028, 32 * 1028))
    assert 24 * 1024 <= large - small <= 26 * 1024       # 24 more loop states
    with pytest.raises(ValueError, match="at least one saved copy"):
        fb.grad(loss(100))(x)


# ------------------------------------------------------------------ composition
def test_vmap_with_a_different_trip_count_per_example():
    thetas = jnp.array([[0.3, 1.0, -2.0], [2.0, 0.1, 0.2], [-1.0, 5.0, 3.0]])
    refs, counts = zip(*[_reference(newton, (th,)) for th in thetas])
    assert len(set(counts)) == 3
    want = jnp.stack(refs)
    _close(jax.vmap(fb.grad(newton))(thetas), want)
    _close(jax.jit(jax.vmap(fb.grad(newton)))(thetas), want)
    # A batched loop differentiated: examples that stopped early are not updated
    # by the later iterations, and their gradients see none of them.
    _close(jax.jit(fb.grad(lambda ts: jnp.sum(jax.vmap(newton)(ts))))(thetas), want)


def test_nested_while_loops():
    def nested(theta):
        def body(c):
            i, s = c
            return i + 1, s + newton(theta * (1.0 + 0.1 * i))
        return lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.asarray(0.0)))[1]

    th = jnp.array([0.3, 1.0, -2.0])
    _close(jax.jit(fb.grad(nested))(th), jax.jacfwd(nested)(th))


def test_while_inside_scan_and_scan_inside_while():
    def implicit_euler(k, y0, h=0.1):
        def step(y, _):
            def body(c):
                (z,) = c
                return (z - (z + h * k * z ** 3 - y) / (1 + 3 * h * k * z ** 2),)
            (z,) = lax.while_loop(lambda c: jnp.abs(c[0] + h * k * c[0] ** 3 - y) > 1e-6,
                                  body, (y,))
            return z, z
        return jnp.sum(lax.scan(step, y0, None, length=5)[1])

    _close(jax.jit(fb.grad(implicit_euler, (0, 1)))(1.5, 0.8),
           jax.jacfwd(implicit_euler, (0, 1))(1.5, 0.8))

    def scan_in_while(w, x):
        def body(c):
            i, h = c
            return i + 1, lax.scan(lambda h, _: (jnp.tanh(w @ h) + h, None), h, None,
                                   length=3)[0]
        return jnp.sum(lax.while_loop(lambda c: jnp.sum(c[1] ** 2) < 50.0, body, (0, x))[1])

    w, x = jax.random.normal(_K[0], (3, 3)) * 0.5, jnp.array([0.1, 0.2, 0.3])
    _close(jax.jit(fb.grad(scan_in_while, (0, 1)))(w, x), jax.jacfwd(scan_in_while, (0, 1))(w, x))


def test_hessian_and_hvp_through_a_while_loop():
    th = jnp.array([0.3, 1.0, -2.0])
    n = _trip_count(newton, th)
    want = jax.hessian(functools.partial(newton, loop=_scan_loop(n)))(th)
    _close(jax.jit(fb.hessian(newton))(th), want, 1e-4)
    v = jnp.array([1.0, -0.5, 0.25])
    _close(fb.hvp(newton, (th,), (v,))[0], want @ v, 1e-4)


def test_grad_of_grad_through_a_while_loop():
    def f(a):
        return lax.while_loop(lambda c: c[0] < 4,
                              lambda c: (c[0] + 1, jnp.sin(a * c[1]) + c[1]), (0, a))[1]

    want = jax.grad(jax.grad(lambda a: lax.fori_loop(0, 4, lambda i, h: jnp.sin(a * h) + h,
                                                     a)))(0.7)
    _close(jax.jit(fb.grad(fb.grad(f)))(0.7), want)


def test_stop_gradient_and_integer_carries():
    def f(a):
        def body(c):
            i, h, frozen = c
            return i + 1, jnp.sin(h * a) + lax.stop_gradient(h) * frozen, frozen + 0.5
        return lax.while_loop(lambda c: c[0] < 5, body, (0, a, jnp.asarray(1.0)))[1]

    def ref(a):
        def body(i, c):
            h, frozen = c
            return jnp.sin(h * a) + lax.stop_gradient(h) * frozen, frozen + 0.5
        return lax.fori_loop(0, 5, body, (a, jnp.asarray(1.0)))[0]

    _close(fb.grad(f)(0.8), jax.grad(ref)(0.8))


def test_random_keys_in_the_carry():
    def f(x, loop):
        def body(c):
            key, h = c
            key, sub = jax.random.split(key)
            return key, h * (1.0 + 0.1 * jax.random.normal(sub, h.shape))
        return jnp.sum(loop(lambda c: True, body, (jax.random.key(0), x))[1])

    def loop(cond, body, init):          # five iterations, counted in the carry
        return lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, body(c[1])),
                              (0, init))[1]

    x = jnp.ones(3)
    _close(jax.jit(fb.grad(functools.partial(f, loop=loop)))(x),
           jax.grad(functools.partial(f, loop=_scan_loop(5)))(x))


def test_a_loop_nothing_differentiates_is_bound_as_it_is():
    def f(x):
        count = lax.while_loop(lambda c: c * 1.5 < lax.stop_gradient(x), lambda c: c + 1.0, 0.0)
        return count * x

    jaxpr = jax.make_jaxpr(fb.grad(f))(4.0)
    whiles = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert len(whiles) == 1 and len(whiles[0].outvars) == 1     # no slots, no second loop
    _close(fb.grad(f)(4.0), jax.grad(f)(4.0))


def test_fori_loop_with_traced_bounds():
    def f(x, lo, hi):
        return jnp.sum(lax.fori_loop(lo, hi, lambda i, c: jnp.sin(c) * i, x))

    def ref(x):
        return jnp.sum(lax.fori_loop(2, 7, lambda i, c: jnp.sin(c) * i, x))

    x = jnp.array([0.1, 0.2])
    _close(jax.jit(fb.grad(f))(x, 2, 7), jax.grad(ref)(x))


def test_library_loops_bfgs_and_equinox():
    from jax.scipy.optimize import minimize

    def bfgs(theta):
        def f(x, th):
            return jnp.sum((x - th) ** 2 * jnp.arange(1.0, 4.0)) + 0.1 * jnp.sum(jnp.cos(x))
        return jnp.sum(minimize(f, jnp.zeros(3), args=(theta,), method="BFGS",
                                tol=1e-6).x ** 2)

    th = jnp.array([0.5, -1.0, 2.0])
    _close(jax.jit(fb.grad(bfgs))(th), jax.jacfwd(bfgs)(th), 1e-4)

    import equinox.internal as eqxi

    def eqx_loop(a):
        return eqxi.while_loop(lambda c: c[0] < 4,
                               lambda c: (c[0] + 1, jnp.sin(a * c[1]) + c[1]), (0, a),
                               kind="lax")[1]

    _close(fb.grad(eqx_loop)(0.7), jax.grad(
        lambda a: lax.fori_loop(0, 4, lambda i, h: jnp.sin(a * h) + h, a))(0.7))


def test_vjp_fn_leaves_jit_and_eager_calls_repeat():
    def g(x):
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1])), (0, x))[1]

    want = jax.grad(lambda x: jnp.sum(lax.fori_loop(0, 3, lambda i, h: jnp.sin(h), x)))(
        jnp.ones(2))
    vjp_fn = jax.jit(lambda x: fb.vjp(g, x)[1])(jnp.ones(2))
    _close(vjp_fn(jnp.ones(2))[0], want)
    eager_vjp_fn = fb.vjp(g, jnp.ones(2))[1]          # recorded iteration by iteration
    _close(jax.jit(lambda f, ct: f(ct))(eager_vjp_fn, jnp.ones(2))[0], want)
    for _ in range(4):            # the eager engine compiles repeated programs
        _close(fb.grad(lambda x: jnp.sum(g(x)))(jnp.ones(2)), want)


def test_eager_calls_record_each_iteration_up_to_a_size(monkeypatch, loop_stats):
    from fbackprop._src.registry import call_handlers_reverse

    def f(x, n):
        return jnp.sum(lax.while_loop(lambda c: c[0] < n,
                                      lambda c: (c[0] + 1, jnp.sin(c[1]) * 1.1), (0, x))[1])

    def ref(x, n):
        return jnp.sum(lax.fori_loop(0, n, lambda i, h: jnp.sin(h) * 1.1, x))

    x = jnp.array([0.3, -0.2])
    _close(fb.grad(f)(x, 30), jax.grad(ref)(x, 30))
    assert loop_stats == []               # recorded iteration by iteration
    handler = call_handlers_reverse["while"]
    monkeypatch.setattr(handler, "max_eqns", 3 * 20)
    _close(fb.grad(f)(x, 30), jax.grad(ref)(x, 30))
    (st,) = loop_stats                    # too long: the compiled loops ran
    assert st["trip_count"] == 30


# ------------------------------------------------------------------- the tools
def _looped(x, a):
    def body(c):
        i, h = c
        return i + 1, jnp.sin(fb.tag(h * a, "ha")) + h
    return jnp.sum(lax.while_loop(lambda c: c[0] < 4, body, (0, x))[1])


def test_tags_in_the_body_get_one_cotangent_per_iteration():
    def as_scan(x, a):
        def body(h, _):
            return jnp.sin(fb.tag(h * a, "ha")) + h, None
        return jnp.sum(lax.scan(body, x, None, length=4)[0])

    x = jnp.array([0.5, 1.0])
    grads, inter = fb.grad_and_intermediates(_looped, (0, 1))(x, 0.7)
    want_grads, want = fb.grad_and_intermediates(as_scan, (0, 1))(x, 0.7)
    assert inter["ha"].shape == (4, 2)
    _close(inter["ha"], want["ha"])
    _close(grads, want_grads)


def test_explain_summarizes_the_body_over_iterations():
    ex = fb.explain(_looped, jnp.array([0.5, 1.0]), 0.7)
    body_rows = [r for r in ex.rows if r.loop]
    assert body_rows and all("while_loop" in r.loop for r in body_rows)
    # Values over the iterations are kept for the rows shown (the integer
    # counter's row is folded plumbing).
    shown = [r for r in body_rows if not r.plumbing]
    assert {r.primitive for r in shown} >= {"mul", "sin"}
    assert all(len(r.steps) == 4 for r in shown)
    _close(ex.inputs[1].grad, fb.grad(_looped, 1)(jnp.array([0.5, 1.0]), 0.7))
    assert "in the while_loop at" in str(ex)


def test_checked_grad_names_the_iteration():
    def f(x):
        def body(c):
            i, h = c
            return i + 1, jnp.where(i == 2, jnp.log(h - 10.0), h * 1.5)
        return jnp.sum(lax.while_loop(lambda c: c[0] < 4, body, (0, x))[1])

    x = jnp.array([0.5, 1.0])
    with pytest.raises(fb.NonFiniteError, match="in iteration 2 of the while_loop") as info:
        fb.checked_grad(f)(x)
    assert info.value.site.primitive == "log"
    report, _ = jax.jit(fb.checked_grad(f))(x)
    assert report.first().primitive == "log"
    assert "in iteration 2 of the while_loop" in report.first().where


def test_side_effects_in_the_body_raise_naming_the_loop():
    def f(a):
        def body(c):
            jax.debug.print("{}", c[0])
            return c[0] + 1, c[1] * a
        return lax.while_loop(lambda c: c[0] < 2, body, (0, a))[1]

    with pytest.raises(ValueError, match="side effects") as info:
        fb.grad(f)(1.0)
    assert "test_while_loop.py" in str(info.value)
