"""fb.hessian against jax.hessian and fb.hvp against jax.jvp(jax.grad(f)) on small models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util

import fbackprop as fb


def assert_trees_close(ours, theirs, tol=1e-9):
    la, ta = tree_util.tree_flatten(ours)
    lb, tb = tree_util.tree_flatten(theirs)
    assert ta == tb, f"tree structure\n  ours:   {ta}\n  theirs: {tb}"
    for a, b in zip(la, lb):
        assert np.shape(a) == np.shape(b) and jnp.asarray(a).dtype == jnp.asarray(b).dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ------------------------------------------------------------------ models
def _mlp_params(rng, sizes):
    return [{"w": rng.standard_normal((m, n)) / np.sqrt(m), "b": 0.1 * rng.standard_normal(n)}
            for m, n in zip(sizes[:-1], sizes[1:])]


def mlp_loss(params, x, y, act=jnp.tanh):
    h = x
    for layer in params[:-1]:
        h = act(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((out - y) ** 2)


def softmax_xent(w, x, labels):
    logits = x @ w
    return -jnp.mean(jnp.sum(jax.nn.one_hot(labels, w.shape[1]) * jax.nn.log_softmax(logits),
                             axis=-1))


def attention(wq, wk, wv, x):
    q, k, v = x @ wq, x @ wk, x @ wv
    scores = q @ k.T / jnp.sqrt(q.shape[-1])
    return jnp.sum((jax.nn.softmax(scores, axis=-1) @ v) ** 2)


@jax.custom_jvp
def stable_logsumexp(x):
    m = jnp.max(x, axis=-1, keepdims=True)
    return jnp.squeeze(m, -1) + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))


@stable_logsumexp.defjvp
def _stable_logsumexp_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    out = stable_logsumexp(x)
    return out, jnp.sum(jnp.exp(x - out[..., None]) * t, axis=-1)


def lse_loss(w, x):
    return jnp.sum(stable_logsumexp(x @ w) ** 2) + jnp.sum(jax.nn.logsumexp(x @ w, axis=0))


def _cases():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3))
    y = rng.standard_normal((5, 2))
    mlp = _mlp_params(rng, (3, 4, 2))
    cases = {
        "mlp_tanh": (functools.partial(mlp_loss, x=x, y=y), (mlp,)),
        # jax.nn.relu is a custom_jvp function; keep inputs away from its kink.
        "mlp_relu": (functools.partial(mlp_loss, x=x + 3.0, y=y, act=jax.nn.relu), (mlp,)),
        "softmax_xent": (functools.partial(softmax_xent, x=x, labels=np.array([0, 1, 3, 2, 1])),
                         (rng.standard_normal((3, 4)),)),
        "attention": (functools.partial(attention, x=rng.standard_normal((4, 3))),
                      tuple(rng.standard_normal((3, 3)) for _ in range(3))),
        "logsumexp_custom_jvp": (functools.partial(lse_loss, x=x),
                                 (rng.standard_normal((3, 4)),)),
    }
    return cases


CASES = _cases()
CASE_IDS = sorted(CASES)


@pytest.mark.parametrize("name", CASE_IDS)
def test_hessian_matches_jax(name):
    f, args = CASES[name]
    argnums = tuple(range(len(args)))  # all arguments
    # The reference runs jitted only to keep the test fast.
    assert_trees_close(fb.hessian(f, argnums)(*args), jax.jit(jax.hessian(f, argnums))(*args))


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev"])
@pytest.mark.parametrize("name", CASE_IDS)
def test_hvp_matches_jax(name, mode):
    f, args = CASES[name]
    rng = np.random.default_rng(1)
    v = tree_util.tree_map(lambda a: rng.standard_normal(np.shape(a)), args)
    argnums = tuple(range(len(args)))  # all arguments
    theirs = jax.jit(lambda a, v: jax.jvp(jax.grad(f, argnums), a, v)[1])(args, v)
    ours = jax.jit(lambda a, v: fb.hvp(f, a, v, mode=mode))(args, v)
    assert_trees_close(ours, theirs)


def test_hessian_pytree_structure_and_has_aux():
    f = lambda d: {"c": jnp.power(d["a"], d["b"])}  # noqa: E731
    d = {"a": np.arange(2.0) + 1.0, "b": np.arange(2.0) + 2.0}
    assert_trees_close(fb.hessian(f)(d), jax.hessian(f)(d))

    def g(x, y):
        return jnp.sum(jnp.sin(x) * y ** 2), {"n": jnp.sum(x)}

    x, y = np.array([0.1, 0.2, 0.3]), np.array([1.0, -2.0, 0.5])
    assert_trees_close(fb.hessian(g, (0, 1), has_aux=True)(x, y),
                       jax.jit(jax.hessian(g, (0, 1), has_aux=True))(x, y))
    assert_trees_close(jax.jit(fb.hessian(g, 1, has_aux=True))(x, y),
                       jax.jit(jax.hessian(g, 1, has_aux=True))(x, y))


def test_sum_of_squares_differentiated_twice_gives_two():
    assert float(fb.grad(fb.grad(lambda x: x ** 2))(3.0)) == 2.0
    np.testing.assert_array_equal(fb.hessian(lambda x: jnp.sum(x ** 2))(np.ones(3)),
                                  2.0 * np.eye(3))
    assert fb.hvp(lambda x: jnp.sum(x ** 2), (np.ones(3),), (np.ones(3),))[0].tolist() == \
        [2.0, 2.0, 2.0]


def test_gradient_penalty_matches_jax():
    """Gradient of a gradient norm (WGAN-GP style): reverse over reverse."""
    rng = np.random.default_rng(2)
    params = _mlp_params(rng, (3, 6, 1))
    x = rng.standard_normal((4, 3))

    def critic(params, x):
        h = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
        return jnp.sum(h @ params[1]["w"] + params[1]["b"])

    def penalty(grad_fn, params):
        g = grad_fn(critic, argnums=1)(params, x)
        return (jnp.sqrt(jnp.sum(g ** 2)) - 1.0) ** 2

    ours = fb.grad(functools.partial(penalty, fb.grad))(params)
    theirs = jax.jit(jax.grad(functools.partial(penalty, jax.grad)))(params)
    assert_trees_close(ours, theirs)
    assert_trees_close(jax.jit(fb.grad(functools.partial(penalty, fb.grad)))(params), theirs)


def test_hvp_never_materializes_the_hessian():
    rng = np.random.default_rng(3)
    params = _mlp_params(rng, (20, 30, 5))
    n = sum(np.size(p) for p in tree_util.tree_leaves(params))
    x, y = rng.standard_normal((8, 20)), rng.standard_normal((8, 5))
    f = functools.partial(mlp_loss, x=x, y=y)
    hvp = lambda p, v: fb.hvp(f, (p,), (v,))  # noqa: E731
    jaxpr = jax.make_jaxpr(hvp)(params, params)
    biggest = max(int(np.prod(v.aval.shape)) for e in jaxpr.jaxpr.eqns for v in e.outvars)
    assert biggest < n, f"an intermediate of {biggest} elements for {n} parameters"


def test_hvp_argument_errors():
    f = lambda x: jnp.sum(x ** 3)  # noqa: E731
    with pytest.raises(ValueError, match="fwd_rev"):
        fb.hvp(f, (np.ones(2),), (np.ones(2),), mode="fwd_fwd")
    with pytest.raises(TypeError, match="tuples or lists"):
        fb.hvp(f, np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="shape"):
        fb.hvp(f, (np.ones(2),), (np.ones(3),), mode="rev_rev")


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_rev"])
def test_hvp_of_a_list_of_params_passed_as_is_says_how_to_wrap_it(mode):
    # primals is the tuple of positional arguments (as in jax.jvp): a list of
    # parameters passed as is reads as two arguments of a one-argument loss.
    def loss(params):
        return sum(jnp.sum(p ** 3) for p in params)

    params = [jnp.ones((2, 3), jnp.float32), jnp.arange(3, dtype=jnp.float32)]
    v = [jnp.ones((2, 3), jnp.float32), jnp.ones(3, jnp.float32)]
    with pytest.raises(TypeError) as info:
        fb.hvp(loss, params, v, mode=mode)
    text = str(info.value)
    for part in ("`primals`", "positional arguments of loss", "jax.jvp",
                 "list of 2 entries [float32[2, 3], float32[3]]", "loss(primals[0], primals[1])",
                 "takes 1 positional argument (params)", "fb.hvp(loss, (params,), (v,))"):
        assert part in text, (part, text)
    # the suggested call is right: it is JAX's forward-over-reverse
    got = fb.hvp(loss, (params,), (v,), mode=mode)
    want = jax.jvp(jax.grad(loss), (params,), (v,))[1]
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves((want,))):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # JAX itself fails here with Python's own arity error
    with pytest.raises(TypeError, match="positional argument"):
        jax.jvp(jax.grad(loss), params, v)


def test_hvp_argument_count_and_container_errors_name_the_fix():
    def loss(params, batch):
        return jnp.sum(params ** 2) * batch

    with pytest.raises(TypeError, match=r"takes 2 positional arguments \(params, batch\).*"
                                        r"fb\.hvp\(lambda params: loss\(params, batch\), "
                                        r"\(params,\), \(v,\)\)"):
        fb.hvp(loss, (jnp.ones(2),), (jnp.ones(2),))
    with pytest.raises(TypeError, match=r"found dict and dict.*fb\.hvp\(f, \(w,\), \(v,\)\)"):
        def f(w):
            return jnp.sum(w["a"] ** 2)
        fb.hvp(f, {"a": jnp.ones(2)}, {"a": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"2 primals but 1 tangents.*"
                                        r"tangents: list \[float32\[3\]\]"):
        fb.hvp(lambda a, b: jnp.sum(a * b), [jnp.ones(2), jnp.ones(3)],
               [jnp.ones(3, jnp.float32)])


@pytest.mark.parametrize("act", [jnp.tanh, jax.nn.gelu], ids=["tanh", "gelu_tanh"])
def test_hvp_of_tanh_net_compiles_to_no_more_temp_bytes_than_jax(act):
    # Forward-over-reverse runs tanh's JVP in the forward sweep and its VJP in the
    # backward sweep. Were both to form tanh' = (1 + y)(1 - y) as a value of its
    # own, XLA would merge the two and keep that activation-sized value alive from
    # the forward pass to the backward pass, one buffer per layer JAX does not keep.
    rng = np.random.default_rng(4)
    sizes = (32, 128, 128, 128, 4)
    params = [{"w": jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m), jnp.float32),
               "b": jnp.zeros(n, jnp.float32)} for m, n in zip(sizes[:-1], sizes[1:])]
    v = tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32),
                           params)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    f = functools.partial(mlp_loss, x=x, y=y, act=act)

    def temp_bytes(step):
        return jax.jit(step).lower(params, v).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda p, v: fb.hvp(f, (p,), (v,)))
    theirs = temp_bytes(lambda p, v: jax.jvp(jax.grad(f), (p,), (v,))[1])
    assert ours <= theirs, f"fbackprop {ours} > jax {theirs} temp bytes"
