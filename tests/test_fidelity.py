"""Drop-in fidelity with JAX: code that works with jax.grad works with fb.grad.

One regression test per cause found by running JAX's own test suite through
fbackprop (see conformance/), each compared with JAX on the same function,
plus a property test over argnums orders, pytrees and has_aux for every API
that takes argnums.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fbackprop as fb


def close(a, b, tol=1e-6):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.shape(x) == np.shape(y)
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=tol, atol=tol)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


# ------------------------------------------------------------------ argnums order
def test_unsorted_argnums_give_gradients_in_argnums_order():
    f = lambda x, y, z: x + 2 * y + 3 * z  # noqa: E731
    assert [float(g) for g in fb.grad(f, (2, 0))(1., 1., 1.)] == [3.0, 1.0]
    close(fb.grad(f, (2, 0))(1., 1., 1.), jax.grad(f, (2, 0))(1., 1., 1.))


def _pytree_loss(a, b, c):
    return (jnp.sum(jnp.sin(a["w"]) * a["b"][0]) + jnp.sum(b ** 3)
            + jnp.sum(jnp.tanh(c[0]) * c[1]))


def _args(seed):
    rng = np.random.default_rng(seed)
    a = {"w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32),
         "b": [jnp.asarray(rng.standard_normal(()), jnp.float32)]}
    b = jnp.asarray(rng.standard_normal(4), jnp.float32)
    c = (jnp.asarray(rng.standard_normal(2), jnp.float32),
         jnp.asarray(rng.standard_normal(2), jnp.float32))
    return a, b, c


def _with_aux(f):
    return lambda *xs: (f(*xs), {"n": jnp.sum(xs[1])})


argnums_strategy = st.one_of(
    st.integers(0, 2),
    st.permutations([0, 1, 2]).flatmap(
        lambda p: st.integers(1, 3).map(lambda k: tuple(p[:k]))))


@settings(max_examples=12)
@given(argnums=argnums_strategy, has_aux=st.booleans(), seed=st.integers(0, 3))
def test_argnums_orders_pytrees_and_aux_match_jax(argnums, has_aux, seed):
    args = _args(seed)
    f = _with_aux(_pytree_loss) if has_aux else _pytree_loss
    close(fb.grad(f, argnums, has_aux=has_aux)(*args),
          jax.grad(f, argnums, has_aux=has_aux)(*args))
    close(fb.value_and_grad(f, argnums, has_aux=has_aux)(*args),
          jax.value_and_grad(f, argnums, has_aux=has_aux)(*args))
    close(fb.jacrev(f, argnums, has_aux=has_aux)(*args),
          jax.jacrev(f, argnums, has_aux=has_aux)(*args))
    close(fb.jacfwd(f, argnums, has_aux=has_aux)(*args),
          jax.jacfwd(f, argnums, has_aux=has_aux)(*args))
    inter = fb.grad_and_intermediates(f, argnums, has_aux=has_aux)(*args)
    close(inter[0], jax.grad(f, argnums, has_aux=has_aux)(*args)[0] if has_aux
          else jax.grad(f, argnums)(*args))
    report, checked = fb.checked_grad(f, argnums, has_aux=has_aux)(*args)
    assert report.ok
    close(checked, jax.grad(f, argnums, has_aux=has_aux)(*args))


@settings(max_examples=8)
@given(argnums=argnums_strategy, seed=st.integers(0, 3))
def test_hessian_argnums_orders_match_jax(argnums, seed):
    args = _args(seed)
    close(fb.hessian(_pytree_loss, argnums)(*args), jax.hessian(_pytree_loss, argnums)(*args),
          tol=1e-5)


# ------------------------------------------------------ eager semantics (concrete)
def test_python_control_flow_on_a_differentiated_value():
    def f(x):
        if x > 0:
            return jnp.sin(x) * x
        return -x ** 3
    for x in (1.5, -0.5):
        close(fb.grad(f)(x), jax.grad(f)(x))
        close(fb.grad(fb.grad(f))(x), jax.grad(jax.grad(f))(x))
        close(fb.jvp(f, (x,), (1.0,)), jax.jvp(f, (x,), (1.0,)))
        close(fb.linearize(f, x)[1](2.0), jax.linearize(f, x)[1](2.0))
        close(fb.jacfwd(f)(x), jax.jacfwd(f)(x))
        close(fb.jacrev(f)(x), jax.jacrev(f)(x))


def test_concrete_non_differentiated_arguments():
    def f(x, n, table):
        for _ in range(int(n)):                         # int() of an array
            x = jnp.sin(x)
        k = np.asarray(n).item()                       # NumPy on an array argument
        return jnp.sum(x * table[k % len(table)])      # a list indexed by it
    args = (jnp.ones(3), jnp.array(3), [1.0, 2.0, 3.0])
    close(fb.grad(f)(*args), jax.grad(f)(*args))
    close(fb.value_and_grad(f)(*args), jax.value_and_grad(f)(*args))


def test_fori_loop_with_a_concrete_array_trip_count_in_reverse_mode():
    f = lambda x: jax.lax.fori_loop(0, jnp.array(3), lambda i, c: c * x, 1.0)  # noqa: E731
    close(fb.grad(f)(2.0), jax.grad(f)(2.0))


def test_eager_try_except_fallback():
    def f(x):
        try:
            if jnp.any(x > 100):        # concrete: decides which path runs
                raise ValueError
            return jnp.sum(x ** 2)
        except ValueError:
            return jnp.sum(x)
    close(fb.grad(f)(jnp.ones(2)), jax.grad(f)(jnp.ones(2)))
    close(fb.grad(f)(jnp.full(2, 200.)), jax.grad(f)(jnp.full(2, 200.)))


def test_float16_dot_product_attention():
    q = jnp.ones((1, 4, 2, 8), jnp.float16) * 0.1
    f = lambda q: jnp.sum(jax.nn.dot_product_attention(q, q, q).astype(jnp.float32))  # noqa
    close(fb.grad(f)(q), jax.grad(f)(q), tol=1e-3)


def test_error_under_jit_names_the_users_function():
    def my_model(x):
        if x > 0:
            return x
        return -x
    with pytest.raises(jax.errors.TracerBoolConversionError, match="my_model"):
        jax.jit(fb.grad(my_model))(1.0)


def test_globals_are_read_at_every_call():
    state = {"k": 1.0}
    g = fb.grad(lambda x: x * state["k"])
    assert float(g(1.0)) == 1.0
    state["k"] = 5.0
    assert float(g(1.0)) == 5.0


# -------------------------------------------------------------- linearize + loops
LOOPS = {
    "scan": lambda x: jax.lax.scan(lambda c, y: (jnp.sin(c) * y, c * 2), x[0], x)[1],
    "cond": lambda x: jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x),
    "switch": lambda x: jax.lax.switch(1, [jnp.sin, jnp.cos, jnp.tanh], x),
    "while": lambda x: jax.lax.while_loop(lambda c: c[0] < 4,
                                          lambda c: (c[0] + 1, jnp.sin(c[1])), (0, x))[1],
    "fori": lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c * x, x),
    "fori_dynamic": lambda x: jax.lax.fori_loop(0, jnp.array(3), lambda i, c: c * x, x),
    # Loops with no reverse mode inside calls whose reverse rules build a backward
    # program: linearize records the program only, so these work as in JAX.
    "remat_while": jax.checkpoint(lambda x: jax.lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1])), (0, x))[1]),
    "fori_traced_bounds_in_cond": lambda x: jax.lax.cond(
        True, lambda x: jax.lax.fori_loop(x[0] - x[0], x[0] - x[0] + 2.0,
                                          lambda i, c: c * 2.0 + jnp.sin(c), x),
        lambda x: x, x),
}



@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(LOOPS))
def test_linearize_through_control_flow(name, jit):
    f, x, t = LOOPS[name], jnp.array([0.5, 1.0, 1.5]), jnp.array([1.0, -1.0, 2.0])

    def ours(x, t):
        y, f_jvp = fb.linearize(f, x)
        return y, f_jvp(t), f_jvp(2 * t)

    def theirs(x, t):
        y, f_jvp = jax.linearize(f, x)
        return y, f_jvp(t), f_jvp(2 * t)
    close((jax.jit(ours) if jit else ours)(x, t), theirs(x, t), tol=1e-5)


# ----------------------------------------------------------------- vjp_fn pytree
def test_vjp_fn_is_a_partial_that_can_leave_jit():
    def make(x):
        return fb.vjp(lambda x: jnp.sin(x) * x, x)[1]
    vjp_fn = jax.jit(make)(jnp.ones(3))
    assert isinstance(vjp_fn, jax.tree_util.Partial)
    close(vjp_fn(jnp.ones(3)), jax.vjp(lambda x: jnp.sin(x) * x, jnp.ones(3))[1](jnp.ones(3)))
    # and through control flow, whose tapes keep their own residuals
    g = lambda x: jax.lax.scan(lambda c, _: (jnp.sin(c), None), x, None, length=3)[0]  # noqa
    vjp_fn = jax.jit(lambda x: fb.vjp(g, x)[1])(jnp.ones(2))
    close(vjp_fn(jnp.ones(2)), jax.vjp(g, jnp.ones(2))[1](jnp.ones(2)))


# ------------------------------------------------ accept what JAX accepts
def test_cotangent_types_jax_accepts():
    with jax.enable_x64(False):
        close(fb.vjp(lambda x: x * 2, 1.0)[1](np.float64(1.0)),
              jax.vjp(lambda x: x * 2, 1.0)[1](np.float64(1.0)))
    f = lambda x: (x * 2).astype(jnp.int32)  # noqa: E731
    close(fb.vjp(f, 1.0)[1](jnp.int32(1)), jax.vjp(f, 1.0)[1](jnp.int32(1)))


def test_custom_rules_returning_python_scalars_or_other_float_dtypes():
    @jax.custom_vjp
    def f(x):
        return x * 2
    f.defvjp(lambda x: (x * 2, None), lambda r, g: (g.astype(jnp.float32) * 3,))
    x = jnp.ones(3, jnp.bfloat16)
    loss = lambda x: jnp.sum(f(x)).astype(jnp.float32)  # noqa: E731
    ours = fb.grad(loss)(x)
    # JAX passes the bwd's float32 cotangent on (excess precision), not cast.
    assert ours.dtype == jax.grad(loss)(x).dtype == jnp.float32
    close(ours, jax.grad(loss)(x))

    @jax.custom_gradient
    def g(x):
        return x * 2, lambda ct: (3.0,)
    close(fb.grad(g)(1.0), jax.grad(g)(1.0))
    close(jax.jit(fb.grad(g))(1.0), jax.grad(g)(1.0))


def test_non_array_aux():
    f = lambda x: (x ** 2, ("hello", {"n": 3}))  # noqa: E731
    assert fb.grad(f, has_aux=True)(2.0)[1] == ("hello", {"n": 3})
    close(fb.grad(f, has_aux=True)(2.0)[0], jax.grad(f, has_aux=True)(2.0)[0])


# ---------------------------------------------- custom rules: checked, not trusted
def test_nonlinear_custom_jvp_rule_is_an_error_in_reverse_mode():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), jnp.cos(x) * t * jnp.abs(t)

    with pytest.raises(fb.NonLinearRuleError, match="abs"):
        fb.grad(f)(1.0)
    with pytest.raises(fb.NonLinearRuleError):
        jax.jit(fb.grad(f))(1.0)
    # Forward mode evaluates the rule as written, like JAX.
    close(fb.jvp(f, (1.0,), (2.0,)), jax.jvp(f, (1.0,), (2.0,)))


def test_custom_jvp_rule_calling_the_function_on_the_tangent():
    @jax.custom_jvp
    def s(x):
        return 2 * x
    s.defjvp(lambda p, t: (s(p[0]), s(t[0])))
    close(fb.grad(s)(1.0), jax.grad(s)(1.0))
    close(fb.grad(fb.grad(lambda x: s(x) * x))(1.0), jax.grad(jax.grad(lambda x: s(x) * x))(1.0))


def test_custom_jvp_under_jit_is_linearized_as_in_jax():
    # Under a transformation the rule runs once (as JAX linearizes it): the value
    # is the rule's primal output, the gradient the transpose of its tangent part.
    @jax.custom_jvp
    def f(x):
        return x
    f.defjvp(lambda p, t: (p[0] + 1.0, 3.0 * t[0]))
    close(jax.jit(fb.value_and_grad(f))(1.0), jax.jit(jax.value_and_grad(f))(1.0))
    close(jax.jit(lambda x: fb.vjp(f, x)[0])(1.0), jax.vjp(f, 1.0)[0])


def test_custom_jvp_rule_with_jitted_helpers_under_jit():
    # The same jitted helper inside a rule (applied to a tangent, swept as a
    # checked linear map) and outside it (differentiated as usual): one cached
    # program must not serve both.
    scale = jax.jit(lambda a, b: a * b)

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)
    f.defjvp(lambda p, t: (f(p[0]), scale(jnp.cos(p[0]), t[0])))

    def loss(x):
        return jnp.sum(f(scale(x, x)) * jnp.tanh(x))
    x = jnp.linspace(-1.0, 1.0, 5)
    close(jax.jit(fb.grad(loss))(x), jax.grad(loss)(x))
    close(fb.grad(loss)(x), jax.grad(loss)(x))
    close(jax.jit(fb.hessian(loss))(x), jax.hessian(loss)(x), tol=1e-5)

    @jax.custom_jvp
    def bad(x):
        return jnp.sin(x)
    bad.defjvp(lambda p, t: (bad(p[0]), scale(t[0], t[0])))   # not linear
    with pytest.raises(fb.NonLinearRuleError, match="bad"):
        jax.jit(fb.grad(lambda x: jnp.sum(bad(x))))(x)


def test_custom_rules_closing_over_vmap_tracers():
    def per_jvp(a):
        @jax.custom_jvp
        def f(x):
            return jnp.sin(x) * a
        f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * a * t[0]))
        return fb.grad(f)(1.0)

    def per_vjp(a):
        @jax.custom_vjp
        def f(x):
            return jnp.sin(x) * a
        f.defvjp(lambda x: (f(x), x), lambda x, g: (jnp.cos(x) * a * g,))
        return fb.grad(f)(1.0)

    expected = jax.vmap(lambda a: jax.grad(lambda x: jnp.sin(x) * a)(1.0))(jnp.arange(3.0))
    close(jax.vmap(per_jvp)(jnp.arange(3.0)), expected)
    close(jax.vmap(per_vjp)(jnp.arange(3.0)), expected)


def test_vmap_of_custom_jvp_whose_output_ignores_the_input():
    @jax.custom_jvp
    def c(x):
        return jnp.zeros(())
    c.defjvp(lambda p, t: (c(p[0]), jnp.zeros(())))
    f = lambda x: c(x) + x  # noqa: E731
    close(jax.vmap(fb.grad(f))(jnp.arange(3.0)), jax.vmap(jax.grad(f))(jnp.arange(3.0)))


def test_forward_mode_gives_float0_tangents_to_integer_inputs_of_custom_jvp():
    @jax.custom_jvp
    def f(x, n):
        return x * n

    def rule(primals, tangents):
        assert tangents[1].dtype == jax.dtypes.float0
        return f(*primals), tangents[0] * primals[1]
    f.defjvp(rule)
    g = lambda x: jax.lax.scan(lambda c, _: (f(c, 3), None), x, None, length=2)[0]  # noqa
    close(fb.jvp(g, (1.0,), (1.0,)), jax.jvp(g, (1.0,), (1.0,)))
    close(fb.jvp(lambda x: f(x, 3), (1.0,), (1.0,)), jax.jvp(lambda x: f(x, 3), (1.0,), (1.0,)))


def test_stop_gradient_of_a_while_loop_in_reverse_mode():
    f = lambda x: jax.lax.stop_gradient(  # noqa: E731
        jax.lax.while_loop(lambda c: c < 10, lambda c: c * x, 1.0)) + x
    close(fb.grad(f)(2.0), jax.grad(f)(2.0))
    # Reversed without the stop_gradient too (JAX cannot): x**4 at x = 2.0.
    g = lambda x: jax.lax.while_loop(lambda c: c < 10, lambda c: c * x, 1.0)  # noqa: E731
    close(fb.grad(g)(2.0), jax.grad(lambda x: x ** 4)(2.0))


def test_dot_of_python_floats():
    close(fb.grad(lambda x: jnp.dot(x, x))(3.0), jax.grad(lambda x: jnp.dot(x, x))(3.0))


# ------------------------------------------------- primitives JAX's API produces
def test_closed_call():
    from jax._src import core
    inner = jax.make_jaxpr(lambda x: jnp.sin(x) * x)(1.0)
    a, b = core.Var(inner.in_avals[0]), core.Var(inner.out_avals[0])
    eqn = core.new_jaxpr_eqn([a], [b], core.closed_call_p, dict(call_jaxpr=inner),
                             core.no_effects)
    outer = core.Jaxpr([], [a], [b], [eqn])
    f = lambda x: core.eval_jaxpr(outer, [], x)[0]  # noqa: E731
    close(fb.grad(f)(0.7), jax.grad(f)(0.7))
    close(fb.jvp(f, (0.7,), (1.0,)), jax.jvp(f, (0.7,), (1.0,)))
    close(jax.jit(fb.grad(f))(0.7), jax.grad(f)(0.7))


def test_eval_jaxpr_and_core_call():
    from jax._src import core
    from jax._src import linear_util as lu
    from jax._src.lax.eval_jaxpr import eval_jaxpr_p
    closed = jax.make_jaxpr(lambda x: [x ** 3 * jnp.sin(x)])(1.0)

    def via_eval_jaxpr(x):
        return eval_jaxpr_p.bind(x, jaxpr=closed)[0]

    def via_call(x):
        sub = lu.wrap_init(lambda x: [jnp.cos(x) * x],
                           debug_info=jax.api_util.debug_info("call", via_call, (x,), {}))
        return core.call(x, name="inner", subfuns=(sub,))[0]

    for f in (via_eval_jaxpr, via_call, jax.checkpoint(via_call)):
        close(fb.grad(f)(0.7), jax.grad(f)(0.7))
        close(jax.jit(fb.grad(f))(0.7), jax.grad(f)(0.7))
        close(fb.jvp(f, (0.7,), (1.0,)), jax.jvp(f, (0.7,), (1.0,)))


def test_library_primitive_with_a_token_operand():
    from jax._src import core, dispatch
    from jax._src.interpreters import ad, mlir
    p = core.Primitive("fbackprop_test_tokens")
    p.def_impl(lambda *a: dispatch.apply_primitive(p, *a))
    p.def_abstract_eval(lambda x, token: x)
    mlir.register_lowering(p, lambda ctx, x, token: [x])
    ad.defjvp(p, lambda g, x, token: 2.0 * g, None)
    token = jax.lax.create_token(0)
    out, vjp_fn = fb.vjp(lambda x: p.bind(x, token), jnp.ones(3))
    close(vjp_fn(jnp.ones(3)), (2.0 * jnp.ones(3),))


def test_vjp_fn_returned_from_jit_keeps_no_trace_alive():
    def apply_fn(x):
        return fb.vjp(jax.checkpoint(lambda x: jax.nn.relu(2.0 * x)), x)
    with jax.check_tracer_leaks():
        out, vjp_fn = jax.jit(apply_fn)(1.0)
    close(vjp_fn(1.0), (2.0,))


def test_vjp_fn_called_with_several_arguments_is_a_clear_error():
    def foo(x, y):
        return x * y, y
    _, vjp_fn = fb.vjp(foo, 1.0, 2.0)
    with pytest.raises(TypeError, match="applied to foo was called with 2 arguments"):
        vjp_fn(1.0, 1.0)
    close(vjp_fn((1.0, 1.0)), jax.vjp(foo, 1.0, 2.0)[1]((1.0, 1.0)))


def test_object_array_is_a_clear_error():
    with pytest.raises(TypeError, match="dtype object .* is not a valid JAX type"):
        fb.grad(lambda x: x)(np.zeros(3, dtype=object))


def test_custom_vjp_with_consts_and_forwarded_residuals():
    """jax.experimental.ode.odeint: a custom_vjp over a closure-converted function, whose
    fwd forwards some inputs as residuals (their indices count the call's consts)."""
    from jax.experimental.ode import odeint

    def loss(y0, k, w):
        ys = odeint(lambda y, t, k: -k * y + jnp.sin(w * t), y0, jnp.array([0.0, 0.5, 1.0]), k)
        return jnp.sum(ys[-1] ** 2)

    args = (jnp.array([1.0, 2.0]), 0.5, 1.5)
    want = jax.grad(loss, (0, 1, 2))(*args)
    close(fb.grad(loss, (0, 1, 2))(*args), want, tol=1e-5)
    close(jax.jit(fb.grad(loss, (0, 1, 2)))(*args), want, tol=1e-5)


def test_custom_linear_solve_aux_outputs_have_zero_derivative():
    """As in JAX: the diagnostics a solve returns with has_aux=True are constants."""
    def solve(matvec, b):
        x = jax.lax.stop_gradient(jnp.linalg.solve(jax.jacfwd(matvec)(b), b))
        return x, {"residual": jnp.sum(matvec(x) - b) ** 2 + jnp.sum(b)}

    def f(a, b):
        x, aux = jax.lax.custom_linear_solve(lambda v: a @ v, b, solve, solve,
                                             symmetric=True, has_aux=True)
        return jnp.sum(jnp.sin(x)) + aux["residual"]

    a = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    b = jnp.array([1.0, -1.0])
    want = jax.grad(f, (0, 1))(a, b)
    close(fb.grad(f, (0, 1))(a, b), want, tol=1e-5)
    close(jax.jit(fb.grad(f, (0, 1)))(a, b), want, tol=1e-5)
    close(fb.jvp(f, (a, b), (a, b)), jax.jvp(f, (a, b), (a, b)), tol=1e-5)


def test_custom_vmap_call():
    from jax.custom_batching import custom_vmap

    @custom_vmap
    def f(x):
        return jnp.sin(x)

    @f.def_vmap
    def rule(axis_size, in_batched, xs):
        return jnp.sin(xs), in_batched[0]

    close(fb.grad(f)(0.3), jnp.cos(0.3))
    close(fb.jvp(f, (0.3,), (2.0,)), (jnp.sin(0.3), 2 * jnp.cos(0.3)))


def _custom_vmap_with_another_rule():
    """sin, whose custom batching rule computes cos: under vmap its value and
    derivatives are the rule's (JAX's jvp says so), elsewhere the body's."""
    from jax.custom_batching import custom_vmap

    @custom_vmap
    def f(x):
        return jnp.sin(x)

    @f.def_vmap
    def rule(axis_size, in_batched, xs):
        return jnp.cos(xs), in_batched[0]
    return f


def test_custom_vmap_forward_mode_differentiates_the_rule_as_jax_does():
    f = _custom_vmap_with_another_rule()
    xs, ts = jnp.arange(3.0) + 0.25, jnp.arange(3.0) * 2 - 1
    fb_jvp = lambda x, t: fb.jvp(f, (x,), (t,))  # noqa: E731
    jax_jvp = lambda x, t: jax.jvp(f, (x,), (t,))  # noqa: E731
    close(fb_jvp(xs[0], ts[0]), jax_jvp(xs[0], ts[0]))
    close(jax.vmap(fb_jvp)(xs, ts), jax.vmap(jax_jvp)(xs, ts))
    close(jax.jit(jax.vmap(fb_jvp))(xs, ts), jax.vmap(jax_jvp)(xs, ts))
    close(fb.jvp(jax.vmap(f), (xs,), (ts,)), jax.jvp(jax.vmap(f), (xs,), (ts,)))
    # Axes only the tangents, or only the primals, have.
    for axes in ((None, 0), (0, None)):
        close(jax.vmap(fb_jvp, in_axes=axes)(xs[0] if axes[0] is None else xs,
                                             ts[0] if axes[1] is None else ts),
              jax.vmap(jax_jvp, in_axes=axes)(xs[0] if axes[0] is None else xs,
                                              ts[0] if axes[1] is None else ts))
    close(fb.jacfwd(f)(xs), jax.jacfwd(f)(xs))
    np.testing.assert_allclose(jax.vmap(fb_jvp)(xs, ts)[1], -jnp.sin(xs) * ts, rtol=1e-6)


def test_custom_vmap_reverse_mode_differentiates_the_rule_under_vmap():
    """jax.grad cannot differentiate a custom_vmap function (its linearization
    fails); fbackprop's reverse mode gives the body's gradient unbatched and the
    rule's under vmap, however late the vmap comes: compared with JAX's forward
    mode, which has that semantics."""
    f = _custom_vmap_with_another_rule()
    xs = jnp.arange(3.0) + 0.25
    rule_slope = jax.vmap(lambda x: jax.jvp(f, (x,), (1.0,))[1])(xs)      # -sin
    np.testing.assert_allclose(rule_slope, -jnp.sin(xs), rtol=1e-6)
    close(fb.grad(f)(0.5), jnp.cos(0.5))
    close(jax.jit(fb.grad(f))(0.5), jnp.cos(0.5))
    close(jax.vmap(fb.grad(f))(xs), rule_slope)
    close(jax.vmap(jax.jit(fb.grad(f)))(xs), rule_slope)
    total = lambda xs: jax.vmap(f)(xs).sum()  # noqa: E731
    close(fb.grad(total)(xs), jax.jacfwd(total)(xs))
    close(jax.jit(fb.grad(total))(xs), jax.jacfwd(total)(xs))
    # Second order: the rule's second derivative under vmap.
    close(jax.vmap(fb.grad(fb.grad(f)))(xs), -jnp.cos(xs))
    close(jax.vmap(lambda x: fb.linearize(f, x)[1](1.0))(xs), rule_slope)


def test_custom_vmap_gradients_with_mixed_batching_match_jax():
    """An unbatched argument's gradient sums over the batch; a rule output that
    is unbatched (the same for every member) receives the summed cotangent."""
    from jax.custom_batching import custom_vmap
    z = jnp.array([2.0, 1.0, 3.0])

    @custom_vmap
    def g(x, y, n):
        return jnp.sin(x) * y + z * n

    @g.def_vmap
    def g_rule(axis_size, in_batched, xs, ys, n):
        return jnp.cos(xs) * ys + z * n, any(in_batched)

    @custom_vmap
    def h(x):
        return x[0]

    @h.def_vmap
    def h_rule(axis_size, in_batched, xs):
        return 2.0 * xs[0, 0], False

    xs = jnp.arange(6.0).reshape(2, 3) / 4
    y = jnp.array([1.0, 2.0, 3.0])
    loss = lambda x, y: jax.vmap(g, in_axes=(0, None, None))(x, y, 2).sum()  # noqa: E731
    close(fb.grad(loss, (0, 1))(xs, y), jax.jacfwd(loss, (0, 1))(xs, y), tol=1e-5)
    close(jax.jit(fb.grad(loss, (0, 1)))(xs, y), jax.jacfwd(loss, (0, 1))(xs, y), tol=1e-5)
    loss2 = lambda xs: jax.vmap(h)(xs).sum()  # noqa: E731
    close(fb.grad(loss2)(xs), jax.jacfwd(loss2)(xs))


def test_custom_vjp_with_optimize_remat_in_forward_mode():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)
    f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (c * g,), optimize_remat=True)
    fwd = lambda x: f.fwd(x)[0] if hasattr(f, "fwd") else None  # noqa: E731
    close(fb.grad(f)(0.4), jax.grad(f)(0.4))
    if fwd(0.4) is not None:
        close(fb.jvp(fwd, (0.4,), (1.0,)), jax.jvp(fwd, (0.4,), (1.0,)))


@pytest.mark.parametrize("flag", ["jax_remat3", "jax_custom_vjp3"])
def test_next_jax_defaults_for_checkpoint_and_custom_vjp(flag):
    with _flag(flag):
        f = jax.checkpoint(lambda x: jnp.sin(jnp.sin(x)))
        close(fb.grad(f)(1.0), jax.grad(f)(1.0))
        close(jax.jit(fb.grad(f))(1.0), jax.grad(f)(1.0))
        close(fb.jvp(f, (1.0,), (1.0,)), jax.jvp(f, (1.0,), (1.0,)))
        named = jax.checkpoint(
            lambda x: jnp.sin(jax.ad_checkpoint.checkpoint_name(jnp.sin(x), "a")),
            policy=jax.checkpoint_policies.save_only_these_names("a"))
        close(fb.grad(named)(1.0), jax.grad(named)(1.0))

        @jax.custom_vjp
        def h(x):
            return x * 2
        h.defvjp(lambda x: (x * 2, x), lambda r, g: (g * 10,))
        close(fb.grad(h)(1.0), jax.grad(h)(1.0))       # the rule's 10, not the primal's 2
        assert float(fb.grad(h)(1.0)) == 10.0
        close(jax.jit(fb.grad(h))(1.0), 10.0)
        loop = lambda x: jax.lax.scan(lambda c, _: (h(c), None), x, None, length=2)[0]  # noqa
        close(fb.grad(loop)(1.0), jax.grad(loop)(1.0))


def _optimize_remat_sin_for_tan():
    """tan, whose optimize_remat fwd (deliberately) computes sin: which one a
    derivative's primal is shows where JAX swaps the function itself back in."""
    @jax.custom_vjp
    def f(x):
        return jnp.tan(x)
    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.cos(x) * g,),
             optimize_remat=True)
    return f


@pytest.mark.parametrize("where", ["checkpoint", "inside", "none"])
def test_custom_vjp3_optimize_remat_primal_follows_jax(where):
    """Under jax_custom_vjp3, the forward part of a checkpointed region computes
    the function itself (its residuals are recomputed later, so JAX's dead-code
    elimination drops the fwd); elsewhere the fwd's primal is the value."""
    with _flag("jax_custom_vjp3"):
        f = _optimize_remat_sin_for_tan()
        loss = {"checkpoint": lambda x: jax.checkpoint(f)(x) ** 2,
                "inside": lambda x: jax.checkpoint(lambda x: f(x) ** 2)(x),
                "none": lambda x: f(x) ** 2}[where]
        want = jax.value_and_grad(loss)(3.2)
        close(fb.value_and_grad(loss)(3.2), want)
        close(jax.jit(fb.value_and_grad(loss))(3.2), want)
        xs = jnp.array([3.2, 0.3])
        close(jax.vmap(fb.grad(f))(xs), jax.vmap(jax.grad(f))(xs))
    expected_value = jnp.tan(3.2) ** 2 if where != "none" else jnp.sin(3.2) ** 2
    close(want[0], expected_value)


def test_custom_vjp3_in_a_scan_and_forward_mode_of_its_vmap():
    with _flag("jax_custom_vjp3"):
        @jax.custom_vjp
        def f(x):
            return jnp.sin(x)
        f.defvjp(lambda x: (f(x), jnp.cos(x)), lambda c, g: (2 * c * g,))

        def loop(x):
            return jax.lax.scan(lambda c, _: (f(c), None), x, None, length=2)[0]
        close(fb.grad(loop)(3.0), jax.grad(loop)(3.0))
        close(jax.jit(fb.grad(loop))(3.0), jax.grad(loop)(3.0))
        close(fb.grad(fb.grad(loop))(3.0), jax.grad(jax.grad(loop))(3.0))
        batched = lambda x: jax.vmap(loop)(x).sum()  # noqa: E731
        xs = jnp.arange(3.0)
        close(fb.grad(batched)(xs), jax.grad(batched)(xs))
        message = r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp function"
        with pytest.raises(TypeError, match=message):
            jax.jvp(jax.vmap(f), (xs,), (xs,))
        with pytest.raises(TypeError, match=message):
            fb.jvp(jax.vmap(f), (xs,), (xs,))


def test_vmap_of_custom_jvp_with_an_unbatched_output():
    """The function's output ignores its (batched) input, its rule's tangent does
    not: the rule's outputs are the values (as in JAX), so the batch survives."""
    @jax.custom_jvp
    def f(x):
        return np.zeros(x.shape, x.dtype)
    f.defjvp(lambda p, t: (f(p[0]), t[0] * p[0]))
    loss = lambda x: jax.vmap(f)(x).sum()  # noqa: E731
    xs = jnp.arange(3.0) + 1
    want = jax.grad(loss)(xs)
    np.testing.assert_allclose(want, xs)
    for _ in range(4):          # eager calls switch to compiled programs when they repeat
        close(fb.grad(loss)(xs), want)
    close(jax.jit(fb.grad(loss))(xs), want)
    close(jax.jit(jax.vmap(fb.grad(f)))(xs), jax.vmap(jax.grad(f))(xs))
    close(fb.jvp(jax.vmap(f), (xs,), (xs,)), jax.jvp(jax.vmap(f), (xs,), (xs,)))


def test_custom_vjp_cotangent_in_excess_precision_is_passed_on():
    """A bwd may return a float32 cotangent for a bfloat16 input: JAX passes it on
    unchanged, and a checkpoint rounds the values it saves, so the forward and
    backward parts agree (JAX's test_excess_precision_hell)."""
    @jax.custom_vjp
    def dot(x):
        return jnp.dot(x, x)
    dot.defvjp(lambda x: (dot(x), None), lambda _, g: (g,))

    @jax.custom_vjp
    def widen(x):
        return x.astype(jnp.float32)
    widen.defvjp(lambda x: (widen(x), x), lambda x, _: (x.astype(jnp.float32),))

    f = jax.jit(jax.checkpoint(lambda x: widen(dot(x)), policy=lambda *_, **__: True))
    x = (1 + jnp.finfo(jnp.bfloat16).eps) * jnp.eye(2, dtype=jnp.bfloat16)
    for g in (f, lambda x: widen(dot(x))):
        y, vjp_fn = jax.vjp(g, x)
        fy, fb_vjp_fn = fb.vjp(g, x)
        (ct,), (fct,) = vjp_fn(jnp.ones_like(y)), fb_vjp_fn(jnp.ones_like(fy))
        assert fct.dtype == ct.dtype == jnp.float32
        np.testing.assert_array_equal(fy, y)
        np.testing.assert_array_equal(fct, ct)
    y, vjp_fn = fb.vjp(f, x)          # what JAX's test checks: the identity's gradient
    np.testing.assert_array_equal(vjp_fn(jnp.ones_like(y))[0], y)


class _flag:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.old = getattr(jax.config, self.name)
        jax.config.update(self.name, True)

    def __exit__(self, *exc):
        jax.config.update(self.name, self.old)


# ---------------------------------- the user's rank-promotion setting (JAX's tests')
def test_rules_and_layers_work_under_rank_promotion_raise():
    """fbackprop's rules and nn layers never rely on implicit rank promotion, so
    they work under jax_numpy_rank_promotion='raise' (JAX's own test setting).
    The check happens while a function is traced, so both sides run under jit."""
    from fbackprop import nn
    a = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4)), jnp.float32)
    with jax.numpy_rank_promotion("raise"):
        eigvals = lambda a: jnp.sum(jnp.linalg.eigvals(a).real)  # noqa: E731
        close(jax.jit(fb.grad(eigvals))(a), jax.jit(jax.grad(eigvals))(a), tol=1e-4)
        for f in (jnp.linalg.det, lambda a: jax.lax.linalg.lu(a)[0]):
            second = lambda a: fb.vjp(lambda a: jnp.sum(f(a)), a)[1](jnp.float32(1))[0]  # noqa
            close(jax.jit(lambda a: fb.jvp(second, (a,), (a,)))(a),
                  jax.jit(lambda a: jax.jvp(lambda a: jax.vjp(lambda a: jnp.sum(f(a)), a)[1](
                      jnp.float32(1))[0], (a,), (a,)))(a), tol=2e-3)
        params = nn.init_mlp(jax.random.key(0), [3, 8, 2])
        block = nn.init_transformer_block(jax.random.key(1), 8, 2)
        x = jnp.ones((5, 3))
        loss = lambda p: jnp.sum(nn.mlp(p, x) ** 2)  # noqa: E731
        close(jax.jit(fb.grad(loss))(params), jax.jit(jax.grad(loss))(params))
        loss2 = lambda p: jnp.sum(nn.transformer_block(p, jnp.ones((1, 4, 8)), num_heads=2))  # noqa
        close(jax.jit(fb.grad(loss2))(block), jax.jit(jax.grad(loss2))(block), tol=1e-5)
