"""Eager gradients reuse a compiled backward program when the recorded program repeats.

Every check compares with ``jax.value_and_grad`` on the same call, and reads
``eager.stats`` to prove which path ran: a compiled hit must give JAX's
answer for values it was not compiled with, a changed program must not hit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbackprop as fb
from fbackprop._src import eager

pytestmark = pytest.mark.xdist_group("eager_programs")


def close(a, b, tol=1e-5):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        assert np.shape(x) == np.shape(y) and jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=tol, atol=tol)


@pytest.fixture(autouse=True)
def fresh():
    eager.clear()
    yield
    eager.clear()


def _params(seed=0, n_in=5, n_hidden=7):
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.standard_normal((n_in, n_hidden)), jnp.float32),
            "b1": jnp.zeros(n_hidden, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((n_hidden, 3)), jnp.float32)}


def _batch(seed, n=4, n_in=5):
    rng = np.random.default_rng(100 + seed)
    return (jnp.asarray(rng.standard_normal((n, n_in)), jnp.float32),
            jnp.asarray(rng.integers(0, 3, n)))


@jax.jit
def _user_jit(h):
    return jnp.tanh(h) * 2.0


def model_loss(p, batch):
    """jax.numpy helpers, a user jit, custom_jvp functions (relu, softmax,
    logsumexp), a checkpointed block, a scan and a cond."""
    x, y = batch
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.checkpoint(lambda h: jnp.sin(h) + h)(h)
    h = _user_jit(h)
    h, _ = jax.lax.scan(lambda c, _: (jnp.cos(c) * c, None), h, None, length=3)
    h = jax.lax.cond(jnp.sum(x) > 100.0, lambda h: h * 3.0, jnp.exp, h)
    logits = h @ p["w2"]
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)) + \
        jnp.sum(jax.nn.softmax(logits)[:, 0])


def test_repeated_program_is_compiled_and_matches_jax_on_new_values():
    f = fb.value_and_grad(model_loss)
    for i in range(5):
        p, batch = _params(i), _batch(i)
        close(f(p, batch), jax.value_and_grad(model_loss)(p, batch))
    # Calls 1-2 run op by op (the second notices the repeat), call 3 compiles,
    # calls 3-5 run the compiled program on values it was not traced with.
    assert eager.stats["compiles"] == 1
    assert eager.stats["hits"] == 3
    assert eager.stats["fallbacks"] == 2


def test_fresh_closures_over_new_constants_hit_and_use_the_new_constants():
    p = _params(0)
    for i in range(4):
        batch = _batch(i)
        got = fb.grad(lambda q: model_loss(q, batch))(p)
        close(got, jax.grad(lambda q: model_loss(q, batch))(p))
    assert eager.stats["hits"] == 2


def test_python_control_flow_switching_programs_never_mixes_them_up():
    def f(x, w):
        # A different program on each branch, and a loop whose length depends on x.
        y = jnp.sin(x * w) if jnp.sum(x) > 0 else jnp.cos(x) * w
        for _ in range(2 if jnp.abs(x[0]) > 1 else 0):
            y = jnp.tanh(y) * w
        return jnp.sum(y ** 2)
    xs = [jnp.array([0.5, 1.0]), jnp.array([-0.5, -1.0]), jnp.array([2.5, 1.0]),
          jnp.array([1.5, -0.2])]
    w = jnp.float32(0.7)
    for i in range(12):
        x = xs[i % 4] * (1 + 0.1 * i)
        close(fb.value_and_grad(f, (0, 1))(x, w), jax.value_and_grad(f, (0, 1))(x, w))
    assert eager.stats["hits"] > 0


def test_shapes_and_dtypes_key_separate_programs():
    f = lambda x: jnp.sum(jnp.tanh(x) ** 2)  # noqa: E731
    cases = [jnp.ones(3), jnp.ones(4), jnp.ones((2, 2)), jnp.ones(3, jnp.bfloat16)]
    for _ in range(4):
        for x in cases:
            close(fb.value_and_grad(f)(x * 0.3), jax.value_and_grad(f)(x * 0.3), tol=1e-2)
    # One function cycling through four programs: each is compiled once it has
    # repeated in the program-only mode, and only once.
    assert eager.stats["compiles"] == len(cases)


def test_parameters_enter_the_key_by_value():
    # Same primitives and types, different parameters (an integer power, a
    # literal constant, -0.0 against 0.0): each is its own program.
    fs = [lambda x: jnp.sum(x ** 2), lambda x: jnp.sum(x ** 3),
          lambda x: jnp.sum(x * 2.0), lambda x: jnp.sum(x * 3.0),
          lambda x: jnp.sum(jnp.maximum(x, 0.0) * x),
          lambda x: jnp.sum(jnp.maximum(x, -0.0) * x)]
    x = jnp.array([0.0, -1.5, 2.0])
    for _ in range(3):
        for f in fs:
            close(fb.value_and_grad(f)(x), jax.value_and_grad(f)(x))


def test_aux_argnums_and_integer_inputs():
    def f(x, n, y):
        return jnp.sum(x * y) * n, {"n": n, "y2": y * 2}
    x, y = jnp.ones(3), jnp.arange(3.0)
    for i in range(4):
        got = fb.value_and_grad(f, (2, 0, 1), has_aux=True, allow_int=True)(x + i, 2, y)
        want = jax.value_and_grad(f, (2, 0, 1), has_aux=True, allow_int=True)(x + i, 2, y)
        close(got[0], want[0])
        assert [g.dtype for g in got[1]] == [g.dtype for g in want[1]]
        close(got[1][:2], want[1][:2])
    assert eager.stats["hits"] == 2


def test_custom_vjp_bwd_still_runs_on_the_values_every_call():
    seen = []

    @jax.custom_vjp
    def clip_grad(x):
        return x

    def fwd(x):
        return x, None

    def bwd(_, g):
        seen.append(float(jnp.max(jnp.abs(g))))   # Python on the cotangent: eager only
        return (jnp.clip(g, -1.0, 1.0),)
    clip_grad.defvjp(fwd, bwd)
    f = lambda x: jnp.sum(clip_grad(x * 3.0) ** 2)  # noqa: E731
    for i in range(4):
        x = jnp.array([0.1, 2.0]) * (i + 1)
        close(fb.grad(f)(x), jax.grad(f)(x))
    assert len(seen) == 8 and eager.stats["hits"] == 0


def test_callbacks_run_once_per_call_as_in_jax():
    calls = {"fb": 0, "jax": 0}
    which = ["fb"]

    def count(_):
        calls[which[0]] += 1

    @jax.jit
    def g(x):
        jax.debug.callback(count, x)
        return jnp.sin(x)
    f = lambda x: jnp.sum(g(x) * x)  # noqa: E731
    for i in range(4):
        which[0] = "fb"
        got = fb.grad(f)(jnp.ones(2) * i)
        which[0] = "jax"
        close(got, jax.grad(f)(jnp.ones(2) * i))
    jax.effects_barrier()
    assert calls["fb"] == calls["jax"] == 4
    assert eager.stats["hits"] == 0


def test_errors_of_the_backward_sweep_are_raised_on_every_call():
    @jax.custom_jvp
    def bad(x):
        return jnp.sin(x)
    bad.defjvp(lambda xs, ts: (bad(xs[0]), xs[0] * ts[0] * ts[0]))   # not linear
    f = lambda x: jnp.sum(bad(x))  # noqa: E731
    for _ in range(4):
        with pytest.raises(fb.NonLinearRuleError, match="not linear"):
            fb.grad(f)(jnp.ones(2))


class _Counter:
    def __init__(self):
        self.n = 0

    def on_backward(self, eqn, cts_out, cts_in, record):
        self.n += 1

    def on_forward(self, eqn, invals, outvals):
        pass


def test_watched_sweeps_are_never_compiled():
    from fbackprop._src.tools.common import observing
    f = lambda x: jnp.sum(jnp.sin(x) * x)  # noqa: E731
    counts = []
    for _ in range(4):
        with observing(_Counter()) as obs:
            close(fb.grad(f)(jnp.ones(3)), jax.grad(f)(jnp.ones(3)))
        counts.append(obs.n)
    # The observer sees the backward sweep's equations on every call.
    assert counts[0] > 0 and len(set(counts)) == 1
    with jax.disable_jit():
        for _ in range(3):
            close(fb.grad(f)(jnp.ones(3)), jax.grad(f)(jnp.ones(3)))
    assert eager.stats["hits"] == 0


def test_second_order_and_jit_outside_do_not_use_eager_programs():
    f = lambda x: jnp.sum(jnp.sin(x) ** 3)  # noqa: E731
    x = jnp.array([0.3, 0.9])
    for _ in range(3):
        close(fb.grad(lambda y: jnp.sum(fb.grad(f)(y)))(x),
              jax.grad(lambda y: jnp.sum(jax.grad(f)(y)))(x))
        close(jax.jit(fb.grad(f))(x), jax.grad(f)(x))
        close(jax.vmap(fb.grad(f))(x[:, None]), jax.vmap(jax.grad(f))(x[:, None]))


def test_eager_hvp_compiled_matches_jax_on_new_values():
    def f(p):
        h = jnp.tanh(p["w"] @ p["x"])
        return jnp.sum(jax.nn.softplus(h) * p["b"]) + jnp.sum(p["b"] ** 3)
    rng = np.random.default_rng(0)
    for i in range(4):
        p = {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
             "x": jnp.asarray(rng.standard_normal(4), jnp.float32),
             "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
        v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) * (i + 1), p)
        want = jax.jvp(jax.grad(f), (p,), (v,))[1]
        close(fb.hvp(f, (p,), (v,)), (want,), tol=1e-4)
    assert eager.stats["hvp_compiles"] == 1 and eager.stats["hvp_hits"] == 3


def test_eager_hvp_with_changing_branches_and_bad_tangents():
    f = lambda x: jnp.sum(jnp.sin(x) ** 3) if jnp.sum(x) > 0 else jnp.sum(x ** 4)  # noqa: E731
    for i in range(6):
        x = jnp.array([0.3, -0.2]) * (1 if i % 3 else -1) * (i + 1)
        v = jnp.array([1.0, 0.5])
        close(fb.hvp(f, (x,), (v,)), (jax.jvp(jax.grad(f), (x,), (v,))[1],), tol=1e-4)
    assert eager.stats["hvp_compiles"] == 2 and eager.stats["hvp_hits"] == 4
    with pytest.raises(ValueError, match="different primal and tangent shapes"):
        fb.hvp(f, (x,), (jnp.ones(3),))
