"""Linear algebra and FFT: VJP and JVP rules side by side.

Decompositions (``cholesky``, ``lu``, ``qr``, ``eig``, ``eigh``, ``svd``),
triangular and tridiagonal solves, ``custom_linear_solve`` (what
``jnp.linalg.solve`` and ``inv`` bind) and ``fft``. Conventions shared by every
rule here:

* Matrices may carry leading batch dimensions; every formula works on the last
  two axes (``_T`` swaps them, ``_mm`` is a batched matrix product).
* Each JVP is the classical perturbation formula (the same one JAX uses, so
  tangents agree with JAX's) and each VJP is derived here as the exact
  transpose of that JVP. The transposes use the bilinear pairing
  ``<u, v> = Re(sum(u * v))`` with no conjugation, JAX's convention for complex
  numbers: a C-linear map ``v -> A v`` transposes to ``u -> A^T u`` (not
  ``A^H``), and ``v -> conj(v)`` / ``v -> v^H`` transpose to themselves. For
  real inputs every ``conj`` below is the identity.
* The rules only use primitives that have rules themselves (triangular solves,
  ``dot_general``, ``select_n``...), so second and higher orders work.
* Outside a formula's domain the rules raise ``NotImplementedError`` naming the
  primitive (partial eigen/singular decompositions, singular vectors of a
  full-matrix SVD of a non-square input, non-symmetric eigenvectors without
  ``enable_eigvec_derivs``), as JAX does. At degenerate points (repeated eigenvalues
  or singular values) the gradients are inf/NaN, as JAX's: the derivative of an
  eigenvector there is not defined.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.lax import linalg as lax_linalg

from ..engine import sweeps as _reverse
from ..engine import tangents as _forward
from ..registry import (
    defjvp,
    defjvp_linear,
    defnondiff,
    defvjp,
    register_jvp,
    register_vjp,
)

_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------- helpers
def _is_complex(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.complexfloating)


def _conj(x):
    return lax.conj(x) if _is_complex(x) else x


def _T(x):
    """Transpose of the last two axes (a batch of matrices)."""
    perm = (*range(x.ndim - 2), x.ndim - 1, x.ndim - 2)
    return lax.transpose(x, perm)


def _H(x):
    """Conjugate transpose of the last two axes."""
    return _conj(_T(x))


def _mm(a, b):
    """Batched matrix product at full precision (as JAX's own linalg rules)."""
    return jnp.matmul(a, b, precision=_HIGHEST)


def _cast(x, dtype):
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _eye(n, dtype):
    return jnp.eye(n, dtype=dtype)


def _tril(x, k=0):
    return jnp.tril(x, k)


def _triu(x, k=0):
    return jnp.triu(x, k)


def _diagonal(x):
    """The diagonals of a batch of square matrices, shape ``(..., n)``."""
    n = x.shape[-1]
    return jnp.sum(jnp.where(np.eye(n, dtype=bool), x, jnp.zeros((), x.dtype)), axis=-1)


def _diag_matrix(v):
    """A batch of diagonal matrices with ``v`` (shape ``(..., n)``) on the diagonal."""
    n = v.shape[-1]
    return jnp.where(np.eye(n, dtype=bool), v[..., None, :], jnp.zeros((), v.dtype))


def _inverse_gaps(w, dtype):
    """F_ij = 1 / (w_j - w_i) off the diagonal, 0 on it, in ``dtype``."""
    n = w.shape[-1]
    eye = _eye(n, w.dtype)
    return _cast(1 / (eye + w[..., None, :] - w[..., :, None]) - eye, dtype)


def _zeros_like(x):
    return jnp.zeros(x.shape, x.dtype)


def _inverse_permutation(perm):
    return jnp.argsort(perm, axis=-1).astype(perm.dtype)


def _permute_rows(x, perm):
    """``x[..., perm, :]`` with a batch of permutations ``perm`` of shape ``(..., m)``."""
    idx = jnp.broadcast_to(perm[..., :, None], x.shape)
    return jnp.take_along_axis(x, idx, axis=-2)


def _permute_cols(x, perm):
    """``x[..., :, perm]`` with a batch of permutations ``perm`` of shape ``(..., n)``."""
    idx = jnp.broadcast_to(perm[..., None, :], x.shape)
    return jnp.take_along_axis(x, idx, axis=-1)


def _tri_solve(a, b, *, left_side=False, lower=False, transpose_a=False,
               conjugate_a=False, unit_diagonal=False):
    conjugate_a = conjugate_a and _is_complex(a)
    return lax_linalg.triangular_solve_p.bind(
        a, b, left_side=left_side, lower=lower, transpose_a=transpose_a,
        conjugate_a=conjugate_a, unit_diagonal=unit_diagonal)


def _symmetrize(x):
    return (x + _H(x)) / np.array(2, x.dtype)


# -------------------------------------------------------------------- cholesky
# A = L L^H with L lower triangular. Differentiating, dA = dL L^H + L dL^H, so
# L^{-1} dA L^{-H} = L^{-1} dL + (L^{-1} dL)^H, whose lower triangle with a
# halved diagonal is L^{-1} dL (lower triangular):
#   dL = L Phi(L^{-1} dA L^{-H}),   Phi(X) = tril(X) with the diagonal halved.
# Like JAX, the JVP uses the whole dA (no symmetrization), so the VJP is the
# transpose of exactly that map:
#   ct_A = L^{-T} Phi(L^T ct) conj(L)^{-1}.
def _phi(x):
    n = x.shape[-1]
    return _tril(x) / (np.array(1, x.dtype) + _eye(n, x.dtype))


def _cholesky_jvp(primals, tangents):
    (a,), (t,) = primals, tangents
    l = lax_linalg.cholesky_p.bind(a)
    if t is None:
        return l, None
    l = _tril(l)
    tmp = _tri_solve(l, t, left_side=False, lower=True, transpose_a=True, conjugate_a=True)
    inner = _tri_solve(l, tmp, left_side=True, lower=True)
    return l, _mm(l, _phi(inner))


def _cholesky_vjp(ct, l, a):
    l = _tril(l)
    inner = _phi(_mm(_T(l), ct))
    tmp = _tri_solve(l, inner, left_side=True, lower=True, transpose_a=True)
    return _tri_solve(l, tmp, left_side=False, lower=True, conjugate_a=True)


defvjp(lax_linalg.cholesky_p, _cholesky_vjp)
register_jvp(lax_linalg.cholesky_p, _cholesky_jvp)


# ------------------------------------------------------------- triangular_solve
# X = op(A)^{-1} B (left_side) or X = B op(A)^{-1}, where op(A) is A, A^T,
# conj(A) or A^H and only A's triangle (without the diagonal when
# unit_diagonal) is read. Linear in B; in A:
#   left:  dX = -op(A)^{-1} op(dA~) X      right: dX = -X op(dA~) op(A)^{-1}
# with dA~ the read triangle of dA. Transposing (op transposes to itself):
#   ct_B = op(A)^{-T} ct  (the same solve with transpose_a flipped)
#   left:  ct_A = -mask(op(ct_B X^T))      right: ct_A = -mask(op(X^T ct_B))
def _tri_mask(x, lower, unit_diagonal):
    k = 1 if unit_diagonal else 0
    return _tril(x, -k) if lower else _triu(x, k)


def _tri_op(x, transpose_a, conjugate_a):
    x = _T(x) if transpose_a else x
    return _conj(x) if conjugate_a else x


def _tri_solve_ct_b(ct, x, a, b, *, left_side, lower, transpose_a, conjugate_a,
                    unit_diagonal):
    return _tri_solve(a, ct, left_side=left_side, lower=lower, transpose_a=not transpose_a,
                      conjugate_a=conjugate_a, unit_diagonal=unit_diagonal)


def _tri_solve_vjp(ct, x, a, b, *, active, **params):
    ct_b = _tri_solve_ct_b(ct, x, a, b, **params)
    ct_a = None
    if active[0]:
        outer = _mm(ct_b, _T(x)) if params["left_side"] else _mm(_T(x), ct_b)
        ct_a = -_tri_mask(_tri_op(outer, params["transpose_a"], params["conjugate_a"]),
                          params["lower"], params["unit_diagonal"])
    return [ct_a, ct_b if active[1] else None]


def _tri_solve_jvp_a(t, x, a, b, *, left_side, lower, transpose_a, conjugate_a,
                     unit_diagonal):
    dop = -_tri_op(_tri_mask(t, lower, unit_diagonal), transpose_a, conjugate_a)
    params = {"left_side": left_side, "lower": lower, "transpose_a": transpose_a,
              "conjugate_a": conjugate_a, "unit_diagonal": unit_diagonal}
    m, n = x.shape[-2:]
    # A triangular solve costs about a matrix product: order the two so the
    # product is the smaller one, as JAX does.
    if left_side:
        return _tri_solve(a, _mm(dop, x), **params) if m > n \
            else _mm(_tri_solve(a, dop, **params), x)
    return _tri_solve(a, _mm(x, dop), **params) if m < n \
        else _mm(x, _tri_solve(a, dop, **params))


register_vjp(lax_linalg.triangular_solve_p, _tri_solve_vjp, needs_active=True)
defjvp(lax_linalg.triangular_solve_p, _tri_solve_jvp_a,
       lambda t, x, a, b, **params: _tri_solve(a, t, **params))


# -------------------------------------------------------------------------- lu
# P A = L U, packed in one m x n matrix (L unit lower, U upper). With
# la u = L^{-1} P dA U^{-1}, the perturbation splits into its strictly lower
# part (L^{-1} dL) and its upper part (dU U^{-1}):
#   d(lu) = L tril(lau, -1) + triu(lau) U.
# Rectangular inputs pad L to m x m and U to n x n with identity blocks.
# Transpose: ct_lau = tril(L^T ct, -1) + triu(ct U^T), then
#   ct_A = P^T L^{-T} ct_lau U^{-T}.
# The pivots and the permutation are integers and carry no gradient.
def _lu_factors(lu):
    *batch, m, n = lu.shape
    k = min(m, n)
    nb = len(batch)
    l = _tril(lu[..., :, :k], -1)
    if m > k:
        l = jnp.pad(l, [(0, 0)] * nb + [(0, 0), (0, m - k)])
    l = l + _eye(m, lu.dtype)
    u = _triu(lu[..., :k, :])
    if n > k:
        u = jnp.pad(u, [(0, 0)] * nb + [(0, n - k), (0, 0)])
        u = u + jnp.pad(_eye(n - k, lu.dtype), [(k, 0), (k, 0)])
    return l, u


def _lu_jvp(primals, tangents):
    (a,), (t,) = primals, tangents
    lu, pivots, perm = lax_linalg.lu_p.bind(a)
    if t is None:
        return (lu, pivots, perm), (None, None, None)
    l, u = _lu_factors(lu)
    la = _tri_solve(l, _permute_rows(t, perm), left_side=True, lower=True,
                    unit_diagonal=True)
    lau = _tri_solve(u, la, left_side=False, lower=False)
    lu_dot = _mm(l, _tril(lau, -1)) + _mm(_triu(lau), u)
    return (lu, pivots, perm), (lu_dot, None, None)


def _lu_vjp(cts, outs, a):
    ct = cts[0]
    if ct is None:
        return [None]
    lu, _, perm = outs
    l, u = _lu_factors(lu)
    ct_lau = _tril(_mm(_T(l), ct), -1) + _triu(_mm(ct, _T(u)))
    ct_la = _tri_solve(u, ct_lau, left_side=False, lower=False, transpose_a=True)
    ct_pa = _tri_solve(l, ct_la, left_side=True, lower=True, transpose_a=True,
                       unit_diagonal=True)
    return [_permute_rows(ct_pa, _inverse_permutation(perm))]


register_vjp(lax_linalg.lu_p, _lu_vjp)
register_jvp(lax_linalg.lu_p, _lu_jvp)
defnondiff(lax_linalg.lu_pivots_to_permutation_p)


def _lu_solve(a, b):
    """X with A X = B for square A (batched), by LU: X = U^{-1} L^{-1} P B.

    Built from primitives with rules, so it differentiates like any program
    (used inside rules that need A^{-1}; a user's jnp.linalg.solve goes through
    custom_linear_solve instead).
    """
    lu, _, perm = lax_linalg.lu_p.bind(a)
    l, u = _lu_factors(lu)
    x = _tri_solve(l, _permute_rows(b, perm), left_side=True, lower=True, unit_diagonal=True)
    return _tri_solve(u, x, left_side=True, lower=False)


# -------------------------------------------------------------------------- qr
# Thin QR (m >= n): X = Q R, Q^H Q = I, R upper triangular. With
# Y = dX R^{-1} and C = Q^H Y, the skew-Hermitian part of Q^H dQ is
#   dO = tril(C, -1) - tril(C, -1)^H + i Im(diag C)
# and dQ = Q (dO - C) + Y, dR = (C - dO) R.
# Transpose: W = Q^T ct_Q - ct_R R^T, then
#   ct_C = -W + tril(W - W^H, -1) + i Im(diag W),
#   ct_Y = ct_Q + conj(Q) ct_C,   ct_X = ct_Y R^{-T}.
# Wide (m < n): X = [X1 X2], R = [R1 R2] with X1 = Q R1 (square) and
# R2 = Q^H X2, so dR2 = dQ^H X2 + Q^H dX2; its transpose adds
# conj(X2) ct_R2^H to ct_Q and gives ct_X2 = conj(Q) ct_R2.
# Full Q of a tall X (m > n): the extra columns Q_mp follow from the thin
# ones (JAX's formula, arXiv:2409.13374 eqs. 32-33); transposed term by term.
def _qr_thin_jvp(q, r, dx):
    y = _tri_solve(r, dx, left_side=False, lower=False)
    c = _mm(_H(q), y)
    c_low = _tril(c, -1)
    d_o = c_low - _H(c_low)
    if _is_complex(c):
        n = r.shape[-1]
        d_o = d_o + _eye(n, c.dtype) * (c - _cast(jnp.real(c), c.dtype))
    return _mm(q, d_o - c) + y, _mm(c - d_o, r)


def _qr_thin_vjp(q, r, ct_q, ct_r):
    w = _mm(_T(q), ct_q) - _mm(ct_r, _T(r))
    ct_c = -w + _tril(w - _H(w), -1)
    if _is_complex(w):
        n = r.shape[-1]
        ct_c = ct_c + _eye(n, w.dtype) * (w - _conj(w)) / np.array(2, w.dtype)
    ct_y = ct_q + _mm(_conj(q), ct_c)
    return _tri_solve(r, ct_y, left_side=False, lower=False, transpose_a=True)


def _qr_full_z(q, n):
    """Z_pn = Q_pn (Q_nn - I)^{-1} of JAX's full-matrices QR derivative."""
    q_nn, q_pn = q[..., :n, :n], q[..., n:, :n]
    # Z (Q_nn - I) = Q_pn  <=>  (Q_nn - I)^T Z^T = Q_pn^T.
    return _T(_lu_solve(_T(q_nn - _eye(n, q.dtype)), _T(q_pn)))


def _qr_jvp(primals, tangents, *, pivoting, full_matrices, use_magma):
    (x,), (dx,) = primals, tangents
    outs = lax_linalg.qr_p.bind(x, pivoting=pivoting, full_matrices=full_matrices,
                                use_magma=use_magma)
    if dx is None:
        return outs, [None] * len(outs)
    q, r = outs[0], outs[1]
    if pivoting:
        dx = _permute_cols(dx, outs[2])
    *_, m, n = x.shape
    if m < n:
        dq, dr1 = _qr_thin_jvp(q, r[..., :, :m], dx[..., :, :m])
        dr2 = _mm(_H(dq), x[..., :, m:]) + _mm(_H(q), dx[..., :, m:])
        dr = jnp.concatenate([dr1, dr2], axis=-1)
    elif not full_matrices or m == n:
        dq, dr = _qr_thin_jvp(q, r, dx)
    else:
        q_mn, q_mp = q[..., :, :n], q[..., :, n:]
        dq_mn, dr_nn = _qr_thin_jvp(q_mn, r[..., :n, :], dx)
        z = _qr_full_z(q, n)
        e = dq_mn[..., n:, :] - _mm(z, dq_mn[..., :n, :])
        dq_mp = _mm(dq_mn, _H(z)) - _mm(q_mn + _mm(q_mp, z), _H(e))
        dq = jnp.concatenate([dq_mn, dq_mp], axis=-1)
        dr = jnp.concatenate([dr_nn, jnp.zeros((*dr_nn.shape[:-2], m - n, n), dr_nn.dtype)],
                             axis=-2)
    return outs, [dq, dr] + [None] * (len(outs) - 2)


def _qr_vjp(cts, outs, x, *, pivoting, full_matrices, use_magma):
    q, r = outs[0], outs[1]
    ct_q = _zeros_like(q) if cts[0] is None else cts[0]
    ct_r = _zeros_like(r) if cts[1] is None else cts[1]
    *_, m, n = x.shape
    if m < n:
        ct_r1, ct_r2 = ct_r[..., :, :m], ct_r[..., :, m:]
        ct_q = ct_q + _mm(_conj(x[..., :, m:]), _H(ct_r2))
        ct_x1 = _qr_thin_vjp(q, r[..., :, :m], ct_q, ct_r1)
        ct_x = jnp.concatenate([ct_x1, _mm(_conj(q), ct_r2)], axis=-1)
    elif not full_matrices or m == n:
        ct_x = _qr_thin_vjp(q, r, ct_q, ct_r)
    else:
        q_mn, q_mp = q[..., :, :n], q[..., :, n:]
        ct_q_mn, ct_q_mp = ct_q[..., :, :n], ct_q[..., :, n:]
        z = _qr_full_z(q, n)
        b = q_mn + _mm(q_mp, z)
        # dq_mp = dq_mn Z^H - B E^H,  E = dq_pn - Z dq_nn
        ct_e = -_mm(_H(ct_q_mp), _conj(b))
        ct_dq_mn = ct_q_mn + _mm(ct_q_mp, _conj(z)) + jnp.concatenate(
            [-_mm(_T(z), ct_e), ct_e], axis=-2)
        ct_x = _qr_thin_vjp(q_mn, r[..., :n, :], ct_dq_mn, ct_r[..., :n, :])
    if pivoting:
        ct_x = _permute_cols(ct_x, _inverse_permutation(outs[2]))
    return [ct_x]


register_vjp(lax_linalg.qr_p, _qr_vjp)
register_jvp(lax_linalg.qr_p, _qr_jvp)


# ------------------------------------------------------------------------- eig
# A V = V diag(w) for a general (diagonalizable) A; w and V are complex. With
# P = V^{-1} dA V: dw = diag(P), and the right eigenvectors move by
#   U = V (F o P),  F_ij = 1 / (w_j - w_i) (i != j), F_ii = 0,
#   dv_j = u_j + c_j v_j,
# where c_j keeps LAPACK's normalization (unit norm, real largest component
# v_kj, k = argmax_i |v_ij|):
#   c_j = -Re(v_j^H u_j) - i Im(u_kj) / Re(v_kj)   (JAX's rule, issue 2748).
# The left eigenvectors are the right ones of A^H (eigenvalues conj(w)).
# Transpose, with g_j = sum_i ct_v_ij v_ij:
#   ct_U = ct_v - conj(V) Re(g) - i (Im(g) / Re(v_k)) e_k   (column by column)
#   ct_A = V^{-T} (diag(ct_w) + F o (V^T ct_U)) V^T,  its real part for a real A.
# Eigenvector derivatives rely on assumptions JAX cannot check, so, like JAX,
# they need enable_eigvec_derivs=True; eigenvalue derivatives do not.
def _eig_check_vectors(enable_eigvec_derivs):
    if not enable_eigvec_derivs:
        raise NotImplementedError(
            "fbackprop: derivatives of the eigenvectors of 'eig' (non-symmetric) are only "
            "valid under assumptions on the input that cannot be checked; pass "
            "enable_eigvec_derivs=True to jax.lax.linalg.eig to opt in (as in JAX). "
            "Eigenvalue derivatives need no opt-in: use jnp.linalg.eigvals.")


def _eig_bind(a, params, right=True):
    return lax_linalg.eig_p.bind(a, **{**params, "compute_right_eigenvectors": right})


def _eig_fwd(a, **params):
    outs = _eig_bind(a, params)
    if params["compute_right_eigenvectors"]:
        return outs, None
    return outs[:-1], outs[-1]


def _eig_normalizing_index(v):
    """One-hot (as v's dtype) of each column's largest-magnitude component."""
    k = jnp.argmax(jnp.abs(v), axis=-2)
    rows = lax.broadcasted_iota(np.int32, v.shape, v.ndim - 2)
    return (rows == k[..., None, :]).astype(v.dtype)


def _eig_vec_jvp(w, v, da):
    p = _mm(_lu_solve(v, da), v)
    u = _mm(v, _inverse_gaps(w, v.dtype) * p)
    mask = _eig_normalizing_index(v)
    c = lax.complex(-jnp.sum(jnp.real(_conj(v) * u), axis=-2),
                    -jnp.imag(jnp.sum(mask * u, axis=-2))
                    / jnp.real(jnp.sum(mask * v, axis=-2)))
    return _diagonal(p), u + v * c[..., None, :]


def _eig_ct_p(w, v, ct_v):
    """The cotangent of P = V^{-1} dA V from the eigenvectors' cotangent."""
    g = jnp.sum(ct_v * v, axis=-2)
    mask = _eig_normalizing_index(v)
    r = jnp.real(jnp.sum(mask * v, axis=-2))
    ct_u = ct_v - _conj(v) * _cast(jnp.real(g), v.dtype)[..., None, :] \
        - mask * lax.complex(jnp.zeros_like(r), jnp.imag(g) / r)[..., None, :]
    return _inverse_gaps(w, v.dtype) * _mm(_T(v), ct_u)


def _eig_vjp(cts, outs, a, *, residuals, compute_left_eigenvectors,
             compute_right_eigenvectors, enable_eigvec_derivs, implementation):
    w = outs[0]
    vr = outs[-1] if compute_right_eigenvectors else residuals
    ct_w = cts[0]
    ct_vl = cts[1] if compute_left_eigenvectors else None
    ct_vr = cts[-1] if compute_right_eigenvectors else None
    if ct_vl is not None or ct_vr is not None:
        _eig_check_vectors(enable_eigvec_derivs)
    ct_a = None
    ct_p = None
    if ct_w is not None:
        ct_p = _diag_matrix(_cast(ct_w, vr.dtype))
    if ct_vr is not None:
        term = _eig_ct_p(w, vr, ct_vr)
        ct_p = term if ct_p is None else ct_p + term
    if ct_p is not None:
        ct_a = _lu_solve(_T(vr), _mm(ct_p, _T(vr)))    # V^{-T} ct_P V^T
    if ct_vl is not None:
        vl = outs[1]
        ct_p_left = _eig_ct_p(_conj(w), vl, ct_vl)
        term = _H(_lu_solve(_T(vl), _mm(ct_p_left, _T(vl))))
        ct_a = term if ct_a is None else ct_a + term
    if ct_a is None:
        return [None]
    return [ct_a if _is_complex(a) else _cast(jnp.real(ct_a), a.dtype)]


def _eig_jvp(primals, tangents, **params):
    (a,), (da,) = primals, tangents
    if params["compute_left_eigenvectors"] or params["compute_right_eigenvectors"]:
        _eig_check_vectors(params["enable_eigvec_derivs"])
    full = _eig_bind(a, params)
    w, vr = full[0], full[-1]
    outs = full if params["compute_right_eigenvectors"] else full[:-1]
    if da is None:
        return outs, [None] * len(outs)
    da = _cast(da, vr.dtype)
    if not params["compute_right_eigenvectors"]:
        dw = _diagonal(_mm(_lu_solve(vr, da), vr))
        if not params["compute_left_eigenvectors"]:
            return outs, [dw]
    else:
        dw, dvr = _eig_vec_jvp(w, vr, da)
    touts = [dw]
    if params["compute_left_eigenvectors"]:
        touts.append(_eig_vec_jvp(_conj(w), full[1], _H(da))[1])
    if params["compute_right_eigenvectors"]:
        touts.append(dvr)
    return outs, touts


register_vjp(lax_linalg.eig_p, _eig_vjp, fwd=_eig_fwd)
register_jvp(lax_linalg.eig_p, _eig_jvp)


# ------------------------------------------------------------------------ eigh
# A = V diag(w) V^H with distinct eigenvalues w (first-order perturbation
# theory): with M = V^H dA V,
#   dw = Re(diag M),   dV = V (F o M),   F_ij = 1 / (w_j - w_i) (i != j), F_ii = 0.
# Transpose: ct_A = conj(V) (diag(ct_w) + F o (V^T ct_V)) V^T.
# Repeated eigenvalues make F infinite: the eigenvectors are not differentiable
# there and the gradient is inf/NaN, as in JAX (only the eigenvalue gradient,
# with ct_V = 0, stays finite). Like JAX's rule, the derivative is taken at the
# decomposition of (A + A^H) / 2, which is what the primitive computes for a
# Hermitian A; the forward sweep decomposes that matrix too.
def _eigh_check(a, subset_by_index):
    n = a.shape[-1]
    if not (subset_by_index is None or tuple(subset_by_index) == (0, n)):
        raise NotImplementedError(
            f"fbackprop: the derivative of 'eigh' is only defined for the full "
            f"eigendecomposition, not for subset_by_index={subset_by_index} (JAX has "
            f"none either). Compute all {n} eigenpairs and slice the result.")


def _eigh_fwd(a, **params):
    _eigh_check(a, params["subset_by_index"])
    return lax_linalg.eigh_p.bind(_symmetrize(a), **params), None


def _eigh_vjp(cts, outs, a, *, residuals, subset_by_index, **_):
    ct_v, ct_w = cts
    v, w = outs
    m = jnp.zeros(v.shape, v.dtype)
    if ct_w is not None:
        m = m + _diag_matrix(_cast(ct_w, v.dtype))
    if ct_v is not None:
        m = m + _inverse_gaps(w, v.dtype) * _mm(_T(v), ct_v)
    return [_mm(_mm(_conj(v), m), _T(v))]


def _eigh_jvp(primals, tangents, **params):
    (a,), (t,) = primals, tangents
    _eigh_check(a, params["subset_by_index"])
    v, w = lax_linalg.eigh_p.bind(_symmetrize(a), **params)
    if t is None:
        return (v, w), (None, None)
    m = _mm(_mm(_H(v), t), v)
    dw = _cast(jnp.real(_diagonal(m)), w.dtype)
    dv = _mm(v, _inverse_gaps(w, v.dtype) * m)
    return (v, w), (dv, dw)


register_vjp(lax_linalg.eigh_p, _eigh_vjp, fwd=_eigh_fwd)
register_jvp(lax_linalg.eigh_p, _eigh_jvp)


# ------------------------------------------------------------------------- svd
# A = U diag(s) V^H (thin, k = min(m, n)), distinct nonzero singular values.
# With dS = U^H dA V, F_ij = 1 / (s_j^2 - s_i^2) (0 on the diagonal):
#   ds = Re(diag dS)
#   dU = U (F o (dS S + S dS^H) + i Im(diag dS) / s) [+ (I - U U^H) dA V / s  if m > n]
#   dV = V (F o (S dS + dS^H S))                     [+ (I - V V^H) dA^H U / s if n > m]
# and the primitive returns V^H. Each term transposes separately:
#   ct_dS = diag(ct_s) + (G + G^H) S + (D - D^H) + S (G' + G'^H),
#   G = F o (U^T ct_U), D = diag(U^T ct_U) / (2 s), G' = F o (V^T ct_V), ct_V = ct_Vt^H
#   ct_A = conj(U) ct_dS V^T + (projection terms).
# With compute_uv=False the forward sweep still computes U and V (as JAX's rule
# does) and ct_A = conj(U diag(ct_s) V^H). With full_matrices=True and a
# non-square matrix the extra singular vectors are not unique: the VJP accepts
# cotangents of the singular values only (using the first k vectors) and the
# JVP raises, as JAX's does. Repeated or zero singular values make
# U and V non-differentiable (inf/NaN gradients, as in JAX); the singular
# values alone stay differentiable wherever they are distinct.
def _svd_check_vectors(a, full_matrices, subset_by_index):
    """Raises where the singular vectors of ``a`` have no derivative."""
    m, n = a.shape[-2:]
    if full_matrices and m != n:
        raise NotImplementedError(
            f"fbackprop: the derivative of 'svd' singular vectors with full_matrices=True is "
            f"not implemented for a non-square {m}x{n} matrix (JAX has none either): the "
            f"extra singular vectors are not unique. Use full_matrices=False (or "
            f"compute_uv=False if only the singular values are differentiated).")
    if not (subset_by_index is None or tuple(subset_by_index) == (0, min(m, n))):
        raise NotImplementedError(
            f"fbackprop: the derivative of 'svd' singular vectors is only implemented "
            f"for the full decomposition, not subset_by_index={subset_by_index}.")


def _svd_thin(a, subset_by_index, algorithm):
    return lax_linalg.svd_p.bind(a, full_matrices=False, compute_uv=True,
                                 subset_by_index=subset_by_index, algorithm=algorithm)


def _svd_fwd(a, *, full_matrices, compute_uv, subset_by_index, algorithm):
    if compute_uv:
        outs = lax_linalg.svd_p.bind(a, full_matrices=full_matrices, compute_uv=True,
                                     subset_by_index=subset_by_index, algorithm=algorithm)
        return outs, None
    s, u, vt = _svd_thin(a, subset_by_index, algorithm)
    return [s], (u, vt)


def _svd_gaps(s, dtype):
    """(F, 1/s with 0 where s == 0) in ``dtype``."""
    k = s.shape[-1]
    eye = _eye(k, s.dtype)
    row = s[..., None, :]
    f = 1 / ((row + _T(row)) * (row - _T(row)) + eye) - eye
    s_zero = (s == 0).astype(s.dtype)
    s_inv = 1 / (s + s_zero) - s_zero
    return _cast(f, dtype), _cast(s_inv, dtype)


def _svd_vjp(cts, outs, a, *, residuals, full_matrices, compute_uv, subset_by_index,
             algorithm):
    dtype = a.dtype
    m, n = a.shape[-2:]
    if compute_uv:
        s, u, vt = outs
        ct_s, ct_u, ct_vt = cts
        if ct_u is not None or ct_vt is not None:
            _svd_check_vectors(a, full_matrices, subset_by_index)
        # Only the singular values get a cotangent: the first k vectors suffice
        # (also for full_matrices=True, where the others are not unique).
        k = s.shape[-1]
        if u.shape[-1] != k:
            u = u[..., :, :k]
        if vt.shape[-2] != k:
            vt = vt[..., :k, :]
    else:
        (s,), (u, vt) = outs, residuals
        ct_s, ct_u, ct_vt = cts[0], None, None
    v = _H(vt)
    s_c = _cast(s, dtype)
    k = s.shape[-1]
    ct_ds = jnp.zeros((*s.shape[:-1], k, k), dtype)
    if ct_s is not None:
        ct_ds = ct_ds + _diag_matrix(_cast(ct_s, dtype))
    ct_a = None
    if ct_u is not None or ct_vt is not None:
        f, s_inv = _svd_gaps(s, dtype)
        if ct_u is not None:
            ct_mu = _mm(_T(u), ct_u)
            g = f * ct_mu
            ct_ds = ct_ds + (g + _H(g)) * s_c[..., None, :]
            if _is_complex(ct_mu):
                d = _diag_matrix(_diagonal(ct_mu) * s_inv) / np.array(2, dtype)
                ct_ds = ct_ds + d - _H(d)
            if m > n:
                w = ct_u / s_c[..., None, :]
                ct_a = _mm(w - _mm(_conj(u), _mm(_T(u), w)), _T(v))
        if ct_vt is not None:
            ct_v = _H(ct_vt)
            g = f * _mm(_T(v), ct_v)
            ct_ds = ct_ds + s_c[..., :, None] * (g + _H(g))
            if n > m:
                w = ct_v / s_c[..., None, :]
                w = w - _mm(_T(vt), _mm(_T(v), w))
                term = _mm(_conj(u), _H(w))
                ct_a = term if ct_a is None else ct_a + term
    main = _mm(_mm(_conj(u), ct_ds), _T(v))
    return [main if ct_a is None else main + ct_a]


def _svd_jvp(primals, tangents, *, full_matrices, compute_uv, subset_by_index, algorithm):
    (a,), (da,) = primals, tangents
    if compute_uv:
        _svd_check_vectors(a, full_matrices, subset_by_index)
    s, u, vt = _svd_thin(a, subset_by_index, algorithm)
    outs = (s, u, vt) if compute_uv else (s,)
    if da is None:
        return outs, [None] * len(outs)
    dtype = a.dtype
    v = _H(vt)
    ds_mat = _mm(_mm(_H(u), da), v)
    ds = _cast(jnp.real(_diagonal(ds_mat)), s.dtype)
    if not compute_uv:
        return outs, [ds]
    f, s_inv = _svd_gaps(s, dtype)
    s_c = _cast(s, dtype)
    dss = ds_mat * s_c[..., None, :]
    sds = s_c[..., :, None] * ds_mat
    du_inner = f * (dss + _H(dss))
    if _is_complex(ds_mat):
        du_inner = du_inner + _diag_matrix(_diagonal(ds_mat - _H(ds_mat)) * s_inv) \
            / np.array(2, dtype)
    du = _mm(u, du_inner)
    dv = _mm(v, f * (sds + _H(sds)))
    m, n = a.shape[-2:]
    if m > n:
        dav = _mm(da, v)
        du = du + (dav - _mm(u, _mm(_H(u), dav))) / s_c[..., None, :]
    if n > m:
        dahu = _mm(_H(da), u)
        dv = dv + (dahu - _mm(v, _mm(vt, dahu))) / s_c[..., None, :]
    return outs, [ds, du, _H(dv)]


register_vjp(lax_linalg.svd_p, _svd_vjp, fwd=_svd_fwd)
register_jvp(lax_linalg.svd_p, _svd_jvp)


# ----------------------------------------------------------- tridiagonal_solve
# X = T^{-1} B for the tridiagonal T with sub-, main and super-diagonals dl, d,
# du (dl[0] and du[-1] are not read). Like a general solve:
#   dX = T^{-1} (dB - dT X),   ct_B = T^{-T} ct,
# where T^T has sub-diagonal du shifted down one and super-diagonal dl shifted
# up one. The diagonals' cotangents pair ct_B with the matching rows of X:
#   ct_d[i] = -sum_j ct_B[i, j] X[i, j],   ct_dl[i] = -sum_j ct_B[i, j] X[i-1, j],
#   ct_du[i] = -sum_j ct_B[i, j] X[i+1, j]  (zero where the diagonal is not read).
def _shift_rows(x, offset):
    """``y[..., i, :] = x[..., i + offset, :]``, zero outside (offset is +1 or -1)."""
    nb = x.ndim - 2
    if offset == 1:
        return jnp.pad(x[..., 1:, :], [(0, 0)] * nb + [(0, 1), (0, 0)])
    return jnp.pad(x[..., :-1, :], [(0, 0)] * nb + [(1, 0), (0, 0)])


def _tridiagonal_product(dl, d, du, x):
    return (d[..., :, None] * x + dl[..., :, None] * _shift_rows(x, -1)
            + du[..., :, None] * _shift_rows(x, 1))


def _tridiagonal_transposed(dl, d, du):
    zero = jnp.zeros((*d.shape[:-1], 1), d.dtype)
    dl_t = jnp.concatenate([zero, du[..., :-1]], axis=-1)
    du_t = jnp.concatenate([dl[..., 1:], zero], axis=-1)
    return dl_t, d, du_t


def _tridiagonal_solve_vjp(ct, x, dl, d, du, b, *, perturb_singular, active):
    ct_b = lax_linalg.tridiagonal_solve_p.bind(*_tridiagonal_transposed(dl, d, du), ct,
                                               perturb_singular=perturb_singular)
    cts = [None, None, None, ct_b if active[3] else None]
    if any(active[:3]):
        m = d.shape[-1]
        read_below = np.arange(m) > 0
        read_above = np.arange(m) < m - 1
        pairs = (_shift_rows(x, -1), x, _shift_rows(x, 1))
        masks = (read_below, None, read_above)
        for i, (rows, mask) in enumerate(zip(pairs, masks)):
            if active[i]:
                ct_diag = -jnp.sum(ct_b * rows, axis=-1)
                if mask is not None:
                    ct_diag = jnp.where(mask, ct_diag, jnp.zeros((), ct_diag.dtype))
                cts[i] = ct_diag
    return cts


def _tridiagonal_solve_jvp(primals, tangents, *, perturb_singular):
    dl, d, du, _ = primals
    x = lax_linalg.tridiagonal_solve_p.bind(*primals, perturb_singular=perturb_singular)
    t_diags, t_b = tangents[:3], tangents[3]
    rhs = t_b
    if any(t is not None for t in t_diags):
        t_diags = [_zeros_like(p) if t is None else t for p, t in zip(primals[:3], t_diags)]
        m = d.shape[-1]
        zero = jnp.zeros((), d.dtype)
        t_read = (jnp.where(np.arange(m) > 0, t_diags[0], zero), t_diags[1],
                  jnp.where(np.arange(m) < m - 1, t_diags[2], zero))
        t_tx = _tridiagonal_product(*t_read, x)
        rhs = -t_tx if rhs is None else rhs - t_tx
    if rhs is None:
        return x, None
    return x, lax_linalg.tridiagonal_solve_p.bind(dl, d, du, rhs,
                                                  perturb_singular=perturb_singular)


register_vjp(lax_linalg.tridiagonal_solve_p, _tridiagonal_solve_vjp, needs_active=True)
register_jvp(lax_linalg.tridiagonal_solve_p, _tridiagonal_solve_jvp)


# ---------------------------------------------------------- custom_linear_solve
# x = solve(b) with A x = b for the linear map A = matvec(params). Implicit
# differentiation at the solution: A dx + dA x = db, so
#   dx = A^{-1} (db - dA x)        (the solve applied to a new right-hand side)
# and, transposing, with ct_b = A^{-T} ct_x (the transpose solve):
#   ct_params = -(d/dparams <ct_b, matvec(params, x)>)
# which our own reverse sweep over the matvec jaxpr computes. The solver's own
# parameters (e.g. an LU factorization) get no gradient: only matvec defines A.
# ct_b is the primitive itself with the transposed jaxprs, so differentiating it
# again goes through this same rule (with vecmat as the linear map).
def _solve_parts(primals, const_lengths):
    sizes = list(const_lengths)
    groups, start = [], 0
    for size in sizes:
        groups.append(list(primals[start:start + size]))
        start += size
    return type(const_lengths)(*groups), list(primals[start:])


def _flatten_groups(groups):
    return [x for group in groups for x in group]


def _linear_solve_vjp(cts, outs, *primals, const_lengths, jaxprs, active):
    params, b = _solve_parts(primals, const_lengths)
    n_b = len(b)
    # The auxiliary outputs of a solve with has_aux=True (solver diagnostics) have a
    # zero derivative by custom_linear_solve's definition (its JVP, JAX's and ours
    # below, gives them zero tangents): their cotangents contribute nothing.
    ct_x = cts[:n_b]
    if jaxprs.transpose_solve is None:
        raise TypeError(
            "fbackprop: transpose_solve required for reverse mode through "
            "custom_linear_solve: pass transpose_solve (or symmetric=True) so the "
            "transposed system can be solved.")
    n_consts = sum(const_lengths)
    if all(c is None for c in ct_x):
        return [None] * len(primals)
    ct_x = [_zeros_like(x) if c is None else c for x, c in zip(outs[:n_b], ct_x)]
    ct_b = lax.linear_solve_p.bind(
        *_flatten_groups(params.transpose()), *ct_x,
        const_lengths=const_lengths.transpose(), jaxprs=jaxprs.transpose())[:n_b]
    ct_params = [None] * n_consts
    matvec_active = active[:const_lengths.matvec]
    if any(matvec_active):
        matvec = jaxprs.matvec
        in_active = list(matvec_active) + [False] * n_b
        _, tape = _reverse.forward(matvec.jaxpr, matvec.consts,
                                   list(params.matvec) + list(outs[:n_b]), in_active)
        cts_mv = _reverse.backward(tape, [lax.neg(c) for c in ct_b])
        ct_params[:const_lengths.matvec] = cts_mv[:const_lengths.matvec]
    ct_b = [_cast(c, x.dtype) if a else None
            for c, x, a in zip(ct_b, b, active[n_consts:])]
    return ct_params + ct_b


def _linear_solve_jvp(primals, tangents, *, const_lengths, jaxprs):
    outs = lax.linear_solve_p.bind(*primals, const_lengths=const_lengths, jaxprs=jaxprs)
    params, b = _solve_parts(primals, const_lengths)
    t_params, t_b = _solve_parts(tangents, const_lengths)
    n_b = len(b)
    x = list(outs[:n_b])
    rhs = list(t_b)
    if any(t is not None for t in t_params.matvec):
        matvec = jaxprs.matvec
        _, t_mv = _forward.jvp_jaxpr(matvec.jaxpr, matvec.consts, list(params.matvec) + x,
                                     list(t_params.matvec) + [None] * n_b)
        rhs = [tb if tm is None else (lax.neg(tm) if tb is None else lax.sub(tb, tm))
               for tb, tm in zip(rhs, t_mv)]
    if all(t is None for t in rhs):
        return outs, [None] * len(outs)
    rhs = [_zeros_like(xb) if t is None else _cast(t, xb.dtype) for t, xb in zip(rhs, b)]
    dx = lax.linear_solve_p.bind(*_flatten_groups(params), *rhs,
                                 const_lengths=const_lengths, jaxprs=jaxprs)[:n_b]
    return outs, list(dx) + [None] * (len(outs) - n_b)


register_vjp(lax.linear_solve_p, _linear_solve_vjp, needs_active=True)
register_jvp(lax.linear_solve_p, _linear_solve_jvp)


# ------------------------------------------------------------------------- fft
# The FFT is linear. Under the bilinear pairing the DFT matrix is symmetric, so
# FFT and IFFT are their own transposes. RFFT keeps the first N//2 + 1 outputs
# of a real input's FFT: its transpose is Re(F^T ct) = N * IRFFT(conj(ct) / c),
# where c = 2 for the bins IRFFT counts twice (all but DC and, for even N,
# Nyquist) and 1 otherwise. IRFFT (a Hermitian extension then an IFFT) has the
# transpose conj(c * RFFT(ct) / N). N is the product of fft_lengths.
def _fft(x, fft_type, fft_lengths):
    return lax.fft_p.bind(x, fft_type=fft_type, fft_lengths=tuple(fft_lengths))


def _hermitian_counts(fft_lengths, size, dtype):
    counts = np.full((size,), 2.0)
    counts[0] = 1.0
    if fft_lengths[-1] % 2 == 0:
        counts[-1] = 1.0
    return counts.astype(dtype)


def _fft_vjp(ct, out, x, *, fft_type, fft_lengths):
    kind = lax.FftType(fft_type)
    if kind in (lax.FftType.FFT, lax.FftType.IFFT):
        return _fft(ct, kind, fft_lengths)
    n_total = math.prod(fft_lengths)
    if kind == lax.FftType.RFFT:
        counts = _hermitian_counts(fft_lengths, ct.shape[-1], ct.dtype)
        ct_x = _fft(lax.conj(ct) / counts, lax.FftType.IRFFT, fft_lengths)
        return ct_x * np.array(n_total, x.dtype)
    # IRFFT
    spectrum = _fft(ct, lax.FftType.RFFT, fft_lengths)
    counts = _hermitian_counts(fft_lengths, spectrum.shape[-1], spectrum.dtype)
    return lax.conj(spectrum * (counts / n_total).astype(spectrum.dtype))


defvjp(lax.fft_p, _fft_vjp)
defjvp_linear(lax.fft_p)
