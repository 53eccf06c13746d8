"""``per_example_grad_norms``, ``clipped_grad`` and ``per_example_stats``.

Each takes the user's *per-example* loss and ``in_axes`` as ``jax.vmap`` does,
and runs, under ``jax.vmap``, our own forward sweep and backward sweep of one
example as a per-example sweep (:mod:`.sweep`): the parameters' cotangents
come out of the backward sweep factored where that is cheaper
(:mod:`.factored`), their per-example norms are taken from the factors inside
the vmap, and sums over the examples are contractions of the factors outside
it. The per-example gradients of large parameters are never formed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, tree_util

from .. import api as _api
from .. import compat
from ..engine import recording, sweeps
from . import factored, loops

# The vmap's axis name: private, so no user code can name it in a collective.
AXIS_NAME = "fbackprop_per_example"

_METHODS = ("auto", "reuse", "second_sweep")

# method="auto" reuses the first sweep's factors (one backward sweep of time) when
# what they add to memory is at most this fraction of the forward values the
# backward sweep keeps anyway, and runs the summing second sweep otherwise.
REUSE_FRACTION = 0.5


class PerExampleStats(NamedTuple):
    """What :func:`per_example_stats` returns (a pytree: it can leave ``jax.jit``).

    With ``g_i`` the gradient of the loss of example ``i`` with respect to the
    differentiated arguments (pytrees like them, or tuples of pytrees for a
    tuple ``argnums``), over ``B`` examples:

    Attributes:
      value: ``[B]``, the per-example losses.
      grad: ``mean_i g_i``.
      norms: ``[B]``, ``||g_i||`` over all differentiated leaves.
      param_norms: ``||g_i||`` of each leaf alone (each leaf ``[B]``).
      second_moment: ``mean_i g_i ** 2`` (elementwise).
      variance: ``mean_i (g_i - grad) ** 2`` (elementwise).
    """
    value: Any
    grad: Any
    norms: Any
    param_norms: Any
    second_moment: Any
    variance: Any


def _in_axes_per_arg(in_axes, args, nums, api: str):
    """``in_axes`` for ``jax.vmap``: the default maps every argument but the
    differentiated ones over its leading axis; the differentiated ones must not
    be mapped."""
    nargs = len(args)
    if in_axes is None:
        return tuple(None if i in nums else 0 for i in range(nargs))
    if isinstance(in_axes, (int, np.integer)) and not isinstance(in_axes, bool):
        per_arg = (int(in_axes),) * nargs
    elif isinstance(in_axes, tuple):
        if len(in_axes) != nargs:
            raise ValueError(
                f"{api}: in_axes has {len(in_axes)} entries but the function was called "
                f"with {nargs} positional arguments; give one entry per positional "
                f"argument (None for the differentiated arguments), as for jax.vmap.")
        per_arg = in_axes
    else:
        raise TypeError(
            f"{api}: in_axes must be None (the default: differentiated arguments shared, "
            f"every other positional argument mapped over its leading axis), an int, or a "
            f"tuple with one entry per positional argument, as for jax.vmap; got "
            f"{in_axes!r} of type {type(in_axes).__name__}.")
    for i in nums:
        if tree_util.tree_leaves(per_arg[i]):
            raise ValueError(
                f"{api}: argument {i} is differentiated (argnums) but in_axes maps it over "
                f"the examples (in_axes[{i}] = {per_arg[i]!r}). The differentiated "
                f"arguments are the parameters every example shares: give None for them "
                f"in in_axes, e.g. in_axes=(None, 0). (For gradients with respect to each "
                f"example's own inputs, use jax.vmap(fbackprop.grad(loss, argnums=...)).)")
    if not any(tree_util.tree_leaves(a) for a in per_arg):
        raise ValueError(
            f"{api}: in_axes {in_axes!r} maps no argument over the examples; map the "
            f"batch arguments, e.g. in_axes=(None, 0).")
    return tuple(per_arg)


def _interaction_error(api: str, err: Exception) -> ValueError:
    return ValueError(
        f"{api}: the per-example function uses a collective over an axis it does not "
        f"own ({err}). Per-example gradients need examples that do not interact: each "
        f"example's loss may depend on the parameters and on that example only. Batch "
        f"normalization over the batch (e.g. flax BatchNorm with axis_name), or "
        f"jax.lax.pmean / psum over the batch axis, make every loss depend on every "
        f"example. Use a per-example normalization (LayerNorm, GroupNorm), batch norm "
        f"with running statistics (use_running_average=True), or statistics computed "
        f"outside the differentiated function.")


def _per_argument(inputs, per_leaf, nums):
    """Per differentiated argument (in ``nums`` order) the pytree of ``per_leaf``
    (one value per differentiated leaf, in leaf order)."""
    it = iter(per_leaf)
    groups: dict = {i: [] for i in nums}
    for d, i in zip(inputs.diff, inputs.arg_index):
        if d:
            groups[i].append(next(it))
    return [tree_util.tree_unflatten(inputs.arg_trees[i], groups[i]) for i in nums]


def _pack(values, argnums):
    return values[0] if isinstance(argnums, (int, np.integer)) else tuple(values)


def _run(fun, argnums, in_axes, has_aux, api, mode, args, kwargs, clip=None,
         method="auto"):
    """The vmapped per-example sweep. Returns ``(outer inputs, nums, value, aux,
    per-leaf squared norms [B], per-leaf (spec, arrays) or None, per-leaf sums
    over the examples or None)``."""
    nums = _api._normalize_argnums(argnums, len(args), api)
    outer = _api._Inputs(args, kwargs, nums, api)
    for aval, d in zip(outer.diff_avals, outer.diff):
        if d and jnp.issubdtype(aval.dtype, jnp.complexfloating):
            raise TypeError(
                f"{api}: a differentiated argument has the complex dtype {aval.dtype}; "
                f"per-example norms and clipping are defined here for real parameters. "
                f"Split complex parameters into real and imaginary parts.")
    axes = _in_axes_per_arg(in_axes, args, nums, api)
    cell: dict = {}

    def one_example(*args, **kwargs):
        batch_trace = compat.current_trace()
        inputs = _api._Inputs(args, kwargs, nums, api)
        diff_leaves = [i for i, d in enumerate(inputs.diff) if d]
        flat = summed = None
        with loops.per_example_sweep(batch_trace) as sw:
            try:
                run = recording.record(fun, inputs.in_tree, inputs.leaves,
                                           inputs.active())
            except NameError as err:   # a collective over an unbound axis name
                if "axis name" not in str(err):
                    raise
                raise _interaction_error(api, err) from None
            _, aux_tree = _api.split_scalar_output(run.out_tree, run.out_vals, has_aux, api)
            value = run.out_vals[0]
            n_out = len(run.out_vals)

            def backward(seed, tape=run.tape):
                if not run.out_active[0]:
                    return [None] * len(diff_leaves)
                # The seed is made to depend on the value, so XLA cannot start the
                # backward sweep's seed-dependent work (and keep its results) early.
                seed, _ = lax.optimization_barrier(
                    (lax.convert_element_type(seed, compat.typeof(value).dtype), value))
                cts = sweeps.backward(tape, [seed] + [None] * (n_out - 1))
                return [cts[i] for i in diff_leaves]

            cts = backward(jnp.ones(()))
            sq = [factored.sq_norm(c) for c in cts]
            sq = [jnp.zeros((), np.float32) if s is None else s for s in sq]
            if mode == "clip":
                norm = jnp.sqrt(sum(sq[1:], sq[0]) if sq else jnp.zeros((), np.float32))
                # min(1, C / ||g||); a zero gradient (C / 0 = inf) keeps weight 1.
                weight = jnp.minimum(jnp.ones((), norm.dtype), clip / norm)
                # A second sweep seeded with the weights gives the weighted sum if
                # the backward sweep is linear in its seed: every rule of ours is,
                # a user's custom_vjp bwd need not be.
                custom_vjp = _custom_vjp_in(run.tape)
                if method == "second_sweep" and custom_vjp:
                    raise ValueError(
                        f"{api}(method='second_sweep'): the function calls the custom_vjp "
                        f"function {custom_vjp!r}, whose bwd need not be linear in the "
                        f"cotangent, so a second backward sweep seeded with the clipping "
                        f"weights need not give the sum of the clipped gradients. Use "
                        f"method='auto' (it reuses the first sweep's factors here) or "
                        f"method='reuse'.")
                second = method == "second_sweep" or (
                    method == "auto" and not custom_vjp
                    and _kept_bytes(cts, sw) >
                    REUSE_FRACTION * _tape_bytes(run.tape, batch_trace))
                cell["method"] = "second_sweep" if second else "reuse"
                if second:
                    # The second sweep reads the forward values through an
                    # optimization barrier (with the weights, so it runs after the
                    # first): XLA cannot merge its rules' cotangent-free parts with
                    # the first sweep's and keep them alive in between.
                    seeds = [jnp.ones((), compat.typeof(value).dtype)] + [None] * (n_out - 1)
                    tape, weight = _barrier(run.tape, weight, seeds)
                    with sw.summing_over_examples():
                        cts = backward(weight, tape)
                        summed = [None if c is None else
                                  c.value if type(c) is factored.Summed else sw.summed(c).value
                                  for c in cts]
                else:
                    cts = [None if c is None else
                           factored.scaled(c, weight) if type(c) is factored.Factored else
                           lax.mul(c, weight.astype(c.dtype)) for c in cts]
        if mode == "stats" or (mode == "clip" and summed is None):
            specs, flat = [], []
            for c in cts:
                spec, arrays = factored.flatten(c)
                specs.append(spec)
                flat.append(arrays)
            cell["specs"] = specs
        aux = run.out_vals[1:] if has_aux else []
        cell["aux_tree"] = aux_tree
        return value, aux, sq, flat, summed

    # Sums over the examples are values of the enclosing trace: not mapped.
    value, aux, sq, flat, summed = jax.vmap(
        one_example, in_axes=axes, out_axes=(0, 0, 0, 0, None), axis_name=AXIS_NAME)(
        *args, **kwargs)
    if has_aux:
        aux = tree_util.tree_unflatten(cell["aux_tree"], aux)
    per_leaf = None if flat is None else list(zip(cell["specs"], flat))
    return outer, nums, value, aux, sq, per_leaf, summed


def _nbytes(x) -> int:
    aval = compat.typeof(x)
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _kept_bytes(cts, sw) -> int:
    """Bytes per example of the parameters' cotangents as the first sweep left
    them (what reusing them keeps alive until the norms are known). Arrays the
    same for every example do not grow with the batch, and factors a loop
    stacked over its steps are stacked by a second sweep too: neither counts."""
    total = 0
    for c in cts:
        if c is None:
            continue
        _, arrays = factored.flatten(c)
        total += sum(_nbytes(a) for a in arrays if compat.mapped_by(sw.batch_trace, a)
                     and id(a) not in sw.loop_factors)
    return total


def _tape_bytes(tape, batch_trace) -> int:
    """Bytes per example of the forward values on the tape."""
    seen, total = set(), 0
    for x in tree_util.tree_leaves(tape):
        if compat.mapped_by(batch_trace, x) and id(x) not in seen:
            seen.add(id(x))
            total += _nbytes(x)
    return total


def _barrier(tape, weight, seeds):
    leaves, tree = tree_util.tree_flatten(tape)
    arrays = [i for i, x in enumerate(leaves) if compat.is_tracer(x) or isinstance(x, jax.Array)]
    arrays = _read_by_backward(leaves, tree, arrays, seeds)
    barred = lax.optimization_barrier([weight] + [leaves[i] for i in arrays])
    for i, x in zip(arrays, barred[1:]):
        leaves[i] = x
    return tree_util.tree_unflatten(tree, leaves), barred[0]


def _read_by_backward(leaves, tree, arrays, seeds):
    """The tape leaves (of ``arrays``) a backward sweep reads: a trial sweep
    traced to a jaxpr, dead code removed."""
    def trial(*vals):
        ls = list(leaves)
        for i, v in zip(arrays, vals):
            ls[i] = v
        cts = sweeps.backward(tree_util.tree_unflatten(tree, ls), list(seeds))
        return [factored.materialize(c) for c in cts
                if c is not None and type(c) is not factored.Summed]
    closed = jax.make_jaxpr(trial)(*[compat.spec_of(leaves[i]) for i in arrays])
    jaxpr = closed.jaxpr
    used = compat.dce_used_inputs(jaxpr)
    return [i for i, u in zip(arrays, used) if u]


def _jaxprs_in(value):
    if isinstance(value, compat.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, compat.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _jaxprs_in(v)


def _custom_vjp_in(tape):
    """The name of a custom_vjp function the recorded program calls (at any
    depth: in nested calls, loop bodies and branches), or None."""
    seen: set = set()
    stack = [rec.eqn for rec in tape.records]
    while stack:
        eqn = stack.pop()
        if eqn.primitive.name == compat.CUSTOM_VJP_CALL:
            return eqn.params.get("name") or str(eqn.params.get("call_jaxpr", "?"))[:40]
        for value in eqn.params.values():
            for jaxpr in _jaxprs_in(value):
                if id(jaxpr) not in seen:
                    seen.add(id(jaxpr))
                    stack.extend(jaxpr.eqns)
    return None


def _diff_avals(outer):
    return [a for a, d in zip(outer.diff_avals, outer.diff) if d]


def _norm(sq):
    return jnp.sqrt(sum(sq[1:], sq[0])) if sq else None


def _check_clip(l2_norm_clip, api):
    if isinstance(l2_norm_clip, (int, float, np.integer, np.floating)) and \
            not isinstance(l2_norm_clip, bool):
        if not l2_norm_clip > 0:
            raise ValueError(f"{api}: l2_norm_clip must be positive, got {l2_norm_clip!r}.")
        return
    if np.shape(l2_norm_clip) != ():
        raise TypeError(f"{api}: l2_norm_clip must be a positive scalar, got a value of "
                        f"shape {np.shape(l2_norm_clip)}.")


def per_example_grad_norms(fun: Callable, in_axes=None, argnums: int | Sequence[int] = 0,
                           has_aux: bool = False) -> Callable:
    """Creates a function that returns each example's gradient norm.

    ``fun`` is the loss of *one* example; ``in_axes`` says, as for
    :func:`jax.vmap`, which arguments hold the examples. The result equals
    ``sqrt`` of the sum over leaves of ``jax.vmap(jax.grad(fun, argnums),
    in_axes)(...) ** 2`` per example, computed without forming any per-example
    gradient of a parameter used in a matrix product, convolution or embedding
    lookup: those norms come from the use's input and output cotangent (the
    Gram form, ``T x T`` for ``T`` rows per example, or the per-example gradient
    where that costs fewer FLOPs), with the cross terms of parameters used
    several times (tied embeddings, weights in a ``lax.scan``).

    Args:
      fun: per-example loss, returning a scalar (or ``(scalar, aux)`` with
        ``has_aux``). Examples must not interact (no collective over the batch,
        such as batch norm across it): that is an error.
      in_axes: ``None`` (default: the differentiated arguments are shared, every
        other positional argument is mapped over its leading axis), or as for
        :func:`jax.vmap` (an int or a tuple with one entry per positional
        argument) with ``None`` for the differentiated arguments. Keyword
        arguments are mapped over their leading axis.
      argnums: which positional arguments to differentiate (int or tuple).
      has_aux: ``fun`` returns ``(loss, aux)``; the function then returns
        ``(norms, aux)`` with each example's ``aux`` stacked.

    Returns:
      A function returning ``norms``, shape ``[B]`` (float32, or float64 for
      float64 parameters).

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> loss = lambda w, x: jnp.sum(x @ w) ** 2 / 2
      >>> w, x = jnp.ones((3, 2)), jnp.array([[1.0, 0, 0], [0, 2.0, 0]])
      >>> fb.per_example_grad_norms(loss, in_axes=(None, 0))(w, x)
      Array([ 2.828427, 11.313708], dtype=float32)
    """
    api = "per_example_grad_norms"
    _api._check_callable(fun, api)

    @functools.wraps(fun)
    def norms_f(*args, **kwargs):
        _, _, _, aux, sq, _, _ = _run(fun, argnums, in_axes, has_aux, api, "norms", args,
                                      kwargs)
        norms = _norm(sq)
        return (norms, aux) if has_aux else norms

    return norms_f


def clipped_grad(fun: Callable, l2_norm_clip, in_axes=None, argnums: int | Sequence[int] = 0,
                 has_aux: bool = False, method: str = "auto") -> Callable:
    """Creates a function that returns the sum of per-example gradients, each
    clipped to norm ``l2_norm_clip`` (the gradient step of DP-SGD, before noise).

    The result is ``sum_i g_i * min(1, l2_norm_clip / ||g_i||)`` with ``g_i``
    the gradient of ``fun`` on example ``i``, and the norms ``||g_i||``. The
    per-example gradients of large parameters are never formed: the norms
    come first (as in :func:`per_example_grad_norms`), then each example's
    weight ``min(1, C / ||g_i||)`` multiplies its factors and the sum over the
    examples is one contraction per parameter use.

    Args:
      fun: per-example loss (see :func:`per_example_grad_norms`).
      l2_norm_clip: the clipping norm ``C > 0`` (a float or a scalar array).
      in_axes: as in :func:`per_example_grad_norms`.
      argnums: which positional arguments to differentiate.
      has_aux: ``fun`` returns ``(loss, aux)``; the function then returns
        ``((grads, norms), aux)``.
      method: ``"reuse"``: the weights scale the factors the one backward
        sweep kept (one backward pass of time, but each use's factors stay
        alive until all norms are known, as in Book-Keeping);
        ``"second_sweep"``: a second backward sweep over the same forward pass,
        seeded with the weights, in which each use is summed over the examples
        where it is made (ghost clipping: one more backward pass of time,
        nothing per-example outlives its use). It is the weighted sum only if
        the backward sweep is linear in its seed, which a ``custom_vjp``'s bwd
        need not be: it refuses a program with one. ``"auto"`` (default):
        ``"reuse"`` when the factors it keeps take at most half the bytes of
        the forward values the backward sweep keeps anyway (a transformer, a
        CNN, an RNN's loop factors) or when the program has a ``custom_vjp``;
        ``"second_sweep"`` otherwise (an MLP, whose factors are as large as
        its activations).

    Returns:
      A function returning ``(grads, norms)``: ``grads`` like the differentiated
      arguments (a tuple of them for a tuple ``argnums``), ``norms`` ``[B]``.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> loss = lambda w, x: jnp.sum(x @ w) ** 2 / 2
      >>> w, x = jnp.ones((3, 2)), jnp.array([[1.0, 0, 0], [0, 2.0, 0]])
      >>> grads, norms = fb.clipped_grad(loss, 1.0, in_axes=(None, 0))(w, x)
      >>> grads
      Array([[0.70710677, 0.70710677],
             [0.70710677, 0.70710677],
             [0.        , 0.        ]], dtype=float32)
    """
    api = "clipped_grad"
    _api._check_callable(fun, api)
    _check_clip(l2_norm_clip, api)
    if method not in _METHODS:
        raise ValueError(f"{api}: method must be one of {_METHODS}, got {method!r}.")

    @functools.wraps(fun)
    def clipped_f(*args, **kwargs):
        outer, nums, _, aux, sq, per_leaf, summed = _run(
            fun, argnums, in_axes, has_aux, api, "clip", args, kwargs, clip=l2_norm_clip,
            method=method)
        avals = _diff_avals(outer)
        if summed is not None:
            grads = [jnp.zeros(a.shape, a.dtype) if g is None else g.astype(a.dtype)
                     for g, a in zip(summed, avals)]
        else:
            grads = [factored.sum_over_examples(spec, arrays, a.shape, a.dtype)
                     for (spec, arrays), a in zip(per_leaf, avals)]
        out = (_pack(_per_argument(outer, grads, nums), argnums), _norm(sq))
        return (out, aux) if has_aux else out

    return clipped_f


def per_example_stats(fun: Callable, in_axes=None, argnums: int | Sequence[int] = 0,
                      has_aux: bool = False) -> Callable:
    """Creates a function that returns per-example gradient statistics.

    BackPACK's first-order quantities from one backward sweep: the per-example
    losses and gradient norms (overall and per leaf), the mean gradient, and
    the elementwise second moment and variance of the per-example gradients
    (see :class:`PerExampleStats`). Norms and the mean never form per-example
    gradients of large parameters; the elementwise moments need ``sum_i g_i**2``,
    which for a weight applied to one vector per example is
    ``sum_i x_i**2 (x) c_i**2`` and otherwise is formed from the per-example
    gradients a chunk of examples at a time (never all at once).

    Args:
      fun: per-example loss (see :func:`per_example_grad_norms`).
      in_axes: as in :func:`per_example_grad_norms`.
      argnums: which positional arguments to differentiate.
      has_aux: ``fun`` returns ``(loss, aux)``; the function then returns
        ``(stats, aux)``.

    Returns:
      A function returning a :class:`PerExampleStats`.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> loss = lambda w, x: jnp.sum(x @ w) ** 2 / 2
      >>> w, x = jnp.ones((3, 2)), jnp.array([[1.0, 0, 0], [0, 2.0, 0]])
      >>> stats = fb.per_example_stats(loss, in_axes=(None, 0))(w, x)
      >>> stats.grad
      Array([[1., 1.],
             [4., 4.],
             [0., 0.]], dtype=float32)
    """
    api = "per_example_stats"
    _api._check_callable(fun, api)

    @functools.wraps(fun)
    def stats_f(*args, **kwargs):
        outer, nums, value, aux, sq, per_leaf, _ = _run(fun, argnums, in_axes, has_aux, api,
                                                        "stats", args, kwargs)
        n = value.shape[0]
        means, seconds, variances = [], [], []
        for (spec, arrays), a in zip(per_leaf, _diff_avals(outer)):
            total = factored.sum_over_examples(spec, arrays, a.shape,
                                               factored.compute_dtype(a.dtype))
            mean = total / n
            second, var = factored.second_moments(spec, arrays, a.shape, mean)
            means.append(mean.astype(a.dtype))
            seconds.append(second.astype(a.dtype))
            variances.append(var.astype(a.dtype))
        stats = PerExampleStats(
            value=value,
            grad=_pack(_per_argument(outer, means, nums), argnums),
            norms=_norm(sq),
            param_norms=_pack(_per_argument(outer, [jnp.sqrt(s) for s in sq], nums), argnums),
            second_moment=_pack(_per_argument(outer, seconds, nums), argnums),
            variance=_pack(_per_argument(outer, variances, nums), argnums))
        return (stats, aux) if has_aux else stats

    return stats_f
