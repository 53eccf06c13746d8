"""Forward mode and Jacobians: fb.jvp / linearize / jacfwd / jacrev / jacobian against JAX.

Also derivatives of order 3 by nesting. The inner-product identity between our own
JVP and VJP for every spec is in test_rules.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util

import fbackprop as fb

float0 = jax.dtypes.float0


def assert_trees_match(ours, theirs, tol=1e-10):
    """Same tree structure, shapes, dtypes and (for float leaves) values."""
    la, ta = tree_util.tree_flatten(ours)
    lb, tb = tree_util.tree_flatten(theirs)
    assert ta == tb, f"tree structure\n  ours:   {ta}\n  theirs: {tb}"
    for a, b in zip(la, lb):
        da, db = jnp.asarray(a).dtype if not isinstance(a, np.ndarray) else a.dtype, \
            jnp.asarray(b).dtype if not isinstance(b, np.ndarray) else b.dtype
        assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
        assert da == db, (da, db)
        if da != float0:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _rand(rng, tree):
    return tree_util.tree_map(lambda x: rng.standard_normal(np.shape(x)), tree)


@pytest.fixture
def model():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    x = rng.standard_normal((4, 3))

    def net(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"][None, :])
        return {"out": h, "energy": jnp.sum(h * h)}

    return net, params, x


# ----------------------------------------------------------------------- jvp
def test_jvp_matches_jax_on_pytrees(model):
    net, params, x = model
    tangents = _rand(np.random.default_rng(1), (params, x))
    assert_trees_match(fb.jvp(net, (params, x), tangents),
                       jax.jvp(net, (params, x), tangents))
    jitted = jax.jit(lambda p, x, t: fb.jvp(net, (p, x), t))
    assert_trees_match(jitted(params, x, tangents), jax.jvp(net, (params, x), tangents))


def test_jvp_has_aux_and_list_primals(model):
    net, params, x = model

    def f(p, x):
        out = net(p, x)
        return out["out"], {"energy": out["energy"], "n": 3}

    t = _rand(np.random.default_rng(2), [params, x])
    assert_trees_match(fb.jvp(f, [params, x], t, has_aux=True),
                       jax.jvp(f, [params, x], t, has_aux=True))


def test_jvp_python_scalars_and_weak_types():
    ours = fb.jvp(lambda x, y: jnp.sin(x) * y, (0.5, 2.0), (1.0, 0.0))
    theirs = jax.jvp(lambda x, y: jnp.sin(x) * y, (0.5, 2.0), (1.0, 0.0))
    assert_trees_match(ours, theirs)
    assert ours[1].weak_type == theirs[1].weak_type


def _same_values_and_types(ours, theirs):
    """Equal trees whose leaves have the same Python type, dtype and weak type."""
    la, ta = tree_util.tree_flatten(ours)
    lb, tb = tree_util.tree_flatten(theirs)
    assert ta == tb, (ta, tb)
    for a, b in zip(la, lb):
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array)), \
            (a, b)
        if isinstance(b, jax.Array):
            assert (a.dtype, a.weak_type) == (b.dtype, b.weak_type), (a, b)
        if getattr(b, "dtype", None) != float0:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("f, primals, tangents", [
    (lambda x: (jnp.sin(x), 5.0), (1.0,), (1.0,)),                  # a Python output
    (lambda x, y: (x * 2, y), (1.0, 2.0), (1.0, 1.0)),               # Python pass-through
    (lambda x, y: (x, y), (jnp.float32(1.0), np.float32(2.0)),       # NumPy pass-through
     (jnp.float32(1.0), np.float32(1.0))),
    (lambda x: (x * 2, np.ones(2)), (1.0,), (1.0,)),                 # a NumPy output
    (lambda x: x, (1.0,), (np.float64(0.5),)),                        # NumPy tangent
])
def test_jvp_and_linearize_return_what_the_function_returned(f, primals, tangents):
    """Outputs the function returns as they are (Python numbers, NumPy values,
    arguments) come back as they are, and a zero tangent has its primal's weak
    type, as from JAX (library code compares types, e.g. eqx.tree_equal(typematch))."""
    _same_values_and_types(fb.jvp(f, primals, tangents), jax.jvp(f, primals, tangents))
    y, f_jvp = fb.linearize(f, *primals)
    y_ref, f_jvp_ref = jax.linearize(f, *primals)
    _same_values_and_types((y, f_jvp(*tangents)), (y_ref, f_jvp_ref(*tangents)))


def test_jvp_returns_arrays_for_computed_outputs():
    """Only an argument passed through is returned as given: a computed output
    is an array even when its rule forwards the input tangent (add's), as in JAX."""
    f = lambda x: x + 1  # noqa: E731
    _same_values_and_types(fb.jvp(f, (1.0,), (1.0,)), jax.jvp(f, (1.0,), (1.0,)))


def test_jvp_integer_primal_and_output_use_float0():
    f = lambda x, n: (x * n, n + 1)  # noqa: E731
    t = (2.0, np.zeros((), float0))
    ours, theirs = fb.jvp(f, (1.5, 3), t), jax.jvp(f, (1.5, 3), t)
    assert_trees_match(ours, theirs)
    assert ours[1][1].dtype == float0


def test_jvp_through_nested_jit_and_custom_jvp():
    @jax.jit
    def inner(x):
        return jax.nn.relu(x) * jnp.exp(x)

    f = lambda x: jnp.sum(inner(x) ** 2)  # noqa: E731
    x = np.array([-1.0, 0.0, 0.5, 2.0])  # relu's custom rule decides the tangent at 0
    t = np.array([1.0, 1.0, -2.0, 0.5])
    assert_trees_match(fb.jvp(f, (x,), (t,)), jax.jvp(f, (x,), (t,)))
    assert_trees_match(fb.jvp(jax.nn.relu, (x,), (t,)), jax.jvp(jax.nn.relu, (x,), (t,)))


def test_custom_jvp_rule_returning_python_scalar_tangents():
    # A rule may return a Python scalar as a tangent (JAX reads it as an array of
    # the default dtype of its kind), and a float0 zero for an integer output.
    @jax.custom_jvp
    def f(x, y):
        return x, y

    @f.defjvp
    def f_jvp(primals, _):
        x, y = primals
        return (x, y), (2., jax.custom_derivatives.zero_from_primal(y))

    primals, tangents = (2., 3), (np.ones(()), np.zeros((), jax.dtypes.float0))
    for jvp in (fb.jvp, jax.jit(fb.jvp, static_argnums=0)):
        (x, y), (tx, ty) = jvp(f, primals, tangents)
        assert (float(x), int(y), float(tx)) == (2., 3, 2.)
        assert np.asarray(ty).dtype == jax.dtypes.float0

    @jax.custom_jvp
    def g(x):
        return x

    g.defjvp(lambda primals, tangents: (primals[0], "two"))
    for jvp in (fb.jvp, jax.jvp):
        with pytest.raises(TypeError, match="not a valid JAX type"):
            jvp(g, (1.,), (1.,))


def test_jvp_of_custom_vjp_is_refused_clearly():
    @jax.custom_vjp
    def straight_through(x):
        return jnp.round(x)

    straight_through.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))
    with pytest.raises(TypeError, match="custom_vjp"):
        fb.jvp(straight_through, (np.array([0.3]),), (np.array([1.0]),))


@pytest.mark.parametrize("primals,tangents,error,pattern", [
    (np.ones(3), np.ones(3), TypeError, "must be tuples or lists"),
    ((np.ones(3),), [np.ones(3)], TypeError, "same tree structure"),
    (({"w": np.ones(3)},), ({"w": np.ones(4)},), ValueError,
     r"primal shape \(3,\) and tangent shape as \(4,\).*primals\[0\]\['w'\]"),
    ((np.ones(3),), (np.ones(3, np.float32),), TypeError,
     "expected tangent dtype float64, but got tangent dtype float32"),
    ((np.arange(3),), (np.ones(3),), TypeError, "float0"),
    (("a string",), (1.0,), TypeError, "not a valid JAX type"),
])
def test_jvp_input_errors(primals, tangents, error, pattern):
    with pytest.raises(error, match=pattern):
        fb.jvp(lambda *xs: xs[0], primals, tangents)


@pytest.mark.parametrize("primals,tangents", [
    (0.0, (1.0,)),                                    # not a tuple
    ((0.0,), np.array([1.0, 2.0])),
    ((np.float32(2),), ()),                           # another tree structure
    ((np.float32(2),), [np.float32(2)]),
    ((np.float16(2),), (np.float32(4),)),             # another dtype
    ((np.ones(3, np.float32),), (np.ones(4, np.float32),)),   # another shape
])
def test_jvp_misuse_is_reported_in_jax_jvp_words(primals, tangents):
    """The same exception as jax.jvp, with JAX's sentence (code matching JAX's
    messages keeps working), then what fbackprop adds: where, and the fix."""
    f = lambda *xs: xs[0]  # noqa: E731
    with pytest.raises((TypeError, ValueError)) as want:
        jax.jvp(f, primals, tangents)
    with pytest.raises(want.type) as got:
        fb.jvp(f, primals, tangents)
    key = str(want.value).split(";")[0]
    assert key in str(got.value)
    assert len(str(got.value)) > len(key) + 40


# ----------------------------------------------------------------- linearize
def test_linearize_matches_jax_and_is_reusable(model):
    net, params, x = model
    y, f_jvp = fb.linearize(net, params, x)
    y_ref, f_jvp_ref = jax.linearize(net, params, x)
    assert_trees_match(y, y_ref)
    rng = np.random.default_rng(3)
    for _ in range(2):
        t = _rand(rng, (params, x))
        assert_trees_match(f_jvp(*t), f_jvp_ref(*t))
    # jvp_fn is a pytree (its residuals are leaves): it can cross a jit boundary.
    t = _rand(rng, (params, x))
    assert_trees_match(jax.jit(lambda fn, t: fn(*t))(f_jvp, t), f_jvp_ref(*t))


def test_linearize_does_not_recompute_the_primal():
    f = lambda x: jnp.sin(jnp.exp(x)) * 3.0  # noqa: E731
    _, f_jvp = fb.linearize(f, np.array([0.1, 0.2]))
    tangent_prims = {e.primitive.name for e in f_jvp.func.prog.tangent_jaxpr.eqns}
    assert tangent_prims <= {"mul", "neg", "add"}, tangent_prims
    np.testing.assert_allclose(f_jvp(np.array([1.0, 0.0])),
                               jax.jvp(f, (np.array([0.1, 0.2]),),
                                       (np.array([1.0, 0.0]),))[1])


def test_linearize_has_aux_and_jit():
    def f(x):
        return jnp.sum(jnp.tanh(x)), {"mean": jnp.mean(x)}

    x = np.linspace(-1.0, 1.0, 5)
    y, f_jvp, aux = fb.linearize(f, x, has_aux=True)
    y_ref, f_jvp_ref, aux_ref = jax.linearize(f, x, has_aux=True)
    assert_trees_match((y, aux), (y_ref, aux_ref))
    assert_trees_match(f_jvp(np.ones(5)), f_jvp_ref(np.ones(5)))

    @jax.jit
    def under_jit(x, t):
        _, fn = fb.linearize(lambda x: jnp.tanh(x) * x, x)
        return fn(t)

    assert_trees_match(under_jit(x, np.ones(5)), jax.jvp(lambda x: jnp.tanh(x) * x, (x,),
                                                          (np.ones(5),))[1])


def test_linearize_tangent_errors():
    _, f_jvp = fb.linearize(lambda x, y: x * y, np.ones(3), np.ones(3))
    with pytest.raises(TypeError, match="one tangent per primal"):
        f_jvp(np.ones(3))
    with pytest.raises(ValueError, match=r"float64\[4\].*tangents\[1\].*float64\[3\]"):
        f_jvp(np.ones(3), np.ones(4))


def test_linearize_of_custom_vjp_as_jax():
    """jax.linearize accepts a custom_vjp function: the primal outputs are its fwd
    rule's, and only evaluating the linear map on a tangent that reaches it raises
    (a linear map whose outputs it does not reach runs)."""
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    # fwd's primal output differs from f's on purpose: JAX returns fwd's.
    f.defvjp(lambda x: (jnp.sin(x) + 100.0, jnp.cos(x)), lambda c, g: (2 * g * c,))
    reaching = lambda x, y: (f(x) * 2 + y ** 2, y * 3)  # noqa: E731
    not_reaching = [lambda x, y: (f(x), y * 3)[1],
                    lambda x, y: jax.lax.stop_gradient(f(x)) + y]
    x, y, t = np.float32(1.0), np.float32(2.0), (np.float32(0.5), np.float32(1.0))
    for fn in [reaching] + not_reaching:
        for lin in (fb.linearize, jax.jit(fb.linearize, static_argnums=0)):
            out, f_jvp = lin(fn, x, y)
            out_ref, f_jvp_ref = jax.linearize(fn, x, y)
            assert_trees_match(out, out_ref, tol=1e-6)
            if fn is reaching:
                with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
                    f_jvp(*t)
                with pytest.raises(TypeError, match=r"custom_vjp function \('f' at "):
                    jax.jit(f_jvp)(*t)
            else:
                assert_trees_match(f_jvp(*t), f_jvp_ref(*t), tol=1e-6)
    with pytest.raises(TypeError, match="custom_vjp"):        # jvp itself still refuses
        fb.jvp(reaching, (x, y), t)


# ----------------------------------------------------------------- Jacobians
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1,)])
@pytest.mark.parametrize("jac", ["jacfwd", "jacrev", "jacobian"])
def test_jacobians_match_jax_on_pytrees(model, jac, argnums):
    net, params, x = model
    ours = getattr(fb, jac)(net, argnums)(params, x)
    theirs = getattr(jax, jac)(net, argnums)(params, x)
    assert_trees_match(ours, theirs)


@pytest.mark.parametrize("jac", ["jacfwd", "jacrev"])
def test_jacobians_has_aux_kwargs_and_jit(model, jac):
    net, params, x = model

    def f(p, x, scale=1.0):
        out = net(p, x)
        return out["out"] * scale, {"energy": out["energy"]}

    ours = jax.jit(getattr(fb, jac)(f, has_aux=True))(params, x, scale=2.0)
    theirs = getattr(jax, jac)(f, has_aux=True)(params, x, scale=2.0)
    assert_trees_match(ours, theirs)


def test_jacrev_allow_int_and_input_checks():
    f = lambda x, n: x * n  # noqa: E731
    x, n = np.ones(2), np.arange(2)
    assert_trees_match(fb.jacrev(f, (0, 1), allow_int=True)(x, n),
                       jax.jacrev(f, (0, 1), allow_int=True)(x, n))
    with pytest.raises(TypeError, match="allow_int"):
        fb.jacrev(f, 1)(x, n)
    with pytest.raises(TypeError, match="jacfwd requires real-valued inputs"):
        fb.jacfwd(f, 1)(x, n)
    with pytest.raises(TypeError, match="argnums"):
        fb.jacfwd(f, 2)(x, n)


def test_jacrev_of_scalar_and_tuple_outputs_and_holomorphic():
    f = lambda x: (jnp.sum(x ** 3), x[:2] * 2.0)  # noqa: E731
    x = np.array([1.0, 2.0, 3.0])
    for jac in ("jacfwd", "jacrev"):
        assert_trees_match(getattr(fb, jac)(f)(x), getattr(jax, jac)(f)(x))
    z = np.array([1.0 + 2.0j, -0.5 + 0.1j])
    g = lambda z: z * z + 3.0 * z  # noqa: E731
    for jac in ("jacfwd", "jacrev"):
        assert_trees_match(getattr(fb, jac)(g, holomorphic=True)(z),
                           getattr(jax, jac)(g, holomorphic=True)(z))


# ----------------------------------------------------------- higher order
def _scalar_fn(x):
    return jnp.sum(jnp.sin(x) * jnp.exp(0.3 * x) + x ** 3 / (1.0 + x * x))


def test_third_order_by_nesting():
    """fbackprop nested eagerly (its define-by-run traces inside one another), against
    JAX's same nesting compiled once."""
    x = np.array([0.3, -0.7, 1.1])
    v = np.array([1.0, 0.5, -2.0])

    def cases(grad, jvp, jacfwd, jacrev):
        return [
            (grad(grad(grad(_scalar_fn)))(0.4), 1e-9),
            (jvp(grad(_scalar_fn), (x,), (v,)), 1e-9),
            (jacfwd(jacrev(_scalar_fn))(x), 1e-9),
            (jacfwd(jacfwd(jacrev(_scalar_fn)))(x), 1e-8),
            (jacrev(jacrev(grad(_scalar_fn)))(x), 1e-8),
            # Reverse over forward as well.
            (grad(lambda x: jvp(_scalar_fn, (x,), (v,))[1])(x), 1e-9),
        ]

    ours = cases(fb.grad, fb.jvp, fb.jacfwd, fb.jacrev)
    theirs = jax.jit(lambda: [c for c, _ in cases(jax.grad, jax.jvp, jax.jacfwd,
                                                   jax.jacrev)])()
    for (a, tol), b in zip(ours, theirs):
        assert_trees_match(a, b, tol)
