"""fbackprop.privacy: the DP-SGD gradient, its optax form, sampling and accounting."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fbackprop as fb
from fbackprop import privacy

F32 = jnp.float32


def _loss(p, x, y):
    return -jax.nn.log_softmax(jnp.tanh(x @ p["w"]) @ p["v"])[y]


def _problem(n=6):
    k = jax.random.split(jax.random.key(0), 3)
    p = {"w": jax.random.normal(k[0], (5, 40), F32), "v": jax.random.normal(k[1], (40, 3), F32)}
    x = jax.random.normal(k[2], (n, 5), F32)
    return p, x, jnp.arange(n) % 3


def test_without_noise_the_gradient_is_the_clipped_mean():
    p, x, y = _problem()
    grads, info = privacy.dp_gradient(_loss, l2_norm_clip=0.7, noise_multiplier=0.0,
                                      expected_batch_size=4)(jax.random.key(1), p, x, y)
    summed, norms = fb.clipped_grad(_loss, 0.7)(p, x, y)
    for g, s in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(summed)):
        np.testing.assert_allclose(g, s / 4, rtol=1e-6)
    np.testing.assert_allclose(info.norms, norms, rtol=1e-6)
    np.testing.assert_allclose(info.loss, jnp.mean(jax.vmap(_loss, (None, 0, 0))(p, x, y)),
                               rtol=1e-6)
    assert float(info.clipped_fraction) == pytest.approx(float(jnp.mean(norms > 0.7)))


def test_noise_has_the_stated_standard_deviation():
    p, x, y = _problem()
    sigma, clip, n = 1.3, 0.5, 6
    noisy, _ = privacy.dp_gradient(_loss, l2_norm_clip=clip, noise_multiplier=sigma)(
        jax.random.key(2), p, x, y)
    clean, _ = privacy.dp_gradient(_loss, l2_norm_clip=clip, noise_multiplier=0.0)(
        jax.random.key(2), p, x, y)
    diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(noisy),
                                                           jax.tree_util.tree_leaves(clean))])
    assert diff.size == 5 * 40 + 40 * 3
    # 320 independent normals: the sample std is within 15% with near certainty.
    assert abs(np.std(diff) / (sigma * clip / n) - 1) < 0.15
    assert abs(np.mean(diff)) < 4 * sigma * clip / n / np.sqrt(diff.size)


def test_masked_padding_changes_nothing():
    p, x, y = _problem()
    kwargs = dict(l2_norm_clip=0.7, noise_multiplier=0.0, expected_batch_size=5)
    dp = privacy.dp_gradient(_loss, **kwargs)
    ref, ref_info = dp(jax.random.key(3), p, x[:4], y[:4])
    mask = jnp.array([1, 1, 1, 1, 0, 0], F32)
    got, info = dp(jax.random.key(3), p, x, y, mask=mask)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(info.loss, ref_info.loss, rtol=1e-6)
    np.testing.assert_allclose(info.norms[:4], ref_info.norms, rtol=1e-6)
    np.testing.assert_allclose(info.norms[4:], 0.0)


def test_train_step_and_optax_aggregate():
    p, x, y = _problem()
    opt = optax.sgd(0.1)
    step = privacy.make_dp_train_step(_loss, opt, l2_norm_clip=0.7, noise_multiplier=0.0,
                                      expected_batch_size=6)
    new, _, info = step(p, opt.init(p), jax.random.key(4), x, y)
    summed, _ = fb.clipped_grad(_loss, 0.7)(p, x, y)
    for a, b, s in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(p),
                       jax.tree_util.tree_leaves(summed)):
        np.testing.assert_allclose(a, b - 0.1 * s / 6, rtol=1e-5, atol=1e-6)
    chain = optax.chain(privacy.dp_aggregate(0.7, 0.0, 6, jax.random.key(5)), optax.sgd(0.1))
    updates, _ = chain.update(summed, chain.init(p), p)
    for u, s in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(summed)):
        np.testing.assert_allclose(u, -0.1 * s / 6, rtol=1e-6)
    # With noise, the state's key moves on: two steps add different noise.
    noisy = privacy.dp_aggregate(0.7, 1.0, 6, jax.random.key(5))
    state = noisy.init(p)
    first, state = noisy.update(summed, state)
    second, _ = noisy.update(summed, state)
    assert not np.allclose(first["w"], second["w"])


def test_poisson_batch():
    idx, mask, over = privacy.poisson_batch(jax.random.key(6), 1000, 0.05, 80)
    chosen = jax.random.bernoulli(jax.random.key(6), 0.05, (1000,))
    count = int(chosen.sum())
    assert int(mask.sum()) == min(count, 80) and int(over) == max(count - 80, 0)
    assert set(np.asarray(idx[:count]).tolist()) == set(np.flatnonzero(chosen).tolist())
    _, mask, over = privacy.poisson_batch(jax.random.key(6), 1000, 0.05, 10)
    assert int(mask.sum()) == 10 and int(over) == count - 10


def test_accounting_is_dp_accounting():
    dpa = pytest.importorskip("dp_accounting")
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)),
                                    1000)
    acc = dpa.rdp.RdpAccountant()
    acc.compose(event)
    assert privacy.epsilon(1.1, 0.01, 1000, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    pld = privacy.epsilon(1.1, 0.01, 1000, 1e-5, accountant="pld")
    assert 0 < pld <= privacy.epsilon(1.1, 0.01, 1000, 1e-5) * 1.01   # PLD is tighter
    sigma = privacy.noise_multiplier_for_epsilon(1.5, 0.01, 1000, 1e-5)
    assert privacy.epsilon(sigma, 0.01, 1000, 1e-5) == pytest.approx(1.5, abs=1e-3)
    assert privacy.epsilon(sigma * 1.05, 0.01, 1000, 1e-5) < 1.5 < \
        privacy.epsilon(sigma * 0.95, 0.01, 1000, 1e-5)


def test_bad_arguments_are_named():
    pytest.importorskip("dp_accounting")
    with pytest.raises(ValueError, match="sampling_rate must be in"):
        privacy.epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ValueError, match="delta must be in"):
        privacy.epsilon(1.0, 0.1, 10, 0.0)
    with pytest.raises(ValueError, match="accountant must be"):
        privacy.epsilon(1.0, 0.1, 10, 1e-5, accountant="moments")
    with pytest.raises(ValueError, match="noise_multiplier must be non-negative"):
        privacy.dp_gradient(_loss, l2_norm_clip=1.0, noise_multiplier=-1.0)


def test_accounting_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ImportError, match=r"fbackprop\[privacy\]"):
        privacy.epsilon(1.0, 0.1, 10, 1e-5)
