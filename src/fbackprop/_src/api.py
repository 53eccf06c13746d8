"""Public differentiation functions with JAX's signatures and semantics."""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from . import compat, reverse, trace
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
                            f"but argument {path} has dtype {dtype}.")
    elif jnp.issubdtype(dtype, jnp.inexact):
        return
    elif jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_) \
            or dtype == jax_float0:
        if not allow_int:
            raise TypeError(
                f"{api} requires real- or complex-valued inputs (input dtype that is a "
                f"sub-dtype of np.inexact), but argument {path} has dtype {dtype}. If you "
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


def split_scalar_output(traced, has_aux: bool, api: str, holomorphic: bool = False):
    """(main_tree, aux_tree) of a traced function whose main output must be a scalar."""
    out_tree = traced.out_tree
    aux_tree = None
    if has_aux:
        if out_tree.num_nodes == 1 or len(out_tree.children()) != 2 \
                or out_tree.node_data()[0] not in (tuple, list):
            raise TypeError(
                f"{api} with has_aux=True requires `fun` to return a pair (output, aux), "
                f"but it returned a pytree with structure {out_tree}.")
        main_tree, aux_tree = out_tree.children()
    else:
        main_tree = out_tree
    if main_tree.num_leaves != 1 or main_tree.num_nodes != 1:
        raise TypeError(
            f"Gradient only defined for scalar-output functions. Output was a pytree "
            f"with structure {main_tree}, not a single array. Use fbackprop.vjp or "
            f"fbackprop.jacrev for several outputs, or return the aux with has_aux=True.")
    aval = traced.out_avals[0]
    _check_scalar_output(jax.ShapeDtypeStruct(aval.shape, aval.dtype), api, holomorphic)
    return main_tree, aux_tree


def _zeros_or_float0(x):
    aval = compat.typeof(x)
    if jnp.issubdtype(aval.dtype, jnp.inexact):
        return jnp.zeros(aval.shape, aval.dtype)
    return np.zeros(aval.shape, jax_float0)


# ---------------------------------------------------------------- the program
class _Program:
    """A traced function plus which leaves are differentiated."""

    def __init__(self, fun, args, kwargs, diff_argnums, api, holomorphic=False,
                 allow_int=False, vjp_mode=False):
        leaves_with_path, in_tree = tree_util.tree_flatten_with_path((tuple(args), kwargs))
        leaves = [x for _, x in leaves_with_path]
        diff = []
        static = []
        for path, x in leaves_with_path:
            is_diff = len(path) >= 2 and path[0].idx == 0 and path[1].idx in diff_argnums
            if is_diff:
                where = "args" + tree_util.keystr(path[1:])
                if vjp_mode:
                    trace.check_leaf(x, f"{api}: primal {tree_util.keystr(path[1:])}")
                else:
                    _check_diff_input(x, where, api, holomorphic, allow_int)
            diff.append(is_diff)
            static.append(not is_diff and not _is_array_leaf(x))
        self.leaves, self.in_tree, self.diff, self.static = leaves, in_tree, diff, static
        self.dyn = [x for x, s in zip(leaves, static) if not s]
        self.dyn_diff = [d for d, s in zip(diff, static) if not s]
        self.traced = trace.trace_flat(fun, in_tree, leaves, static,
                                       what=getattr(fun, "__name__", "fun"))
        self.active = [d and jnp.issubdtype(_dtype_of(x), jnp.inexact)
                       for x, d in zip(self.dyn, self.dyn_diff)]

    def diff_cts_to_tree(self, dyn_cts, args, diff_argnums):
        """Per differentiated argument, the pytree of its gradients."""
        it = iter(dyn_cts)
        per_leaf = []
        for x, s, d in zip(self.leaves, self.static, self.diff):
            ct = None if s else next(it)
            if d:
                if ct is None:
                    per_leaf.append(_zeros_or_float0(x))
                else:
                    weak = bool(getattr(compat.typeof(x), "weak_type", False))
                    per_leaf.append(compat.with_weak_type(ct, weak))
        it = iter(per_leaf)
        out = []
        for i in diff_argnums:
            arg_leaves, arg_tree = tree_util.tree_flatten(args[i])
            out.append(tree_util.tree_unflatten(arg_tree, [next(it) for _ in arg_leaves]))
        return out


def _run_value_and_grad(closed, dyn, active, holomorphic):
    outs, tape = reverse.forward(closed.jaxpr, closed.consts, dyn, active)
    one = jnp.ones((), _dtype_of(outs[0]))
    cts = reverse.backward(tape, [one] + [None] * (len(outs) - 1))
    return outs, cts


# Eager calls (no tracers anywhere) of a function fbackprop has already traced
# for these shapes run the whole forward+backward program compiled (once per
# traced jaxpr): repeated eager calls neither re-trace nor dispatch op by op.
# The first call of a traced program is interpreted primitive by primitive, like
# JAX's own eager mode, so a fresh closure per call never pays a compile.
# Programs longer than ``eager_compile_max_eqns`` always run op by op (XLA's
# compiler recurses over very long chains and can overflow the stack near 100k
# operations).
eager_compile = True
eager_compile_after = 2
eager_compile_max_eqns = 5000
_eager_calls: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compile_eagerly(traced, *value_lists) -> bool:
    """Whether this eager call of ``traced`` should run as one compiled program."""
    if not eager_compile or traced.num_eqns > eager_compile_max_eqns:
        return False
    if any(_any_tracer(values) for values in value_lists) or \
            _any_tracer(traced.closed.consts):
        return False
    calls = _eager_calls.get(traced, 0) + 1
    _eager_calls[traced] = calls
    return calls >= eager_compile_after


_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_value_and_grad(traced, active, holomorphic):
    key = (tuple(active), holomorphic)
    per = _compiled.setdefault(traced, {})
    fn = per.get(key)
    if fn is None:
        closed = traced.closed

        def run(dyn):
            return _run_value_and_grad(closed, dyn, active, holomorphic)
        fn = per[key] = jax.jit(run)
    return fn


def _any_tracer(xs) -> bool:
    return any(compat.is_tracer(x) for x in xs)


def _compiled_vjp(traced, active):
    """(forward(dyn) -> outs, vjp(dyn, cts) -> input cts), compiled, per jaxpr."""
    key = ("vjp", tuple(active))
    per = _compiled.setdefault(traced, {})
    fns = per.get(key)
    if fns is None:
        closed = traced.closed

        def fwd(dyn):
            return reverse.forward(closed.jaxpr, closed.consts, dyn, active)[0]

        def vjp(dyn, cts):
            _, tape = reverse.forward(closed.jaxpr, closed.consts, dyn, active)
            return reverse.backward(tape, cts)
        fns = per[key] = (jax.jit(fwd), jax.jit(vjp))
    return fns


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
        prog = _Program(fun, args, kwargs, nums, api, holomorphic, allow_int)
        traced = prog.traced
        main_tree, aux_tree = split_scalar_output(traced, has_aux, api, holomorphic)

        if compile_eagerly(traced, prog.dyn):
            outs, cts = _compiled_value_and_grad(traced, prog.active, holomorphic)(prog.dyn)
        else:
            outs, cts = _run_value_and_grad(traced.closed, prog.dyn, prog.active, holomorphic)
        grads = prog.diff_cts_to_tree(cts, args, nums)
        grads = grads[0] if isinstance(argnums, (int, np.integer)) else tuple(grads)
        value = outs[0]
        if has_aux:
            aux = tree_util.tree_unflatten(aux_tree, outs[1:])
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
    prog = _Program(fun, primals, {}, tuple(range(len(primals))), "vjp", vjp_mode=True)
    traced = prog.traced
    out_tree = traced.out_tree
    if has_aux:
        if out_tree.num_nodes == 1 or len(out_tree.children()) != 2:
            raise TypeError(f"vjp with has_aux=True requires `fun` to return a pair "
                            f"(output, aux), but it returned structure {out_tree}.")
        main_tree, aux_tree = out_tree.children()
    else:
        main_tree = out_tree
    n_main = main_tree.num_leaves
    active = [jnp.issubdtype(_dtype_of(x), jnp.inexact) for x in prog.dyn]
    closed = traced.closed
    if compile_eagerly(traced, prog.dyn):
        # Eagerly, the forward runs compiled, and each vjp_fn call runs one
        # compiled program that recomputes the forward and sweeps backward: no
        # op-by-op dispatch and no tape kept alive between calls.
        fwd_fn, bwd_fn = _compiled_vjp(traced, active)
        dyn = prog.dyn
        outs = fwd_fn(dyn)
        backward_fn = functools.partial(bwd_fn, dyn)
    else:
        outs, tape = reverse.forward(closed.jaxpr, closed.consts, prog.dyn, active)
        backward_fn = functools.partial(reverse.backward, tape)
    main_outs = outs[:n_main]
    out = tree_util.tree_unflatten(main_tree, main_outs)
    fun_name = getattr(fun, "__name__", "fun")

    def vjp_fn(ct):
        ct_leaves_with_path, ct_tree = tree_util.tree_flatten_with_path(ct)
        if ct_tree != main_tree:
            raise ValueError(
                f"unexpected tree structure of the cotangent passed to the VJP function of "
                f"{fun_name}: it must match the structure of the function's output.\n"
                f"  expected: {main_tree}\n  got:      {ct_tree}")
        cts = []
        for (path, c), o in zip(ct_leaves_with_path, main_outs):
            o_aval = compat.typeof(o)
            want = _fmt_aval(o_aval.shape, o_aval.dtype)
            c_dtype = getattr(c, "dtype", None)
            if c_dtype is None:
                c = jnp.asarray(c)
                c_dtype = c.dtype
            if jnp.issubdtype(o_aval.dtype, jnp.inexact):
                if np.shape(c) != tuple(o_aval.shape) or (
                        c_dtype != o_aval.dtype and not
                        (jnp.issubdtype(c_dtype, jnp.inexact) and
                         getattr(compat.typeof(c), "weak_type", False))):
                    raise _ct_type_error(tree_util.keystr(path),
                                         _fmt_aval(np.shape(c), c_dtype), want)
                if c_dtype != o_aval.dtype:
                    c = c.astype(o_aval.dtype)
                cts.append(c)
            else:
                if c_dtype != jax_float0 or np.shape(c) != tuple(o_aval.shape):
                    raise _ct_type_error(tree_util.keystr(path),
                                         _fmt_aval(np.shape(c), c_dtype),
                                         f"float0{list(o_aval.shape)}")
                cts.append(None)
        in_cts = backward_fn(cts + [None] * (len(outs) - n_main))
        return tuple(prog.diff_cts_to_tree(in_cts, primals, tuple(range(len(primals)))))

    if has_aux:
        return out, vjp_fn, tree_util.tree_unflatten(aux_tree, outs[n_main:])
    return out, vjp_fn
