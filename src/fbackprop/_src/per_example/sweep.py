"""The per-example sweep: our backward sweep of one example, with factored cotangents.

:func:`.loops.per_example_sweep` is entered inside ``jax.vmap`` of the user's
per-example loss, around our own forward and backward sweeps of it. There:

* a value is *example-dependent* when the ``vmap`` batches it (a value of the
  vmap's trace with a mapped axis, :func:`compat.mapped_by`), and
  *parameter-side* otherwise; inside a loop body we trace ourselves (a scan's
  backward step) the values are not the vmap's, so example dependence is
  propagated there by data dependence from the loop's inputs
  (:func:`dependent_vars`);
* the cotangent of a parameter-side operand of ``dot_general``,
  ``conv_general_dilated`` (no groups) or an embedding-style ``gather`` is kept
  as a :class:`~.factored.Factored` pair of per-example factors instead of being
  formed (under ``vmap`` that would be a ``[B, *W.shape]`` array);
* a linear op between a parameter and its use (``transpose``,
  ``convert_element_type``, ``broadcast_in_dim``, size-1 reshapes, a product
  with a scalar) regroups the factors; a call swept in place passes them on;
  every other rule gets the cotangent materialized first;
* nested ``jit`` calls are swept in place (their equations are then the vmap's,
  so the example dependence of their values is visible), and ``lax.scan`` and
  checkpointed regions get handlers of their own (loops.py: :class:`ScanHandler`,
  :class:`RematHandler`) that keep factored cotangents through them.

Factored cotangents are only made where the sweep runs in the trace it was
entered for (or a scan step it traces itself): inside another handler's own
trace (a ``cond`` branch's joint trace) everything stays dense, so no staged
program ever sees one.

A sweep can also *sum as it goes* (:meth:`Sweep.summing_over_examples`, the
weighted second sweep of ``clipped_grad``): every parameter-side cotangent is
then summed over the examples where it is made, in the trace enclosing the vmap
(:class:`~.factored.Summed`), and rules upstream of it apply to the sum (every
input of an equation whose output is the same for every example is too, so
the rule is the same linear map for every example). Sums are only taken in our
own sweeps over the program's values (at the vmap's level, not inside a loop
body or another handler's trace, whose values are stand-ins), where "the same
for every example" is read off the vmap exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import compat
from ..engine.tape import Tape
from ..registry import is_differentiable_dtype
from ..rules.calls import CustomJVPCall, InlineCall
from . import factored
from .factored import Factored, Summed, materialize


def _differentiable(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and is_differentiable_dtype(dtype)


def _is_var(v) -> bool:
    return type(v) is not compat.Literal and type(v) is not compat.DropVar


# ------------------------------------------------------- example dependence
def _sub_jaxpr(eqn):
    """The body of a call our per-example sweep sweeps in place (its invars line
    up with the equation's), or None."""
    name = eqn.primitive.name
    if name in compat.JIT_NAMES:
        return compat.jit_inner(eqn.params).jaxpr
    if name in compat.CALL_BODIES:
        body = compat.CALL_BODIES[name](eqn.params)
        return getattr(body, "jaxpr", body)
    if name in compat.REMAT_NAMES:
        body, _ = compat.remat_inner(eqn.params)
        return getattr(body, "jaxpr", body)
    return None


def dependent_vars(jaxpr, in_flags, into: set) -> list:
    """Adds to ``into`` the variables of ``jaxpr`` (and of the calls in it that are
    swept in place) that depend on the inputs flagged in ``in_flags``; returns
    the flags of its outputs. Conservative: any input flags all outputs of an
    equation (a flag only decides whether a cotangent is kept factored, never
    its value)."""
    for v, f in zip(jaxpr.invars, in_flags):
        if f:
            into.add(v)
    for eqn in jaxpr.eqns:
        ins = [_is_var(v) and v in into for v in eqn.invars]
        if not any(ins):
            continue
        sub = _sub_jaxpr(eqn)
        if sub is None:
            into.update(v for v in eqn.outvars if _is_var(v))
        else:
            outs = dependent_vars(sub, ins, into)
            into.update(v for v, o in zip(eqn.outvars, outs) if o and _is_var(v))
    return [_is_var(v) and v in into for v in jaxpr.outvars]


def _carry_fixpoint(body, flags, nc, nk) -> list:
    """Flags of a scan body's inputs with each carry flagged when its initial
    value is or the body makes it so."""
    flags = list(flags)
    while True:
        outs = dependent_vars(body, flags, set())
        new = flags[:nc] + [a or b for a, b in zip(flags[nc:nc + nk], outs[:nk])] + flags[nc + nk:]
        if new == flags:
            return flags
        flags = new


# ---------------------------------------------------------------- the sweep
class Sweep:
    """State of one per-example sweep (see the module docstring)."""

    def __init__(self, batch_trace, handlers: dict):
        self.batch_trace = batch_trace
        # The engine's handlers this sweep replaces, by call primitive (see
        # ``handler``; loops.py: scan and checkpointed regions).
        self.handlers = handlers
        # (trace where factored cotangents are made, example-dependent variables
        # of the jaxpr being swept there, or None to read it off the values)
        self.scopes = [(batch_trace, None)]
        # While True (at the sweep's own level), every parameter-side
        # cotangent is summed over the examples where it is made (Summed).
        self.summing = False
        # ids of the factors loops stacked over their steps: a second sweep
        # stacks them again, so keeping them costs nothing extra.
        self.loop_factors: set = set()

    # ------------------------------------------------ what the engine calls
    def handler(self, name):
        """The reverse handler of call primitive ``name`` in this sweep, or None
        (the engine's own): loops and checkpoints keep factored cotangents."""
        return self.handlers.get(name)

    @staticmethod
    def symbolic(ct) -> bool:
        """``ct`` is a cotangent kept as factors or as a sum over the examples."""
        return type(ct) in factored.SYMBOLIC

    @staticmethod
    def add(a, b):
        """The sum of two cotangents of one value, at least one of them symbolic."""
        return factored.add(a, b)

    # ---------------------------------------------------------------------
    def factoring_here(self) -> bool:
        return compat.current_trace() is self.scopes[-1][0]

    def summing_here(self) -> bool:
        return (self.summing and len(self.scopes) == 1
                and compat.current_trace() is self.batch_trace)

    @contextlib.contextmanager
    def scope(self, trace, example_vars: set):
        """Factored cotangents inside a program we trace (a scan's backward step)."""
        self.scopes.append((trace, example_vars))
        try:
            yield
        finally:
            self.scopes.pop()

    @contextlib.contextmanager
    def summing_over_examples(self, on: bool = True):
        saved, self.summing = self.summing, on
        try:
            yield
        finally:
            self.summing = saved

    def example_dependent(self, x, var) -> bool:
        if compat.mapped_by(self.batch_trace, x):
            return True
        example_vars = self.scopes[-1][1]
        return example_vars is not None and _is_var(var) and var in example_vars

    def parameter_side(self, rec, i) -> bool:
        """Input ``i`` of a recorded equation is differentiated, of a float dtype
        and the same for every example."""
        x = rec.invals[i]
        return (rec.active[i] and _differentiable(compat.typeof(x))
                and not self.example_dependent(x, rec.eqn.invars[i]))

    def summed(self, ct) -> Summed:
        """One example's cotangent summed over the examples, in the trace
        enclosing the vmap: a factored use is one contraction over examples and
        rows together (``sum_b L_b^T R_b``); no per-example gradient is formed."""
        parent, size = compat.vmap_parent(self.batch_trace)
        with compat.set_current_trace(parent):
            if type(ct) is not Factored:
                val, axis = compat.batched_value(self.batch_trace, ct)
                total = lax.mul(val, np.asarray(size, val.dtype)) if axis is None else \
                    jnp.sum(val, axis=axis)
                return Summed(total)
            total = None
            cd = ct.compute_dtype()
            for key, L, R in ct.uses:
                (lv, la), (rv, ra) = (self._parent_factor(x) for x in (L, R))
                part = factored.use_summed_over_examples(key, lv, la, rv, ra, size, ct.shape, cd)
                total = part if total is None else lax.add(total, part)
            if ct.dense is not None:
                val, axis = compat.batched_value(self.batch_trace, ct.dense)
                part = lax.mul(_cast_to(val, cd), np.asarray(size, cd)) if axis is None else \
                    jnp.sum(_cast_to(val, cd), axis=axis)
                total = part if total is None else lax.add(total, part)
            if total is None:
                total = jnp.zeros(ct.shape, ct.dtype)
            return Summed(_cast_to(total, ct.dtype))

    def _parent_factor(self, x):
        """A factor as ``(value of the enclosing trace, examples' axis or None)``."""
        if type(x) is factored.OneHot:
            idx, axis = compat.batched_value(self.batch_trace, x.idx)
            return factored.OneHot(idx, x.depth, x.dtype), axis
        return compat.batched_value(self.batch_trace, x)

    def apply_rule(self, rec, cts_out, default):
        """``default(rec, cts_out)`` (the engine's rule application), except where
        a cotangent is made, kept, passed on or summed symbolically."""
        if any(type(c) is Summed for c in cts_out):
            return self._apply_to_sums(rec, cts_out, default)
        if rec.handler is not None:
            if _passes_symbolic(rec):
                # Our own sweep over the call's body, in place: it sorts the
                # symbolic cotangents out equation by equation.
                return self._summed_inputs(rec, default(rec, cts_out))
            # A handler that sweeps a program of its own (a custom_jvp rule's
            # transpose on stand-in tangents, a loop body, a branch): its values
            # do not say which cotangents are the same for every example, so
            # nothing is summed inside it; what it returns is summed here.
            cts_out = [materialize(c) for c in cts_out]
            with self.summing_over_examples(False):
                cts = default(rec, cts_out)
            return self._summed_inputs(rec, cts)
        if any(type(c) is Factored for c in cts_out):
            through = PASS_THROUGH.get(rec.eqn.primitive.name)
            if through is not None:
                cts = through(rec, cts_out[0])
                if cts is not None:
                    return self._summed_inputs(rec, cts)
            cts_out = [materialize(c) for c in cts_out]
        make = FACTORING.get(rec.eqn.primitive.name)
        if make is not None and cts_out[0] is not None and self.factoring_here():
            cts = make(self, rec, cts_out[0], default)
            if cts is not None:
                return self._summed_inputs(rec, cts)
        return self._summed_inputs(rec, default(rec, cts_out))

    def _same_for_all(self, x):
        """A value that is the same for every example, as one value: a
        parameter-side cotangent computed from sums can come out of a handler
        mapped over the examples (its zero per-example parts were multiplied by
        per-example values), with every example's entry equal."""
        val, axis = compat.batched_value(self.batch_trace, x)
        if axis is None:
            return x
        parent, _ = compat.vmap_parent(self.batch_trace)
        with compat.set_current_trace(parent):
            return jnp.mean(val, axis=axis)

    def _summed_inputs(self, rec, cts_in):
        """While summing, the parameter-side inputs' cotangents are summed now."""
        if not self.summing_here():
            return cts_in
        return [self.summed(c) if c is not None and type(c) is not Summed
                and self.parameter_side(rec, i) else c for i, c in enumerate(cts_in)]

    def _apply_to_sums(self, rec, cts_out, default):
        """A rule whose output cotangents are (partly) summed over the examples.
        Everything upstream of a parameter-side value is parameter-side, so the
        rule is the same linear map for every example and applies to the sum;
        the per-example cotangents (of other outputs) go through on their own."""
        if rec.handler is not None and _passes_symbolic(rec):
            return default(rec, cts_out)    # our own sweep over the body sorts them
        plain = [None if type(c) is Summed else c for c in cts_out]
        sums = [c.value if type(c) is Summed else None for c in cts_out]
        with self.summing_over_examples(False):
            from_sums = default(rec, sums)
        result = [Summed(self._same_for_all(materialize(c)))
                  if c is not None and self.parameter_side(rec, i) else None
                  for i, c in enumerate(from_sums)]
        if any(c is not None for c in plain):
            from_plain = self.apply_rule(rec, plain, default)
            result = [b if a is None else a if b is None else factored.add(a, b)
                      for a, b in zip(result, from_plain)]
        return result


def _cast_to(x, dtype):
    dtype = np.dtype(dtype)
    return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _passes_symbolic(rec) -> bool:
    """A call whose backward is our own sweep over its body (a nested call swept
    in place, a checkpoint recomputed here, a custom_jvp rule's recorded tangent
    part, whose stand-in tangents are the primal values themselves), which takes
    factored or summed cotangents as they are."""
    handler = rec.handler
    if isinstance(handler, (InlineCall, CustomJVPCall)):
        return isinstance(rec.sub, Tape)
    if getattr(handler, "sweeps_body_here", False):     # loops.RematHandler
        return not isinstance(rec.sub, Delegated)
    return False


def _with_rest(rec, factored_inputs, ct, default):
    """The ordinary rule's cotangents for the active inputs not in ``factored_inputs``."""
    rest = [a and i not in factored_inputs for i, a in enumerate(rec.active)]
    if not any(rest):
        return [None] * len(rec.invals)
    return list(default(dataclasses.replace(rec, active=rest), [ct]))


# ------------------------------------------------------- making factors
def _dot_general_factors(ct, w, other, w_is_lhs, dimension_numbers):
    """``W``'s cotangent at ``out = dot_general(W, X)`` (or ``(X, W)``) as factors:
    ``ct_W[b, c, f] = sum_j X[b, j, c] ct[b, .., j, .., f]`` with ``b`` the batch
    dimensions (P), ``c`` W's contracting dimensions (from ``X``), ``f`` W's
    free dimensions (from the output's cotangent), ``j`` X's free ones (K)."""
    (lc, rc), (lb, rb) = dimension_numbers
    w_c, x_c, w_b, x_b = (lc, rc, lb, rb) if w_is_lhs else (rc, lc, rb, lb)
    w_nd, x_nd = np.ndim(w), np.ndim(other)
    w_f = [d for d in range(w_nd) if d not in w_c and d not in w_b]
    x_f = [d for d in range(x_nd) if d not in x_c and d not in x_b]
    nb = len(w_b)
    # The output lays out (batch, lhs free, rhs free).
    if w_is_lhs:
        ct_wf = list(range(nb, nb + len(w_f)))
        ct_xf = list(range(nb + len(w_f), nb + len(w_f) + len(x_f)))
    else:
        ct_xf = list(range(nb, nb + len(x_f)))
        ct_wf = list(range(nb + len(x_f), nb + len(x_f) + len(w_f)))
    b_sizes = [w.shape[d] for d in w_b]
    k = factored._prod([other.shape[d] for d in x_f])
    L = lax.transpose(other, tuple(x_b) + tuple(x_f) + tuple(x_c))
    L = lax.reshape(L, tuple(b_sizes) + (k,) + tuple(other.shape[d] for d in x_c))
    R = lax.transpose(ct, tuple(range(nb)) + tuple(ct_xf) + tuple(ct_wf))
    R = lax.reshape(R, tuple(b_sizes) + (k,) + tuple(ct.shape[d] for d in ct_wf))
    return factored.single(w.shape, w.dtype, L, R, w_b, w_c, w_f)


def _dot_general_factored(sweep, rec, ct, default):
    params = rec.eqn.params
    inputs = [i for i in (0, 1) if sweep.parameter_side(rec, i)]
    if not inputs:
        return None
    cts = _with_rest(rec, inputs, ct, default)
    lhs, rhs = rec.invals
    for i in inputs:
        w, other = (lhs, rhs) if i == 0 else (rhs, lhs)
        cts[i] = _dot_general_factors(ct, w, other, i == 0, params["dimension_numbers"])
    return cts


def _conv_factored(sweep, rec, ct, default):
    """The kernel's cotangent of a convolution without groups. Summing over the
    examples: the ordinary kernel-gradient convolution with the examples merged
    into the convolution's batch. Otherwise, where the Gram form is cheaper
    (few output positions, a large kernel), the image patches (``L``, one row
    per output position) and the output's cotangent (``R``):
    ``ct_W[o, i, k] = sum_{n, y} patches[n, y, (i, k)] ct[n, o, y]``; else the
    per-example kernel gradient of the ordinary rule (kernels are small)."""
    p = rec.eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    if not sweep.parameter_side(rec, 1):
        return None
    lhs, rhs = rec.invals
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    if sweep.summing_here():
        summed = _conv_kernel_summed(sweep, ct, lhs, rhs, p)
        if summed is None:
            return None
        cts = _with_rest(rec, [1], ct, default)
        cts[1] = summed
        return cts
    filter_shape = [rhs.shape[d] for d in rhs_spec[2:]]
    rows = factored._prod([ct.shape[d] for d in (out_spec[0],) + tuple(out_spec[2:])])
    cols = lhs.shape[lhs_spec[1]] * factored._prod(filter_shape)
    out_features = ct.shape[out_spec[1]]
    if cols * out_features <= 4 * rows * rows:
        return None
    patches = lax.conv_general_dilated_patches(
        lhs, filter_shape, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"], dimension_numbers=p["dimension_numbers"],
        precision=lax.Precision.HIGHEST)
    order = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
    L = lax.reshape(lax.transpose(patches, order),
                    (rows, lhs.shape[lhs_spec[1]]) + tuple(filter_shape))
    R = lax.reshape(lax.transpose(ct, order), (rows, out_features))
    cts = _with_rest(rec, [1], ct, default)
    cts[1] = factored.single(rhs.shape, rhs.dtype, L, R, (), (rhs_spec[1],) + tuple(rhs_spec[2:]),
                             (rhs_spec[0],))
    return cts


def _conv_kernel_summed(sweep, ct, lhs, rhs, params):
    """``sum_b`` of the kernel gradients, in the trace enclosing the vmap: the
    examples joined to each one's batch dimension, one convolution."""
    from ..rules.contraction import _conv_vjp_rhs
    (lv, la), (cv, ca) = (compat.batched_value(sweep.batch_trace, x) for x in (lhs, ct))
    if la is None or ca is None:
        return None
    lhs_spec, _, out_spec = params["dimension_numbers"]
    parent, _ = compat.vmap_parent(sweep.batch_trace)

    def merged(x, axis, n_axis):
        x = jnp.moveaxis(x, axis, n_axis)
        shape = list(x.shape)
        shape[n_axis:n_axis + 2] = [shape[n_axis] * shape[n_axis + 1]]
        return lax.reshape(x, tuple(shape))
    with compat.set_current_trace(parent):
        kernel = _conv_vjp_rhs(merged(cv, ca, out_spec[0]), None, merged(lv, la, lhs_spec[0]),
                               rhs, **params)
    return Summed(kernel)


def _gather_factored(sweep, rec, ct, default):
    """An embedding lookup ``W[idx]`` along one axis ``a`` (full slices of the
    other dimensions): ``ct_W = onehot(idx)^T ct``, with ``L`` the one-hot rows of
    the indices and ``R`` the output's cotangent, one row per index."""
    p = rec.eqn.params
    if not sweep.parameter_side(rec, 0):
        return None
    operand, indices = rec.invals
    dn = p["dimension_numbers"]
    if (dn.operand_batching_dims or dn.start_indices_batching_dims
            or len(dn.start_index_map) != 1
            or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map)):
        return None
    a = dn.start_index_map[0]
    sizes = p["slice_sizes"]
    if sizes[a] != 1 or any(sizes[d] != operand.shape[d] for d in range(operand.ndim) if d != a):
        return None
    if indices.shape[-1] != 1:
        return None
    v = operand.shape[a]
    idx = lax.reshape(indices, (factored._prod(indices.shape[:-1]),))
    if lax.GatherScatterMode.from_any(p["mode"]) == lax.GatherScatterMode.CLIP:
        idx = jnp.clip(idx, 0, v - 1)
    # Out-of-bounds indices (dropped by FILL_OR_DROP) have all-zero rows.
    L = factored.OneHot(idx, v, ct.dtype)
    offset = list(dn.offset_dims)
    batch = [d for d in range(ct.ndim) if d not in offset]
    rest = [d for d in range(operand.ndim) if d != a]
    R = lax.reshape(lax.transpose(ct, tuple(batch + offset)),
                    (int(idx.shape[0]),) + tuple(operand.shape[d] for d in rest))
    cts = [None, None]
    cts[0] = factored.single(operand.shape, operand.dtype, L, R, (), (a,), rest)
    return cts


FACTORING = {
    "dot_general": _dot_general_factored,
    "conv_general_dilated": _conv_factored,
    "gather": _gather_factored,
}


# --------------------------------------------- passing factors through ops
def _only_operand(rec):
    return len(rec.invals) == 1 and rec.active[0]


def _transpose_through(rec, f):
    return [factored.transposed(f, rec.eqn.params["permutation"])] if _only_operand(rec) else None


def _convert_through(rec, f):
    dtype = compat.typeof(rec.invals[0]).dtype
    if not _only_operand(rec) or not is_differentiable_dtype(dtype) or \
            jnp.issubdtype(dtype, jnp.complexfloating) or \
            jnp.issubdtype(f.dtype, jnp.complexfloating):
        return None
    return [factored.with_dtype(f, dtype)]


def _broadcast_through(rec, f):
    if not _only_operand(rec):
        return None
    return [factored.broadcast_summed(f, np.shape(rec.invals[0]),
                                      rec.eqn.params["broadcast_dimensions"])]


def _reshape_through(rec, f):
    if not rec.active[0] or rec.eqn.params.get("dimensions") is not None:
        return None
    ct = factored.unit_reshaped(f, np.shape(rec.invals[0]))
    return None if ct is None else [ct] + [None] * (len(rec.invals) - 1)


def _identity_through(rec, f):
    return [f] if _only_operand(rec) else None


def _mul_through(rec, f):
    """``W * s`` with a scalar ``s`` that is not differentiated."""
    x, y = rec.invals
    for w, s in ((0, 1), (1, 0)):
        if (rec.active[w] and not rec.active[s] and np.shape(rec.invals[s]) == ()
                and tuple(np.shape(rec.invals[w])) == f.shape):
            cts = [None, None]
            cts[w] = factored.scaled(f, rec.invals[s])
            return cts
    return None


PASS_THROUGH = {
    "transpose": _transpose_through,
    "convert_element_type": _convert_through,
    "broadcast_in_dim": _broadcast_through,
    "reshape": _reshape_through,
    "squeeze": _reshape_through,
    "copy": _identity_through,
    "copy_p": _identity_through,
    "mul": _mul_through,
}


class Delegated:
    """The state of a handler that ran the engine's own handler (outside the
    trace the per-example sweep factors in)."""

    def __init__(self, sub):
        self.sub = sub
