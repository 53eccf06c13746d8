"""Forward mode and higher-order derivatives with JAX's signatures and semantics.

``jvp`` and ``linearize`` push tangents through fbackprop's own tangent sweep
(:mod:`fbackprop._src.forward`); ``jacfwd``/``jacrev`` map our own ``jvp``/``vjp``
over a basis with ``jax.vmap`` (batching, not differentiation); ``hessian`` is
``jacfwd(jacrev(f))`` and ``hvp`` is forward-over-reverse (Pearlmutter's trick)
by default. Higher orders come from nesting: every derivative function is
itself a plain function of arrays that the engines can trace again.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from . import api, compat, eager, trace
from . import eager as eager_programs
from .engine import recording
from .engine.tangents import push_tangents
from .linearization import LinearizedProgram
from .api import _check_callable, _normalize_argnums, grad, vjp
from .registry import jax_float0

__all__ = ["jvp", "linearize", "jacfwd", "jacrev", "jacobian", "hessian", "hvp"]


# -------------------------------------------------------------------- helpers
def _aval(x):
    return compat.typeof(x)


def _fmt(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _tangent_dtype(dtype):
    """JAX's tangent dtype: the dtype itself for inexact types, float0 otherwise."""
    return dtype if jnp.issubdtype(dtype, jnp.inexact) else jax_float0


def _is_tracer_tree(xs) -> bool:
    return any(compat.is_tracer(x) for x in xs)


def _as_array(x):
    """Python scalars become (weakly typed) arrays so every leaf can be bound."""
    if isinstance(x, (bool, int, float, complex)):
        return jnp.asarray(x)
    return x


def _zero_tangent(aval):
    """JAX's instantiated zero tangent: the primal's dtype and weak type (float0
    for integer and boolean primals)."""
    if jnp.issubdtype(aval.dtype, jnp.inexact):
        return compat.with_weak_type(jnp.zeros(aval.shape, aval.dtype), bool(aval.weak_type))
    return np.zeros(aval.shape, jax_float0)


def _as_given(outs: list, converted: list, given: list) -> list:
    """``outs`` with every value that is one of the ``converted`` inputs (Python
    scalars and NumPy values made arrays so they can be bound) replaced by the
    input as it was given: a function that returns an argument unchanged gets
    it back unchanged, as from JAX."""
    back = {id(c): g for c, g in zip(converted, given) if c is not g}
    if not back:
        return list(outs)
    return [back.get(id(o), o) for o in outs]


def _weak_like(t, aval):
    """An output tangent with its primal's weak type, as JAX gives it; a tangent
    handed back as it was given (a Python or NumPy value) stays as it is."""
    if isinstance(t, jax.Array) or compat.is_tracer(t):
        return compat.with_weak_type(t, bool(aval.weak_type))
    return t


def _passed_through(outs, touts, primals, tangents, given_primals, given_tangents):
    """``(outs, touts)`` where an output that is an input passed through unchanged
    (its primal and its tangent the very objects the sweep started from) is that
    input as it was given, tangent included; other outputs stay as computed (JAX
    returns arrays for them, even when a rule forwards an input tangent)."""
    index = {id(p): j for j, p in enumerate(primals)}
    outs, touts = list(outs), list(touts)
    for i, (o, t) in enumerate(zip(outs, touts)):
        j = index.get(id(o))
        if j is not None and t is tangents[j]:
            outs[i] = given_primals[j]
            if t is not None:
                touts[i] = given_tangents[j]
    return outs, touts


def _check_primal_leaves(leaves_with_path, api_name: str, what: str = "primals"):
    for path, x in leaves_with_path:
        trace.check_leaf(x, f"{api_name}: {what}{tree_util.keystr(path)}")


def _param_names(fun) -> list[str]:
    try:
        return [p.name for p in inspect.signature(fun).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _validate_tangents(p_leaves_with_path, t_leaves, api_name: str, fun=None):
    """JAX's checks for a (primal, tangent) pair, with the leaf path (and the
    name of the function's parameter) in the message."""
    names = _param_names(fun) if fun is not None else []
    out = []
    for (path, p), t in zip(p_leaves_with_path, t_leaves):
        where = tree_util.keystr(path)
        idx = getattr(path[0], "idx", None) if path else None
        if isinstance(idx, int) and idx < len(names):
            where += f" (argument `{names[idx]}`)"
        trace.check_leaf(t, f"{api_name}: tangents{where}")
        p_aval = _aval(p)
        t_dtype = _aval(t).dtype  # canonical, like JAX (float64 numpy -> float32 without x64)
        want = _tangent_dtype(p_aval.dtype)
        if t_dtype != want:
            hint = ("pass a float0 tangent, e.g. np.zeros(shape, jax.dtypes.float0), for an "
                    "integer or boolean primal" if want == jax_float0 else
                    f"cast the tangent with .astype({np.dtype(want).name})")
            raise TypeError(
                f"primal and tangent arguments to {_args_name(api_name)} do not match; "
                f"dtypes must be equal, or in case of int/bool primal dtype the tangent "
                f"dtype must be float0. Got primal dtype {p_aval.dtype} and so expected tangent dtype "
                f"{np.dtype(want).name}, but got tangent dtype {np.dtype(t_dtype).name} "
                f"instead (at primals{where}: {hint}).")
        if tuple(np.shape(t)) != tuple(p_aval.shape):
            raise ValueError(
                f"{api_name} called with different primal and tangent shapes; Got primal "
                f"shape {tuple(p_aval.shape)} and tangent shape as {tuple(np.shape(t))} (at "
                f"primals{where}). A tangent must have its primal's shape and dtype.")
        if want == jax_float0:
            out.append(None)
        else:
            out.append(jnp.asarray(t, p_aval.dtype) if not
                       (isinstance(t, jax.Array) or compat.is_tracer(t)) else t)
    return out


# fbackprop.jvp checks its arguments as jax.jvp does and says so in jax.jvp's
# words (code that matches JAX's messages keeps working), then how to fix them.
_TAKES_JAX_ARGS = "fbackprop.jvp takes the arguments of jax.jvp:"


def _args_name(api_name: str) -> str:
    """The function whose arguments the messages of ``api_name`` are about."""
    return "jax.jvp" if api_name == "jvp" else api_name


def _leaves(n: int, what: str) -> str:
    return f"{n} {what} leaf" if n == 1 else f"{n} {what} leaves"


def _jvp(fun, primals, tangents, has_aux=False, api_name="jvp"):
    """``jvp`` without the tuple/list check (used by ``jacfwd`` under ``vmap``)."""
    p_leaves_with_path, p_tree = tree_util.tree_flatten_with_path(primals)
    t_leaves, t_tree = tree_util.tree_flatten(tangents)
    if p_tree != t_tree:
        how = (f"{_TAKES_JAX_ARGS} one tangent per primal, in the same containers"
               if api_name == "jvp" else "Give one tangent per primal, in the same containers")
        raise TypeError(
            f"primal and tangent arguments to {_args_name(api_name)} must have the same "
            f"tree structure; primals have tree structure {p_tree} whereas tangents have "
            f"tree structure {t_tree} ({_leaves(p_tree.num_leaves, 'primal')}, "
            f"{_leaves(t_tree.num_leaves, 'tangent')}). {how} (build them with e.g. "
            f"jax.tree_util.tree_map(jnp.ones_like, primals)).")
    _check_primal_leaves(p_leaves_with_path, api_name)
    tangent_vals = _validate_tangents(p_leaves_with_path, t_leaves, api_name, fun)
    given = [x for _, x in p_leaves_with_path]
    leaves = [_as_array(x) for x in given]
    in_tree = tree_util.tree_structure((tuple(primals), {}))
    outs, out_tree, touts = push_tangents(fun, in_tree, leaves, tangent_vals)
    outs, touts = _passed_through(outs, touts, leaves, tangent_vals, given, t_leaves)
    main_tree, aux_tree = api.split_aux(out_tree, api_name, has_aux)

    n_main = main_tree.num_leaves
    out_tangents = []
    for i, (o, t) in enumerate(zip(outs[:n_main], touts)):
        aval = api.output_aval(o, api_name, f"[{i}]")
        if t is None:
            t = _zero_tangent(aval)
        elif jnp.issubdtype(aval.dtype, jnp.inexact):
            t = _weak_like(t, aval)
        out_tangents.append(t)
    primal_out = tree_util.tree_unflatten(main_tree, outs[:n_main])
    tangent_out = tree_util.tree_unflatten(main_tree, out_tangents)
    if has_aux:
        return primal_out, tangent_out, tree_util.tree_unflatten(aux_tree, outs[n_main:])
    return primal_out, tangent_out


def jvp(fun: Callable, primals, tangents, has_aux: bool = False):
    """Computes ``fun(*primals)`` and its Jacobian-vector product with ``tangents``.

    Same signature and semantics as :func:`jax.jvp`; the tangents are pushed
    forward by fbackprop's own tangent sweep (one JVP rule per primitive).

    Args:
      fun: function of arrays / pytrees of arrays returning a pytree of arrays (or
        ``(out, aux)`` with ``has_aux=True``).
      primals: tuple or list of the positional arguments of ``fun``.
      tangents: tuple or list with the same tree structure, shapes and dtypes as
        ``primals`` (``jax.dtypes.float0`` tangents for integer/bool primals).
      has_aux: whether ``fun`` returns ``(out, aux)``; ``aux`` is returned as is.

    Returns:
      ``(primals_out, tangents_out)``, or ``(primals_out, tangents_out, aux)``;
      ``tangents_out`` has the structure of ``primals_out`` (``float0`` zeros for
      integer outputs).

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> fb.jvp(jnp.sin, (0.0,), (2.0,))
      (Array(0., dtype=float32, weak_type=True), Array(2., dtype=float32, weak_type=True))
    """
    _check_callable(fun, "jvp")
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError(
            f"primal and tangent arguments to jax.jvp must be tuples or lists; found "
            f"{type(primals).__name__} and {type(tangents).__name__}. {_TAKES_JAX_ARGS} "
            f"wrap a single argument as a 1-tuple, fb.jvp(f, (x,), (t,)).")
    return _jvp(fun, primals, tangents, has_aux=has_aux)


# --------------------------------------------------------------- linearize
_linearized: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _linearized_program(traced, mask) -> LinearizedProgram:
    per = _linearized.setdefault(traced, {})
    key = tuple(mask)
    prog = per.get(key)
    if prog is None:
        closed = traced.closed
        in_avals = [v.aval for v in closed.jaxpr.invars]
        prog = LinearizedProgram(closed.jaxpr, closed.consts, in_avals, mask)
        if not _is_tracer_tree(closed.consts):
            per[key] = prog
    return prog


class _Lifted:
    """The static part of a ``linearize`` result (everything but the residuals)."""

    def __init__(self, prog, primal_tree, in_avals, out_avals, main_tree):
        self.prog, self.primal_tree, self.in_avals = prog, primal_tree, in_avals
        self.out_avals, self.main_tree = out_avals, main_tree

    def __call__(self, residuals, *tangents):
        t_leaves_with_path, t_tree = tree_util.tree_flatten_with_path(tangents)
        if t_tree != self.primal_tree:
            raise TypeError(
                f"linearized function called with tangents whose tree structure does not "
                f"match the primals given to linearize: it takes one tangent per primal, "
                f"each with that primal's structure.\n  expected: {self.primal_tree}\n"
                f"  got:      {t_tree}")
        nz, given = [], []
        for (path, t), aval, m in zip(t_leaves_with_path, self.in_avals, self.prog.tangent_mask):
            trace.check_leaf(t, f"linearized function: tangent{tree_util.keystr(path)}")
            t_aval = _aval(t)
            want = _tangent_dtype(aval.dtype)
            if tuple(t_aval.shape) != tuple(aval.shape) or t_aval.dtype != want:
                raise ValueError(
                    f"linearized function called on tangent values inconsistent with the "
                    f"original primal values: got tangent {_fmt(t_aval.shape, t_aval.dtype)} "
                    f"at tangents{tree_util.keystr(path)} for primal "
                    f"{_fmt(aval.shape, aval.dtype)}, but expected "
                    f"{_fmt(aval.shape, want)}.")
            if m:
                given.append(t)
                nz.append(t if isinstance(t, jax.Array) or compat.is_tracer(t)
                          else jnp.asarray(t, aval.dtype))
        touts = iter(_as_given(self.prog.eval_tangent(residuals, nz), nz, given))
        n_main = self.main_tree.num_leaves
        out = []
        for aval, nonzero in zip(self.out_avals, self.prog.out_tangent_nonzero):
            t = next(touts) if nonzero else None
            out.append(t)
        out = [_zero_tangent(a) if t is None else _weak_like(t, a)
               for a, t in zip(self.out_avals[:n_main], out[:n_main])]
        return tree_util.tree_unflatten(self.main_tree, out)


def linearize(fun: Callable, *primals, has_aux: bool = False):
    """Evaluates ``fun`` at ``primals`` and returns its linearization there.

    Same signature and semantics as :func:`jax.linearize`. The tangent sweep is
    traced once and split: everything that does not depend on a tangent (the
    primal computation and the primal-only factors of the rules) runs now; the
    returned ``jvp_fn`` only evaluates the linear part, from saved residuals.
    ``jvp_fn`` is a :class:`jax.tree_util.Partial`, so it can be called any
    number of times and passed through ``jax.jit``.

    Args:
      fun: function of arrays / pytrees of arrays.
      *primals: the point to linearize at, one value per positional argument.
      has_aux: whether ``fun`` returns ``(out, aux)``.

    Returns:
      ``(primals_out, jvp_fn)`` or ``(primals_out, jvp_fn, aux)``, where
      ``jvp_fn(*tangents)`` takes one tangent per primal and returns the output
      tangent with the structure of ``primals_out``.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> y, f_jvp = fb.linearize(lambda x: 3.0 * jnp.sin(x), 0.0)
      >>> f_jvp(1.0), f_jvp(2.0)
      (Array(3., dtype=float32, weak_type=True), Array(6., dtype=float32, weak_type=True))
    """
    _check_callable(fun, "linearize")
    p_leaves_with_path, p_tree = tree_util.tree_flatten_with_path(primals)
    _check_primal_leaves(p_leaves_with_path, "linearize")
    given = [x for _, x in p_leaves_with_path]
    leaves = [_as_array(x) for x in given]
    in_tree = tree_util.tree_structure((tuple(primals), {}))
    in_avals = [_aval(x) for x in leaves]
    mask = [jnp.issubdtype(a.dtype, jnp.inexact) for a in in_avals]
    eager = compat.is_eager() and not _is_tracer_tree(leaves)
    if eager:
        # Run the function on the values (Python control flow on them works, as
        # in jax.linearize) and linearize the program it ran.
        run = recording.record(fun, in_tree, leaves, mask, tape_only=True,
                               bind=eager_programs.bind, stage_custom_vjp=True)
        closed, out_tree = recording.recorded_jaxpr(run), run.out_tree
        prog = LinearizedProgram(closed.jaxpr, closed.consts, in_avals, mask)
    else:
        traced = trace.trace_flat(fun, in_tree, leaves, what=getattr(fun, "__name__", "fun"))
        closed, out_tree = traced.closed, traced.out_tree
        prog = _linearized_program(traced, mask)
    main_tree, aux_tree = api.split_aux(out_tree, "linearize", has_aux)
    out_avals = [v.aval for v in closed.jaxpr.outvars]
    outs, residuals = prog.eval_primal(leaves)
    if eager:
        # What the function returned without a dependence on the inputs (a
        # Python number, a NumPy array) is returned as it is, as by JAX.
        outs = [o if a else x for o, x, a in zip(outs, run.out_vals, run.out_active)]
    outs = _as_given(outs, leaves, given)

    lifted = _Lifted(prog, p_tree, in_avals, out_avals, main_tree)
    jvp_fn = tree_util.Partial(lifted, list(residuals))
    n_main = main_tree.num_leaves
    primal_out = tree_util.tree_unflatten(main_tree, outs[:n_main])
    if has_aux:
        return primal_out, jvp_fn, tree_util.tree_unflatten(aux_tree, outs[n_main:])
    return primal_out, jvp_fn


# ----------------------------------------------------------------- Jacobians
def _argnums_partial(fun, argnums: tuple[int, ...], args, kwargs):
    """``fun`` as a function of ``args[argnums]`` only (the rest closed over)."""
    dyn_args = tuple(args[i] for i in argnums)

    def f_partial(*dyn):
        full = list(args)
        for i, x in zip(argnums, dyn):
            full[i] = x
        return fun(*full, **kwargs)

    f_partial.__name__ = getattr(fun, "__name__", "fun")
    return f_partial, dyn_args


def _check_input_jacfwd(holomorphic: bool, path, x):
    trace.check_leaf(x, f"jacfwd: argument{tree_util.keystr(path)}")
    dtype = _aval(x).dtype
    if holomorphic:
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"jacfwd with holomorphic=True requires inputs with complex "
                            f"dtype, but got {np.dtype(dtype).name} at "
                            f"argument{tree_util.keystr(path)}.")
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"jacfwd requires real-valued inputs (input dtype that is a sub-dtype of "
            f"np.floating), but got {np.dtype(dtype).name} at "
            f"argument{tree_util.keystr(path)}. For holomorphic differentiation, pass "
            f"holomorphic=True. For differentiation of non-holomorphic functions involving "
            f"complex inputs or integer inputs, use fbackprop.jvp directly.")


def _check_output_jacfwd(holomorphic: bool, x):
    if holomorphic and not jnp.issubdtype(_aval(x).dtype, jnp.complexfloating):
        raise TypeError(f"jacfwd with holomorphic=True requires outputs with complex dtype, "
                        f"but got {np.dtype(_aval(x).dtype).name}.")


def _check_input_jacrev(holomorphic: bool, allow_int: bool, path, x):
    where = f"argument{tree_util.keystr(path)}"
    trace.check_leaf(x, f"jacrev: {where}")
    dtype = _aval(x).dtype
    if holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"jacrev with holomorphic=True requires inputs with complex dtype, "
                        f"but got {np.dtype(dtype).name} at {where}.")
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
        if not allow_int:
            raise TypeError(
                f"jacrev requires real- or complex-valued inputs (input dtype that is a "
                f"sub-dtype of np.inexact), but got {np.dtype(dtype).name} at {where}. If "
                f"you want to use Boolean- or integer-valued inputs, use vjp or set "
                f"allow_int to True.")
    elif not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"jacrev requires numerical-valued inputs, but got "
                        f"{np.dtype(dtype).name} at {where}.")


def _check_output_jacrev(holomorphic: bool, x):
    dtype = _aval(x).dtype
    if holomorphic:
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"jacrev with holomorphic=True requires outputs with complex "
                            f"dtype, but got {np.dtype(dtype).name}.")
    elif jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"jacrev requires real-valued outputs (output dtype that is a sub-dtype of "
            f"np.floating), but got {np.dtype(dtype).name}. For holomorphic "
            f"differentiation, pass holomorphic=True. For differentiation of "
            f"non-holomorphic functions involving complex outputs, use fbackprop.vjp "
            f"directly.")
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"jacrev requires real-valued outputs (output dtype that is a sub-dtype of "
            f"np.floating), but got {np.dtype(dtype).name}. For differentiation of "
            f"functions with integer outputs, use fbackprop.vjp directly.")


def _std_basis(pytree):
    """The identity matrix over all leaves, unravelled into ``pytree`` along axis 1.

    Each leaf ``x`` becomes an array of shape ``(n, *x.shape)`` where ``n`` is the
    total number of elements: row ``k`` is the ``k``-th standard basis vector.
    """
    leaves = tree_util.tree_leaves(pytree)
    n = sum(int(np.size(x)) for x in leaves)
    dtype = jnp.result_type(*leaves)
    return _unravel_array_into_pytree(pytree, 1, None, jnp.eye(n, dtype=dtype))


def _possible_downcast(x, example):
    dtype = _aval(example).dtype
    if getattr(x, "dtype", None) == jax_float0:
        # Integer inputs (allow_int): JAX reports their zero Jacobian in their dtype.
        x = jnp.zeros(np.shape(x), dtype)
    if jnp.issubdtype(x.dtype, jnp.complexfloating) and \
            not jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.real(x)
    if x.dtype != dtype:
        x = x.astype(dtype)
    return compat.with_weak_type(x, bool(getattr(_aval(example), "weak_type", False)))


def _unravel_array_into_pytree(pytree, axis: int, example, arr):
    """Splits ``arr`` along ``axis`` into pieces shaped like the leaves of ``pytree``.

    Each piece is cast like ``example`` (or like its leaf when ``example`` is None).
    """
    leaves, treedef = tree_util.tree_flatten(pytree)
    shapes = [arr.shape[:axis] + np.shape(x) + arr.shape[axis + 1:] for x in leaves]
    sizes = [int(np.size(x)) for x in leaves]
    parts = jnp.split(arr, np.cumsum(sizes[:-1]).tolist(), axis) if leaves else []
    out = [_possible_downcast(jnp.reshape(p, s), x if example is None else example)
           for p, s, x in zip(parts, shapes, leaves)]
    return tree_util.tree_unflatten(treedef, out)


def _jacfwd_unravel(input_pytree, output_leaf, arr):
    return _unravel_array_into_pytree(input_pytree, arr.ndim - 1, output_leaf, arr)


def _jacrev_unravel(output_pytree, input_leaf, arr):
    return _unravel_array_into_pytree(output_pytree, 0, input_leaf, arr)


def _jac_docstring(fun, argnums, how):
    name = getattr(fun, "__name__", "fun")
    return (f"Jacobian of {name} with respect to positional argument(s) {argnums}, "
            f"by {how}. Takes the same arguments as {name} but returns the Jacobian of "
            f"the output with respect to the arguments at positions {argnums}.")


def jacfwd(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
           holomorphic: bool = False) -> Callable:
    """Jacobian of ``fun`` evaluated column by column with forward mode.

    Same signature, semantics and output structure as :func:`jax.jacfwd`: our own
    ``jvp`` mapped with ``jax.vmap`` over the standard basis of the inputs.

    Args:
      fun: function whose Jacobian is computed.
      argnums: int or tuple of ints, which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(output, aux)``; then ``(jacobian, aux)``
        is returned.
      holomorphic: whether ``fun`` is promised to be holomorphic (complex inputs).

    Returns:
      A function with the same arguments as ``fun`` that returns the Jacobian:
      for each output leaf of shape ``out`` and input leaf of shape ``in``, an
      array of shape ``out + in``, nested as output tree of input trees.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> fb.jacfwd(lambda x: jnp.sin(x) * 2.0)(jnp.zeros(2))
      Array([[2., 0.],
             [0., 2.]], dtype=float32)
    """
    _check_callable(fun, "jacfwd")

    @functools.wraps(fun)
    def jacfun(*args, **kwargs):
        nums = _normalize_argnums(argnums, len(args), "jacfwd")
        f_partial, dyn_args = _argnums_partial(fun, nums, args, kwargs)
        tree_util.tree_map_with_path(functools.partial(_check_input_jacfwd, holomorphic),
                                     dyn_args)
        pushfwd = functools.partial(_jvp, f_partial, dyn_args, has_aux=has_aux,
                                    api_name="jacfwd")
        if has_aux:
            y, jac, aux = jax.vmap(pushfwd, out_axes=(None, -1, None))(_std_basis(dyn_args))
        else:
            y, jac = jax.vmap(pushfwd, out_axes=(None, -1))(_std_basis(dyn_args))
            aux = None
        tree_util.tree_map(functools.partial(_check_output_jacfwd, holomorphic), y)
        example_args = dyn_args[0] if isinstance(argnums, (int, np.integer)) else dyn_args
        jac_tree = tree_util.tree_map(functools.partial(_jacfwd_unravel, example_args), y, jac)
        return (jac_tree, aux) if has_aux else jac_tree

    jacfun.__doc__ = _jac_docstring(fun, argnums, "forward mode")
    return jacfun


def jacrev(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
           holomorphic: bool = False, allow_int: bool = False) -> Callable:
    """Jacobian of ``fun`` evaluated row by row with reverse mode.

    Same signature, semantics and output structure as :func:`jax.jacrev`: our own
    ``vjp`` (one forward sweep) whose ``vjp_fn`` is mapped with ``jax.vmap`` over
    the standard basis of the outputs.

    Args:
      fun: function whose Jacobian is computed.
      argnums: int or tuple of ints, which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(output, aux)``; then ``(jacobian, aux)``
        is returned.
      holomorphic: whether ``fun`` is promised to be holomorphic.
      allow_int: allow integer inputs (their Jacobian blocks are ``float0``).

    Returns:
      A function with the same arguments as ``fun`` that returns the Jacobian
      (same structure as :func:`jacfwd`).

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> fb.jacrev(lambda x: x ** 2)(jnp.array([1.0, 3.0]))
      Array([[2., 0.],
             [0., 6.]], dtype=float32)
    """
    _check_callable(fun, "jacrev")

    @functools.wraps(fun)
    def jacfun(*args, **kwargs):
        nums = _normalize_argnums(argnums, len(args), "jacrev")
        f_partial, dyn_args = _argnums_partial(fun, nums, args, kwargs)
        tree_util.tree_map_with_path(
            functools.partial(_check_input_jacrev, holomorphic, allow_int), dyn_args)
        y, pullback, *maybe_aux = vjp(f_partial, *dyn_args, has_aux=has_aux)
        tree_util.tree_map(functools.partial(_check_output_jacrev, holomorphic), y)
        jac = jax.vmap(pullback)(_std_basis(y))
        jac = jac[0] if isinstance(argnums, (int, np.integer)) else jac
        example_args = dyn_args[0] if isinstance(argnums, (int, np.integer)) else dyn_args
        jac_tree = tree_util.tree_map(functools.partial(_jacrev_unravel, y), example_args, jac)
        jac_tree = tree_util.tree_transpose(tree_util.tree_structure(example_args),
                                            tree_util.tree_structure(y), jac_tree)
        return (jac_tree, *maybe_aux) if has_aux else jac_tree

    jacfun.__doc__ = _jac_docstring(fun, argnums, "reverse mode")
    return jacfun


def jacobian(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
             holomorphic: bool = False, allow_int: bool = False) -> Callable:
    """Alias of :func:`jacrev` (like :func:`jax.jacobian`)."""
    return jacrev(fun, argnums=argnums, has_aux=has_aux, holomorphic=holomorphic,
                  allow_int=allow_int)


def hessian(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
            holomorphic: bool = False) -> Callable:
    """Hessian of ``fun`` as a dense array (or pytree of blocks): ``jacfwd(jacrev(fun))``.

    Same signature, semantics and output structure as :func:`jax.hessian`: for an
    output leaf of shape ``out`` and input leaves of shapes ``in1``, ``in2`` the
    block has shape ``out + in1 + in2``. To apply the Hessian to a vector without
    forming it, use :func:`hvp`.

    Args:
      fun: function to differentiate twice.
      argnums: int or tuple of ints, which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(output, aux)``; then ``(hessian, aux)``
        is returned.
      holomorphic: whether ``fun`` is promised to be holomorphic.

    Returns:
      A function with the same arguments as ``fun`` returning the Hessian.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> fb.hessian(lambda x: x[0] ** 3 - 2.0 * x[0] * x[1])(jnp.array([1.0, 2.0]))
      Array([[ 6., -2.],
             [-2.,  0.]], dtype=float32)
    """
    return jacfwd(jacrev(fun, argnums, has_aux=has_aux, holomorphic=holomorphic),
                  argnums, has_aux=has_aux, holomorphic=holomorphic)


# ---------------------------------------------------------------------- hvp
_hvp_functions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _hvp_functions_of(fun, argnums):
    """``(grad(fun), grad of <grad(fun), v>)``: the same function objects on every
    call, so that repeated ``hvp`` calls hit the trace and compile caches. They
    reach ``fun`` through a weak reference so the cache does not keep it alive."""
    try:
        per = _hvp_functions.setdefault(fun, {})
        ref = weakref.ref(fun)
    except TypeError:  # not weak-referenceable: build them afresh
        per, ref = {}, (lambda: fun)
    fns = per.get(argnums)
    if fns is None:
        def fun_by_ref(*args):
            return ref()(*args)

        fun_by_ref.__name__ = getattr(fun, "__name__", "fun")
        grad_f = grad(fun_by_ref, argnums=argnums)

        def grad_dot_v(*args_and_v):
            *xs, v = args_and_v
            return _tree_vdot(grad_f(*xs), v)

        fns = per[argnums] = (grad_f, grad(grad_dot_v, argnums=argnums))
    return fns


def _tree_vdot(xs, ys):
    """Sum over leaves of <x, y> (real inner product), as a scalar array."""
    terms = [jnp.sum(x * y) for x, y in zip(tree_util.tree_leaves(xs),
                                           tree_util.tree_leaves(ys))]
    return functools.reduce(jnp.add, terms)


def _entries(xs) -> str:
    """``[float32[2, 3], PyTreeDef({'w': *})]``: each entry's type, or its tree."""
    def one(x):
        leaves, tree = tree_util.tree_flatten(x)
        if tree_util.treedef_is_leaf(tree) and leaves:
            try:
                aval = _aval(leaves[0])
                return _fmt(aval.shape, aval.dtype)
            except TypeError:
                return type(leaves[0]).__name__
        return str(tree)
    shown = [one(x) for x in list(xs)[:4]] + (["..."] if len(xs) > 4 else [])
    return f"[{', '.join(shown)}]"


def _check_hvp_arguments(fun, primals, tangents):
    """``primals`` is the tuple of ``fun``'s positional arguments (as in
    ``jax.jvp``), not one pytree: a list of parameters passed as is reads as
    several arguments. Says so, with the call that was meant."""
    name = getattr(fun, "__name__", "fun")
    if name == "<lambda>":
        name = "fun"
    names = _param_names(fun)
    first = names[0] if names else "params"
    wrap = f"fb.hvp({name}, ({first},), (v,))"
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError(
            f"hvp: `primals` and `tangents` must be tuples or lists with one entry per "
            f"positional argument of {name} (as in jax.jvp); found "
            f"{type(primals).__name__} and {type(tangents).__name__}. For one argument "
            f"that is a pytree, wrap it and its tangent in 1-tuples: {wrap}.")
    if len(primals) != len(tangents):
        raise TypeError(
            f"hvp: got {len(primals)} primals but {len(tangents)} tangents; pass one "
            f"tangent per primal, with its structure (primals: {type(primals).__name__} "
            f"{_entries(primals)}, tangents: {type(tangents).__name__} "
            f"{_entries(tangents)}).")
    try:
        signature = inspect.signature(fun)
    except (TypeError, ValueError):
        return                       # no signature to check against: the call will tell
    try:
        signature.bind(*primals)
    except TypeError as exc:
        n = len(primals)
        takes = (f"{name} takes {len(names)} positional argument"
                 f"{'s' if len(names) != 1 else ''} ({', '.join(names)})")
        seen = (f"the {type(primals).__name__} of {n} entr{'ies' if n != 1 else 'y'} "
                f"{_entries(primals)} passed means "
                f"{name}({', '.join(f'primals[{i}]' for i in range(min(n, 4)))}"
                f"{', ...' if n > 4 else ''})")
        if n > len(names):
            fix = (f"To differentiate with respect to one argument that is a list (or any "
                   f"pytree), wrap it and its tangent in 1-tuples: {wrap}")
        elif n < len(names):
            rest = ", ".join(names[n:])
            fix = (f"hvp differentiates with respect to every positional argument; close "
                   f"over the others: fb.hvp(lambda {first}: {name}({first}, {rest}), "
                   f"({first},), (v,))" if n == 1 else
                   f"hvp differentiates with respect to every positional argument; pass "
                   f"them all, or close over the others with a lambda")
        else:
            fix = f"({exc})"
        raise TypeError(
            f"hvp: `primals` holds the positional arguments of {name}, as in jax.jvp, "
            f"not one pytree: {seen}, but {takes}. {fix}.") from None


def hvp(fun: Callable, primals, tangents, mode: str = "fwd_rev"):
    """Hessian-vector product of a scalar function, without forming the Hessian.

    With ``H`` the Hessian of ``fun`` with respect to all of ``primals`` (seen as
    one flat vector) and ``v`` the ``tangents``, returns ``H v`` with one entry
    per primal, like ``vjp_fn``. Costs a small constant times one gradient
    evaluation, whatever the number of parameters.

    Modes:
      * ``"fwd_rev"`` (default): forward-over-reverse, Pearlmutter's trick,
        ``jvp(grad(fun), primals, tangents)``: the tangent sweep runs once over the
        traced gradient computation. Cheapest in time and memory.
      * ``"rev_rev"``: reverse-over-reverse, ``grad(x -> <grad(fun)(x), v>)``: only
        reverse mode is involved (useful when a function has a ``custom_vjp``
        rule, which forward mode refuses, or to cross-check the forward rules);
        it records the whole gradient computation, so it keeps more residuals.

    Args:
      fun: scalar-valued function of the positional arguments ``primals``.
      primals: tuple or list of the positional arguments of ``fun`` (pytrees of
        float arrays), as in ``jax.jvp``: for a ``fun(params)`` whose ``params``
        is a list, pass ``(params,)``, not ``params``.
      tangents: tuple or list with the same structure, shapes and dtypes.
      mode: ``"fwd_rev"`` or ``"rev_rev"``.

    Returns:
      A tuple with one entry per primal, each with that primal's structure.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> f = lambda x: jnp.sum(x ** 3)
      >>> fb.hvp(f, (jnp.array([1.0, 2.0]),), (jnp.array([1.0, 0.0]),))
      (Array([6., 0.], dtype=float32),)
    """
    _check_callable(fun, "hvp")
    _check_hvp_arguments(fun, primals, tangents)
    argnums = tuple(range(len(primals)))
    grad_f, rev_rev = _hvp_functions_of(fun, argnums)
    if mode == "fwd_rev":
        hv = eager.hvp(fun, primals, tangents, hvp)
        if hv is not None:
            return tuple(hv)
        _, hv = _jvp(grad_f, tuple(primals), tuple(tangents), api_name="hvp")
        return tuple(hv)
    if mode == "rev_rev":
        p_leaves_with_path, p_tree = tree_util.tree_flatten_with_path(tuple(primals))
        t_leaves, t_tree = tree_util.tree_flatten(tuple(tangents))
        if p_tree != t_tree:
            raise TypeError(f"hvp: primals and tangents must have the same tree structure; "
                            f"primals have {p_tree}, tangents have {t_tree}.")
        _validate_tangents(p_leaves_with_path, t_leaves, "hvp", fun)

        return tuple(rev_rev(*primals, tuple(tangents)))
    raise ValueError(f"hvp: mode must be 'fwd_rev' (forward-over-reverse) or 'rev_rev' "
                     f"(reverse-over-reverse), got {mode!r}.")
