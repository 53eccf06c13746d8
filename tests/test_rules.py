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
from fbackprop._src import eager
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
_group_of: dict = {}      # jitted case key -> its group id
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
    params, pending, group_of = [], {}, _group_of
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


# ------------------------------------------------------------- every front end
# A reverse-mode spec is also a scalar loss, in its widest dtype: the sum of its
# float outputs paired with a random cotangent. The loss goes through the front ends
# a user calls, each compared with JAX's value_and_grad of the same loss:
#
# - "replay": eager ``fb.value_and_grad`` called with the same input types at two
#   points of the spec's domain, A B A B. The first two calls sweep op by op, the
#   third records the program only and runs its compiled backward program, the
#   fourth runs that program on values it was not compiled with; ``eager.stats``
#   says which path ran. A program that is never compiled (NOT_COMPILED,
#   NOT_REPEATING) is called A B A, and why it is not compiled is checked.
# - ``fb.checked_grad`` (the report is ok, the gradients are JAX's) and
#   ``fb.grad_and_intermediates`` with a tag on each float output (its intermediate
#   is that output's cotangent), eagerly and under ``jax.jit``.
#
# ``jax.jit(fb.value_and_grad(...))`` is not repeated here: under jit it records and
# sweeps backward as ``fb.vjp`` does in test_vjp_and_jvp_match_jax's jit cases (the
# eager programs are only used eagerly).
#
# The cases of one rules group (one worker) are computed together: one jitted
# program holds JAX's references, another the jitted tools, and each eager front end
# runs once on the sum of the cases' losses (one recorded program, one compiled
# backward program per group). A part that fails for the group is redone spec by
# spec in each case's test, so a failure names its spec.
FRONT_ENDS = ("replay", "checked_grad-eager", "checked_grad-jit",
              "intermediates-eager", "intermediates-jit")

# Specs whose eager program is never compiled, and why (``eager._Uncompilable``).
NOT_COMPILED = {
    # The user's bwd runs as Python on the recorded values.
    "custom_vjp_swish": "a custom_vjp function",
    "custom_vjp_two_inputs": "a custom_vjp function",
    # Collectives carry their axis name as an effect.
    "shard_map_psum": "the effects of 'psum_invariant'",
    "shard_map_pmean": "the effects of 'psum_invariant'",
    "shard_map_replicated_weight": "the effects of 'psum_invariant'",
    "shard_map_psum_no_vma": "the effects of 'psum'",
    "shard_map_pmean_no_vma": "the effects of 'psum'",
    "shard_map_all_gather": "the effects of 'all_gather'",
    "shard_map_all_gather_tiled": "the effects of 'all_gather'",
    "shard_map_psum_scatter": "the effects of 'reduce_scatter'",
    "shard_map_all_to_all": "the effects of 'all_to_all'",
    "shard_map_axis_index": "the effects of 'axis_index'",
}
# Specs whose eager program could be compiled but differs from call to call.
NOT_REPEATING = {
    # lax.reduce's reducer is a function made anew by every call, and a parameter
    # that is a function is compared by identity.
    "reduce_generic_variadic",
}


def _pairing(outs, cts):
    total = None
    for o, c in zip(outs, cts):
        term = jnp.sum(jnp.real(o * c))
        total = term if total is None else total + term
    return total


class _Loss:
    """A spec as the scalar loss <outputs, cotangent>, at two points of its domain
    (seeds 0 and 1): ``loss(floats, others)`` of its float and its other inputs."""

    def __init__(self, spec):
        self.spec, self.dtype = spec, _widest(spec)
        self.points = [spec.args(self.dtype, seed) for seed in (0, 1)]
        self.float_idx = [i for i, a in enumerate(self.points[0]) if _is_float(a)]
        f, floats = _split(spec, self.points[0])
        cts = tree_util.tree_leaves(_like(np.random.default_rng(1), jax.eval_shape(f, *floats)))
        self.cts = [None if c.dtype == float0 else c for c in cts]
        self.tags = [f"{spec.name}.out{k}" for k, c in enumerate(self.cts) if c is not None]
        if not self.tags or not floats:
            raise ValueError(f"{spec.name}: a reverse-mode spec needs float inputs and a "
                             f"float output (else list only 'fwd' in its modes)")

    def floats(self, point):
        return tuple(self.points[point][i] for i in self.float_idx)

    def others(self, point):
        return tuple(a for i, a in enumerate(self.points[point]) if i not in self.float_idx)

    def outputs(self, floats, others):
        floats, others = iter(floats), iter(others)
        args = [next(floats) if i in self.float_idx else next(others)
                for i in range(len(self.points[0]))]
        leaves = tree_util.tree_leaves(self.spec.fn(*args))
        return [o for o, c in zip(leaves, self.cts) if c is not None]

    def __call__(self, floats, others, tag=False):
        outs = self.outputs(floats, others)
        if tag:
            outs = [fb.tag(o, name) for o, name in zip(outs, self.tags)]
        return _pairing(outs, [c for c in self.cts if c is not None])

    def at(self, point, tag=False):
        """The loss of the float inputs, the others fixed at ``point``."""
        others = self.others(point)
        return lambda floats: self(floats, others, tag)


def _summed(losses, tag=False):
    """The sum of several specs' losses (one eager program), each one as aux."""
    def loss(all_floats, all_others):
        each = [m(f, o, tag) for m, f, o in zip(losses, all_floats, all_others)]
        return sum(each[1:], each[0]), each
    return loss


def _inputs(losses, point):
    return [m.floats(point) for m in losses], [m.others(point) for m in losses]


def _jax_references(losses):
    """Per loss: JAX's ``(value, grads)`` at both points and the cotangents of its
    outputs at point 0, from one jitted program."""
    def program(floats):
        refs = []
        for m, xs in zip(losses, floats):
            outs = m.outputs(xs[0], m.others(0))
            cts = [c for c in m.cts if c is not None]
            per_out = jax.grad(lambda os, cts=cts: _pairing(os, cts))(outs)
            refs.append(([jax.value_and_grad(m.at(p))(xs[p]) for p in (0, 1)],
                         dict(zip(m.tags, per_out))))
        return refs
    return jax.jit(program)([(m.floats(0), m.floats(1)) for m in losses])


def _tools_jit(losses):
    """fb.checked_grad and fb.grad_and_intermediates of each loss, in one jitted program."""
    def program(floats):
        return [(fb.checked_grad(m.at(0))(xs),
                 fb.grad_and_intermediates(m.at(0, tag=True), names=m.tags)(xs))
                for m, xs in zip(losses, floats)]
    outs = jax.jit(program)([m.floats(0) for m in losses])
    return {"checked_grad-jit": [(report.ok, grads) for (report, grads), _ in outs],
            "intermediates-jit": [inter for _, inter in outs]}


def _checked_grad_eager(losses):
    report, (grads, _) = fb.checked_grad(_summed(losses), has_aux=True)(*_inputs(losses, 0))
    return {"checked_grad-eager": [(report.ok, g) for g in grads]}


def _intermediates_eager(losses):
    names = [n for m in losses for n in m.tags]
    grads, inter, _ = fb.grad_and_intermediates(_summed(losses, tag=True), has_aux=True,
                                                names=names)(*_inputs(losses, 0))
    return {"intermediates-eager": [(g, {n: inter[n] for n in m.tags})
                                    for m, g in zip(losses, grads)]}


_EAGER_REPLAY_STATS = {"fallbacks": 2, "compiles": 1, "hits": 2}


def _replay(losses):
    """Eager fb.value_and_grad of the summed losses at points A B A B (A B A for a
    program never compiled). Per loss: ``(calls, stats, keys)``: its ``(point,
    value, grads)`` per call, ``eager.stats`` and what ``eager.tape_key`` returned
    (a key, or the ``_Uncompilable`` raised) for each call."""
    never = {m.spec.name for m in losses} & (set(NOT_COMPILED) | NOT_REPEATING)
    assert not never or len(losses) == 1, "a program that is never compiled runs alone"
    points = (0, 1, 0) if never else (0, 1, 0, 1)
    value_and_grad = fb.value_and_grad(_summed(losses), has_aux=True)
    keys, tape_key = [], eager.tape_key

    def spy(tape):
        try:
            layout = tape_key(tape)
        except eager._Uncompilable as err:
            keys.append(err)
            raise
        keys.append(layout.key)
        return layout

    eager.clear()
    eager.tape_key = spy
    try:
        calls = [(p, value_and_grad(*_inputs(losses, p))) for p in points]
        stats = dict(eager.stats)
    finally:
        eager.tape_key = tape_key
        eager.clear()
    if len(losses) > 1 and stats != _EAGER_REPLAY_STATS:
        raise AssertionError(f"eager.stats {stats}")   # redone spec by spec
    return {"replay": [([(p, each[k], grads[k]) for p, ((_, each), grads) in calls],
                        stats, keys) for k in range(len(losses))]}


# Each part computes one or more front ends for a list of losses.
_PARTS = {"replay": _replay, "checked_grad-eager": _checked_grad_eager,
          "intermediates-eager": _intermediates_eager, "checked_grad-jit": _tools_jit,
          "intermediates-jit": _tools_jit}

_front_groups: dict = {}    # group id -> the names of its specs
_front_results: dict = {}   # (spec name, front end) -> result, or _FAILED
_front_refs: dict = {}      # spec name -> JAX's references


def _compute_front_ends(group):
    losses = [_Loss(_SPECS[n]) for n in _front_groups.pop(group)]
    try:
        _front_refs.update(zip([m.spec.name for m in losses], _jax_references(losses)))
    except Exception:  # noqa: BLE001 - computed per spec in its test
        pass
    together = [m for m in losses
                if m.spec.name not in NOT_COMPILED and m.spec.name not in NOT_REPEATING]
    for part in dict.fromkeys(_PARTS.values()):
        members = together if part is _replay else losses
        try:
            out = part(members) if members else {}
        except Exception:  # noqa: BLE001 - redone spec by spec, so a failure names its spec
            out = {front: [_FAILED] * len(members)
                   for front, p in _PARTS.items() if p is part}
        for front, results in out.items():
            for m, r in zip(members, results):
                _front_results[(m.spec.name, front)] = r


def front_end_results(spec, front, group):
    """``(ours, JAX's references)`` of one spec through one front end."""
    if group in _front_groups:
        _compute_front_ends(group)
    ours = _front_results.pop((spec.name, front), _FAILED)
    loss = None
    if ours is _FAILED:
        loss = _Loss(spec)
        ours = _PARTS[front]([loss])[front][0]
    refs = _front_refs.get(spec.name)
    if refs is None:
        refs = _front_refs[spec.name] = _jax_references([loss or _Loss(spec)])[0]
    return ours, refs


def _front_params():
    params = []
    for spec in ALL_SPECS:
        if "rev" not in spec.modes:
            continue
        group = _group_of.get(_key("rules", spec, _widest(spec), True))
        if group is not None:
            _front_groups.setdefault(f"front-{group}", []).append(spec.name)
            group = f"front-{group}"
        marks = [pytest.mark.xdist_group(group[len("front-"):])] if group else []
        params.extend(pytest.param(spec, front, group, id=f"{spec.name}-{front}",
                                   marks=marks) for front in FRONT_ENDS)
    return params


FRONT_CASES = _front_params()


def _assert_close(ours, theirs, spec, what):
    assert tree_util.tree_structure(ours) == tree_util.tree_structure(theirs), \
        f"{spec.name} ({what}): {tree_util.tree_structure(ours)} != " \
        f"{tree_util.tree_structure(theirs)}"
    for a, b in zip(tree_util.tree_leaves(ours), tree_util.tree_leaves(theirs)):
        assert np.shape(a) == np.shape(b) and a.dtype == b.dtype, \
            f"{spec.name} ({what}): {a.dtype}{np.shape(a)} != {b.dtype}{np.shape(b)}"
        assert_allclose(a, b, _widest(spec), spec.tol, err_msg=f"{spec.name} ({what})")


@pytest.mark.parametrize("spec,front,group", FRONT_CASES)
def test_front_ends_match_jax(spec, front, group):
    """The spec's loss through eager fb.value_and_grad (compiled replay included),
    fb.checked_grad and fb.grad_and_intermediates, against JAX's value_and_grad."""
    if front == "replay" and not eager.eligible():
        pytest.skip("eager programs are off (FBACKPROP_EAGER_PROGRAMS=0)")
    ours, (jax_vg, jax_cts) = front_end_results(spec, front, group)
    if front == "replay":
        calls, stats, keys = ours
        for k, (point, value, grads) in enumerate(calls):
            _assert_close((value, grads), jax_vg[point], spec, f"eager call {k + 1}")
        if spec.name in NOT_COMPILED:
            assert stats == {"fallbacks": 3}, (spec.name, stats)
            reason = NOT_COMPILED[spec.name]
            assert len(keys) == 3 and all(
                isinstance(k, eager._Uncompilable) and reason in str(k) for k in keys), \
                f"{spec.name}: expected not compiled because of {reason!r}, got {keys}"
        elif spec.name in NOT_REPEATING:
            assert stats == {"fallbacks": 3}, (spec.name, stats)
            assert not any(isinstance(k, Exception) for k in keys) and \
                len(set(keys)) == len(keys), f"{spec.name}: the program repeats: {keys}"
        else:
            assert stats == _EAGER_REPLAY_STATS, \
                f"{spec.name}: the third call should compile and the fourth hit: {stats}, " \
                f"tape keys {[k for k in keys if isinstance(k, Exception)]}"
    elif front.startswith("checked_grad"):
        ok, grads = ours
        assert ok, f"{spec.name}: checked_grad reports a non-finite value"
        _assert_close(grads, jax_vg[0][1], spec, front)
    else:
        grads, inter = ours
        _assert_close(grads, jax_vg[0][1], spec, front + " gradients")
        assert sorted(inter) == sorted(jax_cts), (spec.name, sorted(inter))
        _assert_close([inter[n] for n in sorted(inter)], [jax_cts[n] for n in sorted(inter)],
                      spec, front + " cotangents of the outputs")
