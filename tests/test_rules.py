"""Every spec in the table, against JAX.

- fbackprop's VJP (random cotangent) and JVP (random tangent) against JAX's, under
  jit in every dtype the spec lists and eagerly in its widest dtype (every dtype
  with ``FBACKPROP_TEST_FULL=1``, ``make test-full``);
- reverse over reverse (order-2 specs): the gradient of <vjp(ct), w>;
- the inner-product identity <u, J v> == <J^T u, v> between fbackprop's own JVP
  and VJP, and for order-2 specs the same identity for x -> J(x)^T u
  (forward over reverse against reverse over reverse).

Under jit the cases are compiled in groups: one program computes fbackprop's and
JAX's results for ``GROUP_SIZE`` cases of one kind and dtype (the suite's time is
otherwise mostly XLA compiles of small programs). Each test reads its own share and
checks it; a group that fails to trace or compile is retried case by case, so a
failure always names its spec.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util

import fbackprop as fb
from fbackprop._src.testing import assert_allclose
from specs import ALL_SPECS

float0 = jax.dtypes.float0


def _is_float(x):
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _split(spec, args):
    """The function of the float inputs only (others are closed over)."""
    float_idx = [i for i, a in enumerate(args) if _is_float(a)]

    def f(*floats):
        full = list(args)
        for i, x in zip(float_idx, floats):
            full[i] = x
        return spec.fn(*full)

    return f, tuple(args[i] for i in float_idx)


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(np.shape(x)).astype(x.dtype))
        if _is_float(x) else np.zeros(np.shape(x), jax.dtypes.float0), tree)


def _widest(spec):
    """The most precise dtype a spec lists (eager and second order are checked there)."""
    for d in ("float64", "complex128", "float32", "complex64"):
        if d in spec.dtypes:
            return d
    return spec.dtypes[0]


def _like(rng, tree):
    """Random values shaped like ``tree`` (float0 zeros for non-float leaves)."""
    def one(x):
        x = x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return np.zeros(x.shape, float0)
        r = rng.standard_normal(x.shape)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            r = r + 1j * rng.standard_normal(x.shape)
        return jnp.asarray(r, x.dtype)
    return tree_util.tree_map(one, tree)


def _inner(xs, ys):
    total = 0.0
    for x, y in zip(tree_util.tree_leaves(xs), tree_util.tree_leaves(ys)):
        if jnp.asarray(x).dtype == float0:
            continue
        total = total + jnp.real(jnp.sum(jnp.conj(x) * y))
    return total


# ------------------------------------------------------------------ the cases
# Each case builds ``(inputs, fn)``; ``fn(inputs)`` computes fbackprop's and JAX's
# results (or both sides of the identity) as a pytree of arrays.
def _rules_parts(spec, dtype):
    """``(inputs, both)``: ``both(vjp, jvp, xs)`` is one implementation's derivatives."""
    f, floats = _split(spec, spec.args(dtype))
    tangents = _random_like(floats, 2)

    def both(vjp, jvp, xs):
        results = {}
        if "rev" in spec.modes:
            out, vjp_fn = vjp(f, *xs)
            results["rev"] = (out, vjp_fn(_random_like(out, 1)))
        if "fwd" in spec.modes:
            results["fwd"] = jvp(f, xs, tangents)
        return results

    return floats, both


def _rules_case(spec, dtype):
    floats, both = _rules_parts(spec, dtype)
    return floats, lambda xs: (both(fb.vjp, fb.jvp, xs), both(jax.vjp, jax.jvp, xs))


def _rules_eager(spec, dtype):
    """fbackprop's derivatives eagerly; JAX's reference is the jitted run of the same
    spec and dtype (kept from its group's program, which ran first on this worker, or
    compiled here)."""
    xs, both = _rules_parts(spec, dtype)
    theirs = _references.pop(_key("rules", spec, dtype, True), None)
    if theirs is None:
        theirs = jax.jit(lambda xs: both(jax.vjp, jax.jvp, xs))(xs)
    return both(fb.vjp, fb.jvp, xs), theirs


def _second_order_case(spec, dtype):
    f, floats = _split(spec, spec.args(dtype))
    out = jax.eval_shape(f, *floats)
    ct = _random_like(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out), 3)
    w = _random_like(floats, 4)
    argnums = tuple(range(len(floats)))

    def scalar(vjp):
        def g(*xs):
            _, vjp_fn = vjp(f, *xs)
            gs = vjp_fn(ct)
            return sum(jnp.sum(jnp.real(a * b)) for a, b in zip(gs, w))
        return g

    return floats, lambda xs: (fb.grad(scalar(fb.vjp), argnums)(*xs),
                               jax.grad(scalar(jax.vjp), argnums)(*xs))


def _identity_sides(f, xs, seed):
    """(<u, J v>, <J^T u, v>) with our own JVP and VJP, JAX's complex convention."""
    rng = np.random.default_rng(seed)
    v = _like(rng, xs)
    out, jv = fb.jvp(f, xs, v)
    u = _like(rng, out)
    _, vjp_fn = fb.vjp(f, *xs)
    jtu = vjp_fn(tree_util.tree_map(lambda c: c if c.dtype == float0 else jnp.conj(c), u))
    jtu = tree_util.tree_map(lambda c: c if c.dtype == float0 else jnp.conj(c), jtu)
    return _inner(u, jv), _inner(jtu, v)


def _identity_case(spec, dtype):
    f, floats = _split(spec, spec.args(dtype))

    def sides(xs):
        first = _identity_sides(f, xs, 0)
        if spec.order < 2:
            return first, first
        u = _like(np.random.default_rng(5), jax.eval_shape(f, *xs))

        def pullback(*ys):
            return fb.vjp(f, *ys)[1](u)

        return first, _identity_sides(pullback, xs, 1)

    return floats, sides


BUILD = {"rules": _rules_case, "second": _second_order_case, "identity": _identity_case}


# ------------------------------------------------------------ grouped compiles
GROUP_SIZE = 16
_groups: dict = {}        # group id -> list of case keys
_results: dict = {}       # case key -> results, or _FAILED for a group that failed
_references: dict = {}    # jitted rules case key -> JAX's results, for its eager case
_eager_wanted: set = set()  # the jitted rules cases an eager case reads
_FAILED = object()


def _key(kind, spec, dtype, jit):
    return (kind, spec.name, dtype, jit)


_SPECS = {s.name: s for s in ALL_SPECS}


def _compute_group(gid):
    keys = _groups[gid]
    built = [BUILD[k[0]](_SPECS[k[1]], k[2]) for k in keys]
    try:
        outs = jax.jit(lambda all_xs: [fn(xs) for (_, fn), xs in zip(built, all_xs)])(
            [xs for xs, _ in built])
    except Exception:  # retried one by one, so the failing case names its spec
        outs = [_FAILED] * len(keys)
    _results.update(zip(keys, outs))
    for key, out in zip(keys, outs):
        if key[0] == "rules" and out is not _FAILED and key in _eager_wanted:
            _references[key] = out[1]


def results_of(kind, spec, dtype, jit, group=None):
    """The case's results: from its group's program, or computed on their own."""
    key = _key(kind, spec, dtype, jit)
    if group is not None:
        if key not in _results:
            _compute_group(group)
        out = _results.pop(key, _FAILED)
        if out is not _FAILED:
            return out
    xs, fn = BUILD[kind](spec, dtype)
    return jax.jit(fn)(xs) if jit else fn(xs)


def _params(kind, cases):
    """pytest params for ``(spec, dtype, jit)`` cases. The jitted ones are grouped by
    dtype; an eager rules case joins the group of its jitted twin (whose program gives
    its JAX reference). Each group runs on one pytest-xdist worker (``--dist loadgroup``),
    its jitted cases first (they come first in ``cases``)."""
    params, pending, group_of = [], {}, {}
    for spec, dtype, jit in cases:
        tag = "jit" if jit else "eager"
        case_id = f"{spec.name}-{dtype}" + (f"-{tag}" if kind == "rules" else "")
        key = _key(kind, spec, dtype, jit)
        if jit:
            members = pending.setdefault(dtype, [])
            if not members or len(_groups[members[-1]]) >= GROUP_SIZE:
                members.append(f"{kind}-{dtype}-{len(members)}")
                _groups[members[-1]] = []
            group = group_of[key] = members[-1]
            _groups[group].append(key)
        else:
            twin = _key(kind, spec, dtype, True)
            group = group_of.get(twin)
            if group is not None:
                _eager_wanted.add(twin)
        marks = [pytest.mark.xdist_group(group)] if group else []
        params.append(pytest.param(spec, dtype, jit, group, id=case_id, marks=marks))
    return params


_FULL = os.environ.get("FBACKPROP_TEST_FULL") == "1"
RULE_CASES = _params("rules", [(s, d, True) for s in ALL_SPECS for d in s.dtypes] + [
    (s, d, False) for s in ALL_SPECS for d in (s.dtypes if _FULL else [_widest(s)])])


@pytest.mark.parametrize("spec,dtype,jit,group", RULE_CASES)
def test_vjp_and_jvp_match_jax(spec, dtype, jit, group):
    """fb.vjp with a random cotangent and fb.jvp with a random tangent, against JAX.

    Eagerly fbackprop runs the function primitive by primitive on its traces (against
    JAX's jitted derivatives of the same inputs); under jit fbackprop's and JAX's
    derivatives are compiled together.
    """
    if jit:
        ours, theirs = results_of("rules", spec, dtype, jit, group)
    else:
        ours, theirs = _rules_eager(spec, dtype)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        if _is_float(b):
            assert np.shape(a) == np.shape(b) and a.dtype == b.dtype, spec.name
            assert_allclose(a, b, dtype, spec.tol, err_msg=spec.name)


SECOND_ORDER = _params("second", [(s, _widest(s), True) for s in ALL_SPECS
                                  if s.order >= 2 and "rev" in s.modes])


@pytest.mark.parametrize("spec,dtype,jit,group", SECOND_ORDER)
def test_second_order_matches_jax(spec, dtype, jit, group):
    """Reverse-over-reverse: the gradient of <vjp(ct), w> against JAX's."""
    ours, theirs = results_of("second", spec, dtype, jit, group)
    for a, b in zip(ours, theirs):
        assert_allclose(a, b, dtype, spec.tol, err_msg=spec.name)


# reduce_precision rounds the tangent (JVP) and the cotangent (VJP) to its
# reduced precision separately, so the identity holds only to that precision.
IDENTITY_TOL = {"reduce_precision": {"float64": (1e-2, 1e-2), "float32": (1e-2, 1e-2)}}


def _identity_dtype(spec):
    return "float64" if "float64" in spec.dtypes else spec.dtypes[0]


IDENTITY = _params("identity", [
    (s, _identity_dtype(s), True) for s in ALL_SPECS
    if "fwd" in s.modes and "rev" in s.modes
    and any(_is_float(a) for a in s.args(_identity_dtype(s)))])


@pytest.mark.parametrize("spec,dtype,jit,group", IDENTITY)
def test_jvp_vjp_inner_product_identity(spec, dtype, jit, group):
    """<u, J v> == <J^T u, v> between our own JVP and VJP (under jit; the eager
    derivatives are compared with JAX's above)."""
    (a1, b1), (a2, b2) = results_of("identity", spec, dtype, jit, group)
    tol = IDENTITY_TOL.get(spec.name) or spec.tol or \
        ({"float64": (1e-9, 1e-9)} if dtype == "float64" else None)
    for a, b in ((a1, b1), (a2, b2)):
        scale = 1.0 + abs(float(a)) + abs(float(b))
        assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, dtype, tol,
                        err_msg=spec.name)
