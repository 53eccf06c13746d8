"""grad / value_and_grad / vjp: JAX's semantics on pytrees, composition, bad input."""

import collections
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbackprop as fb


def loss(params, x):
    h = jnp.sin(x * params["w"] + params["b"])
    return jnp.sum(jnp.exp(h) * params["w"])


PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.arange(3.0)}
X = jnp.linspace(0.1, 0.6, 6).reshape(2, 3)


def test_seed_scalar_graph():
    def f(x, y):
        z = x * y
        w = z + x
        return w * w
    value, (gx, gy) = fb.value_and_grad(f, argnums=(0, 1))(2.0, 3.0)
    assert (value, gx, gy) == (64.0, 64.0, 32.0)


def test_seed_three_inputs():
    def y(x):
        a = x[0] * x[1] + x[2]
        return a * a
    np.testing.assert_allclose(fb.grad(y)(jnp.array([2.0, -3.0, 0.5])), [33.0, -22.0, -11.0])


def test_pytree_dict_params():
    chex.assert_trees_all_close(fb.grad(loss)(PARAMS, X), jax.grad(loss)(PARAMS, X))


def test_argnums_tuple_and_negative():
    ours = fb.grad(loss, argnums=(0, -1))(PARAMS, X)
    theirs = jax.grad(loss, argnums=(0, -1))(PARAMS, X)
    assert isinstance(ours, tuple) and len(ours) == 2
    chex.assert_trees_all_close(ours, theirs)


Point = collections.namedtuple("Point", "x y")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    w: jax.Array
    b: jax.Array


def test_namedtuple_dataclass_list_none():
    def f(tree):
        p, layer, lst, none = tree
        assert none is None
        return jnp.sum(p.x * p.y) + jnp.sum(jnp.sin(layer.w) * layer.b) + lst[0] * lst[1]

    tree = (Point(jnp.ones(3), jnp.arange(3.0)), Layer(jnp.ones((2,)), jnp.arange(2.0)),
            [2.0, 3.0], None)
    ours, theirs = fb.grad(f)(tree), jax.grad(f)(tree)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    chex.assert_trees_all_close(ours, theirs)


def test_has_aux():
    def f(x):
        return jnp.sum(x * x), {"mean": jnp.mean(x)}
    (v, aux), g = fb.value_and_grad(f, has_aux=True)(X)
    (v2, aux2), g2 = jax.value_and_grad(f, has_aux=True)(X)
    chex.assert_trees_all_close((v, aux, g), (v2, aux2, g2))
    g3, aux3 = fb.grad(f, has_aux=True)(X)
    chex.assert_trees_all_close((g3, aux3), (g2, aux2))


def test_kwargs_are_not_differentiated():
    def f(x, *, scale):
        return jnp.sum(x * scale)
    np.testing.assert_allclose(fb.grad(f)(X, scale=3.0), jnp.full(X.shape, 3.0))


def test_static_python_values_in_nondiff_args():
    def f(x, n, mode):
        out = x
        for _ in range(n):
            out = jnp.sin(out)
        return jnp.sum(out) if mode == "sum" else jnp.sum(out * out)
    for n, mode in [(2, "sum"), (3, "sq")]:
        np.testing.assert_allclose(fb.grad(f)(X, n, mode), jax.grad(f)(X, n, mode), rtol=1e-6)


def test_allow_int_gives_float0():
    g = fb.grad(lambda x, i: x * i, argnums=(0, 1), allow_int=True)(1.5, 2)
    gj = jax.grad(lambda x, i: x * i, argnums=(0, 1), allow_int=True)(1.5, 2)
    assert g[1].dtype == jax.dtypes.float0 == gj[1].dtype
    assert g[0] == gj[0]


def test_vjp_reusable_retain_graph():
    out, vjp_fn = fb.vjp(lambda x: jnp.sin(x) * x, X)
    g1 = vjp_fn(jnp.ones_like(out))[0]
    g2 = vjp_fn(jnp.ones_like(out))[0]
    np.testing.assert_allclose(g1 + g2, 2 * jax.grad(lambda x: jnp.sum(jnp.sin(x) * x))(X),
                               rtol=1e-6)


def test_vjp_pytree_out_and_aux():
    def f(x, y):
        return {"a": x * y, "b": (jnp.sin(x),)}, jnp.sum(y)
    out, vjp_fn, aux = fb.vjp(f, X, X + 1, has_aux=True)
    out2, vjp_fn2, aux2 = jax.vjp(f, X, X + 1, has_aux=True)
    ct = jax.tree_util.tree_map(lambda o: jnp.cos(o), out)
    chex.assert_trees_all_close((out, aux, vjp_fn(ct)), (out2, aux2, vjp_fn2(ct)))


def test_vjp_integer_output_takes_float0():
    out, vjp_fn = fb.vjp(lambda x: (x * 2, jnp.argmax(x) if False else jnp.int32(1)), X)
    ct = (jnp.ones_like(out[0]), np.zeros((), jax.dtypes.float0))
    np.testing.assert_allclose(vjp_fn(ct)[0], 2 * jnp.ones_like(X))


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad_of_jit", "grad_of_vmap"])
def test_composition(transform):
    f = lambda x: jnp.sum(jnp.sin(x) * jnp.exp(x))  # noqa: E731
    if transform == "jit":
        ours, theirs = jax.jit(fb.grad(f))(X), jax.grad(f)(X)
    elif transform == "vmap":
        ours, theirs = jax.vmap(fb.grad(f))(X), jax.vmap(jax.grad(f))(X)
    elif transform == "grad_of_jit":
        ours, theirs = fb.grad(jax.jit(f))(X), jax.grad(f)(X)
    else:
        g = lambda x: jnp.sum(jax.vmap(lambda r: jnp.sin(r) * r)(x))  # noqa: E731
        ours, theirs = fb.grad(g)(X), jax.grad(g)(X)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_third_order_nesting():
    f = lambda x: jnp.sin(x) * jnp.exp(x) * x  # noqa: E731
    for x in [0.3, -1.2]:
        ours = fb.grad(fb.grad(fb.grad(f)))(x)
        theirs = jax.grad(jax.grad(jax.grad(f)))(x)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
        np.testing.assert_allclose(jax.jit(fb.grad(fb.grad(fb.grad(f))))(x), theirs, rtol=1e-5)


def test_sum_of_squares_twice_gives_two():
    assert fb.grad(fb.grad(lambda x: x * x))(5.0) == 2.0


def test_closure_over_outer_tracer():
    # The inner function closes over y, a tracer of the outer differentiation.
    def outer(y):
        return fb.grad(lambda x: jnp.sin(x * y))(0.5)
    np.testing.assert_allclose(fb.grad(outer)(1.3), jax.grad(
        lambda y: jax.grad(lambda x: jnp.sin(x * y))(0.5))(1.3), rtol=1e-6)


def test_custom_jvp_relu_at_zero_like_jax():
    assert fb.grad(lambda x: jax.nn.relu(x))(0.0) == jax.grad(jax.nn.relu)(0.0) == 0.0
    assert fb.grad(jax.nn.relu)(2.0) == 1.0


def test_custom_jvp_output_with_a_symbolic_zero_tangent_is_not_differentiated():
    """An output whose tangent the custom_jvp rule gives as a symbolic zero is no
    differentiated value (under jax.grad it is no JVP tracer), also in a
    program-only recording (eager fb.linearize), which runs no rule handler: a
    custom_jvp function that refuses a tangent can take it."""
    from jax.custom_derivatives import SymbolicZero

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x), jnp.cos(x)

    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), (jnp.cos(x) * t, SymbolicZero(jax.typeof(x).to_tangent_aval()))
    f.defjvp(f_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def refuses_tangents(y):
        return y * 2.0

    def refuses_jvp(primals, tangents):
        if type(tangents[0]) is not SymbolicZero:
            raise RuntimeError("refuses_tangents got a tangent")
        return refuses_tangents(primals[0]), tangents[0]
    refuses_tangents.defjvp(refuses_jvp, symbolic_zeros=True)

    def loss(x):
        a, b = f(x)
        return jnp.sum(a * refuses_tangents(b))

    x, t = jnp.array([0.3, 1.2]), jnp.array([1.0, -0.5])
    expected = jax.grad(loss)(x)
    for grad in (fb.grad(loss), jax.jit(fb.grad(loss))):
        np.testing.assert_allclose(grad(x), expected, rtol=1e-12)
    for lin in (fb.linearize, jax.jit(fb.linearize, static_argnums=0)):
        y, f_lin = lin(loss, x)
        y_ref, f_lin_ref = jax.linearize(loss, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12)
        np.testing.assert_allclose(f_lin(t), f_lin_ref(t), rtol=1e-12)


@pytest.mark.parametrize("act", [jax.nn.relu, jax.nn.relu6], ids=["relu", "relu6"])
def test_known_custom_jvp_activations_match_jax_at_their_kinks(act):
    # Under jit, relu and relu6 use fbackprop's own VJP (not JAX's rule run and
    # transposed); the gradient is JAX's, including 0 at the kinks.
    x = jnp.array([-2.0, -0.0, 0.0, 0.5, 3.0, 6.0, 7.0])
    f = lambda x: jnp.sum(act(x) ** 2 + act(2 * x))  # noqa: E731
    expected = jax.grad(f)(x)
    np.testing.assert_array_equal(jax.jit(fb.grad(f))(x), expected)
    from fbackprop._src import eager
    eager.clear()
    for _ in range(4):   # op by op, then as a compiled program once the program repeats
        np.testing.assert_array_equal(fb.grad(f)(x), expected)
    assert eager.stats["hits"] >= 1
    g = lambda x: jnp.sum(act(x) * jnp.sin(x))  # noqa: E731
    hvp_expected = jax.jvp(jax.grad(g), (x,), (x + 1.0,))[1]
    for _ in range(4):
        np.testing.assert_allclose(fb.hvp(g, (x,), (x + 1.0,))[0], hvp_expected, rtol=1e-6)
    assert eager.stats["hvp_hits"] >= 1
    np.testing.assert_array_equal(jax.vmap(fb.grad(f))(jnp.stack([x, -x])),
                                  jax.vmap(jax.grad(f))(jnp.stack([x, -x])))
    np.testing.assert_array_equal(jax.jit(fb.hessian(f))(x), jax.hessian(f)(x))


def test_known_custom_jvp_is_recognized_by_its_rule():
    from jax.extend.core.primitives import custom_jvp_call_p as prim

    from fbackprop._src import registry

    captured = []   # the wrapped fun and jvp that a call of relu binds
    original = type(prim).bind_with_trace

    def spy(self, trace, args, avals, params):
        captured.append(params["subfuns"])
        return original(self, trace, args, avals, params)

    type(prim).bind_with_trace = spy
    try:
        jax.make_jaxpr(lambda x: jax.nn.relu(x))(1.0)
    finally:
        type(prim).bind_with_trace = original
    assert registry.known_custom_jvp(*captured[0]) is not None
    # A redefined rule is the user's: it runs (and is transposed) as written.
    rule = jax.nn.relu.jvp
    jax.nn.relu.defjvps(lambda g, ans, x: 3.0 * g)
    try:
        assert registry.known_custom_jvp(*captured[0]) is None
        assert jax.jit(fb.grad(jax.nn.relu))(-1.0) == 3.0
    finally:
        jax.nn.relu.jvp = rule
    assert jax.jit(fb.grad(jax.nn.relu))(-1.0) == 0.0


def test_custom_vjp_runs_user_rule():
    @jax.custom_vjp
    def clip_grad(x):
        return x

    clip_grad.defvjp(lambda x: (x, None), lambda _, ct: (jnp.clip(ct, -1.0, 1.0),))
    f = lambda x: jnp.sum(clip_grad(x) * 5.0)  # noqa: E731
    np.testing.assert_allclose(fb.grad(f)(X), jnp.ones_like(X))
    np.testing.assert_allclose(jax.jit(fb.grad(f))(X), jnp.ones_like(X))


def test_never_calls_jax_autodiff(no_jax_autodiff):
    f = lambda p, x: jnp.sum(jax.nn.relu(x * p["w"] + p["b"]))  # noqa: E731
    g = fb.grad(f)(PARAMS, X)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(PARAMS)
    fb.grad(fb.grad(lambda x: jnp.sin(x) * x))(0.4)
    jax.jit(fb.grad(f))(PARAMS, X)


def test_grad_runs_the_function_itself_without_staging_it():
    """Like jax.grad: no separate tracing step, eagerly or under a transformation,
    so every call sees the function's current globals."""
    from fbackprop._src import trace
    scale = {"k": 2.0}
    f = lambda x: jnp.sum(jnp.sin(x)) * scale["k"]  # noqa: E731
    gf = fb.grad(f)
    before = trace.trace_count
    g1 = gf(X)
    scale["k"] = 3.0
    g2 = gf(X)
    np.testing.assert_allclose(g2, 1.5 * g1, rtol=1e-6)
    jax.make_jaxpr(lambda x: gf(x) * 2.0)(X)
    assert trace.trace_count == before


def test_deep_graph_has_no_recursion_limit():
    # 20x Python's default recursion limit: a recursive sweep would fail here.
    n = 20_000

    def f(x):
        for _ in range(n // 2):
            x = x * 1.0000001
            x = x + 1e-9
        return x
    g = fb.grad(f)(jnp.float32(1.0))
    assert np.isfinite(g) and abs(float(g) - 1.0) < 0.02


# ------------------------------------------------------------------- bad input
def test_non_scalar_output_error():
    with pytest.raises(TypeError, match=r"scalar-output.*shape: \(2, 3\).*vjp"):
        fb.grad(lambda x: x * 2)(X)


def test_integer_input_error():
    with pytest.raises(TypeError, match="allow_int"):
        fb.grad(lambda x: x * 2.0)(3)


def test_integer_output_error():
    with pytest.raises(TypeError, match="real-valued outputs.*int"):
        fb.grad(lambda x: jnp.int32(1) + jnp.sum(x).astype(jnp.int32))(X)


@pytest.mark.parametrize("argnums", [2, -3])
def test_argnums_out_of_range(argnums):
    with pytest.raises(TypeError, match="argnums"):
        fb.grad(lambda x, y: x * y, argnums=argnums)(1.0, 2.0)


def test_argnums_wrong_type():
    with pytest.raises(TypeError, match="argnums"):
        fb.grad(lambda x: x, argnums=1.5)(1.0)


def test_non_array_input_error():
    with pytest.raises(TypeError, match=r"args\[0\].*str.*not a valid JAX type"):
        fb.grad(lambda x: 1.0)("a")


def test_non_array_output_error():
    with pytest.raises(TypeError, match="returned a str"):
        fb.grad(lambda x: "loss")(1.0)


def test_vjp_cotangent_wrong_structure():
    _, vjp_fn = fb.vjp(lambda x: (x, x * 2), 1.0)
    with pytest.raises(ValueError, match="tree structure"):
        vjp_fn((1.0,))


def test_vjp_cotangent_wrong_shape_and_dtype():
    _, vjp_fn = fb.vjp(lambda x: x * 2, jnp.ones(3, jnp.float32))
    with pytest.raises(ValueError, match=r"float32\[3\]"):
        vjp_fn(jnp.ones(2, jnp.float32))
    with pytest.raises(ValueError, match=r"int32"):
        vjp_fn(jnp.ones(3, jnp.int32))


def test_holomorphic_requires_complex_inputs():
    with pytest.raises(TypeError, match="holomorphic"):
        fb.grad(lambda x: x * x, holomorphic=True)(1.0)


def test_missing_rule_error_names_primitive_and_line():
    from jax.extend.core import Primitive
    from jax.interpreters import mlir
    p = Primitive("fb_test_unruled")
    p.def_impl(lambda x: x)
    p.def_abstract_eval(lambda x: x)
    mlir.register_lowering(p, mlir.lower_fun(lambda x: x, multiple_results=False))

    def f(x):
        return p.bind(x) * 2.0
    with pytest.raises(NotImplementedError, match=r"fb_test_unruled(.|\n)*test_api.py(.|\n)*defvjp"):
        fb.grad(f)(1.0)


def test_user_registered_rule():
    from jax.extend.core import Primitive
    from jax.interpreters import mlir
    cube = Primitive("fb_test_cube")
    cube.def_impl(lambda x: x ** 3)
    cube.def_abstract_eval(lambda x: x)
    mlir.register_lowering(cube, mlir.lower_fun(lambda x: x ** 3, multiple_results=False))
    fb.extend.defvjp(cube, lambda ct, out, x: ct * 3.0 * x * x)
    try:
        assert fb.grad(cube.bind)(2.0) == 12.0
        assert jax.jit(fb.grad(cube.bind))(2.0) == 12.0
    finally:
        # the rule tables are global; the coverage tests must not see this one
        from fbackprop._src import registry
        registry.vjp_rules.pop("fb_test_cube")


def test_holomorphic_and_complex_inputs_like_jax():
    f = lambda z: jnp.sin(z) * z + jnp.exp(z) / z  # noqa: E731
    z = jnp.complex64(1 + 0.5j)
    np.testing.assert_allclose(fb.grad(f, holomorphic=True)(z),
                               jax.grad(f, holomorphic=True)(z), rtol=1e-5)
    h = lambda z: jnp.real(z * jnp.conj(z)) + jnp.imag(z) ** 2  # noqa: E731
    np.testing.assert_allclose(fb.grad(h)(z), jax.grad(h)(z), rtol=1e-6)
    g = lambda x: jnp.abs(jnp.sum(jnp.exp(1j * x) * x)) ** 2  # noqa: E731
    x = jnp.arange(3.0)
    np.testing.assert_allclose(fb.grad(g)(x), jax.grad(g)(x), rtol=1e-5)


def test_complex_output_without_holomorphic_is_refused():
    with pytest.raises(TypeError, match="holomorphic=True"):
        fb.grad(lambda x: x * 1j)(1.0)
