"""Every public method and property of ``jax.Array`` on values inside fbackprop.

A user's function calls array methods on the values fbackprop hands it
(``h.var(-1, keepdims=True)`` in a LayerNorm); those values are fbackprop's
tracers. Each method must behave as it does on JAX's own tracers: the same
result, the same derivative, or the same error. The methods are enumerated from
``dir(jax.Array)`` when the test runs, so a method a new JAX adds is covered (or
the test asks for a recipe). All calls of one mode run in one function, so the
whole file takes seconds; a mismatch is then narrowed down to the calls that
cause it.

Also here: no attribute of an fbackprop tracer class may hide one of
``jax.Array``'s (a slot named ``var`` once did).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core
from jax._src.array import ArrayImpl

import fbackprop as fb

X = np.array([[0.3, -1.2, 2.1], [1.7, 0.9, -0.4]], np.float32)   # no ties, no .5
T = np.array([[0.5, 0.25, -1.0], [2.0, -0.75, 1.5]], np.float32)
_IDX = np.array([2, 0])
_KEEP = np.array([True, False, True])

# Calls for the methods that need arguments, or that have behaviours worth a
# second call, as ``(label, fn)``; ``fn`` receives the traced array. Every other
# public name is called with no arguments (a property is read).
RECIPES = {
    "addressable_data": [("0", lambda x: x.addressable_data(0))],
    "argpartition": [("kth=1", lambda x: x.argpartition(1))],
    "astype": [("float16", lambda x: x.astype(jnp.float16)),
               ("bfloat16", lambda x: x.astype(jnp.bfloat16)),
               ("int32", lambda x: x.astype(jnp.int32)),
               ("complex64", lambda x: x.astype(jnp.complex64))],
    # (x.at[i].apply has no derivative, in JAX either: test_at_apply_... below.)
    "at": [("set", lambda x: x.at[0, 1].set(5.0)),
           ("set traced", lambda x: x.at[1].set(x[0] * 2.0)),
           ("add", lambda x: x.at[:, _IDX].add(x[:, :2])),
           ("mul", lambda x: x.at[1, 2].mul(x[0, 0])),
           ("divide", lambda x: x.at[0].divide(x[1])),
           ("power", lambda x: x.at[1, 1].power(2.0)),
           ("min", lambda x: x.at[0].min(x[1])),
           ("max", lambda x: x.at[0].max(x[1])),
           ("get", lambda x: x.at[:, _IDX].get()),
           ("get fill", lambda x: x.at[0, 5].get(mode="fill", fill_value=-1.0))],
    "choose": [("float self", lambda x: x.choose([x, -x])),
               ("int self", lambda x: (x > 0).astype(jnp.int32).choose([x, x * x],
                                                                      mode="clip"))],
    "clip": [("bounds", lambda x: x.clip(-0.5, 1.0)),
             ("traced bounds", lambda x: x.clip(x[0, 0], x[1, 0]))],
    "compress": [("axis=1", lambda x: x.compress(_KEEP, axis=1, size=2))],
    "cumprod": [("axis=1", lambda x: x.cumprod(axis=1))],
    "dot": [("x.T", lambda x: x.dot(x.T))],
    "item": [("scalar", lambda x: x[1, 2].item()), ("size 6", lambda x: x.item())],
    "max": [("axis=1", lambda x: x.max(axis=1))],
    "mean": [("axis=0", lambda x: x.mean(axis=0))],
    "min": [("keepdims", lambda x: x.min(axis=1, keepdims=True))],
    "nonzero": [("size", lambda x: (x > 0).nonzero(size=6, fill_value=0)),
                ("no size", lambda x: x.nonzero())],
    "prod": [("axis=1", lambda x: x.prod(axis=1))],
    "repeat": [("per item", lambda x: x.repeat(np.array([1, 0, 2]), axis=1))],
    "reshape": [("3,2", lambda x: x.reshape(3, 2))],
    "round": [("1", lambda x: x.round(1))],
    "searchsorted": [("sorted row", lambda x: x[0].sort().searchsorted(x[1]))],
    "sort": [("axis=0", lambda x: x.sort(axis=0))],
    "squeeze": [("axis", lambda x: x[None].squeeze(0))],
    "std": [("ddof", lambda x: x.std(axis=1, ddof=1))],
    "sum": [("keepdims", lambda x: x.sum(axis=1, keepdims=True))],
    "swapaxes": [("0,1", lambda x: x.swapaxes(0, 1))],
    "take": [("axis=1", lambda x: x.take(_IDX, axis=1))],
    "to_device": [("cpu", lambda x: x.to_device(jax.devices()[0]))],
    "trace": [("offset", lambda x: x.trace(1))],
    "transpose": [("axes", lambda x: x.transpose(1, 0))],
    # What started this file: a LayerNorm's variance, and the method's default.
    "var": [("all", lambda x: x.var()), ("layernorm", lambda x: x.var(-1, keepdims=True))],
    "view": [("int32", lambda x: x.view(jnp.int32))],
}

# Public names not called, with the reason. Empty: every name is called, and
# where JAX raises on its own tracers the error is what is compared.
SKIP: dict = {}

EAGER, ABSTRACT = ("grad", "jvp"), ("jit(grad)", "hessian")

# The calls that raise on JAX's own tracers, in the modes listed (``ABSTRACT``:
# only where values are not concrete). fbackprop must raise the same error type.
JAX_ERRORS = {
    "addressable_data[0]": (EAGER + ABSTRACT, "a traced value has no buffers"),
    "addressable_shards[default]": (EAGER + ABSTRACT, "a traced value has no shards"),
    "global_shards[default]": (EAGER + ABSTRACT, "a traced value has no shards"),
    "committed[default]": (EAGER + ABSTRACT, "placement is a concrete array's"),
    "device[default]": (EAGER + ABSTRACT, "placement is a concrete array's"),
    "sharding[default]": (EAGER + ABSTRACT, "placement is a concrete array's"),
    "is_fully_addressable[default]": (EAGER + ABSTRACT, "placement is a concrete array's"),
    "is_fully_replicated[default]": (EAGER + ABSTRACT, "placement is a concrete array's"),
    "copy_to_host_async[default]": (EAGER + ABSTRACT, "not defined on tracers"),
    "flat[default]": (EAGER + ABSTRACT, "JAX arrays do not implement .flat"),
    "choose[float self]": (EAGER + ABSTRACT, "choose's indices must be integers"),
    "item[size 6]": (EAGER + ABSTRACT, "only a one-element array is a scalar"),
    "item[scalar]": (ABSTRACT, "a Python scalar needs a concrete value"),
    "nonzero[no size]": (ABSTRACT, "the output size depends on the values"),
}


def _public_names() -> list:
    return sorted(n for n in dir(jax.Array) if not n.startswith("_"))


def _default_call(name):
    if isinstance(inspect.getattr_static(jax.Array, name), property):
        return lambda x: getattr(x, name)
    return lambda x: getattr(x, name)()


def _calls() -> list:
    """``(key, fn)`` for every public name of ``jax.Array`` not skipped."""
    calls = []
    for name in _public_names():
        if name in SKIP:
            continue
        for label, fn in RECIPES.get(name, [("default", _default_call(name))]):
            calls.append((f"{name}[{label}]", fn))
    return calls


def _scalar(r, k):
    """A nonlinear scalar of one result, with fixed uneven weights that tell
    positions apart (and a Hessian that sees each method twice)."""
    n = int(np.prod(r.shape))
    w = jnp.asarray(1.0 + 0.1 * ((np.arange(n) * 7 + k) % 11), jnp.float32).reshape(r.shape)
    if jnp.issubdtype(r.dtype, jnp.complexfloating):
        return jnp.sum(jnp.sin(r.real.astype(jnp.float32)) * w
                       + jnp.cos(r.imag.astype(jnp.float32)) * w)
    if jnp.issubdtype(r.dtype, jnp.floating):
        return jnp.sum(jnp.sin(r.astype(jnp.float32)) * w)
    return 1e-3 * jnp.sum(r.astype(jnp.float32))


@jax.jit
def _total(results):
    """One compiled program sums all results' scalars: evaluated op by op, the
    reductions would cost more compiles than the methods themselves."""
    return sum((_scalar(v, k) for k, v in enumerate(jax.tree.leaves(results))),
               jnp.zeros((), jnp.float32))


def _program(calls, outcomes: dict):
    """``f(x) -> (total, results)``: every call on ``x``; ``outcomes`` gets what each
    call did (its error's type, its static value, or its arrays' types)."""

    def f(x):
        results = {}
        for key, fn in calls:
            try:
                r = fn(x)
            except Exception as e:  # noqa: BLE001 - the error is the outcome compared
                outcomes[key] = ("raises", type(e).__name__)
                continue
            leaves = jax.tree.leaves(r)
            if leaves and all(isinstance(v, jax.Array) for v in leaves):
                outcomes[key] = ("arrays", tuple((v.shape, str(v.dtype)) for v in leaves))
                results[key] = leaves
            else:
                outcomes[key] = ("value", r)
        return _total(results), results

    return f


JAX, FB = jax, fb   # the same entry points, JAX's and fbackprop's


def _grad_eager(lib, f):
    return lib.value_and_grad(f, has_aux=True)(X)


def _grad_jit(lib, f):
    return jax.jit(lib.value_and_grad(f, has_aux=True))(X)


def _jvp(lib, f):
    return lib.jvp(f, (X,), (T,))


def _hessian(lib, f):
    # Compiled: op by op, a Hessian of a hundred methods is a thousand compiles.
    return jax.jit(lib.hessian(lambda x: f(x)[0]))(X)


MODES = {"grad": _grad_eager, "jit(grad)": _grad_jit, "jvp": _jvp, "hessian": _hessian}


def _run(mode, lib, calls):
    outcomes: dict = {}
    out = MODES[mode](lib, _program(calls, outcomes))
    return outcomes, out


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == jax.dtypes.float0:
        return True
    if not np.issubdtype(a.dtype, np.inexact):
        return np.array_equal(a, b)
    a, b = a.astype(np.complex128), b.astype(np.complex128)
    return bool(np.allclose(a, b, rtol=2e-5, atol=2e-5, equal_nan=True))


def _differing(mode, calls) -> list:
    """The calls whose results differ between JAX and fbackprop, run one by one."""
    bad = []
    for call in calls:
        (_, ja), (_, fa) = _run(mode, JAX, [call]), _run(mode, FB, [call])
        if not all(map(_same, jax.tree.leaves(ja), jax.tree.leaves(fa))):
            bad.append(call[0])
    return bad


def test_every_public_name_is_called_or_skipped_with_a_reason():
    names = _public_names()
    stale = sorted((set(RECIPES) | set(SKIP)) - set(names))
    assert not stale, f"RECIPES/SKIP name methods jax.Array no longer has: {stale}"
    assert all(isinstance(why, str) and why for why in SKIP.values())
    keys = [k for k, _ in _calls()]
    assert len(set(keys)) == len(keys)
    called = {k.split("[")[0] for k in keys}
    assert called | set(SKIP) == set(names)
    assert set(JAX_ERRORS) <= set(keys), set(JAX_ERRORS) - set(keys)
    print(f"\n{len(names)} public jax.Array names: {len(called)} called "
          f"({len(keys)} calls per mode), {len(SKIP)} skipped")


@pytest.mark.parametrize("mode", list(MODES))
def test_array_methods_match_jax(mode):
    """Each call's outcome (error type, static value, or result types) is JAX's,
    and all results and derivatives of the mode are JAX's."""
    calls = _calls()
    j_outcomes, j_out = _run(mode, JAX, calls)
    raised = {k for k, (kind, _) in j_outcomes.items() if kind == "raises"}
    expected = {k for k, (modes, _) in JAX_ERRORS.items() if mode in modes}
    # A call JAX refuses that is not in JAX_ERRORS is a method called wrongly
    # (a new method with required arguments needs a recipe).
    assert raised == expected, (f"{mode}: calls raising under JAX {sorted(raised)}, "
                                f"JAX_ERRORS lists {sorted(expected)}: fix the recipes")
    f_outcomes, f_out = _run(mode, FB, calls)
    differ = {k: (j_outcomes[k], f_outcomes.get(k)) for k in j_outcomes
              if not _outcome_equal(j_outcomes[k], f_outcomes.get(k))}
    assert not differ, f"{mode}: (JAX, fbackprop) outcomes differ: {differ}"
    assert jax.tree.structure(j_out) == jax.tree.structure(f_out)
    if not all(map(_same, jax.tree.leaves(j_out), jax.tree.leaves(f_out))):
        pytest.fail(f"{mode}: results differ from JAX's for "
                    f"{_differing(mode, calls) or 'the calls together only'}")


def _outcome_equal(a, b) -> bool:
    if a is None or b is None or a[0] != b[0]:
        return False
    if a[0] != "value":
        return a == b
    x, y = a[1], b[1]
    # Static results (shape, dtype, sizes, Python scalars) must be equal.
    return type(x) is type(y) and bool(x == y)


@pytest.mark.parametrize("mode", list(MODES))
def test_at_apply_has_no_derivative_in_either(mode):
    """``x.at[i].apply(fn)`` has no derivative rule in JAX; fbackprop says so too
    (in reverse mode when the backward sweep reaches it, not at the call)."""
    call = ("at[apply]", lambda x: x.at[1].apply(jnp.sin))
    outcomes, _ = _run(mode, JAX, [call])
    assert outcomes == {"at[apply]": ("raises", "NotImplementedError")}
    outcomes = {}
    try:
        MODES[mode](FB, _program([call], outcomes))
    except NotImplementedError as e:
        assert "custom update computation" in str(e)
    else:
        assert outcomes == {"at[apply]": ("raises", "NotImplementedError")}


# ------------------------------------------------- tracer attribute names
def _fbackprop_tracer_classes() -> list:
    import fbackprop._src as src
    for info in pkgutil.walk_packages(src.__path__, src.__name__ + "."):
        importlib.import_module(info.name)
    seen, todo = [], [core.Tracer]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return [c for c in seen if c.__module__.startswith("fbackprop")]


# JAX's tracer protocol: methods JAX calls on every tracer, which a tracer class
# overrides by design. None of them is a jax.Array attribute (checked below).
TRACER_PROTOCOL = {
    "aval": "the abstract value; JAX reads it on every tracer",
    "full_lower": "JAX lowers a tracer to its value when its trace is done",
    "to_concrete_value": "what bool(x) / int(x) / x.item() read eagerly",
    "get_referent": "what identity checks (jax.Array.is_deleted, donation) see",
    "_short_repr": "how JAX prints a tracer in errors",
    "_contents": "what JAX lists for a tracer in repr and closure conversion",
}


def test_no_tracer_attribute_hides_an_array_attribute():
    """Every attribute an fbackprop tracer class defines (slot, method, property)
    is either JAX's tracer protocol or a name neither ``jax.Array``, its
    implementation nor ``Tracer`` has."""
    classes = _fbackprop_tracer_classes()
    names = {c.__name__ for c in classes}
    assert {"RecordingTracer", "TangentTracer"} <= names, names
    assert not set(TRACER_PROTOCOL) & set(dir(jax.Array))
    taken = set(dir(jax.Array)) | set(dir(ArrayImpl)) | set(dir(core.Tracer))
    # What Python defines on every class (__module__, __doc__, __slots__...).
    implicit = set(vars(type("Probe", (core.Tracer,), {"__slots__": ()})))
    implicit |= {"__init__", "__slots__"}
    clashes = {c.__name__: sorted(n for n in vars(c) if n in taken
                                  and n not in implicit and n not in TRACER_PROTOCOL)
               for c in classes}
    clashes = {c: ns for c, ns in clashes.items() if ns}
    assert not clashes, (f"fbackprop tracer attributes named like jax.Array/Tracer "
                         f"attributes: {clashes}; name them _fb_*")


def test_layernorm_variance_under_fbackprop():
    """The reported case, eagerly, under jit and in forward mode."""
    def loss(h):
        mu = h.mean(-1, keepdims=True)
        return jnp.sum(jnp.tanh((h - mu) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)) * h)

    want = jax.grad(loss)(X)
    np.testing.assert_allclose(fb.grad(loss)(X), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fb.grad(loss))(X), want, rtol=1e-5, atol=1e-6)
    _, vjp_fn = fb.vjp(loss, X)
    np.testing.assert_allclose(vjp_fn(jnp.float32(1.0))[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fb.jvp(loss, (X,), (T,))[1], jax.jvp(loss, (X,), (T,))[1],
                               rtol=1e-5, atol=1e-6)
