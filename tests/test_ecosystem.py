"""Popular JAX libraries differentiated by fbackprop, compared with JAX.

Each case is a loss written with a library (Flax NNX and linen, Equinox, Haiku,
lineax, optimistix, diffrax); fbackprop's gradient, eagerly and under
``jax.jit``, is compared with ``jax.grad`` and (where cheap) its JVP with
``jax.jvp``. lineax/optimistix/diffrax bind primitives of their own: those are
differentiated with the library's own JVP rules, transposed by fbackprop
(``fbackprop/_src/rules/foreign.py``).

Needs the ``ecosystem`` extra (``make test`` installs it); a missing library
skips its cases.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbackprop as fb

pytestmark = pytest.mark.ecosystem


@pytest.fixture(autouse=True)
def _users_default_precision():
    """The libraries at their users' default (the rest of the suite turns x64 on)."""
    with jax.enable_x64(False):
        yield


def _tree_max_diff(a, b):
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)),
                                                   initial=0.0)), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def _check(loss, *args, rtol=2e-5, atol=2e-6, jvp=True, argnums=0):
    """fbackprop's gradient (eager and jitted) and JVP equal JAX's.

    Returns the largest difference to ``jax.grad`` (eager).
    """
    expected = jax.grad(loss, argnums=argnums)(*args)
    eager = fb.grad(loss, argnums=argnums)(*args)
    for got in (eager, jax.jit(fb.grad(loss, argnums=argnums))(*args)):
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=rtol, atol=atol),
                     got, expected)
    if jvp:
        t = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape),
                         args)
        (p_ref, t_ref), (p, tt) = jax.jvp(loss, args, t), fb.jvp(loss, args, t)
        np.testing.assert_allclose(p, p_ref, rtol=rtol, atol=atol)
        np.testing.assert_allclose(tt, t_ref, rtol=rtol, atol=atol)
    diff = _tree_max_diff(eager, expected)
    print(f"[ecosystem] max |fb.grad - jax.grad| = {diff:.3g}")
    return diff


F32 = jnp.float32


# ---------------------------------------------------------------------- Flax
def test_flax_nnx_model_via_split_merge():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 16, rngs=rngs)
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.l2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.gelu(self.norm(self.l1(x))))

    graphdef, params = nnx.split(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (5, 6), F32)

    def loss(params, x):
        return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

    _check(loss, params, x, jvp=False)


def test_flax_linen_scan_model():
    nn = pytest.importorskip("flax.linen")

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, h, x):
            h = jnp.tanh(nn.Dense(8)(h) + nn.Dense(8)(x))
            return h, nn.Dense(2)(h)

    class RNN(nn.Module):
        @nn.compact
        def __call__(self, xs):
            scan = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False},
                           in_axes=0, out_axes=0)
            _, ys = scan()(jnp.zeros(8), xs)
            return ys

    xs = jax.random.normal(jax.random.key(0), (7, 3), F32)
    params = RNN().init(jax.random.key(1), xs)
    loss = lambda p, xs: jnp.sum(RNN().apply(p, xs) ** 2)
    _check(loss, params, xs, jvp=False)


# ------------------------------------------------------------------- Equinox
def test_equinox_mlp_conv_attention_via_partition_combine():
    eqx = pytest.importorskip("equinox")
    k = jax.random.split(jax.random.key(0), 4)

    class Model(eqx.Module):
        conv: eqx.nn.Conv1d
        attn: eqx.nn.MultiheadAttention
        mlp: eqx.nn.MLP

        def __call__(self, x):                     # x: (channels=2, length=6)
            h = jax.nn.relu(self.conv(x)).T          # (6, 4)
            h = h + self.attn(h, h, h)
            return jax.vmap(self.mlp)(h).sum()

    model = Model(eqx.nn.Conv1d(2, 4, 3, padding=1, key=k[0]),
                  eqx.nn.MultiheadAttention(2, 4, key=k[1]),
                  eqx.nn.MLP(4, 1, 8, 2, key=k[2]))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.normal(k[3], (2, 6), F32)
    loss = lambda p, x: eqx.combine(p, static)(x) ** 2
    _check(loss, params, x, jvp=False)


def test_equinox_batchnorm_with_an_axis_name():
    eqx = pytest.importorskip("equinox")
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, axis_name="batch")
    params, static = eqx.partition(bn, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(0), (8, 3), F32) * 2 + 1

    def loss(p, x):
        out, _ = jax.vmap(eqx.combine(p, static), axis_name="batch",
                          in_axes=(0, None), out_axes=(0, None))(x, state)
        return jnp.sum(jnp.sin(out) * jnp.arange(3.0))

    _check(loss, params, x, jvp=False, argnums=(0, 1))


# --------------------------------------------------------------------- Haiku
def test_haiku_transformed_net():
    hk = pytest.importorskip("haiku")

    def net(x):
        x = hk.Linear(16)(x)
        x = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
        return hk.Linear(1)(jax.nn.swish(x))

    f = hk.without_apply_rng(hk.transform(net))
    x = jax.random.normal(jax.random.key(0), (4, 5), F32)
    params = f.init(jax.random.key(1), x)
    loss = lambda p, x: jnp.mean(f.apply(p, x) ** 2)
    _check(loss, params, x, jvp=False)


# ----------------------------------------------------- lineax and optimistix
def _spd(n):
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    return jnp.asarray(a @ a.T + n * np.eye(n, dtype=np.float32))


@pytest.mark.parametrize("solver", ["LU", "CG"])
def test_lineax_solve(solver):
    lx = pytest.importorskip("lineax")
    n = 5

    def loss(a, b):
        if solver == "LU":
            op, s = lx.MatrixLinearOperator(a), lx.LU()
        else:
            op = lx.MatrixLinearOperator(a @ a.T + n * jnp.eye(n, dtype=a.dtype),
                                         lx.positive_semidefinite_tag)
            s = lx.CG(rtol=1e-7, atol=1e-7, max_steps=200)
        return jnp.sum(jnp.sin(lx.linear_solve(op, b, s).value))

    a, b = _spd(n), jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
    _check(loss, a, b, rtol=1e-4, atol=1e-5, argnums=(0, 1))


def test_optimistix_newton_root_find():
    optx = pytest.importorskip("optimistix")

    def loss(theta):
        fn = lambda y, th: jnp.tanh(y) + y ** 3 - th
        sol = optx.root_find(fn, optx.Newton(rtol=1e-7, atol=1e-7), jnp.zeros_like(theta),
                             args=theta)
        return jnp.sum(sol.value ** 2)

    _check(loss, jnp.array([0.3, -1.2, 2.0], F32), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------- diffrax
@pytest.mark.parametrize("adjoint", ["RecursiveCheckpointAdjoint", "DirectAdjoint"])
def test_diffrax_tsit5(adjoint):
    dfx = pytest.importorskip("diffrax")

    def loss(y0, k):
        term = dfx.ODETerm(lambda t, y, k: -k * y + jnp.sin(t))
        sol = dfx.diffeqsolve(term, dfx.Tsit5(), 0.0, 1.0, 0.1, y0, args=k,
                              stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
                              saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 1.0, 4, dtype=F32)),
                              adjoint=getattr(dfx, adjoint)(), max_steps=64)
        return jnp.sum(sol.ys ** 2)

    y0, k = jnp.array([1.0, -0.5], F32), jnp.array([0.7, 1.3], F32)
    _check(loss, y0, k, rtol=1e-4, atol=1e-6, argnums=(0, 1), jvp=adjoint == "DirectAdjoint")


def test_diffrax_tsit5_implicit_adjoint_at_a_steady_state():
    dfx = pytest.importorskip("diffrax")

    def loss(k):
        term = dfx.ODETerm(lambda t, y, k: k - y)
        sol = dfx.diffeqsolve(term, dfx.Tsit5(), 0.0, jnp.inf, 0.1, jnp.array([1.0, 2.0], F32),
                              args=k, adjoint=dfx.ImplicitAdjoint(), max_steps=None,
                              stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
                              event=dfx.Event(dfx.steady_state_event()))
        return jnp.sum(jnp.sin(sol.ys))

    _check(loss, jnp.array([0.5, 3.0], F32), rtol=1e-4, atol=1e-6, jvp=False)


def test_explain_and_saved_residuals_name_the_library_whose_rule_runs():
    lx = pytest.importorskip("lineax")

    def loss(a, b):
        return jnp.sum(lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.LU()).value ** 2)

    a, b = _spd(3), jnp.ones(3, F32)
    assert "linear_solve<lineax>(" in str(fb.explain(loss, a, b))
    report = str(fb.saved_residuals(loss, a, b))
    assert "rule from lineax" in report
    # fbackprop's own rules are never attributed to a library.
    assert "rule from" not in str(fb.saved_residuals(lambda a: jnp.sum(jnp.sin(a) ** 2), a))


# ------------------------------------- library code that calls jax.jvp/linearize
@pytest.fixture
def libraries_call_fbackprop(monkeypatch):
    """``jax.jvp`` & co. as library code reaches them (the ``jax`` package's
    attributes) are fbackprop's for the test's duration; JAX's own code calls its
    internal ``api`` module and keeps JAX's. Returns JAX's originals."""
    originals = {}
    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize"):
        originals[name] = getattr(jax, name)
        monkeypatch.setattr(jax, name, getattr(fb, name))
    return originals


@contextlib.contextmanager
def _jax_s_own(originals):
    """JAX's own entry points back on ``jax`` inside the block (the reference)."""
    rerouted = {n: getattr(jax, n) for n in originals}
    for n, f in originals.items():
        setattr(jax, n, f)
    try:
        yield
    finally:
        for n, f in rerouted.items():
            setattr(jax, n, f)


def test_equinox_filter_jvp_keeps_fbackprop_tangents(libraries_call_fbackprop):
    """eqx.filter_jvp keeps the outputs that are JVP tracers of its trace: with
    fbackprop's jvp underneath, its tracers must count as such (else every tangent
    is silently None)."""
    eqx = pytest.importorskip("equinox")
    f = lambda x, y, s: (jnp.sin(x) * y, 5.0, x, s)  # noqa: E731
    x, y = jnp.array([1.0, 2.0], F32), jnp.array(3.0, F32)
    ours = eqx.filter_jvp(f, (x, y, "tag"), (jnp.ones(2, F32), None, None))
    with _jax_s_own(libraries_call_fbackprop):
        theirs = eqx.filter_jvp(f, (x, y, "tag"), (jnp.ones(2, F32), None, None))
    assert ours[1][0] is not None and ours[1][2] is not None
    # Same structure, values, and types (the Python 5.0 stays a Python float).
    assert bool(eqx.tree_equal(ours, theirs, typematch=True, rtol=1e-6, atol=1e-6))


def test_library_jvps_under_fbackprop_give_jax_gradients(libraries_call_fbackprop):
    """lineax's operator gradient and eqx.internal.noinline's go through
    eqx.filter_jvp inside the libraries' rules: with jax.jvp rerouted they were 0."""
    eqx = pytest.importorskip("equinox")
    lx = pytest.importorskip("lineax")

    def solve_loss(a, b):
        return jnp.sum(lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.LU()).value ** 2)

    def noinline_loss(x):
        return jnp.sum(eqx.internal.noinline(lambda x: jnp.sin(x) * 2)(x))

    a, b = jnp.array([[3.0, 1.0], [1.0, 2.0]], F32), jnp.array([1.0, 2.0], F32)
    x = jnp.array([1.0, 2.0], F32)
    ours = (fb.grad(solve_loss, argnums=(0, 1))(a, b), fb.grad(noinline_loss)(x))
    with _jax_s_own(libraries_call_fbackprop):
        theirs = (jax.grad(solve_loss, argnums=(0, 1))(a, b), jax.grad(noinline_loss)(x))
    assert float(jnp.max(jnp.abs(ours[0][0]))) > 0.1     # not a silent zero
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6),
                 ours, theirs)


def test_library_jvp_rules_get_tuples_under_vmap():
    """Equinox's vprim JVP rule (lineax's batched linear_solve) vmaps over the
    primals and tangents it gets with in_axes made of tuples, as JAX passes them."""
    lx = pytest.importorskip("lineax")

    def loss(a, b):
        solve = lambda a, b: lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.LU()).value  # noqa: E731,E501
        return jnp.sum(jax.vmap(solve)(a, b) ** 2)

    a = jnp.array([[[3.0, 1.0], [1.0, 2.0]], [[2.0, 0.5], [0.1, 4.0]]], F32)
    b = jnp.array([[1.0, 2.0], [0.5, -1.0]], F32)
    _check(loss, a, b, rtol=1e-5, atol=1e-6, argnums=(0, 1))


def test_a_library_transpose_rule_for_a_jax_primitive_is_honored():
    """lineax registers a transpose rule for stop_gradient (JAX #22011): a custom
    JVP rule applying stop_gradient to a tangent is then transposable, in JAX and
    in fbackprop alike."""
    pytest.importorskip("lineax")

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return jnp.sin(x), jnp.cos(x) * jax.lax.stop_gradient(t) + 2.0 * t

    _check(lambda x: jnp.sum(f(x) ** 2), jnp.array([0.3, 1.2], F32))


def test_equinox_nondifferentiable_errors_come_in_jax_order():
    """An error raised by a custom JVP rule or a library primitive's JVP rule at
    the call (Equinox's `nondifferentiable`, `nontraceable`) comes before what
    follows the call (the scalar-output check), as under jax.grad."""
    eqx = pytest.importorskip("equinox")
    eqxi = pytest.importorskip("equinox.internal")

    @eqx.filter_custom_vjp
    def f(x, y):
        return x + y

    @f.def_fwd
    def f_fwd(perturbed, x, y):
        return x + y, None

    @f.def_bwd
    def f_bwd(res, ct, perturbed, x, y):
        return ct

    nonscalar = lambda x: eqxi.nondifferentiable(jnp.stack([x, x]))  # noqa: E731
    # A library primitive whose JVP rule raises, in a function returning a list.
    as_list = lambda x: [jnp.sum(2 * eqxi.nontraceable(x))]  # noqa: E731
    for fn, error in [(lambda x: f(x, x), "Unexpected tangent"),
                      (nonscalar, "Unexpected tangent"),
                      (as_list, "Detected differentiation of nontraceable")]:
        for grad in (jax.grad, fb.grad):
            with pytest.raises(RuntimeError, match=error):
                grad(fn)(1.0)
            with pytest.raises(RuntimeError, match=error):
                jax.jit(grad(fn))(1.0)
