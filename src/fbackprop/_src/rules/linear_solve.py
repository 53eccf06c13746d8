"""Linear solves by an operator: ``tridiagonal_solve`` and ``custom_linear_solve``
(what ``jnp.linalg.solve`` and ``inv`` bind), with the conventions of :mod:`.linalg`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.lax import linalg as lax_linalg

from ..engine import sweeps as _reverse
from ..engine import tangents as _forward
from ..registry import register_jvp, register_vjp
from .linalg import _cast, _zeros_like


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
