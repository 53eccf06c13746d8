"""Linear algebra: VJP and JVP rules side by side, and the helpers and
conventions of the whole family.

Here: ``cholesky``, triangular solves, ``lu``, ``qr``. In ``spectral.py``:
``eig``, ``eigh``, ``svd``; in ``linear_solve.py``: ``tridiagonal_solve`` and
``custom_linear_solve`` (what ``jnp.linalg.solve`` and ``inv`` bind); in
``fft.py``: ``fft``. Conventions shared by every rule of the family:

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

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.lax import linalg as lax_linalg

from ..registry import defjvp, defnondiff, defvjp, register_jvp, register_vjp

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
