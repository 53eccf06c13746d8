"""Checkpointing (remat): gradients, policies, recomputation, and the residual report.

On XLA:CPU the optimization barrier is removed before CSE, so for straight-line
(unrolled) networks compiled memory cannot show the saving; these tests check
remat at the jaxpr level instead: what ``fb.saved_residuals`` reports and that
the backward program recomputes behind a barrier. Compiled memory of scanned
networks is in test_memory.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.ad_checkpoint import saved_residuals as jax_saved_residuals  # the oracle
from jax.ad_checkpoint import Offloadable, Recompute, Saveable, checkpoint_name

import fbackprop as fb
from fbackprop._src.testing import assert_allclose

P = jax.checkpoint_policies
POLICIES = {
    "default": None,
    "nothing_saveable": P.nothing_saveable,
    "everything_saveable": P.everything_saveable,
    "dots_saveable": P.dots_saveable,
    "dots_with_no_batch_dims_saveable": P.dots_with_no_batch_dims_saveable,
    "save_only_these_names": P.save_only_these_names("hidden"),
    "save_any_names_but_these": P.save_any_names_but_these("hidden"),
}


def _params(seed=0, width=8, layers=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(width, width)).astype(dtype) / np.sqrt(width))
            for _ in range(layers)]


def _layer(w, x):
    h = checkpoint_name(jnp.tanh(x @ w), "hidden")
    return x + jnp.sin(h @ w.T)


def _mlp(policy, layers=3, **kwargs):
    layer = jax.checkpoint(_layer, policy=policy, **kwargs)

    def loss(ws, x):
        for w in ws[:layers]:
            x = layer(w, x)
        return jnp.sum(x ** 2)
    return loss


def _x(seed=1, batch=4, width=8, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, width)).astype(dtype))


def _close(a, b, dtype=np.float64):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert_allclose(x, y, dtype)


def _count(jaxpr, name):
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for v in eqn.params.values():
            for j in (v if isinstance(v, (tuple, list)) else [v]):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    total += _count(inner, name)
    return total


def _inline_calls(jaxpr):
    """The equations of ``jaxpr`` with nested ``jit`` calls replaced by their
    bodies (renamed to the call's variables), in program order."""
    out = []

    def walk(j, rename):
        for eqn in j.eqns:
            invars = [v if hasattr(v, "val") else rename.get(v, v)   # literals stay
                      for v in eqn.invars]
            if eqn.primitive.name in ("jit", "pjit"):
                inner = eqn.params["jaxpr"].jaxpr
                sub = dict(zip(inner.invars, invars))
                walk(inner, sub)
                for o, io in zip(eqn.outvars, inner.outvars):
                    rename[o] = sub.get(io, io)
            else:
                out.append(eqn.replace(invars=invars))
    walk(jaxpr, {})
    return out


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_unrolled_gradients_match_jax(name):
    loss = _mlp(POLICIES[name])
    ws, x = _params(), _x()
    want = jax.grad(loss, (0, 1))(ws, x)
    _close(fb.grad(loss, (0, 1))(ws, x), want)
    _close(jax.jit(fb.grad(loss, (0, 1)))(ws, x), want)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_scanned_gradients_and_second_order_match_jax(name):
    ws, x = jnp.stack(_params(layers=4)), _x()

    def loss(ws, x):
        body = jax.checkpoint(lambda x, w: (_layer(w, x), None), policy=POLICIES[name])
        y, _ = lax.scan(body, x, ws)
        return jnp.sum(y ** 2)

    _close(jax.jit(fb.grad(loss, (0, 1)))(ws, x), jax.grad(loss, (0, 1))(ws, x))
    v = _x(2)
    hvp_ours = jax.jit(fb.grad(lambda x: jnp.vdot(fb.grad(loss, 1)(ws, x), v)))(x)
    hvp_jax = jax.grad(lambda x: jnp.vdot(jax.grad(loss, 1)(ws, x), v))(x)
    _close(hvp_ours, hvp_jax)


def test_nested_checkpoints():
    ws, x = _params(), _x()
    inner = jax.checkpoint(_layer, policy=P.dots_saveable)

    def loss(ws, x):
        outer = jax.checkpoint(lambda x: inner(ws[1], inner(ws[0], x)))
        return jnp.sum(outer(x) ** 2)

    _close(jax.jit(fb.grad(loss, (0, 1)))(ws, x), jax.grad(loss, (0, 1))(ws, x))
    _close(jax.jit(fb.hessian(loss, 1))(ws, x[:1]), jax.hessian(loss, 1)(ws, x[:1]))


def test_checkpoint_of_function_with_integer_and_unused_inputs():
    def loss(x, n, unused):
        f = jax.checkpoint(lambda x, n, u: jnp.sin(x) ** n)
        return jnp.sum(f(x, n, unused))

    x = _x()
    _close(fb.grad(loss, (0, 2))(x, 3, x), jax.grad(loss, (0, 2))(x, 3, x))


# ----------------------------------------------------------- fb.checkpoint API
def test_fb_checkpoint_policy_by_function_and_by_name():
    ws, x = _params(), _x()
    for policy in [None, P.dots_saveable, "dots_saveable", "nothing_saveable"]:
        layer = fb.checkpoint(_layer, policy=policy)

        def loss(ws, x, layer=layer):
            return jnp.sum(layer(ws[1], layer(ws[0], x)) ** 2)

        _close(fb.grad(loss)(ws, x), jax.grad(loss)(ws, x))


def test_fb_checkpoint_static_argnums_and_prevent_cse():
    def layer(x, power):
        return jnp.sin(x) ** power

    for prevent_cse in (True, False):
        f = fb.checkpoint(layer, static_argnums=(1,), prevent_cse=prevent_cse)
        x = _x()
        got = jax.jit(fb.grad(lambda x, f=f: jnp.sum(f(x, 3))))(x)
        _close(got, jax.grad(lambda x: jnp.sum(layer(x, 3)))(x))


def test_fb_checkpoint_rejects_unknown_policy_names():
    with pytest.raises(ValueError, match="unknown policy name 'dots'"):
        fb.checkpoint(jnp.sin, policy="dots")
    with pytest.raises(ValueError, match="must be called"):
        fb.checkpoint(jnp.sin, policy="save_only_these_names")
    with pytest.raises(TypeError, match="policy"):
        fb.checkpoint(jnp.sin, policy=3)


def test_custom_policies_returning_jax_decisions():
    ws, x = _params(), _x()

    def save_tanh(prim, *_, **__):
        return Saveable if prim.name == "tanh" else Recompute

    def offload_dots(prim, *_, **__):
        return Offloadable("device", "pinned_host") if prim.name == "dot_general" else False

    for policy in (save_tanh, offload_dots):
        loss = _mlp(policy)
        _close(jax.jit(fb.grad(loss))(ws, x), jax.grad(loss)(ws, x))
    rows = fb.saved_residuals(_mlp(save_tanh, layers=1), ws, x)
    # tanh's output, and the layer's output (an add, for the loss's square)
    assert [r.primitive for r in rows if r.kind == "intermediate"] == ["tanh", "add"]


def test_bad_policy_return_value_is_an_error():
    loss = _mlp(lambda *_, **__: "yes", layers=1)
    with pytest.raises(TypeError, match="must return a bool"):
        fb.grad(loss)(_params(), _x())


# --------------------------------------------- remat at the jaxpr level
def _kept(policy, layers=2):
    """(primitive, shape) of each kept intermediate of the checkpointed MLP."""
    rows = fb.saved_residuals(_mlp(policy, layers=layers), _params(), _x())
    return sorted((r.primitive, r.shape) for r in rows if r.kind == "intermediate")


def test_saved_residuals_follow_the_policy():
    # Two layers. Layer 2's input is layer 1's output (an add), and the loss's
    # square needs layer 2's output (an add); layer 1's input is an argument.
    adds = [("add", (4, 8))] * 2
    assert _kept(P.nothing_saveable) == adds
    assert _kept(None) == _kept(P.nothing_saveable)
    assert _kept(P.dots_saveable) == adds + [("dot_general", (4, 8))] * 4
    assert _kept(P.dots_with_no_batch_dims_saveable) == _kept(P.dots_saveable)
    assert _kept(P.save_only_these_names("hidden")) == adds + [("name", (4, 8))] * 2
    assert _kept(P.save_any_names_but_these("hidden")) == _kept(P.nothing_saveable)
    assert _kept(P.save_any_names_but_these("other")) == _kept(P.save_only_these_names(
        "hidden"))
    everything = _kept(P.everything_saveable)
    # the dots feeding sin (for cos) and tanh's output (for 1 - tanh^2 and the
    # second dot); the named alias of tanh's output is not kept twice
    assert everything == adds + [("dot_general", (4, 8))] * 2 + [("tanh", (4, 8))] * 2
    plain_rows = fb.saved_residuals(lambda ws, x: jnp.sum(
        _layer(ws[1], _layer(ws[0], x)) ** 2), _params(), _x())
    assert everything == sorted((r.primitive, r.shape) for r in plain_rows
                                if r.kind == "intermediate")


def test_named_residual_rows_say_their_name():
    rows = fb.saved_residuals(_mlp(P.save_only_these_names("hidden"), layers=1), _params(),
                              _x())
    named = [r for r in rows if r.primitive == "name"]
    assert len(named) == 1 and "named 'hidden'" in named[0].detail
    assert "test_remat.py" in named[0].source


def test_backward_recomputes_behind_an_optimization_barrier():
    ws, x = _params(), _x()
    plain = jax.make_jaxpr(fb.grad(lambda ws, x: jnp.sum(_layer(ws[0], x) ** 2)))(ws, x)
    assert _count(plain.jaxpr, "tanh") == 1 and _count(plain.jaxpr, "optimization_barrier") == 0

    remat = jax.make_jaxpr(fb.grad(_mlp(None, layers=1)))(ws, x).jaxpr
    assert _count(remat, "tanh") == 2            # forward, then recomputed in backward
    assert _count(remat, "optimization_barrier") == 1
    eqns = _inline_calls(remat)                  # the region's parts are jit calls
    barrier = [i for i, e in enumerate(eqns) if e.primitive.name == "optimization_barrier"]
    tanhs = [i for i, e in enumerate(eqns) if e.primitive.name == "tanh"]
    assert tanhs[0] < barrier[0] < tanhs[1]       # the recomputation reads the barrier
    barred = set(eqns[barrier[0]].outvars)
    recompute_inputs = set(eqns[tanhs[1] - 1].invars)   # the dot feeding the tanh
    assert recompute_inputs & barred

    no_cse = jax.make_jaxpr(fb.grad(_mlp(None, layers=1, prevent_cse=False)))(ws, x).jaxpr
    assert _count(no_cse, "tanh") == 2 and _count(no_cse, "optimization_barrier") == 0

    saved = jax.make_jaxpr(fb.grad(_mlp(P.everything_saveable, layers=1)))(ws, x).jaxpr
    assert _count(saved, "tanh") == 1 and _count(saved, "optimization_barrier") == 0


# ------------------------------------------------------ the residual report
def test_saved_residuals_of_a_known_function():
    def f(w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(jnp.sin(h))

    w, x = jnp.ones((3, 5), jnp.float32), jnp.ones((2, 3), jnp.float32)
    rows = fb.saved_residuals(f, w, x)
    assert [(r.kind, r.primitive, r.shape, r.nbytes) for r in rows] == [
        ("argument", None, (3, 5), 60),       # x^T ct needs w
        ("argument", None, (2, 3), 24),       # ct w^T needs x
        ("intermediate", "tanh", (2, 5), 40),  # tanh' = 1 - tanh^2, and sin's input
    ]
    assert rows.total_bytes == 124 and rows.intermediate_bytes == 40
    assert rows[0].source == "args[0] (w)" and rows[1].source == "args[1] (x)"
    assert "test_remat.py" in rows[2].source
    table = str(rows)
    assert "total: 3 residuals, 124 bytes" in table and "tanh at" in table
    assert rows.as_dicts()[2]["primitive"] == "tanh"


def _jax_rows(f, *args):
    return sorted((tuple(aval.shape), src.split(" from ")[0])
                  for aval, src in jax_saved_residuals(f, *args))


def test_saved_residuals_agree_with_jax_where_the_choice_is_forced():
    ws, x = _params(width=4), _x(batch=6, width=4)

    def linear_loss(policy):
        layer = jax.checkpoint(_layer, policy=policy)
        return lambda ws, x: jnp.sum(layer(ws[0], x))   # the sum needs no residual

    # a checkpoint saving nothing keeps exactly the arguments, for JAX and for us
    f = linear_loss(P.nothing_saveable)
    ours = fb.saved_residuals(f, ws, x)
    assert all(r.kind == "argument" for r in ours)
    assert sorted(r.shape for r in ours) == sorted(s for s, _ in _jax_rows(f, ws, x))
    # saving the named value: both keep it (and the arguments)
    f = linear_loss(P.save_only_these_names("hidden"))
    ours = fb.saved_residuals(f, ws, x)
    jax_rows = _jax_rows(f, ws, x)
    assert sorted(r.shape for r in ours) == sorted(s for s, _ in jax_rows)
    assert [r.primitive for r in ours].count("name") == 1
    assert sum("named 'hidden'" in src for _, src in jax_rows) == 1


def test_saved_residuals_never_exceed_jax_on_simple_functions():
    cases = [
        (lambda x: jnp.sum(jnp.sin(jnp.sin(x))), (jnp.ones(16),)),
        (lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2), (jnp.ones((8, 4)), jnp.ones((3, 8)))),
        (lambda x: jnp.sum(jax.nn.logsumexp(x, axis=-1)), (jnp.ones((4, 8)),)),
        (lambda x: jnp.sum(jnp.exp(x) * jnp.log(x + 2.0)), (jnp.ones(8),)),
    ]
    for f, args in cases:
        ours = fb.saved_residuals(f, *args).total_bytes
        theirs = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                     for a, _ in jax_saved_residuals(f, *args))
        assert ours <= theirs, (f, ours, theirs)


def test_saved_residuals_accepts_pytrees_and_keywords():
    def f(params, x, *, scale):
        return jnp.sum(jnp.sin(params["w"] * x) * scale)

    rows = fb.saved_residuals(f, {"w": jnp.ones(3)}, jnp.ones(3), scale=jnp.float32(2.0))
    sources = [r.source for r in rows if r.kind == "argument"]
    assert "args[0]['w'] (params)" in sources and "kwargs['scale']" in sources
