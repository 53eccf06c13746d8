"""Eigen and singular value decompositions (``eig``, ``eigh``, ``svd``): VJP and
JVP rules side by side, with the conventions of :mod:`.linalg`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.lax import linalg as lax_linalg

from ..registry import register_jvp, register_vjp
from .linalg import (_H, _T, _cast, _conj, _diag_matrix, _diagonal, _eye, _inverse_gaps,
                     _is_complex, _mm, _symmetrize, _lu_solve)


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
