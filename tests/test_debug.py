"""Tags, intermediate cotangents, hooks and NaN/Inf provenance."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import fbackprop as fb
from fbackprop._src.testing import assert_allclose

MODES = ["eager", "jit", "vmap"]


def _line_of(fn, text):
    """The file line number of the first source line of ``fn`` containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    for i, line in enumerate(lines):
        if text in line:
            return start + i
    raise AssertionError(text)


# ------------------------------------------------------------ named intermediates
def seed(x, y):
    z = fb.tag(x * y, "z")
    w = fb.tag(z + x, "w")
    return w ** 2


def test_seed_example_intermediates():
    grads, inter = fb.grad_and_intermediates(seed, argnums=(0, 1))(2.0, 3.0)
    assert [float(g) for g in grads] == [64.0, 32.0]
    assert float(inter["z"]) == 16.0 and float(inter["w"]) == 16.0


def mlp(params, x, mark):
    """A two-layer MLP whose hidden values are marked by ``mark(value, name)``."""
    h = mark(jnp.tanh(x @ params["w1"] + params["b1"]), "h1")
    h2 = mark(jax.nn.sigmoid(h @ params["w2"]), "h2")
    return jnp.mean((h2 - 0.5) ** 2) + 0.1 * jnp.sum(h ** 2)


def _mlp_params(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"w1": rng.standard_normal((3, 4)).astype(dtype),
            "b1": rng.standard_normal(4).astype(dtype),
            "w2": rng.standard_normal((4, 2)).astype(dtype)}


def _perturbation_trick(params, x):
    """JAX's answer: d loss / d eps at eps = 0 for value + eps at each tag."""
    shapes = {"h1": (x.shape[0], 4), "h2": (x.shape[0], 2)}
    eps = {k: jnp.zeros(s, x.dtype) for k, s in shapes.items()}

    def f(params, eps):
        return mlp(params, x, lambda v, name: v + eps[name])

    return jax.grad(f, argnums=(0, 1))(params, eps)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_intermediates_match_perturbation_trick(mode, dtype):
    params = _mlp_params(dtype)
    xs = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(dtype)
    ours = fb.grad_and_intermediates(lambda p, x: mlp(p, x, fb.tag))
    if mode == "jit":
        ours = jax.jit(ours)
    if mode == "vmap":
        got = jax.vmap(ours, in_axes=(None, 0))(params, xs)
        want = jax.vmap(_perturbation_trick, in_axes=(None, 0))(params, xs)
    else:
        got = ours(params, xs[0])
        want = _perturbation_trick(params, xs[0])
    (g_ours, inter), (g_jax, eps_jax) = got, want
    for k in params:
        assert_allclose(g_ours[k], g_jax[k], dtype)
    assert sorted(inter) == ["h1", "h2"]
    for k in inter:
        assert_allclose(inter[k], eps_jax[k], dtype)


def test_checkpoint_name_is_reported():
    def f(x):
        h = checkpoint_name(jnp.sin(x), "s")
        return jnp.sum(h * h)

    x = jnp.array([0.1, 2.0, -1.0])
    _, inter = fb.grad_and_intermediates(f)(x)
    assert_allclose(inter["s"], 2 * jnp.sin(x))


def test_names_filter_and_unknown_name():
    _, inter = fb.grad_and_intermediates(seed, names="z")(2.0, 3.0)
    assert list(inter) == ["z"]
    with pytest.raises(ValueError, match="no tagged value named"):
        fb.grad_and_intermediates(seed, names=["nope"])(2.0, 3.0)


def test_has_aux():
    def f(x):
        h = fb.tag(jnp.sin(x), "h")
        return jnp.sum(h), {"mean": jnp.mean(h)}

    g, inter, aux = fb.grad_and_intermediates(f, has_aux=True)(jnp.ones(3))
    assert_allclose(g, jnp.cos(jnp.ones(3)))
    assert_allclose(inter["h"], jnp.ones(3))
    assert_allclose(aux["mean"], jnp.sin(1.0))


def test_tag_on_non_differentiated_argument_and_unreached_tag():
    def f(x, y):
        unused = fb.tag(x * 5.0, "unused")  # noqa: F841
        return jnp.sum(x * fb.tag(y * 2.0, "y2"))

    x, y = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    g, inter = fb.grad_and_intermediates(f)(x, y)
    assert_allclose(g, 2 * y)
    assert_allclose(inter["y2"], x)                 # y is not differentiated, still reported
    assert_allclose(inter["unused"], jnp.zeros(2))  # does not reach the loss


def test_tag_inside_jit_function():
    inner = jax.jit(lambda x: fb.tag(x * 2.0, "inner"))
    g, inter = fb.grad_and_intermediates(lambda x: jnp.sum(inner(x) ** 2))(jnp.ones(2))
    assert_allclose(inter["inner"], 4.0 * jnp.ones(2))
    assert_allclose(g, 8.0 * jnp.ones(2))


def test_pytree_tag_names():
    def f(x):
        t = fb.tag({"a": x, "b": 2.0 * x}, "t")
        return jnp.sum(t["a"] * t["b"])

    _, inter = fb.grad_and_intermediates(f)(jnp.ones(2))
    assert sorted(inter) == ["t['a']", "t['b']"]


def test_nested_differentiation_of_tagged_function():
    def f(x):
        return jnp.sum(fb.tag(jnp.sin(x), "s") ** 3)

    def plain(x):
        return jnp.sum(jnp.sin(x) ** 3)

    x = jnp.array([0.3, -1.2, 2.0])
    assert_allclose(fb.grad(lambda x: jnp.sum(fb.grad(f)(x)))(x),
                    jax.grad(lambda x: jnp.sum(jax.grad(plain)(x)))(x))
    assert_allclose(fb.hessian(f)(x), jax.hessian(plain)(x))
    # JAX's own transformations see the tag as the identity.
    assert_allclose(jax.grad(f)(x), jax.grad(plain)(x))


def test_gradient_of_an_intermediate_cotangent():
    # d/dx of (d loss / d h), checked against the perturbation trick in JAX.
    def f(x, mark):
        h = mark(jnp.sin(x), "h")
        return jnp.sum(h ** 3 * x)

    x = jnp.array([0.3, -1.2, 2.0])
    ours = fb.grad(lambda x: jnp.sum(fb.grad_and_intermediates(
        lambda x: f(x, fb.tag))(x)[1]["h"] ** 2))(x)

    def dh(x):
        return jax.grad(lambda e: f(x, lambda v, _: v + e))(jnp.zeros(3))

    assert_allclose(ours, jax.grad(lambda x: jnp.sum(dh(x) ** 2))(x))


# ---------------------------------------------------------------------- hooks
def clipped(x):
    h = fb.tag(3.0 * x, "h", hook=lambda ct: jnp.clip(ct, -1.0, 1.0))
    return jnp.sum(h ** 2)


@pytest.mark.parametrize("mode", MODES)
def test_clip_hook(mode):
    xs = jnp.array([[0.1, 2.0, -3.0], [0.01, -0.1, 0.2]])
    want = 3.0 * jnp.clip(2 * 3.0 * xs, -1.0, 1.0)
    g = fb.grad(clipped)
    if mode == "eager":
        got = jnp.stack([g(x) for x in xs])
    elif mode == "jit":
        got = jnp.stack([jax.jit(g)(x) for x in xs])
    else:
        got = jax.vmap(g)(xs)
    assert_allclose(got, want)


def test_hook_sees_one_example_under_grad_of_vmap():
    # A per-example hook (normalize the cotangent) gives the same answer whether
    # the vmap is inside or outside the gradient.
    def f(x):
        h = fb.tag(jnp.sin(x) * 2.0, "h", hook=lambda ct: ct / jnp.linalg.norm(ct))
        return jnp.sum(h ** 2)

    xs = jnp.array([[0.1, 2.0, 0.3], [1.0, -1.0, 0.5]])
    outside = jax.vmap(fb.grad(f))(xs)
    inside = fb.grad(lambda xs: jnp.sum(jax.vmap(f)(xs)))(xs)
    assert_allclose(inside, outside)


def test_reading_hook_and_intermediate_before_hook():
    seen = []

    def f(x):
        h = fb.tag(x * 2.0, "h", hook=lambda ct: seen.append(np.asarray(ct)))
        return jnp.sum(h ** 2)

    x = jnp.array([1.0, -2.0])
    jax.config.update("jax_disable_jit", True)
    try:
        g = fb.grad(f)(x)
    finally:
        jax.config.update("jax_disable_jit", False)
    assert_allclose(g, 8.0 * x)
    np.testing.assert_allclose(seen[-1], 4.0 * np.asarray(x))

    def g2(x):
        h = fb.tag(x * 2.0, "h", hook=lambda ct: ct * 0.0)
        return jnp.sum(h ** 2)

    grads, inter = fb.grad_and_intermediates(g2)(x)
    assert_allclose(grads, jnp.zeros(2))          # the hook replaced the cotangent
    assert_allclose(inter["h"], 4.0 * x)          # reported as it arrived


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad,match", [
    (lambda ct: ct[:1], r"returned float32\[1\].*cotangent it replaces is float32\[3\]"),
    (lambda ct: ct.astype(jnp.float16), r"returned float16\[3\]"),
    (lambda ct: "oops", r"returned a str"),
])
def test_hook_wrong_shape_or_dtype(bad, match, jit):
    g = fb.grad(lambda x: jnp.sum(fb.tag(x, "h", hook=bad)))
    if jit:
        g = jax.jit(g)
    with pytest.raises(TypeError, match=match):
        g(jnp.ones(3, jnp.float32))


def test_duplicate_tag_names():
    def f(x):
        a = fb.tag(x, "h")
        return jnp.sum(fb.tag(a * 2.0, "h"))

    with pytest.raises(ValueError, match="Tag name 'h' is used 2 times"):
        fb.grad_and_intermediates(f)(jnp.ones(2))
    inner = jax.jit(lambda x: fb.tag(x * 2.0, "layer"))
    with pytest.raises(ValueError, match=r"f'layer\{i\}'"):
        fb.grad_and_intermediates(lambda x: jnp.sum(inner(inner(x))))(jnp.ones(2))
    # Hooks alone do not need unique names.
    assert_allclose(fb.grad(f)(jnp.ones(2)), 2.0 * jnp.ones(2))


def test_bad_tag_arguments():
    with pytest.raises(TypeError, match="non-empty string"):
        fb.tag(jnp.ones(2), 3)
    with pytest.raises(TypeError, match="must be a callable"):
        fb.tag(jnp.ones(2), "h", hook=5)
    with pytest.raises(TypeError, match="only arrays and numbers"):
        fb.tag({"a": "text"}, "h")


def test_tag_of_constant_is_a_clear_error_and_loop_body_tags_work():
    def const(x):
        return jnp.sum(x * fb.tag(jnp.ones(3), "c"))

    with pytest.raises(ValueError, match="does not depend on any array argument"):
        fb.grad_and_intermediates(const)(jnp.ones(3))

    def scanned(x):
        def body(c, xi):
            return c + fb.tag(xi * 2.0, "b"), None
        return lax.scan(body, 0.0, x)[0]

    # Inside a loop body: one cotangent per step (tests/test_seeing_loops.py).
    _, inter = fb.grad_and_intermediates(scanned)(jnp.ones(3))
    assert_allclose(inter["b"], jnp.ones(3))
    # Hooks inside the body still apply.
    g = fb.grad(lambda x: lax.scan(lambda c, xi: (c + fb.tag(
        xi ** 2, "b", hook=lambda ct: ct * 0.5), None), 0.0, x)[0])(jnp.ones(3))
    assert_allclose(g, jnp.ones(3))


# ---------------------------------------------------------- NaN/Inf provenance
def norm(v):
    return jnp.sqrt(jnp.sum(v ** 2))


SQRT_LINE = _line_of(norm, "jnp.sqrt")


def _assert_sqrt_backward(site):
    assert site.primitive == "sqrt"
    assert site.phase == "backward"
    assert f"test_debug.py:{SQRT_LINE}" in site.source
    assert "jnp.sqrt" in site.code
    # The VJP rule's inputs: upstream cotangent 1, forward input 0, forward output 0.
    ranges = {label.split(" (")[0]: (mn, mx) for label, _, mn, mx, _, _ in site.inputs}
    assert ranges["forward input 0"] == (0.0, 0.0)
    assert ranges["upstream cotangent of output 0"][0] > 0
    assert site.produced[0][3] == 1              # one inf


def test_nan_eager_raises_with_source_line():
    with pytest.raises(fb.NonFiniteError) as info:
        fb.checked_grad(norm)(jnp.zeros(3))
    _assert_sqrt_backward(info.value.site)
    msg = str(info.value)
    assert "sqrt" in msg and "backward" in msg and f":{SQRT_LINE}" in msg
    assert "gradient args[0]" in msg


def test_nan_under_jit_is_returned_and_thrown_after():
    report, g = jax.jit(fb.checked_grad(norm))(jnp.zeros(3))
    assert np.isnan(np.asarray(g)).all()
    assert not report.ok
    _assert_sqrt_backward(report.first())
    with pytest.raises(fb.NonFiniteError, match="sqrt"):
        report.throw()


def test_nan_under_vmap_names_the_example():
    xs = jnp.array([[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    report, g = jax.vmap(fb.checked_grad(norm))(xs)
    site = report.first()
    assert site.batch_index == (1,)
    _assert_sqrt_backward(site)
    assert_allclose(g[0], xs[0] / jnp.linalg.norm(xs[0]))


def test_nan_inside_a_jitted_helper():
    jnorm = jax.jit(norm)
    with pytest.raises(fb.NonFiniteError) as info:
        fb.checked_grad(lambda w, x: jnp.sum(x @ w) + jnorm(w))(jnp.zeros(2), jnp.ones((3, 2)))
    _assert_sqrt_backward(info.value.site)


def masked_log(x):
    return jnp.sum(jnp.where(x > 0, jnp.log(x), 0.0))


@pytest.mark.parametrize("jit", [False, True])
def test_masked_nan_is_not_reported(jit):
    f = fb.checked_grad(masked_log)
    if jit:
        f = jax.jit(f)
    report, g = f(jnp.array([-1.0, 2.0]))
    assert report.ok and report.get() is None and report.first() is None
    assert_allclose(g, jnp.array([0.0, 0.5]))


def test_masked_nan_before_the_real_bug_is_skipped():
    # The log's NaN comes first in program order but is masked; the sqrt's is the bug.
    def f(x):
        return masked_log(x) + norm(x - x)

    report, _ = jax.jit(fb.checked_grad(f))(jnp.array([-1.0, 2.0]))
    _assert_sqrt_backward(report.first())


def test_masked_branch_gradient_nan_is_reported():
    # where(x > 0, log(x), 0) at x = 0: the forward -inf is masked, but the masked
    # branch's gradient 0 * (1/0) is NaN and reaches the result.
    with pytest.raises(fb.NonFiniteError) as info:
        fb.checked_grad(masked_log)(jnp.array([0.0, 2.0]))
    site = info.value.site
    assert site.primitive == "div" or site.primitive == "log"
    assert site.phase == "backward"


def test_forward_nan_is_reported_in_forward_pass():
    def f(x):
        y = jnp.log(x)
        return jnp.sum(y * 2.0)

    with pytest.raises(fb.NonFiniteError) as info:
        fb.checked_value_and_grad(f)(jnp.array([-1.0, 1.0]))
    site = info.value.site
    assert site.primitive == "log" and site.phase == "forward"
    assert "the loss" in site.results
    assert "log(x) is -inf at x = 0 and NaN for x < 0" in str(info.value)


def test_nan_input_is_reported_as_input():
    with pytest.raises(fb.NonFiniteError, match="comes straight from the inputs"):
        fb.checked_grad(lambda x: x * 2.0)(jnp.float32(np.nan))


def test_checked_value_and_grad_matches_value_and_grad():
    def f(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"])) + jnp.sum(p["b"] ** 2)

    p = {"w": jnp.ones((3, 2)) * 0.3, "b": jnp.array([1.0, -2.0])}
    x = jnp.arange(6.0).reshape(2, 3)
    report, (value, grads) = fb.checked_value_and_grad(f)(p, x)
    want_value, want_grads = fb.value_and_grad(f)(p, x)
    assert report.ok and repr(report) == "NonFiniteReport(ok)"
    assert_allclose(value, want_value)
    for k in p:
        assert_allclose(grads[k], want_grads[k])
    report, (g, aux) = fb.checked_grad(lambda x: (jnp.sum(x ** 2), 7), has_aux=True)(
        jnp.ones(2))
    assert report.ok and aux == 7
    assert_allclose(g, 2.0 * jnp.ones(2))


def test_traced_report_must_be_checked_outside():
    def step(x):
        report, g = fb.checked_grad(norm)(x)
        with pytest.raises(TypeError, match="holds traced values"):
            report.throw()
        return report, g

    jax.jit(step)(jnp.ones(2))


def test_debugging_tools_never_call_jax_autodiff(no_jax_autodiff):
    grads, inter = jax.jit(fb.grad_and_intermediates(seed, argnums=(0, 1)))(2.0, 3.0)
    assert float(inter["z"]) == 16.0
    assert_allclose(jax.vmap(fb.grad(clipped))(jnp.ones((2, 3))), jnp.full((2, 3), 3.0))
    report, _ = jax.jit(fb.checked_grad(norm))(jnp.zeros(2))
    assert report.first().primitive == "sqrt"
    assert [float(i.grad) for i in fb.explain(seed, 2.0, 3.0).inputs] == [64.0, 32.0]
    fb.gradient_health(fb.grad(lambda x: jnp.sum(jnp.sin(x)))(jnp.ones(3)))
