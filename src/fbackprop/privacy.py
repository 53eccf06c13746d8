"""Differentially private training (DP-SGD) with fbackprop's per-example clipping.

DP-SGD (Abadi et al., 2016) bounds each example's influence on a step: every
per-example gradient is clipped to norm ``C``, the clipped gradients are summed,
Gaussian noise of standard deviation ``noise_multiplier * C`` is added, and the
result is divided by the (expected) batch size. The clipping here is
:func:`fbackprop.clipped_grad`, which never forms the per-example gradients of
large parameters; the privacy accounting is Google's ``dp-accounting`` library
(``pip install "fbackprop[privacy]"``), not our own.

* :func:`dp_gradient` -- the noisy clipped mean gradient of a batch.
* :func:`dp_aggregate` -- the same noise and mean as an optax transformation of
  the summed clipped gradient (for ``optax.chain``).
* :func:`make_dp_train_step` -- a jitted step: clipped sum, noise, mean, optax.
* :func:`poisson_batch` -- Poisson sampling (each example with probability ``q``)
  padded to a fixed batch size with a mask, what the accounting assumes.
* :func:`epsilon` and :func:`noise_multiplier_for_epsilon` -- the accounting.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from fbackprop import privacy
  >>> def loss(w, x, y):
  ...     return (x @ w - y) ** 2
  >>> step = privacy.make_dp_train_step(loss, optax.sgd(0.1), l2_norm_clip=1.0,
  ...                                   noise_multiplier=1.1, expected_batch_size=4)
  >>> w = jnp.zeros(3)
  >>> opt_state = optax.sgd(0.1).init(w)
  >>> x, y = jnp.ones((4, 3)), jnp.ones(4)
  >>> w, opt_state, info = step(w, opt_state, jax.random.key(0), x, y)
  >>> info.norms.shape
  (4,)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fbackprop._src.per_example.api import clipped_grad

__all__ = ["DPStepInfo", "dp_gradient", "dp_aggregate", "make_dp_train_step", "poisson_batch",
           "epsilon", "noise_multiplier_for_epsilon"]


class DPStepInfo(NamedTuple):
    """What a DP-SGD step reports (a pytree).

    Attributes:
      loss: the mean loss over the batch's (unmasked) examples. Reporting it
        is not private; it is for watching training.
      norms: ``[B]``, each example's gradient norm before clipping.
      clipped_fraction: the fraction of (unmasked) examples whose gradient was
        clipped.
    """
    loss: Any
    norms: Any
    clipped_fraction: Any


def _check_positive(name, value, api, allow_zero=False):
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if value < 0 or (value == 0 and not allow_zero):
            what = "non-negative" if allow_zero else "positive"
            raise ValueError(f"{api}: {name} must be {what}, got {value!r}.")


def _noise_like(key, tree, std):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, max(1, len(leaves)))
    noisy = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
             * jnp.asarray(std, jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def _with_values(loss, masked: bool):
    """The per-example loss returning its value as aux (and, with a mask
    argument, multiplied by the example's mask so padding has no gradient)."""
    if masked:
        def per_example(*args, mask):
            value = loss(*args)
            return value * mask.astype(jnp.result_type(value)), value
    else:
        def per_example(*args):
            value = loss(*args)
            return value, value
    return per_example


def dp_gradient(loss: Callable, *, l2_norm_clip: float, noise_multiplier: float,
                expected_batch_size: int | None = None, in_axes=None, argnums=0,
                method: str = "auto") -> Callable:
    """Creates a function that returns the DP-SGD gradient of a batch.

    ``(sum_i clip(g_i) + N(0, (noise_multiplier * l2_norm_clip)^2 I)) / n`` with
    ``clip(g) = g * min(1, l2_norm_clip / ||g||)`` and ``n`` the expected batch
    size (the actual one if not given), from :func:`fbackprop.clipped_grad`.

    Args:
      loss: per-example loss, ``loss(params, *example) -> scalar``.
      l2_norm_clip: the clipping norm ``C``.
      noise_multiplier: the noise's standard deviation in units of ``C``.
      expected_batch_size: the denominator (with Poisson sampling: the sampling
        rate times the dataset size); ``None`` uses the batch's size.
      in_axes, argnums, method: as for :func:`fbackprop.clipped_grad`.

    Returns:
      ``f(key, *args, mask=None) -> (grads, DPStepInfo)``; ``mask`` (``[B]``, 0 or 1)
      drops padding examples from the sum and the reported loss.
    """
    api = "dp_gradient"
    _check_positive("l2_norm_clip", l2_norm_clip, api)
    _check_positive("noise_multiplier", noise_multiplier, api, allow_zero=True)
    funs = {masked: clipped_grad(_with_values(loss, masked), l2_norm_clip, in_axes=in_axes,
                                 argnums=argnums, has_aux=True, method=method)
            for masked in (False, True)}

    def dp_grad(key, *args, mask=None):
        if mask is None:
            (sums, norms), values = funs[False](*args)
            m = jnp.ones(norms.shape, jnp.float32)
        else:
            m = jnp.asarray(mask, jnp.float32)
            (sums, norms), values = funs[True](*args, mask=m)
        denom = expected_batch_size if expected_batch_size else norms.shape[0]
        noise = _noise_like(key, sums, noise_multiplier * l2_norm_clip)
        grads = jax.tree_util.tree_map(lambda s, z: (s + z) / jnp.asarray(denom, s.dtype), sums,
                                       noise)
        count = jnp.maximum(jnp.sum(m), 1.0)
        info = DPStepInfo(loss=jnp.sum(values * m) / count, norms=norms,
                          clipped_fraction=jnp.sum((norms > l2_norm_clip) * m) / count)
        return grads, info

    return dp_grad


class DPAggregateState(NamedTuple):
    key: Any


def dp_aggregate(l2_norm_clip: float, noise_multiplier: float, expected_batch_size: int,
                 key) -> optax.GradientTransformation:
    """An optax transformation that turns the *sum* of clipped per-example
    gradients (what :func:`fbackprop.clipped_grad` returns) into the DP-SGD
    gradient: Gaussian noise of standard deviation ``noise_multiplier *
    l2_norm_clip`` added, then divided by ``expected_batch_size``. Its state
    holds the PRNG key (split at every step).

    Example:
      >>> import jax, optax
      >>> from fbackprop import privacy
      >>> opt = optax.chain(privacy.dp_aggregate(1.0, 1.1, 256, jax.random.key(0)),
      ...                   optax.sgd(0.1))
    """
    _check_positive("l2_norm_clip", l2_norm_clip, "dp_aggregate")
    _check_positive("noise_multiplier", noise_multiplier, "dp_aggregate", allow_zero=True)
    _check_positive("expected_batch_size", expected_batch_size, "dp_aggregate")

    def init(params):
        del params
        return DPAggregateState(key)

    def update(updates, state, params=None):
        del params
        key_now, key_next = jax.random.split(state.key)
        noise = _noise_like(key_now, updates, noise_multiplier * l2_norm_clip)
        out = jax.tree_util.tree_map(
            lambda s, z: (s + z) / jnp.asarray(expected_batch_size, s.dtype), updates, noise)
        return out, DPAggregateState(key_next)

    return optax.GradientTransformation(init, update)


def make_dp_train_step(loss: Callable, optimizer: optax.GradientTransformation, *,
                       l2_norm_clip: float, noise_multiplier: float,
                       expected_batch_size: int | None = None, in_axes=None,
                       method: str = "auto", jit: bool = True) -> Callable:
    """A DP-SGD training step: clipped per-example gradients (never formed for
    large parameters), summed, Gaussian noise, the mean, then ``optimizer``.

    Args:
      loss: per-example loss, ``loss(params, *example) -> scalar``.
      optimizer: an optax transformation applied to the noisy mean gradient.
      l2_norm_clip, noise_multiplier, expected_batch_size, in_axes, method: as
        for :func:`dp_gradient` (params are the first argument).
      jit: compile the step with ``jax.jit``.

    Returns:
      ``step(params, opt_state, key, *batch, mask=None) -> (params, opt_state,
      DPStepInfo)``.
    """
    grad_fn = dp_gradient(loss, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
                          expected_batch_size=expected_batch_size, in_axes=in_axes, argnums=0,
                          method=method)

    def step(params, opt_state, key, *batch, mask=None):
        grads, info = grad_fn(key, params, *batch, mask=mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, info

    return jax.jit(step) if jit else step


def poisson_batch(key, num_examples: int, sampling_rate: float, batch_size: int):
    """Poisson sampling padded to a fixed size: each of ``num_examples`` examples
    is in the batch independently with probability ``sampling_rate`` (what the
    accounting of :func:`epsilon` assumes); the chosen indices come first, then
    padding.

    Returns:
      ``(indices [batch_size], mask [batch_size], overflow)``: ``mask`` is 1 for
      chosen examples; ``overflow`` counts chosen examples that did not fit
      (choose ``batch_size`` well above ``sampling_rate * num_examples``, e.g.
      the mean plus 5 standard deviations, so this stays 0).
    """
    chosen = jax.random.bernoulli(key, sampling_rate, (num_examples,))
    order = jnp.argsort(~chosen, stable=True)
    indices = order[:batch_size]
    count = jnp.sum(chosen)
    mask = (jnp.arange(batch_size) < count).astype(jnp.float32)
    return indices, mask, jnp.maximum(count - batch_size, 0)


# ------------------------------------------------------------------ accounting
def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fbackprop.privacy's accounting uses Google's dp-accounting library, which is not "
            "installed: pip install 'fbackprop[privacy]' (or 'dp-accounting').") from err
    return dp_accounting


def _accountant(dpa, accountant: str):
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant()
    if accountant == "pld":
        return dpa.pld.PLDAccountant()
    raise ValueError(f"accountant must be 'rdp' (Renyi DP, the usual DP-SGD accounting) or "
                     f"'pld' (privacy loss distributions, tighter and slower), got "
                     f"{accountant!r}.")


def _check_accounting_args(sampling_rate, steps, delta, api):
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"{api}: sampling_rate must be in (0, 1], got {sampling_rate!r}.")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"{api}: steps must be a non-negative integer, got {steps!r}.")
    if not 0 < delta < 1:
        raise ValueError(f"{api}: delta must be in (0, 1), got {delta!r}.")


def _event(dpa, noise_multiplier, sampling_rate, steps):
    return dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier)),
        int(steps))


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """The epsilon of DP-SGD at ``delta``: ``steps`` steps, each a Gaussian
    mechanism of ``noise_multiplier`` on a Poisson sample of rate
    ``sampling_rate`` (``dp_accounting``'s accountant).

    Example:
      >>> from fbackprop import privacy
      >>> round(privacy.epsilon(1.1, 256 / 60000, 10000, 1e-5), 2)
      2.16
    """
    api = "epsilon"
    _check_positive("noise_multiplier", noise_multiplier, api)
    _check_accounting_args(sampling_rate, steps, delta, api)
    dpa = _dp_accounting()
    acc = _accountant(dpa, accountant)
    acc.compose(_event(dpa, float(noise_multiplier), float(sampling_rate), steps))
    return float(acc.get_epsilon(float(delta)))


def noise_multiplier_for_epsilon(target_epsilon: float, sampling_rate: float, steps: int,
                                 delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose DP-SGD run (as in :func:`epsilon`)
    has epsilon at most ``target_epsilon`` (``dp_accounting``'s calibration).

    Example:
      >>> from fbackprop import privacy
      >>> sigma = privacy.noise_multiplier_for_epsilon(3.0, 256 / 60000, 10000, 1e-5)
      >>> round(sigma, 3), privacy.epsilon(sigma, 256 / 60000, 10000, 1e-5) <= 3.0 + 1e-6
      (0.925, True)
    """
    api = "noise_multiplier_for_epsilon"
    _check_positive("target_epsilon", target_epsilon, api)
    _check_accounting_args(sampling_rate, steps, delta, api)
    dpa = _dp_accounting()
    return float(dpa.calibrate_dp_mechanism(
        lambda: _accountant(dpa, accountant),
        lambda sigma: _event(dpa, sigma, float(sampling_rate), steps),
        float(target_epsilon), float(delta),
        bracket_interval=dpa.LowerEndpointAndGuess(0.0, 1.0)))
