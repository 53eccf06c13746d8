"""A parameter's per-example cotangent kept as factors, and the algebra on it.

In a per-example sweep (the user's per-example loss swept by our engine under
``jax.vmap``, see :mod:`.sweep`) the cotangent of a parameter-side value ``W``
at a use ``y = x @ W`` is, for one example, ``x^T c`` with ``c`` the cotangent
of ``y``. Formed under ``vmap`` it is a ``[B, *W.shape]`` array: the per-example
gradients, which are what makes ``jax.vmap(jax.grad(loss))`` run out of memory.
A :class:`Factored` cotangent keeps the factors ``x`` and ``c`` instead; what
the per-example quantities need is computed from them:

* the squared norm ``||x^T c||^2 = sum((x x^T) * (c c^T))`` (the Gram form,
  ``T x T`` for ``T`` rows per example) or, where cheaper, from the
  materialized per-example gradient (:func:`sq_norm` picks per use by FLOPs);
* the sum over examples ``sum_b w_b x_b^T c_b`` is one contraction over the
  examples and rows together (:func:`sum_over_examples`);
* elementwise second moments (:func:`second_moments`).

Layout. Each dimension of ``W`` is a P dimension (on both factors, like a batch
dimension of ``dot_general``), an M dimension (on ``L`` only) or an N dimension
(on ``R`` only); the summed dimensions are flattened into one K axis::

    L: [P..., K, M...]    R: [P..., K, N...]
    ct[p, m, n] = sum_k L[p, k, m] * R[p, k, n]       (then in W's dim order)

A use's key ``(p_dims, m_dims, n_dims)`` gives the ``W`` dimension of each of
those axes, each tuple ascending, ``m_dims`` holding ``W``'s first non-P
dimension. An embedding lookup's factor is a :class:`OneHot` (its rows are rows
of the identity, given by the indices): its products are gathers and
scatter-adds, never a ``[rows, vocabulary]`` matrix.

Squared norms are computed where a use's factors are made and the cross terms
where uses of one value meet (:func:`add`), so in the program the factors are
read right after they are made and need not stay alive to the sweep's end.

The engine never imports this package: the sweep running now is a field of
the sweep context (``context.current().per_example``), whose methods the
engine calls.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def _prod(shape) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64))


def compute_dtype(*dtypes):
    """The dtype norms and sums are computed in: at least float32."""
    return functools.reduce(jnp.promote_types, [np.dtype(d) for d in dtypes],
                            np.dtype(np.float32))


def _cast(x, dtype):
    dtype = np.dtype(dtype)
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _transpose(x, perm):
    perm = tuple(int(i) for i in perm)
    return x if perm == tuple(range(len(perm))) else lax.transpose(x, perm)


class OneHot:
    """``[K, depth]``: row ``k`` is row ``idx[k]`` of the identity (all zeros for an
    index out of ``[0, depth)``), the left factor of an embedding lookup."""
    __slots__ = ("idx", "depth", "dtype")

    def __init__(self, idx, depth, dtype):
        self.idx, self.depth, self.dtype = idx, int(depth), np.dtype(dtype)

    @property
    def shape(self):
        return (int(self.idx.shape[-1]), self.depth)

    @property
    def ndim(self):
        return 2

    def dense(self, dtype=None):
        idx = self.idx
        shape = tuple(idx.shape) + (self.depth,)
        return lax.convert_element_type(
            lax.eq(lax.broadcast_in_dim(idx, shape, tuple(range(idx.ndim))),
                   lax.broadcasted_iota(idx.dtype, shape, idx.ndim)), dtype or self.dtype)


def _dense_factor(x, dtype=None):
    if type(x) is OneHot:
        return x.dense(dtype)
    return x if dtype is None else _cast(x, dtype)


class Factored:
    """The cotangent of one parameter-side value for one example, as factors.

    Attributes:
      shape, dtype: the primal's (a cotangent has its primal's type).
      uses: a tuple of ``(key, L, R)`` (see the module docstring).
      dense: the part of the cotangent from uses that were not factored, or None.
      sq: its squared norm (at least float32), or None when not computed yet.
    """
    __slots__ = ("shape", "dtype", "uses", "dense", "sq")

    def __init__(self, shape, dtype, uses, dense=None, sq=None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.uses = tuple(uses)
        self.dense = dense
        self.sq = sq

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self):
        parts = [f"{k}: L{tuple(L.shape)} R{tuple(R.shape)}" for k, L, R in self.uses]
        if self.dense is not None:
            parts.append("dense")
        return f"Factored({self.dtype.name}{list(self.shape)}; {', '.join(parts)})"

    def compute_dtype(self):
        return compute_dtype(self.dtype, *[x.dtype for _, L, R in self.uses for x in (L, R)])

    def materialize(self):
        """The cotangent as an array of its primal's shape and dtype."""
        cd = self.compute_dtype()
        total = None if self.dense is None else _cast(self.dense, cd)
        for key, L, R in self.uses:
            part = use_dense(key, L, R, self.shape, cd)
            total = part if total is None else lax.add(total, part)
        if total is None:
            return jnp.zeros(self.shape, self.dtype)
        return _cast(total, self.dtype)


class Summed:
    """The cotangent of a parameter-side value already summed over the examples
    (a value of the trace enclosing the vmap, the same for every example): what
    a per-example sweep that sums as it goes (the weighted second sweep of
    ``clipped_grad``) passes on instead of per-example cotangents."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    @property
    def shape(self):
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype

    def __repr__(self):
        return f"Summed({self.dtype}{list(self.shape)})"


# The cotangents that are not arrays (the engine's backward sweep adds them with
# add(), through the sweep's ``add``).
SYMBOLIC = (Factored, Summed)


def materialize(ct):
    """``ct`` as an array (``None`` and arrays unchanged)."""
    return ct.materialize() if type(ct) is Factored else ct


# ----------------------------------------------------------------- making uses
def normalize(L, R, p, m, n):
    """``(key, L, R)`` with the axes of each block in ascending ``W`` dimension
    and M holding the first non-P dimension (``L``, ``R`` swapped otherwise)."""
    p, m, n = tuple(p), tuple(m), tuple(n)
    n_p = len(p)
    order_p = sorted(range(n_p), key=p.__getitem__)
    order_m = sorted(range(len(m)), key=m.__getitem__)
    order_n = sorted(range(len(n)), key=n.__getitem__)
    if type(L) is not OneHot:
        L = _transpose(L, order_p + [n_p] + [n_p + 1 + i for i in order_m])
    if type(R) is not OneHot:
        R = _transpose(R, order_p + [n_p] + [n_p + 1 + i for i in order_n])
    p, m, n = tuple(sorted(p)), tuple(sorted(m)), tuple(sorted(n))
    if (n and not m) or (m and n and n[0] < m[0]):
        L, R, m, n = R, L, n, m
    return (p, m, n), L, R


def single(shape, dtype, L, R, p, m, n) -> Factored:
    """A cotangent that is one use's factors (``p``, ``m``, ``n``: the ``W``
    dimensions of ``L``'s and ``R``'s axes, in their order), its squared norm
    computed now."""
    key, L, R = normalize(L, R, p, m, n)
    shape = tuple(shape)
    return Factored(shape, dtype, ((key, L, R),), sq=_self_sq(key, L, R, shape))


def with_norm(f: Factored) -> Factored:
    """``f`` with its squared norm computed now."""
    if f.sq is not None:
        return f
    return Factored(f.shape, f.dtype, f.uses, f.dense, _sq_from_parts(f))


def _sizes(key, L, R):
    """``(P, K, M, N)`` element counts of a use."""
    n_p = len(key[0])
    return (_prod(L.shape[:n_p]), int(L.shape[n_p]), _prod(L.shape[n_p + 1:]),
            _prod(R.shape[n_p + 1:]))


def _scatter_rows(onehot, rows, cd):
    """``onehot^T rows``: the rows of ``rows`` (``[K, ...]``) added at the
    indices (``[depth, ...]``); an index out of ``[0, depth)`` adds nothing."""
    rows = _cast(rows, cd)
    dnums = lax.ScatterDimensionNumbers(update_window_dims=tuple(range(1, rows.ndim)),
                                        inserted_window_dims=(0,),
                                        scatter_dims_to_operand_dims=(0,))
    zeros = jnp.zeros((onehot.depth,) + tuple(rows.shape[1:]), cd)
    return lax.scatter_add(zeros, onehot.idx[:, None], rows, dnums,
                           mode=lax.GatherScatterMode.FILL_OR_DROP)


def use_dense(key, L, R, shape, dtype):
    """One use's cotangent as an array in ``W``'s dimension order, in ``dtype``."""
    p, m, n = key
    n_p = len(p)
    if type(L) is OneHot:
        out = _scatter_rows(L, R, dtype)                   # [depth, N...]
    elif type(R) is OneHot:
        out = jnp.moveaxis(_scatter_rows(R, L, dtype), 0, -1)   # [M..., depth]
    else:
        batch = tuple(range(n_p))
        out = lax.dot_general(_cast(L, dtype), _cast(R, dtype),
                              (((n_p,), (n_p,)), (batch, batch)), precision=_HIGHEST)
    return _transpose(out, np.argsort(p + m + n))


# ------------------------------------------------------------------ addition
def _add_dense(x, y):
    if x is None:
        return y
    if y is None:
        return x
    return lax.add(x, _cast(y, x.dtype))


def add(a, b):
    """The sum of two cotangents of one value, at least one of them symbolic.

    The squared norm of the sum is ``|a|^2 + |b|^2 + 2 <a, b>``, the cross term
    computed now, while both operands' factors are at hand."""
    if type(a) is Summed or type(b) is Summed:
        if type(a) is not Summed or type(b) is not Summed:
            raise AssertionError(f"a cotangent summed over the examples met a per-example "
                                 f"one ({a!r}, {b!r}): please report this as a bug")
        return Summed(lax.add(a.value, _cast(b.value, a.value.dtype)))
    if type(a) is not Factored:
        a, b = b, a
    if type(b) is not Factored:
        sq = None
        if a.sq is not None and b is not None:
            db = _cast(b, compute_dtype(b.dtype))
            sq = a.sq + jnp.sum(db * db) + 2 * _inner_parts(a.shape, a.uses, a.dense, (), b)
        return Factored(a.shape, a.dtype, a.uses, _add_dense(a.dense, b), sq)
    sq = None
    if a.sq is not None and b.sq is not None:
        sq = a.sq + b.sq + 2 * _inner_parts(a.shape, a.uses, a.dense, b.uses, b.dense)
    return Factored(a.shape, a.dtype, a.uses + b.uses, _add_dense(a.dense, b.dense), sq)


# ------------------------------------------- the cotangent through linear ops
# Each takes the cotangent of an op's output and returns its operand's, or
# None when that is not a regrouping of the factors (the caller materializes).
def transposed(f: Factored, permutation) -> Factored:
    """Of ``out = transpose(W, permutation)``: output dim d is W's dim perm[d]."""
    perm = [int(i) for i in permutation]
    shape = [0] * len(perm)
    for d, w in enumerate(perm):
        shape[w] = f.shape[d]
    uses = []
    for (p, m, n), L, R in f.uses:
        uses.append(normalize(L, R, [perm[d] for d in p], [perm[d] for d in m],
                              [perm[d] for d in n]))
    dense = None if f.dense is None else _transpose(f.dense, np.argsort(perm))
    return Factored(shape, f.dtype, uses, dense, f.sq)


def with_dtype(f: Factored, dtype) -> Factored:
    """Of ``out = convert_element_type(W)``: the factors stay, the dtype changes."""
    dense = None if f.dense is None else _cast(f.dense, np.dtype(dtype))
    return Factored(f.shape, dtype, f.uses, dense, f.sq)


def scaled(f: Factored, s) -> Factored:
    """``f * s`` for a scalar ``s``."""
    uses = []
    for key, L, R in f.uses:
        if type(R) is OneHot:
            L = lax.mul(L, _cast(s, L.dtype))
        else:
            R = lax.mul(R, _cast(s, R.dtype))
        uses.append((key, L, R))
    dense = None if f.dense is None else lax.mul(f.dense, _cast(s, f.dense.dtype))
    sq = None if f.sq is None else f.sq * jnp.square(_cast(s, f.sq.dtype))
    return Factored(f.shape, f.dtype, uses, dense, sq)


def _sum_axes(L, R, key, summed):
    """Sums the use's ``summed`` W dimensions away: an M (N) dimension is a sum
    over ``L`` (``R``); a P dimension joins K. Returns ``(p, m, n, L, R)`` with
    the summed dimensions gone from the key."""
    p, m, n = (list(t) for t in key)
    if summed:
        L, R = _dense_factor(L), _dense_factor(R)
    for d in sorted(summed, reverse=True):
        n_p = len(p)
        if d in m:
            i = m.index(d)
            L = jnp.sum(L, axis=n_p + 1 + i)
            m.pop(i)
        elif d in n:
            i = n.index(d)
            R = jnp.sum(R, axis=n_p + 1 + i)
            n.pop(i)
        else:
            i = p.index(d)
            # [.., P_i, .., K, ...] -> [.., (P_i K), ...]: the same order on both
            # factors, so row k of one is still row k of the other.
            def merge(x, i=i, n_p=n_p):
                perm = [j for j in range(n_p) if j != i] + [i, n_p] + list(range(n_p + 1, x.ndim))
                x = _transpose(x, perm)
                shape = list(x.shape)
                shape[n_p - 1:n_p + 1] = [shape[n_p - 1] * shape[n_p]]
                return lax.reshape(x, tuple(shape))
            L, R = merge(L), merge(R)
            p.pop(i)
    return p, m, n, L, R


def _relabel(p, m, n, L, R, mapping, unit_dims):
    """Renames W dims by ``mapping`` and adds the size-1 dims ``unit_dims`` (as M
    dims of ``L``); returns the normalized ``(key, L, R)``."""
    p, m, n = [mapping[d] for d in p], [mapping[d] for d in m], [mapping[d] for d in n]
    if unit_dims:
        L = _dense_factor(L)
    for d in unit_dims:
        L = lax.expand_dims(L, (L.ndim,))
        m.append(d)
    return normalize(L, R, p, m, n)


def broadcast_summed(f: Factored, operand_shape, broadcast_dimensions) -> Factored:
    """Of ``out = broadcast_in_dim(W, shape, broadcast_dimensions)``: the
    dimensions the broadcast made (or expanded from size 1) are summed."""
    bd = [int(d) for d in broadcast_dimensions]
    shape = f.shape
    mapping, summed, unit = {}, [], []
    for i, d in enumerate(bd):
        if operand_shape[i] == 1 and shape[d] != 1:
            summed.append(d)
            unit.append(i)
        else:
            mapping[d] = i
    summed += [d for d in range(len(shape)) if d not in bd]
    dense = None
    if f.dense is not None:
        dense = f.dense
        if summed:
            dense = lax.reduce_sum(dense, tuple(sorted(summed)))
        dense = lax.reshape(dense, tuple(operand_shape))
    uses = []
    for key, L, R in f.uses:
        p, m, n, L, R = _sum_axes(L, R, key, summed)
        uses.append(_relabel(p, m, n, L, R, mapping, unit))
    # Summing changes the norm: it is computed again, now.
    return with_norm(Factored(operand_shape, f.dtype, uses, dense))


def unit_reshaped(f: Factored, operand_shape):
    """Of a reshape that only adds or removes size-1 dimensions; None otherwise."""
    out_shape = f.shape
    out_real = [d for d, s in enumerate(out_shape) if s != 1]
    in_real = [d for d, s in enumerate(operand_shape) if s != 1]
    if [out_shape[d] for d in out_real] != [operand_shape[d] for d in in_real]:
        return None
    mapping = dict(zip(out_real, in_real))
    out_units = [d for d, s in enumerate(out_shape) if s == 1]
    in_units = [d for d, s in enumerate(operand_shape) if s == 1]
    dense = None if f.dense is None else lax.reshape(f.dense, tuple(operand_shape))
    uses = []
    for key, L, R in f.uses:
        # A size-1 dimension sums to itself: dropping it is exact.
        p, m, n, L, R = _sum_axes(L, R, key, out_units)
        uses.append(_relabel(p, m, n, L, R, mapping, in_units))
    # The same values in another shape: the same norm.
    return Factored(operand_shape, f.dtype, uses, dense, f.sq)


# ---------------------------------------------------------- per-example norms
def _columns(x, onehot, cd):
    """``x @ onehot^T``: the columns of ``x`` (``[K_x, depth]``) at the indices,
    zero for an index out of range."""
    idx = onehot.idx
    valid = (idx >= 0) & (idx < onehot.depth)
    cols = jnp.take(_cast(x, cd), jnp.where(valid, idx, 0), axis=1, mode="clip")
    return cols * valid[None, :].astype(cd)


def _gram(A, B, n_p, cd):
    """``[P..., K_a, K_b]``: the inner products of the rows of two factors of one
    block (their trailing dimensions contracted)."""
    if type(A) is OneHot and type(B) is OneHot:
        valid = (A.idx >= 0) & (A.idx < A.depth)
        return _cast(lax.eq(A.idx[:, None], B.idx[None, :]) & valid[:, None], cd)
    if type(A) is OneHot:
        return _columns(B, A, cd).T
    if type(B) is OneHot:
        return _columns(A, B, cd)
    batch = tuple(range(n_p))
    axes = tuple(range(n_p + 1, A.ndim))
    return lax.dot_general(_cast(A, cd), _cast(B, cd), ((axes, axes), (batch, batch)),
                           precision=_HIGHEST)


def _gram_inner(key, L1, R1, L2, R2, cd):
    """``<L1^T R1, L2^T R2>`` of two uses with the same key: the Gram form."""
    n_p = len(key[0])
    return jnp.sum(_gram(L1, L2, n_p, cd) * _gram(R1, R2, n_p, cd))


def materializes_cheaper(key, L, R) -> bool:
    """Forming this use's per-example gradient (``M N`` elements per P index)
    costs no more FLOPs than its Gram form -- ``K M N`` against ``K^2 (M + N)``,
    or ``K N + M N`` for an index factor (a scatter-add) -- and no more than 4x
    the Gram's ``K^2`` elements of memory (under vmap either is formed for every
    example at once: memory decides first)."""
    _, k, m, n = _sizes(key, L, R)
    if type(L) is OneHot or type(R) is OneHot:
        rows = n if type(L) is OneHot else m
        flops_dense, flops_gram = k * rows + m * n, k * k * (rows + 1)
    else:
        flops_dense, flops_gram = k * m * n, k * k * (m + n)
    return flops_dense <= flops_gram and m * n <= 4 * k * k


def _self_sq(key, L, R, shape):
    """One use's squared norm: its Gram form or its per-example gradient,
    whichever costs fewer FLOPs."""
    cd = compute_dtype(L.dtype, R.dtype)
    if materializes_cheaper(key, L, R):
        d = use_dense(key, L, R, shape, cd)
        return jnp.sum(d * d)
    return _gram_inner(key, L, R, L, R, cd)


def _inner_with_dense(key, L, R, D, cd):
    """``<L^T R, D>`` for a dense ``D`` of ``W``'s shape."""
    p, m, n = key
    if type(L) is OneHot or type(R) is OneHot:
        return jnp.sum(use_dense(key, L, R, D.shape, cd) * _cast(D, cd))
    n_p = len(p)
    labels_l = list(p) + [len(D.shape)] + list(m)
    labels_r = list(p) + [len(D.shape)] + list(n)
    return jnp.einsum(_cast(D, cd), list(range(D.ndim)), _cast(L, cd), labels_l,
                      _cast(R, cd), labels_r, [], optimize="optimal", precision=_HIGHEST)


def _inner_uses(u, v, shape, cd):
    """``<u, v>`` of two uses of one value."""
    (ka, La, Ra), (kb, Lb, Rb) = u, v
    if ka == kb:
        if materializes_cheaper(ka, La, Ra) and materializes_cheaper(kb, Lb, Rb):
            return jnp.sum(use_dense(ka, La, Ra, shape, cd) * use_dense(kb, Lb, Rb, shape, cd))
        return _gram_inner(ka, La, Ra, Lb, Rb, cd)
    if materializes_cheaper(kb, Lb, Rb) or type(La) is OneHot or type(Ra) is OneHot:
        return _inner_with_dense(ka, La, Ra, use_dense(kb, Lb, Rb, shape, cd), cd)
    return _inner_with_dense(kb, Lb, Rb, use_dense(ka, La, Ra, shape, cd), cd)


def _inner_parts(shape, uses_a, dense_a, uses_b, dense_b):
    """``<a, b>`` of two cotangents of one value given as parts (a scalar)."""
    dtypes = [x.dtype for uses in (uses_a, uses_b) for _, L, R in uses for x in (L, R)]
    dtypes += [d.dtype for d in (dense_a, dense_b) if d is not None]
    cd = compute_dtype(*dtypes)
    total = jnp.zeros((), cd)
    for u in uses_a:
        for v in uses_b:
            total = total + _inner_uses(u, v, shape, cd)
        if dense_b is not None:
            total = total + _inner_with_dense(*u, dense_b, cd)
    if dense_a is not None:
        for v in uses_b:
            total = total + _inner_with_dense(*v, dense_a, cd)
        if dense_b is not None:
            total = total + jnp.sum(_cast(dense_a, cd) * _cast(dense_b, cd))
    return total


def _sq_from_parts(ct: Factored):
    cd = ct.compute_dtype()
    total = jnp.zeros((), cd)
    uses = ct.uses
    for i, u in enumerate(uses):
        total = total + _self_sq(u[0], u[1], u[2], ct.shape)
        for v in uses[i + 1:]:
            total = total + 2 * _inner_uses(u, v, ct.shape, cd)
    if ct.dense is not None:
        d = _cast(ct.dense, cd)
        total = total + jnp.sum(d * d) + 2 * _inner_parts(ct.shape, uses, None, (), ct.dense)
    return total


def sq_norm(ct):
    """The squared Frobenius norm of one example's cotangent (a scalar in at
    least float32), or None for a zero cotangent."""
    if ct is None:
        return None
    if type(ct) is not Factored:
        x = _cast(ct, compute_dtype(ct.dtype))
        return jnp.sum(x * x)
    sq = ct.sq if ct.sq is not None else _sq_from_parts(ct)
    # The factors may be wider than the value (float64 activations of a float32
    # parameter): the norm is of the value's gradient, in its dtype (>= float32).
    return _cast(sq, compute_dtype(ct.dtype))


# ------------------------------------------------ over examples (outside vmap)
# Outside the vmap a leaf's cotangent is described by a static ``spec`` and a
# list of arrays, each with the examples on a leading axis:
#   ("none",)                          -> []
#   ("dense",)                         -> [D]
#   ("factored", uses, has_dense)      -> per use: L then R (+ [D])
# where each entry of ``uses`` is ``(key, l_kind, r_kind)``, a kind ``None`` for
# an array factor or ``(depth, dtype)`` for a OneHot (its array: the indices).
def _flat_factor(x):
    if type(x) is OneHot:
        return (x.depth, x.dtype.name), x.idx
    return None, x


def _unflat_factor(kind, x):
    return x if kind is None else OneHot(x, kind[0], kind[1])


def flatten(ct):
    """``(spec, arrays)`` of one example's cotangent (see above)."""
    if ct is None:
        return ("none",), []
    if type(ct) is not Factored:
        return ("dense",), [ct]
    uses, arrays = [], []
    for key, L, R in ct.uses:
        lk, la = _flat_factor(L)
        rk, ra = _flat_factor(R)
        uses.append((key, lk, rk))
        arrays += [la, ra]
    if ct.dense is not None:
        arrays.append(ct.dense)
    return ("factored", tuple(uses), ct.dense is not None), arrays


def unflatten_uses(spec, arrays):
    """``(uses, dense)`` of a flattened cotangent."""
    kind = spec[0]
    if kind == "none":
        return [], None
    if kind == "dense":
        return [], arrays[0]
    _, uses, has_dense = spec
    out = [(key, _unflat_factor(lk, arrays[2 * i]), _unflat_factor(rk, arrays[2 * i + 1]))
           for i, (key, lk, rk) in enumerate(uses)]
    return out, (arrays[-1] if has_dense else None)


def spec_count(spec) -> int:
    """How many arrays a flattened cotangent has."""
    if spec[0] == "none":
        return 0
    if spec[0] == "dense":
        return 1
    return 2 * len(spec[1]) + int(spec[2])


def _weigh(x, w):
    if w is None:
        return x
    return lax.mul(x, lax.broadcast_in_dim(_cast(w, x.dtype), x.shape, (0,)))


def rows_first(x, n_p):
    """``[B, P..., K, ...] -> [P..., B*K, ...]``: the examples become rows (an
    index factor's ``[B, K]`` indices become ``[B*K]``)."""
    if type(x) is OneHot:
        return OneHot(lax.reshape(x.idx, (_prod(x.idx.shape),)), x.depth, x.dtype)
    if n_p:
        x = _transpose(x, list(range(1, n_p + 1)) + [0] + list(range(n_p + 1, x.ndim)))
    shape = list(x.shape)
    shape[n_p:n_p + 2] = [shape[n_p] * shape[n_p + 1]]
    return lax.reshape(x, tuple(shape))


def contract_rows(key, L, R, shape, cd):
    """``sum_k L[p, k, m] R[p, k, n]`` in ``W``'s dimension order: a plain
    matrix product over the rows (or a scatter-add for an index factor), as a
    gradient's (default precision, ``cd`` accumulation)."""
    p, m, n = key
    if type(L) is OneHot or type(R) is OneHot:
        return use_dense(key, L, R, shape, cd)
    n_p = len(p)
    dtype = jnp.promote_types(L.dtype, R.dtype)
    batch = tuple(range(n_p))
    out = lax.dot_general(_cast(L, dtype), _cast(R, dtype), (((n_p,), (n_p,)), (batch, batch)),
                          preferred_element_type=cd)
    return _transpose(out, np.argsort(p + m + n))


def _weigh_use(L, R, w):
    if w is None:
        return L, R
    if type(R) is OneHot:
        return _weigh(L, w), R
    return L, _weigh(R, w)


def sum_over_examples(spec, arrays, shape, dtype, weights=None):
    """``sum_b w_b g_b`` of one leaf (``weights``: ``[B]`` or None for ones),
    in ``dtype``; zeros when the leaf got no cotangent."""
    uses, dense = unflatten_uses(spec, arrays)
    cd = compute_dtype(dtype, *[a.dtype for a in arrays if jnp.issubdtype(a.dtype, jnp.inexact)])
    total = None
    for key, L, R in uses:
        n_p = len(key[0])
        L, R = _weigh_use(L, R, weights)
        part = contract_rows(key, rows_first(L, n_p), rows_first(R, n_p), shape, cd)
        total = part if total is None else lax.add(total, part)
    if dense is not None:
        part = jnp.sum(_weigh(_cast(dense, cd), weights), axis=0)
        total = part if total is None else lax.add(total, part)
    if total is None:
        return jnp.zeros(shape, dtype)
    return _cast(total, np.dtype(dtype))


def _examples_first(x, axis, size):
    """A factor with the examples on axis 0 (broadcast if it has none)."""
    if type(x) is OneHot:
        idx = x.idx
        idx = lax.broadcast_in_dim(idx, (size,) + tuple(idx.shape), tuple(range(1, idx.ndim + 1))) \
            if axis is None else jnp.moveaxis(idx, axis, 0)
        return OneHot(idx, x.depth, x.dtype)
    if axis is None:
        return lax.broadcast_in_dim(x, (size,) + tuple(x.shape), tuple(range(1, x.ndim + 1)))
    return jnp.moveaxis(x, axis, 0)


def use_summed_over_examples(key, L, l_axis, R, r_axis, size, shape, cd):
    """``sum_b L_b^T R_b`` of one use, each factor given as the array of all
    examples with its examples' axis (``None``: the same for every example)."""
    n_p = len(key[0])
    if l_axis is None and r_axis is None:
        return lax.mul(use_dense(key, L, R, shape, cd), np.asarray(size, cd))
    if l_axis is None and type(R) is not OneHot:
        # The same left factor for every example: the right ones are summed first.
        return use_dense(key, L, jnp.sum(_cast(R, cd), axis=r_axis), shape, cd)
    if r_axis is None and type(L) is not OneHot:
        return use_dense(key, jnp.sum(_cast(L, cd), axis=l_axis), R, shape, cd)
    if n_p == 0 and type(L) is not OneHot and type(R) is not OneHot and \
            (l_axis != 0 or r_axis != 0):
        # The examples and the rows contracted together where they are (moving
        # the examples' axis first would copy a loop's stacked factors).
        k_l, k_r = (0 if a > 0 else 1 for a in (l_axis, r_axis))
        p, m, n = key
        dtype = jnp.promote_types(L.dtype, R.dtype)
        out = lax.dot_general(_cast(L, dtype), _cast(R, dtype),
                              (((l_axis, k_l), (r_axis, k_r)), ((), ())),
                              preferred_element_type=cd)
        return _transpose(out, np.argsort(p + m + n))
    L, R = _examples_first(L, l_axis, size), _examples_first(R, r_axis, size)
    return contract_rows(key, rows_first(L, n_p), rows_first(R, n_p), shape, cd)


def _examples_dense(key, L, R, shape, cd):
    """``[B, *W]``: each example's gradient of one use (examples first)."""
    p, m, n = key
    if type(L) is OneHot or type(R) is OneHot:
        import jax
        kinds = [None if type(x) is not OneHot else (x.depth, x.dtype.name) for x in (L, R)]
        raw = [x.idx if type(x) is OneHot else x for x in (L, R)]
        return jax.vmap(lambda lr, rr: use_dense(key, _unflat_factor(kinds[0], lr),
                                                 _unflat_factor(kinds[1], rr), shape, cd))(*raw)
    n_p = len(p)
    batch = tuple(range(n_p + 1))
    out = lax.dot_general(_cast(L, cd), _cast(R, cd), (((n_p + 1,), (n_p + 1,)), (batch, batch)),
                          precision=_HIGHEST)
    return _transpose(out, [0] + [1 + int(i) for i in np.argsort(p + m + n)])


# Per-example gradients are formed this many elements at a time (a chunk of
# examples) when a second moment needs them.
CHUNK_ELEMENTS = 1 << 22


def second_moments(spec, arrays, shape, mean):
    """``(mean_b g_b**2, mean_b (g_b - mean)**2)`` of one leaf, elementwise, in
    at least float32 (``mean``: ``mean_b g_b``).

    The cheapest exact form is used: a dense per-example part directly; one
    factored use with a single row per example (``K == 1``, a dense layer
    applied to a vector) as ``mean_b L_b**2 (x) R_b**2`` -- then the variance is
    ``E[g^2] - mean^2`` (clipped at 0) -- and otherwise the per-example
    gradients formed a chunk of examples at a time in a ``lax.scan``
    (``CHUNK_ELEMENTS`` elements at once), with the variance summed as
    ``(g_b - mean)**2``.
    """
    uses, dense = unflatten_uses(spec, arrays)
    floats = [a.dtype for a in arrays if jnp.issubdtype(a.dtype, jnp.inexact)]
    cd = compute_dtype(*floats)
    mean = _cast(mean, cd)
    if not uses and dense is None:
        zero = jnp.zeros(shape, cd)
        return zero, zero
    n_ex = int(arrays[0].shape[0])
    if not uses:
        d = _cast(dense, cd)
        dev = d - mean[None]
        return jnp.mean(d * d, axis=0), jnp.mean(dev * dev, axis=0)
    if len(uses) == 1 and dense is None:
        key, L, R = uses[0]
        n_p = len(key[0])
        rows = L.idx.shape[-1] if type(L) is OneHot else L.shape[n_p + 1]
        if rows == 1:
            L2 = L if type(L) is OneHot else jnp.square(_cast(L, cd))
            R2 = R if type(R) is OneHot else jnp.square(_cast(R, cd))
            sq = contract_rows(key, rows_first(L2, n_p), rows_first(R2, n_p), shape, cd) / n_ex
            return sq, jnp.maximum(sq - mean * mean, 0)
    chunk = max(1, min(n_ex, CHUNK_ELEMENTS // max(1, _prod(shape))))
    n_chunks = -(-n_ex // chunk)
    pad = n_chunks * chunk - n_ex

    def chunked(x):
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
        return x.reshape((n_chunks, chunk) + x.shape[1:])
    mask = chunked(jnp.ones((n_ex,), cd))
    xs = (mask, [chunked(a) for a in arrays])

    def body(acc, x):
        mask_c, arrs = x
        us, d = unflatten_uses(spec, arrs)
        g = None if d is None else _cast(d, cd)
        for key, L, R in us:
            part = _examples_dense(key, L, R, shape, cd)
            g = part if g is None else g + part
        w = lax.broadcast_in_dim(mask_c, g.shape, (0,))
        dev = g - mean[None]
        return (acc[0] + jnp.sum(w * g * g, axis=0), acc[1] + jnp.sum(w * dev * dev, axis=0)), None

    zero = jnp.zeros(shape, cd)
    (sq, var), _ = lax.scan(body, (zero, zero), xs)
    return sq / n_ex, var / n_ex
