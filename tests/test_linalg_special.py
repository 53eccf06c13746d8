"""Rules the spec table cannot compare with JAX, and the errors of unsupported cases."""

import jax
import jax.numpy as jnp
import jax.scipy.special as jss
import numpy as np
import pytest
from jax import lax

import fbackprop as fb


def _grid(dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.uniform(0.5, 3.0, (3, 4)).astype(dtype),
            rng.uniform(0.3, 4.0, (3, 4)).astype(dtype))


def test_zeta_primitive_derivative_in_q_matches_scipy_zeta_series():
    s, q = _grid()
    s = s + 1.5                                     # s > 1: the series converges
    ours = fb.grad(lambda q: jnp.sum(lax.zeta(s, q)))(q)
    theirs = jax.grad(lambda q: jnp.sum(jss.zeta(s, q)))(q)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    _, t = fb.jvp(lambda q: lax.zeta(s, q), (q,), (jnp.ones_like(q),))
    np.testing.assert_allclose(t, theirs, rtol=1e-10)


def test_zeta_primitive_second_derivative_in_q():
    s, q = np.array([2.5, 3.0]), np.array([0.7, 1.3])
    ours = fb.grad(lambda q: jnp.sum(fb.grad(lambda q: jnp.sum(lax.zeta(s, q)))(q)))(q)
    np.testing.assert_allclose(ours, s * (s + 1) * jss.zeta(s + 2, q), rtol=1e-10)


def test_igamma_grad_a_derivative_in_x_is_the_mixed_partial():
    a, x = _grid()

    def dP_dx(a, x):  # the x-derivative of igamma, which JAX differentiates in a
        return jnp.exp(-x + (a - 1) * jnp.log(x) - jax.scipy.special.gammaln(a))

    theirs = jax.grad(lambda a: jnp.sum(dP_dx(a, x)))(a)
    ours = fb.grad(lambda x: jnp.sum(lax.igamma_grad_a(a, x)))(x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    _, t = fb.jvp(lambda x: lax.igamma_grad_a(a, x), (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(t, theirs, rtol=1e-9)


def test_igamma_mixed_second_derivative():
    a, x = _grid()
    hess_ax = fb.grad(lambda x: jnp.sum(fb.grad(lambda a: jnp.sum(lax.igamma(a, x)))(a)))(x)
    theirs = jax.grad(lambda a: jnp.sum(jnp.exp(-x + (a - 1) * jnp.log(x)
                                                - jax.scipy.special.gammaln(a))))(a)
    np.testing.assert_allclose(hess_ax, theirs, rtol=1e-9)


@pytest.mark.parametrize("fn,arg,match", [
    (lambda s: lax.zeta(s, jnp.full_like(s, 1.5)), "zeta", "'zeta'"),
    (lambda a: lax.igamma_grad_a(a, jnp.full_like(a, 1.5)), "igamma_grad_a", "'igamma_grad_a'"),
    (lambda a: jss.betainc(a, 2.0, 0.3), "a", "'regularized_incomplete_beta'"),
    (lambda b: jss.betainc(2.0, b, 0.3), "b", "'regularized_incomplete_beta'"),
])
def test_undefined_partial_derivatives_raise(fn, arg, match):
    x = jnp.array([2.5, 3.0])
    with pytest.raises(NotImplementedError, match=match):
        fb.grad(lambda x: jnp.sum(fn(x)))(x)
    with pytest.raises(NotImplementedError, match=match):
        fb.jvp(fn, (x,), (jnp.ones_like(x),))


def test_svd_full_matrices_of_a_non_square_matrix_raises():
    a = jnp.arange(12.0).reshape(4, 3) ** 1.5
    f = lambda a: jnp.sum(jnp.linalg.svd(a, full_matrices=True)[0])  # noqa: E731
    with pytest.raises(NotImplementedError, match="'svd'"):
        fb.grad(f)(a)
    with pytest.raises(NotImplementedError, match="'svd'"):
        fb.jvp(f, (a,), (a,))


def test_partial_eigh_raises():
    a = jnp.diag(jnp.arange(1.0, 5.0))
    f = lambda a: jnp.sum(lax.linalg.eigh(a, subset_by_index=(0, 2))[1])  # noqa: E731
    with pytest.raises(NotImplementedError, match="'eigh'"):
        fb.grad(f)(a)


def test_scatter_max_splits_ties_like_jax():
    x = jnp.array([1.0, 2.0, 3.0])
    idx = jnp.array([0, 0, 1, 2])
    u = jnp.array([5.0, 5.0, 2.0, 0.0])   # two updates tie; one ties the operand; one loses
    f = lambda x, u: jnp.sum(x.at[idx].max(u) * jnp.array([1.0, 10.0, 100.0]))  # noqa: E731
    gx, gu = fb.grad(f, argnums=(0, 1))(x, u)
    np.testing.assert_allclose(gx, [0.0, 5.0, 100.0])
    np.testing.assert_allclose(gu, [0.5, 0.5, 5.0, 0.0])
    jx, ju = jax.grad(f, argnums=(0, 1))(x, u)
    np.testing.assert_allclose(gx, jx)
    np.testing.assert_allclose(gu, ju)


def test_linalg_second_order_through_solve_and_eigh():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    s = a @ a.T
    f = lambda a: jnp.sum(jnp.linalg.solve(a, jnp.ones(3)) ** 2) + jnp.linalg.eigvalsh(a @ a.T)[-1]  # noqa: E731
    np.testing.assert_allclose(fb.hessian(f)(a), jax.hessian(f)(a), rtol=1e-8, atol=1e-10)
    del s


def test_svd_full_matrices_singular_values_only():
    a = np.random.default_rng(2).standard_normal((4, 3))
    ours = fb.grad(lambda a: jnp.sum(jnp.linalg.svd(a)[1] ** 2))(a)   # full_matrices=True
    theirs = jax.grad(lambda a: jnp.sum(jnp.linalg.svd(a, compute_uv=False) ** 2))(a)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def test_qr_complete_tall_second_order():
    a = np.random.default_rng(3).standard_normal((4, 2))
    f = lambda a: jnp.sum(jnp.linalg.qr(a, mode="complete")[0][:, 2:] ** 3)  # noqa: E731
    np.testing.assert_allclose(fb.hessian(f)(a), jax.hessian(f)(a), rtol=1e-7, atol=1e-9)


def _solve_with_aux(m, b):
    def matvec(x):
        return m @ x

    def solve(_, rhs):
        x = jnp.linalg.solve(lax.stop_gradient(m), rhs)
        return x, jnp.sum(x)          # auxiliary output (e.g. a diagnostic)

    def transpose_solve(_, rhs):
        x = jnp.linalg.solve(lax.stop_gradient(m).T, rhs)
        return x, jnp.sum(x)

    return lax.custom_linear_solve(matvec, b, solve, transpose_solve, has_aux=True)


def test_custom_linear_solve_with_aux_output():
    rng = np.random.default_rng(4)
    m, b = rng.standard_normal((3, 3)) + 3 * np.eye(3), rng.standard_normal(3)
    f = lambda m, b: jnp.sum(_solve_with_aux(m, b)[0] ** 2)  # noqa: E731
    for ours, theirs in zip(fb.grad(f, argnums=(0, 1))(m, b), jax.grad(f, argnums=(0, 1))(m, b)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    # The aux output is a constant of the solve, as in JAX: its gradient is JAX's (zero).
    g = lambda m, b: jnp.sum(_solve_with_aux(m, b)[1])  # noqa: E731
    for ours, theirs in zip(fb.grad(g, argnums=(0, 1))(m, b), jax.grad(g, argnums=(0, 1))(m, b)):
        np.testing.assert_array_equal(ours, theirs)
