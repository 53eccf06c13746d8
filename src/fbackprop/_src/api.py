"""Public differentiation functions with JAX's signatures and semantics."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from . import compat, eager, trace
from .engine import recording, sweeps
from .registry import jax_float0

# Importing the rule modules fills the tables.
from . import rules as _rules  # noqa: F401


# ----------------------------------------------------------------- validation
def _check_callable(fun, name):
    if not callable(fun):
        raise TypeError(f"{name} requires a callable `fun`, but got {type(fun).__name__}: "
                        f"{fun!r:.80}.")


def _normalize_argnums(argnums, nargs: int, api: str) -> tuple[int, ...]:
    if isinstance(argnums, (int, np.integer)) and not isinstance(argnums, bool):
        nums = (int(argnums),)
    elif isinstance(argnums, (tuple, list)) and all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in argnums):
        nums = tuple(int(a) for a in argnums)
    else:
        raise TypeError(f"{api}: `argnums` must be an int or a tuple of ints, got "
                        f"{argnums!r} of type {type(argnums).__name__}.")
    out = []
    for a in nums:
        if not -nargs <= a < nargs:
            raise TypeError(
                f"{api}: differentiating with respect to argnums={argnums} requires at least "
                f"{max(a + 1, -a)} positional arguments to be passed by the caller, but got "
                f"only {nargs} positional arguments. Pass the argument positionally or fix "
                f"`argnums`.")
        out.append(a % nargs)
    if len(set(out)) != len(out):
        raise ValueError(f"{api}: `argnums` {argnums} names the same argument twice.")
    return tuple(out)


def _is_array_leaf(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array)) or compat.is_tracer(x)


def _dtype_of(x):
    return compat.typeof(x).dtype


def _check_diff_input(x, path: str, api: str, holomorphic: bool, allow_int: bool):
    trace.check_leaf(x, f"{api}: argument {path}")
    dtype = _dtype_of(x)
    if holomorphic:
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"{api} with holomorphic=True requires inputs with complex dtype, "
                            f"but got {dtype} for argument {path}.")
    elif jnp.issubdtype(dtype, jnp.inexact):
        return
    elif jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_) \
            or dtype == jax_float0:
        if not allow_int:
            raise TypeError(
                f"{api} requires real- or complex-valued inputs (input dtype that is a "
                f"sub-dtype of np.inexact), but got {dtype} for argument {path}. If you "
                f"want to use Boolean- or integer-valued inputs, use vjp or set allow_int "
                f"to True.")
    else:
        raise TypeError(f"{api}: argument {path} has dtype {dtype}, which cannot be "
                        f"differentiated.")


def _check_scalar_output(out, api: str, holomorphic: bool):
    shape = np.shape(out)
    if shape != ():
        raise TypeError(
            f"Gradient only defined for scalar-output functions. Output had shape: {shape}. "
            f"({api}: reduce the output to a scalar, e.g. with jnp.sum/jnp.mean, or use "
            f"fbackprop.vjp / fbackprop.jacrev for non-scalar outputs.)")
    dtype = _dtype_of(out)
    if holomorphic:
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"{api} with holomorphic=True requires outputs with complex dtype, "
                            f"but got {dtype}.")
    elif not jnp.issubdtype(dtype, jnp.floating):
        extra = ("For holomorphic differentiation, pass holomorphic=True. For "
                 "differentiation of non-holomorphic functions involving complex outputs, "
                 "use fbackprop.vjp directly." if jnp.issubdtype(dtype, jnp.complexfloating)
                 else "For differentiation of functions with integer outputs, use "
                      "fbackprop.vjp directly.")
        raise TypeError(f"{api} requires real-valued outputs (output dtype that is a "
                        f"sub-dtype of np.floating), but got {dtype}. {extra}")


def split_aux(out_tree, api: str, has_aux: bool):
    """``(main_tree, aux_tree)`` of a function's output; ``aux_tree`` is None
    without ``has_aux``."""
    if not has_aux:
        return out_tree, None
    if out_tree.num_nodes == 1 or len(out_tree.children()) != 2 or \
            out_tree.node_data()[0] not in (tuple, list):
        raise TypeError(
            f"{api} with has_aux=True requires `fun` to return a two-element tuple "
            f"(output, aux), but it returned a pytree with structure {out_tree}. Return "
            f"`(output, aux)` or call {api} with has_aux=False.")
    main_tree, aux_tree = out_tree.children()
    return main_tree, aux_tree


def split_scalar_output(out_tree, out_leaves, has_aux: bool, api: str,
                        holomorphic: bool = False):
    """(main_tree, aux_tree) of a function whose main output must be a scalar;
    ``out_leaves`` are its flat output values (or avals)."""
    main_tree, aux_tree = split_aux(out_tree, api, has_aux)
    if main_tree.num_leaves != 1 or main_tree.num_nodes != 1:
        raise TypeError(
            f"Gradient only defined for scalar-output functions. Output was a pytree "
            f"with structure {main_tree}, not a single array. Use fbackprop.vjp or "
            f"fbackprop.jacrev for several outputs, or return the aux with has_aux=True.")
    aval = output_aval(out_leaves[0], api, "")
    _check_scalar_output(jax.ShapeDtypeStruct(aval.shape, aval.dtype), api, holomorphic)
    return main_tree, aux_tree


def output_aval(x, api: str, where: str):
    """The aval of an output value; a clear error for values that are not arrays."""
    if isinstance(x, compat.ShapedArray):
        return x
    try:
        return compat.typeof(x)
    except TypeError:
        raise TypeError(
            f"{api}: the function returned a {type(x).__name__} ({x!r:.60}) at "
            f"output{where}; differentiated functions must return arrays or numbers "
            f"(pytrees of them). Return auxiliary data with has_aux=True.") from None


def _zeros_or_float0(aval):
    if jnp.issubdtype(aval.dtype, jnp.inexact):
        return jnp.zeros(aval.shape, aval.dtype)
    return np.zeros(aval.shape, jax_float0)


def _as_array(x):
    """Python scalars become (weakly typed) arrays so they can be traced."""
    if isinstance(x, (bool, int, float, complex)):
        return jnp.asarray(x)
    return x


# ------------------------------------------------------------- the arguments
class _Inputs:
    """The flat leaves of ``(args, kwargs)``, which are differentiated, and which
    positional argument each belongs to."""

    def __init__(self, args, kwargs, diff_argnums, api, holomorphic=False,
                 allow_int=False, vjp_mode=False):
        leaves_with_path, in_tree = tree_util.tree_flatten_with_path((tuple(args), kwargs))
        # The positional argument each leaf belongs to (None for keyword arguments).
        self.arg_index = [path[1].idx if len(path) >= 2 and path[0].idx == 0 else None
                          for path, _ in leaves_with_path]
        diff = []
        for (path, x), i in zip(leaves_with_path, self.arg_index):
            is_diff = i in diff_argnums
            if is_diff:
                if vjp_mode:
                    trace.check_leaf(x, f"{api}: primal {tree_util.keystr(path[1:])}")
                else:
                    _check_diff_input(x, "args" + tree_util.keystr(path[1:]), api,
                                      holomorphic, allow_int)
            diff.append(is_diff)
        self.in_tree, self.diff = in_tree, diff
        self.leaves = [_as_array(x) if d else x
                       for (_, x), d in zip(leaves_with_path, diff)]
        self.diff_avals = [compat.typeof(x) if d else None
                           for x, d in zip(self.leaves, diff)]
        self.arg_trees = {i: tree_util.tree_structure(args[i]) for i in diff_argnums}

    def active(self) -> list:
        """Per leaf: differentiated and of a float/complex dtype."""
        return [a is not None and jnp.issubdtype(a.dtype, jnp.inexact)
                for a in self.diff_avals]

    def static(self) -> list:
        """Per leaf: neither differentiated nor an array or number (a string, a
        callable...): the tools pass it to the function as it is."""
        return [not d and not _is_array_leaf(x) for x, d in zip(self.leaves, self.diff)]

    def grads(self, cts, diff_argnums):
        """One gradient pytree per entry of ``diff_argnums`` from one cotangent
        (``None`` = zero) per leaf."""
        return grads_per_argument(self.diff_avals, self.arg_index, cts, self.arg_trees,
                                  diff_argnums)


def grads_per_argument(diff_avals, arg_index, cts, arg_trees, diff_argnums):
    """Gradients regrouped by argument: one pytree per entry of ``diff_argnums``,
    in that order (which need not be ascending).

    ``cts`` holds one cotangent (or ``None`` for a zero) per leaf of ``(args,
    kwargs)``; each is assigned to the argument its leaf came from, so the
    output order cannot depend on the order of the leaves.
    """
    per_arg: dict = {i: [] for i in diff_argnums}
    for aval, i, ct in zip(diff_avals, arg_index, cts):
        if i not in per_arg:
            continue
        if ct is None:
            per_arg[i].append(_zeros_or_float0(aval))
        else:
            per_arg[i].append(compat.with_weak_type(ct, bool(aval.weak_type)))
    return [tree_util.tree_unflatten(arg_trees[i], per_arg[i]) for i in diff_argnums]


def _seed(out):
    return jnp.ones((), compat.typeof(out).dtype)


def _any_tracer(xs) -> bool:
    return any(compat.is_tracer(x) for x in xs)


# -------------------------------------------------------------------- the API
def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                   holomorphic: bool = False, allow_int: bool = False,
                   reduce_axes: Sequence = ()) -> Callable:
    """Creates a function that evaluates both ``fun`` and its gradient.

    Same signature and semantics as :func:`jax.value_and_grad`; the gradient comes
    from fbackprop's reverse-mode engine.

    Args:
      fun: function to differentiate; its positional arguments at ``argnums`` are
        pytrees of float arrays and it returns a scalar (or ``(scalar, aux)`` with
        ``has_aux=True``).
      argnums: int or tuple of ints, which positional arguments to differentiate.
      has_aux: whether ``fun`` returns a pair whose second element is auxiliary data.
      holomorphic: whether ``fun`` is holomorphic (complex inputs and output).
      allow_int: allow integer inputs; their gradients are ``float0`` zeros.
      reduce_axes: accepted for signature compatibility; must be empty.

    Returns:
      A function returning ``(value, grad)`` (``((value, aux), grad)`` with
      ``has_aux``), where ``grad`` has the structure of the differentiated arguments.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> fb.value_and_grad(lambda x: jnp.sum(x ** 2))(jnp.array([1.0, 2.0]))
      (Array(5., dtype=float32), Array([2., 4.], dtype=float32))
    """
    _check_callable(fun, "value_and_grad")
    if reduce_axes:
        raise NotImplementedError("value_and_grad: reduce_axes is not supported (JAX "
                                  "removed it); use lax.psum on the gradient instead.")
    api = "grad"

    @functools.wraps(fun)
    def value_and_grad_f(*args, **kwargs):
        nums = _normalize_argnums(argnums, len(args), api)
        inputs = _Inputs(args, kwargs, nums, api, holomorphic, allow_int)
        compiled_ok = eager.eligible()
        tape_only = compiled_ok and eager.records_tape_only(fun)
        run = recording.record(fun, inputs.in_tree, inputs.leaves, inputs.active(),
                               tape_only=tape_only, bind=eager.bind)
        main_tree, aux_tree = split_scalar_output(run.out_tree, run.out_vals, has_aux, api,
                                                  holomorphic)
        value = run.out_vals[0]
        if run.out_active[0]:
            n_out = len(run.out_vals)
            seeds = [_seed(value)] + [None] * (n_out - 1)
            if compiled_ok:
                cts = eager.backward(fun, run.tape, seeds, tape_only)
            else:
                cts = sweeps.backward(run.tape, seeds)
        else:
            cts = [None] * len(inputs.leaves)
        grads = inputs.grads(cts, nums)
        grads = grads[0] if isinstance(argnums, (int, np.integer)) else tuple(grads)
        if has_aux:
            aux = tree_util.tree_unflatten(aux_tree, run.out_vals[1:])
            return (value, aux), grads
        return value, grads

    return value_and_grad_f


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         holomorphic: bool = False, allow_int: bool = False,
         reduce_axes: Sequence = ()) -> Callable:
    """Creates a function that evaluates the gradient of ``fun``.

    Same signature and semantics as :func:`jax.grad`.

    Args:
      fun: function to differentiate (scalar output).
      argnums: int or tuple of ints, which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(output, aux)``; the gradient function
        then returns ``(grad, aux)``.
      holomorphic: whether ``fun`` is holomorphic.
      allow_int: allow integer inputs (their gradients are ``float0`` zeros).
      reduce_axes: accepted for signature compatibility; must be empty.

    Returns:
      A function with the same arguments as ``fun`` returning the gradient.

    Example:
      >>> import fbackprop as fb
      >>> fb.grad(lambda x, y: (x * y + x) ** 2, argnums=(0, 1))(2.0, 3.0)
      (Array(64., dtype=float32, weak_type=True), Array(32., dtype=float32, weak_type=True))
    """
    value_and_grad_f = value_and_grad(fun, argnums, has_aux, holomorphic, allow_int,
                                      reduce_axes)

    @functools.wraps(fun)
    def grad_f(*args, **kwargs):
        if has_aux:
            (_, aux), g = value_and_grad_f(*args, **kwargs)
            return g, aux
        _, g = value_and_grad_f(*args, **kwargs)
        return g

    return grad_f


def _ct_type_error(i_path, got, want):
    return ValueError(
        f"unexpected JAX type (e.g. shape/dtype) for argument to VJP function: got {got} at "
        f"cotangent{i_path}, but expected {want} because the corresponding output of the "
        f"differentiated function had JAX type {want}. Pass a cotangent with the output's "
        f"shape and dtype (float0 for integer outputs).")


def _fmt_aval(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def vjp(fun: Callable, *primals, has_aux: bool = False, reduce_axes: Sequence = ()):
    """Computes ``fun(*primals)`` and a function that pulls cotangents back.

    Same signature and semantics as :func:`jax.vjp`. The returned ``vjp_fn`` can be
    called any number of times (the forward pass is kept, like PyTorch's
    ``retain_graph=True``).

    Args:
      fun: function of pytrees of arrays returning a pytree of arrays (or
        ``(out, aux)`` with ``has_aux=True``).
      *primals: the point at which to differentiate.
      has_aux: whether ``fun`` returns ``(out, aux)``.
      reduce_axes: accepted for signature compatibility; must be empty.

    Returns:
      ``(out, vjp_fn)`` or ``(out, vjp_fn, aux)``; ``vjp_fn(ct)`` takes a cotangent
      with the structure, shapes and dtypes of ``out`` and returns a tuple with one
      cotangent per primal.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> out, vjp_fn = fb.vjp(jnp.sin, 0.0)
      >>> vjp_fn(1.0)
      (Array(1., dtype=float32, weak_type=True),)
    """
    _check_callable(fun, "vjp")
    if reduce_axes:
        raise NotImplementedError("vjp: reduce_axes is not supported.")
    nums = tuple(range(len(primals)))
    inputs = _Inputs(primals, {}, nums, "vjp", vjp_mode=True)
    run = recording.record(fun, inputs.in_tree, inputs.leaves, inputs.active())
    out_tree = run.out_tree
    main_tree, aux_tree = split_aux(out_tree, "vjp", has_aux)
    n_main = main_tree.num_leaves
    main_outs = run.out_vals[:n_main]
    main_paths = [tree_util.keystr(p) for p, _ in
                  tree_util.tree_flatten_with_path(tree_util.tree_unflatten(
                      main_tree, [0] * n_main))[0]]
    out_avals = [output_aval(x, "vjp", p) for x, p in zip(main_outs, main_paths)]
    backward = _VJPBackward(inputs, nums, main_tree, out_avals, len(run.out_vals),
                            getattr(fun, "__name__", "fun"), run.tape)
    vjp_fn = tree_util.Partial(backward, backward.residuals(run.tape))
    out = tree_util.tree_unflatten(main_tree, main_outs)
    if has_aux:
        return out, vjp_fn, tree_util.tree_unflatten(aux_tree, run.out_vals[n_main:])
    return out, vjp_fn


def _is_residual(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or compat.is_tracer(x)


class _VJPBackward:
    """The backward half of ``vjp``: rebuilds the tape from its residual arrays
    (the arguments of the :class:`jax.tree_util.Partial` that is ``vjp_fn``, so
    ``vjp_fn`` can be returned from ``jax.jit``) and sweeps it."""

    def __init__(self, inputs, nums, main_tree, out_avals, n_out, fun_name, tape):
        self.diff_avals, self.arg_index = inputs.diff_avals, inputs.arg_index
        self.arg_trees, self.nums = inputs.arg_trees, nums
        self.main_tree, self.out_avals, self.n_out = main_tree, out_avals, n_out
        self.fun_name = fun_name
        leaves, self.tape_tree = tree_util.tree_flatten(tape, is_leaf=_is_residual)
        self.is_residual = [_is_residual(x) for x in leaves]
        self.static = [None if r else x for x, r in zip(leaves, self.is_residual)]

    def residuals(self, tape) -> list:
        leaves = tree_util.tree_leaves(tape, is_leaf=_is_residual)
        return [x for x, r in zip(leaves, self.is_residual) if r]

    def __call__(self, residuals, *cts):
        if len(cts) != 1:
            raise TypeError(
                f"The function returned by fbackprop.vjp applied to {self.fun_name} was "
                f"called with {len(cts)} arguments, but it takes exactly one: the "
                f"cotangent of the single value {self.fun_name} returned, with that value's "
                f"structure (even if it is a tuple or another container). Pass several "
                f"output cotangents as one tuple: vjp_fn((ct_a, ct_b)).")
        ct, = cts
        it = iter(residuals)
        leaves = [next(it) if r else x for x, r in zip(self.static, self.is_residual)]
        tape = tree_util.tree_unflatten(self.tape_tree, leaves)
        cts = self.check_cotangents(ct)
        in_cts = sweeps.backward(tape, cts + [None] * (self.n_out - len(cts)))
        return tuple(grads_per_argument(self.diff_avals, self.arg_index, in_cts,
                                        self.arg_trees, self.nums))

    def check_cotangents(self, ct) -> list:
        """JAX's checks of a cotangent against the outputs; ``None`` for zeros."""
        ct_leaves_with_path, ct_tree = tree_util.tree_flatten_with_path(ct)
        if ct_tree != self.main_tree:
            raise ValueError(
                f"unexpected tree structure of the cotangent passed to the VJP function of "
                f"{self.fun_name}: it must match the structure of the function's output.\n"
                f"  expected: {self.main_tree}\n  got:      {ct_tree}")
        cts = []
        for (path, c), o_aval in zip(ct_leaves_with_path, self.out_avals):
            want = _fmt_aval(o_aval.shape, o_aval.dtype)
            c_aval = output_aval(c, "vjp_fn", tree_util.keystr(path))
            # Like JAX: the dtype as JAX would store it (float64 NumPy -> float32
            # without x64), and a weakly typed cotangent adopts the output's dtype.
            c_dtype = jax.dtypes.canonicalize_dtype(c_aval.dtype)
            if jnp.issubdtype(o_aval.dtype, jnp.inexact):
                if tuple(c_aval.shape) != tuple(o_aval.shape) or (
                        c_dtype != o_aval.dtype and not
                        (jnp.issubdtype(c_dtype, jnp.inexact) and c_aval.weak_type)):
                    raise _ct_type_error(tree_util.keystr(path),
                                         _fmt_aval(c_aval.shape, c_dtype), want)
                if c_dtype != o_aval.dtype or not (isinstance(c, jax.Array) or
                                                    compat.is_tracer(c)):
                    c = jnp.asarray(c, o_aval.dtype)
                cts.append(c)
            else:
                # Integer and boolean outputs carry no cotangent: float0 (or, as
                # JAX also accepts, a value of the output's own type).
                if tuple(c_aval.shape) != tuple(o_aval.shape) or \
                        c_dtype not in (jax_float0, o_aval.dtype):
                    raise _ct_type_error(tree_util.keystr(path),
                                         _fmt_aval(c_aval.shape, c_dtype),
                                         f"float0{list(o_aval.shape)}")
                cts.append(None)
        return cts
