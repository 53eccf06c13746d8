"""Linear algebra and FFT: decompositions, solves, custom_linear_solve, fft.

Inputs are well conditioned by construction (``make_args``): symmetric positive
definite matrices ``A A^T + n I`` for Cholesky, diagonally dominant matrices for
solves and LU, eigenvalues and singular values well apart for eigh and svd (the
eigenvector derivatives divide by their gaps). Complex specs multiply complex
outputs by a unit phase so the (real) random cotangents of the tests reach both
the real and the imaginary parts.
"""

import functools

import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jax import lax

from .common import Spec

COMPLEX = ("complex64", "complex128")
# Decompositions lose a few digits in float32; float64 stays tight.
LOOSE = {"float32": (2e-3, 2e-3), "complex64": (2e-3, 2e-3),
         "float64": (1e-6, 1e-6), "complex128": (1e-6, 1e-6)}
_PHASE = 0.6 + 0.8j


def _rand(rng, shape, dtype):
    dtype = np.dtype(dtype)
    x = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def _matrices(*shapes, kind="general"):
    """make_args giving one matrix (batch) per shape, of the given kind.

    general: random entries; dominant: random plus 3 I (well-conditioned, for
    solves and LU); spd: A A^H + n I; spread: Hermitian with eigenvalues 1..n
    (distinct, well apart); triangular: like dominant.
    """
    def make(rng, dtype):
        out = []
        for shape in shapes:
            x = _rand(rng, shape, dtype)
            n = shape[-1]
            if kind == "dominant":
                x = x + 3 * np.eye(n, dtype=dtype)
            elif kind == "spd":
                x = x @ np.conj(np.swapaxes(x, -1, -2)) + n * np.eye(n, dtype=dtype)
            elif kind == "spread":
                q, _ = np.linalg.qr(x)
                w = np.arange(1, n + 1, dtype=np.float64) * 1.5
                x = (q * w) @ np.conj(np.swapaxes(q, -1, -2))
                x = (x + np.conj(np.swapaxes(x, -1, -2))) / 2
            out.append(x.astype(dtype))
        return out
    return make


def _with_rhs(matrix_shape, rhs_shape, kind="dominant"):
    def make(rng, dtype):
        (a,) = _matrices(matrix_shape, kind=kind)(rng, dtype)
        return a, _rand(rng, rhs_shape, dtype)
    return make


def _phase(x):
    return x * _PHASE if jnp.iscomplexobj(x) else x


def _sum_outputs(*xs):
    """Mixes several outputs into one array so one cotangent reaches all of them."""
    return sum(jnp.sum(_phase(x) * (k + 1.0)) for k, x in enumerate(xs))


# ------------------------------------------------------------------ cholesky
_CHOLESKY = [
    Spec("la_cholesky", jnp.linalg.cholesky, make_args=_matrices((4, 4), kind="spd"),
         tol=LOOSE),
    Spec("la_cholesky_batched", jnp.linalg.cholesky,
         make_args=_matrices((2, 3, 3), kind="spd"), tol=LOOSE),
    # Without symmetrization the rule sees the whole (non-symmetric) tangent.
    Spec("la_cholesky_unsymmetrized",
         lambda a: lax.linalg.cholesky(a, symmetrize_input=False),
         make_args=_matrices((3, 3), kind="spd"), tol=LOOSE),
    Spec("la_cholesky_complex", lambda a: _phase(jnp.linalg.cholesky(a)),
         make_args=_matrices((3, 3), kind="spd"), dtypes=COMPLEX, tol=LOOSE),
    Spec("la_cho_solve", lambda a, b: jsl.cho_solve(jsl.cho_factor(a, lower=True), b),
         make_args=_with_rhs((3, 3), (3, 2), kind="spd"), tol=LOOSE),
]


# ---------------------------------------------------------- triangular solve
def _tri_spec(left_side, lower, transpose_a, unit_diagonal, batch=(), dtypes=None,
              conjugate_a=False):
    rhs = (*batch, 3, 2) if left_side else (*batch, 2, 3)
    name = "la_trisolve_{}_{}{}{}{}{}{}".format(
        "left" if left_side else "right", "lower" if lower else "upper",
        "_trans" if transpose_a else "", "_unit" if unit_diagonal else "",
        "_conj" if conjugate_a else "", "_batched" if batch else "",
        "_complex" if dtypes else "")
    fn = functools.partial(lax.linalg.triangular_solve, left_side=left_side, lower=lower,
                           transpose_a=transpose_a, conjugate_a=conjugate_a,
                           unit_diagonal=unit_diagonal)
    return Spec(name, lambda a, b: _phase(fn(a, b)),
                make_args=_with_rhs((*batch, 3, 3), rhs), tol=LOOSE,
                **({"dtypes": dtypes} if dtypes else {}))


_TRIANGULAR = [
    *[_tri_spec(left, lower, trans, unit)
      for left in (True, False) for lower in (True, False)
      for trans, unit in ((False, False), (True, True))],
    _tri_spec(True, True, True, False, batch=(2,)),
    _tri_spec(False, False, False, True, batch=(2,)),
    _tri_spec(True, True, True, False, dtypes=COMPLEX, conjugate_a=True),
    _tri_spec(False, True, False, False, dtypes=COMPLEX, conjugate_a=True),
    _tri_spec(True, False, False, False, dtypes=COMPLEX),
    Spec("la_solve_triangular_scipy",
         lambda a, b: jsl.solve_triangular(a, b, lower=True, trans="T"),
         make_args=_with_rhs((3, 3), (3,)), tol=LOOSE),
]


# ------------------------------------------------- LU, solve, inverse, determinant
def _lu_with_permutation(a):
    lu, pivots, _ = lax.linalg.lu(a)
    perm = lax.linalg.lu_pivots_to_permutation(pivots, a.shape[-2])
    return lu * (1.0 + perm[:, None].astype(a.dtype))


def _scipy_lu(a):
    p, l, u = jsl.lu(a)
    return _sum_outputs(l, u) + jnp.sum(p)


_LU = [
    Spec("la_lu", lambda a: lax.linalg.lu(a)[0], make_args=_matrices((4, 4)), tol=LOOSE),
    Spec("la_lu_batched", lambda a: lax.linalg.lu(a)[0], make_args=_matrices((2, 3, 3)),
         tol=LOOSE),
    Spec("la_lu_tall", lambda a: lax.linalg.lu(a)[0], make_args=_matrices((4, 3)), tol=LOOSE),
    Spec("la_lu_wide", lambda a: lax.linalg.lu(a)[0], make_args=_matrices((3, 5)), tol=LOOSE),
    Spec("la_lu_permutation", _lu_with_permutation, make_args=_matrices((3, 3)), tol=LOOSE),
    Spec("la_lu_complex", lambda a: _phase(lax.linalg.lu(a)[0]),
         make_args=_matrices((3, 3)), dtypes=COMPLEX, tol=LOOSE),
    Spec("la_lu_scipy", _scipy_lu, make_args=_matrices((3, 3)), tol=LOOSE),
    Spec("la_solve", jnp.linalg.solve, make_args=_with_rhs((3, 3), (3,)), tol=LOOSE),
    Spec("la_solve_matrix_rhs_batched", jnp.linalg.solve,
         make_args=_with_rhs((2, 3, 3), (2, 3, 2)), tol=LOOSE),
    Spec("la_solve_complex", lambda a, b: _phase(jnp.linalg.solve(a, b)),
         make_args=_with_rhs((3, 3), (3,)), dtypes=COMPLEX, tol=LOOSE),
    Spec("la_inv", jnp.linalg.inv, make_args=_matrices((3, 3), kind="dominant"), tol=LOOSE),
    Spec("la_det", jnp.linalg.det, make_args=_matrices((4, 4), kind="dominant"), tol=LOOSE),
    Spec("la_slogdet", lambda a: jnp.linalg.slogdet(a)[1],
         make_args=_matrices((2, 4, 4), kind="dominant"), tol=LOOSE),
]


# ---------------------------------------------------------- custom_linear_solve
def _diag_plus_low_rank_solve(a, d, b):
    """x with (diag(d) + a a^T) x = b, solved densely, differentiated implicitly."""
    def matvec(x):
        return d * x + a @ (a.T @ x)

    def solve(_, rhs):
        return jnp.linalg.solve(jnp.diag(d) + a @ a.T, rhs)

    return lax.custom_linear_solve(matvec, b, solve, symmetric=True)


def _nonsymmetric_solve(m, b):
    def matvec(x):
        return m @ x + 0.5 * x

    def solve(_, rhs):
        return jnp.linalg.solve(lax.stop_gradient(m) + 0.5 * jnp.eye(3, dtype=m.dtype), rhs)

    def transpose_solve(_, rhs):
        return jnp.linalg.solve(lax.stop_gradient(m).T + 0.5 * jnp.eye(3, dtype=m.dtype), rhs)

    return lax.custom_linear_solve(matvec, b, solve, transpose_solve)


def _low_rank_args(rng, dtype):
    return (_rand(rng, (3, 2), dtype), rng.uniform(1.0, 2.0, 3).astype(dtype),
            _rand(rng, (3,), dtype))


def _tridiagonal_args(batch, m, n):
    def make(rng, dtype):
        dl, du, b = (_rand(rng, (*batch, m), dtype), _rand(rng, (*batch, m), dtype),
                     _rand(rng, (*batch, m, n), dtype))
        d = (_rand(rng, (*batch, m), dtype) + 4).astype(dtype)
        return dl, d, du, b
    return make


def _tridiagonal(dl, d, du, b):
    return _phase(lax.linalg.tridiagonal_solve(dl, d, du, b))


_LINEAR_SOLVE = [
    Spec("la_tridiagonal_solve", _tridiagonal, make_args=_tridiagonal_args((), 4, 2),
         tol=LOOSE),
    Spec("la_tridiagonal_solve_batched", _tridiagonal, make_args=_tridiagonal_args((2,), 3, 1),
         tol=LOOSE),
    Spec("la_tridiagonal_solve_complex", _tridiagonal, make_args=_tridiagonal_args((), 4, 2),
         dtypes=COMPLEX, tol=LOOSE),
    Spec("la_custom_linear_solve_symmetric", _diag_plus_low_rank_solve,
         make_args=_low_rank_args, tol=LOOSE),
    Spec("la_custom_linear_solve_transpose_solve", _nonsymmetric_solve,
         make_args=_with_rhs((3, 3), (3,)), tol=LOOSE),
]


# -------------------------------------------------------------------------- QR
def _ramp(x):
    """1, 2, ..., n along the last axis, broadcast to ``x``'s shape explicitly (the
    tests run with jax_numpy_rank_promotion='raise')."""
    n = x.shape[-1]
    return jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.real(x).dtype), x.shape)


def _qr_outputs(mode="reduced"):
    def fn(a):
        q, r = jnp.linalg.qr(a, mode=mode)
        return _sum_outputs(q * _ramp(q), r)
    return fn


def _qr_pivoted(a):
    q, r, p = jsl.qr(a, pivoting=True)
    return _sum_outputs(q * _ramp(q), r) + jnp.sum(p)


_QR = [
    Spec("la_qr_square", _qr_outputs(), make_args=_matrices((3, 3)), tol=LOOSE),
    Spec("la_qr_tall", _qr_outputs(), make_args=_matrices((4, 3)), tol=LOOSE),
    Spec("la_qr_wide", _qr_outputs(), make_args=_matrices((3, 5)), tol=LOOSE),
    Spec("la_qr_tall_complete", _qr_outputs("complete"), make_args=_matrices((5, 3)),
         tol=LOOSE),
    Spec("la_qr_batched", lambda a: jnp.linalg.qr(a), make_args=_matrices((2, 4, 3)),
         tol=LOOSE),
    Spec("la_qr_r_only", lambda a: jnp.linalg.qr(a, mode="r"), make_args=_matrices((4, 3)),
         tol=LOOSE),
    Spec("la_qr_complex", lambda a: tuple(map(_phase, jnp.linalg.qr(a))),
         make_args=_matrices((4, 3)), dtypes=COMPLEX, tol=LOOSE),
    Spec("la_qr_complex_wide", lambda a: tuple(map(_phase, jnp.linalg.qr(a))),
         make_args=_matrices((2, 3)), dtypes=COMPLEX, tol=LOOSE),
    Spec("la_qr_pivoting", _qr_pivoted, make_args=_matrices((4, 3)), tol=LOOSE),
]


# ------------------------------------------------------------------------ eigh
def _eigh_outputs(a):
    w, v = jnp.linalg.eigh(a)
    # Eigenvectors are defined up to sign (phase): a loss invariant to it, as
    # any meaningful one is, plus the eigenvalues themselves.
    return w, jnp.abs(v) ** 2 * _ramp(v)


_EIGH = [
    Spec("la_eigh", jnp.linalg.eigh, make_args=_matrices((4, 4), kind="spread"), tol=LOOSE),
    Spec("la_eigh_batched", _eigh_outputs, make_args=_matrices((2, 3, 3), kind="spread"),
         tol=LOOSE),
    Spec("la_eigvalsh", jnp.linalg.eigvalsh, make_args=_matrices((4, 4), kind="spread"),
         tol=LOOSE),
    Spec("la_eigh_complex", _eigh_outputs, make_args=_matrices((3, 3), kind="spread"),
         dtypes=COMPLEX, tol=LOOSE),
    Spec("la_eigh_unsymmetrized",
         lambda a: lax.linalg.eigh(a, symmetrize_input=False)[1],
         make_args=_matrices((3, 3), kind="spread"), tol=LOOSE),
]


# ------------------------------------------------------------------------- eig
def _eig(left=False, right=True):
    def fn(a):
        outs = lax.linalg.eig(a, compute_left_eigenvectors=left,
                              compute_right_eigenvectors=right, enable_eigvec_derivs=True)
        return tuple(map(_phase, outs))
    return fn


_EIG = [
    # Second order would differentiate the eigenvectors the first-order rule
    # uses, which needs enable_eigvec_derivs=True (in JAX too).
    Spec("la_eigvals", lambda a: _phase(jnp.linalg.eigvals(a)), make_args=_matrices((4, 4)),
         order=1, tol=LOOSE),
    Spec("la_eig_right", _eig(), make_args=_matrices((3, 3)), tol=LOOSE),
    Spec("la_eig_left_and_right", _eig(left=True), make_args=_matrices((3, 3)), tol=LOOSE),
    Spec("la_eig_left_only", _eig(left=True, right=False), make_args=_matrices((3, 3)),
         tol=LOOSE),
    Spec("la_eig_batched", _eig(), make_args=_matrices((2, 3, 3)), tol=LOOSE),
    Spec("la_eig_complex", _eig(), make_args=_matrices((3, 3)), dtypes=COMPLEX, tol=LOOSE),
]


# ------------------------------------------------------------------------- SVD
def _svd_outputs(a):
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return _sum_outputs(jnp.abs(u) ** 2 * _ramp(u), s,
                        jnp.abs(vt) ** 2)


def _svd_raw(a):
    return jnp.linalg.svd(a, full_matrices=False)


_SVD = [
    Spec("la_svd_square", _svd_raw, make_args=_matrices((3, 3)), tol=LOOSE),
    Spec("la_svd_tall", _svd_raw, make_args=_matrices((4, 3)), tol=LOOSE),
    Spec("la_svd_wide", _svd_raw, make_args=_matrices((3, 5)), tol=LOOSE),
    Spec("la_svd_batched", _svd_outputs, make_args=_matrices((2, 4, 3)), tol=LOOSE),
    Spec("la_svd_square_full_matrices", lambda a: jnp.linalg.svd(a, full_matrices=True),
         make_args=_matrices((3, 3)), tol=LOOSE),
    Spec("la_svd_complex", _svd_outputs, make_args=_matrices((4, 3)), dtypes=COMPLEX,
         tol=LOOSE),
    Spec("la_svd_complex_wide", _svd_outputs, make_args=_matrices((2, 4)), dtypes=COMPLEX,
         tol=LOOSE),
    Spec("la_svdvals", lambda a: jnp.linalg.svd(a, compute_uv=False),
         make_args=_matrices((4, 3)), tol=LOOSE),
    Spec("la_norm_2", lambda a: jnp.linalg.norm(a, ord=2), make_args=_matrices((3, 4)),
         tol=LOOSE),
    Spec("la_norm_nuclear", lambda a: jnp.linalg.norm(a, ord="nuc", axis=(-2, -1)),
         make_args=_matrices((2, 3, 3)), tol=LOOSE),
    Spec("la_pinv", jnp.linalg.pinv, make_args=_matrices((4, 3)), tol=LOOSE),
    Spec("la_lstsq", lambda a, b: jnp.linalg.lstsq(a, b)[0],
         make_args=_with_rhs((4, 3), (4,), kind="general"), tol=LOOSE),
]


# ------------------------------------------------------------------------- FFT
def _complex_args(*shapes):
    def make(rng, dtype):
        return [_rand(rng, s, dtype) for s in shapes]
    return make


_FFT = [
    Spec("la_fft_real_input", lambda x: _phase(jnp.fft.fft(x)), shapes=((3, 5),)),
    Spec("la_fft", lambda x: _phase(jnp.fft.fft(x)), make_args=_complex_args((3, 5)),
         dtypes=COMPLEX),
    Spec("la_ifft", lambda x: _phase(jnp.fft.ifft(x, axis=0)),
         make_args=_complex_args((4, 3)), dtypes=COMPLEX),
    Spec("la_fft2", lambda x: _phase(jnp.fft.fft2(x)), make_args=_complex_args((2, 3, 4)),
         dtypes=COMPLEX),
    Spec("la_rfft_even", lambda x: _phase(jnp.fft.rfft(x)), shapes=((3, 6),)),
    Spec("la_rfft_odd", lambda x: _phase(jnp.fft.rfft(x)), shapes=((3, 5),)),
    Spec("la_rfft2", lambda x: _phase(jnp.fft.rfft2(x)), shapes=((2, 4, 5),)),
    Spec("la_irfft_even", lambda x: jnp.fft.irfft(x, n=6), make_args=_complex_args((3, 4)),
         dtypes=COMPLEX),
    Spec("la_irfft_odd", lambda x: jnp.fft.irfft(x, n=5), make_args=_complex_args((3, 3)),
         dtypes=COMPLEX),
    Spec("la_irfftn", lambda x: jnp.fft.irfftn(x, s=(3, 4)),
         make_args=_complex_args((2, 3, 3)), dtypes=COMPLEX),
    Spec("la_fft_roundtrip", lambda x: jnp.fft.irfft(jnp.fft.rfft(x) * _ramp(jnp.fft.rfft(x)),
                                                     n=6), shapes=((2, 6),)),
]

SPECS = [*_CHOLESKY, *_TRIANGULAR, *_LU, *_LINEAR_SOLVE, *_QR, *_EIG, *_EIGH, *_SVD,
         *_FFT]
