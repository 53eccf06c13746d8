"""Losses on logits and regression targets; each returns the mean over examples.

Example:
  >>> import jax.numpy as jnp
  >>> from fbackprop import nn
  >>> logits = jnp.array([[2.0, 0.0, -1.0]])
  >>> round(float(nn.softmax_cross_entropy(logits, jnp.array([0]))), 4)
  0.1698
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _reduce(per_example, reduction: str):
    if reduction == "mean":
        return jnp.mean(per_example)
    if reduction == "sum":
        return jnp.sum(per_example)
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


def softmax_cross_entropy(logits, labels, *, label_smoothing: float = 0.0,
                          reduction: str = "mean"):
    """Cross-entropy between ``softmax(logits)`` and (smoothed) targets.

    Its gradient with respect to the logits is ``softmax(logits) - target`` (per
    example, divided by the batch size for the mean): the softmax and the log
    cancel, which is why losses take logits rather than probabilities.

    Args:
      logits: ``(..., num_classes)`` unnormalized scores.
      labels: integer class ids ``(...)`` or targets ``(..., num_classes)``
        (one-hot or probabilities).
      label_smoothing: ``eps`` in ``target = (1 - eps) * onehot + eps / num_classes``.
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Returns:
      The reduced loss (float, in at least float32 precision).
    """
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"softmax_cross_entropy: integer labels of shape {labels.shape} "
                             f"do not match logits {logits.shape} (expected "
                             f"{logits.shape[:-1]}).")
        targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    else:
        if labels.shape != logits.shape:
            raise ValueError(f"softmax_cross_entropy: targets of shape {labels.shape} do not "
                             f"match logits {logits.shape}; pass integer class ids or "
                             f"one-hot targets of the logits' shape.")
        targets = labels.astype(logits.dtype)
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return _reduce(-jnp.sum(targets * log_probs, axis=-1), reduction)


def mse(predictions, targets, *, reduction: str = "mean"):
    """Mean squared error ``mean((predictions - targets)^2)`` over all elements."""
    if predictions.shape != targets.shape:
        raise ValueError(f"mse: predictions {predictions.shape} and targets {targets.shape} "
                         f"must have the same shape (reshape one of them).")
    return _reduce(jnp.square(predictions - targets), reduction)


def binary_cross_entropy_with_logits(logits, labels, *, reduction: str = "mean"):
    """Binary cross-entropy of ``sigmoid(logits)`` against labels in [0, 1].

    Computed stably as ``max(z, 0) - z * y + log1p(exp(-|z|))``; its gradient is
    ``sigmoid(z) - y``.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"binary_cross_entropy_with_logits: logits {logits.shape} and "
                         f"labels {labels.shape} must have the same shape.")
    labels = labels.astype(logits.dtype)
    per = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return _reduce(per, reduction)


def accuracy(logits, labels):
    """Fraction of examples whose arg-max logit is the integer label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
