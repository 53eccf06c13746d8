"""Training with fbackprop gradients: optax optimizers, jitted steps, data parallelism.

The pieces are small and independent:

* :func:`make_optimizer` -- AdamW with warmup + cosine decay, global-norm clipping
  and (optionally) gradient accumulation across calls, as one optax transformation.
* :func:`accumulated_value_and_grad` -- a big batch's gradient computed from
  micro-batches (``lax.scan``), so memory holds one micro-batch's activations.
* :func:`make_train_step` -- ``jax.jit`` of ``fb.value_and_grad`` + the optimizer.
* :func:`data_parallel_value_and_grad` -- per-device fbackprop gradients averaged
  with ``lax.pmean`` inside ``jax.shard_map`` (JAX's own distribution).
* :func:`progress` and :func:`plot_history` -- a progress bar (tqdm if installed)
  and loss/accuracy curves written to a file (matplotlib if installed, else SVG).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from fbackprop import nn, train
  >>> params = nn.init_mlp(jax.random.key(0), [4, 16, 3])
  >>> def loss_fn(p, batch):
  ...     x, y = batch
  ...     return nn.softmax_cross_entropy(nn.mlp(p, x), y)
  >>> opt = train.make_optimizer(1e-2, total_steps=10)
  >>> step = train.make_train_step(loss_fn, opt)
  >>> opt_state = opt.init(params)
  >>> batch = (jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32))
  >>> params, opt_state, loss = step(params, opt_state, batch)
  >>> bool(loss > 0)
  True
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fbackprop._src.api import value_and_grad

__all__ = ["make_optimizer", "accumulated_value_and_grad", "make_train_step",
           "data_parallel_value_and_grad", "progress", "plot_history", "batches"]


# ------------------------------------------------------------------ optimizer
def make_optimizer(learning_rate: float = 2e-3, *, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 1e-2, clip_norm: float | None = 1.0,
                   accumulate_steps: int = 1, end_fraction: float = 0.0
                   ) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule, after global-norm clipping.

    Args:
      learning_rate: peak learning rate.
      total_steps: number of optimizer updates (after accumulation) the schedule spans.
      warmup_steps: linear warmup from 0 to ``learning_rate``.
      weight_decay: decoupled weight decay of AdamW.
      clip_norm: clip the gradient's global norm to this value (``None``: no clipping).
      accumulate_steps: if > 1, average the gradients of this many calls before one
        update (``optax.MultiSteps``); the intermediate calls leave params unchanged.
      end_fraction: final learning rate as a fraction of the peak.

    Returns:
      An ``optax.GradientTransformation``.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * end_fraction)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, weight_decay=weight_decay))
    opt = optax.chain(*parts)
    if accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=accumulate_steps)
    return opt


# ------------------------------------------------------- gradient accumulation
def accumulated_value_and_grad(loss_fn: Callable, num_microbatches: int, *,
                               has_aux: bool = False) -> Callable:
    """``fb.value_and_grad(loss_fn)`` of a batch, computed over micro-batches.

    The batch (every leaf's leading axis) is split into ``num_microbatches`` equal
    parts; a ``lax.scan`` computes each part's loss and gradient and averages them.
    For a loss that is a mean over examples this equals the full batch's gradient,
    while only one micro-batch's activations are alive at a time.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` if ``has_aux``).
      num_microbatches: must divide the batch size.
      has_aux: as in ``fb.value_and_grad``; aux values are stacked per micro-batch.

    Returns:
      ``f(params, batch) -> (loss, grads)`` or ``((loss, aux), grads)``.
    """
    grad_fn = value_and_grad(loss_fn, has_aux=has_aux)
    if num_microbatches == 1:
        return grad_fn

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"accumulated_value_and_grad: batch size {x.shape[0]} is not "
                             f"divisible by num_microbatches={num_microbatches}.")
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])

    def run(params, batch):
        micro = jax.tree_util.tree_map(split, batch)

        def body(acc, mb):
            out, grads = grad_fn(params, mb)
            loss, aux = out if has_aux else (out, None)
            acc = jax.tree_util.tree_map(jnp.add, acc, (loss, grads))
            return acc, aux

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        init = (jnp.zeros((), jnp.float32), zeros)
        (loss, grads), aux = lax.scan(body, init, micro)
        loss, grads = jax.tree_util.tree_map(lambda g: g / num_microbatches, (loss, grads))
        return ((loss, aux), grads) if has_aux else (loss, grads)

    return run


# ------------------------------------------------------------------ train step
def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, num_microbatches: int = 1,
                    jit: bool = True) -> Callable:
    """A training step: fbackprop gradients, then one optimizer update.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      optimizer: an optax transformation (e.g. :func:`make_optimizer`).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      num_microbatches: split each batch into this many micro-batches
        (see :func:`accumulated_value_and_grad`).
      jit: compile the step with ``jax.jit`` (params and optimizer state donated).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``, with ``aux``
      appended when ``has_aux``.
    """
    grad_fn = accumulated_value_and_grad(loss_fn, num_microbatches, has_aux=has_aux)

    def step(params, opt_state, batch):
        out, grads = grad_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if has_aux:
            loss, aux = out
            return params, opt_state, loss, aux
        return params, opt_state, out

    return jax.jit(step, donate_argnums=(0, 1)) if jit else step


# ---------------------------------------------------------------- data parallel
def data_parallel_value_and_grad(loss_fn: Callable, mesh, *, axis_name: str = "data",
                                 has_aux: bool = False) -> Callable:
    """Data-parallel ``value_and_grad``: per-device fbackprop gradients + ``lax.pmean``.

    The batch is split along its leading axis over the mesh axis ``axis_name``
    (``jax.shard_map``); each device computes the loss and fbackprop gradient of its
    shard; ``lax.pmean`` averages losses and gradients over devices. With equal
    shards and a mean loss this equals the single-device full-batch gradient.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean over the batch (or
        ``(loss, aux)``; aux is averaged too, so it should be numeric).
      mesh: a ``jax.sharding.Mesh`` with an axis named ``axis_name``.
      axis_name: the data axis.
      has_aux: as in ``fb.value_and_grad``.

    Returns:
      ``f(params, batch) -> (loss, grads)`` (replicated results); jit it.

    Example:
      >>> import numpy as np, jax, jax.numpy as jnp
      >>> from jax.sharding import Mesh
      >>> from fbackprop import train
      >>> mesh = Mesh(np.array(jax.devices()), ("data",))
      >>> f = train.data_parallel_value_and_grad(lambda w, b: ((b * w) ** 2).mean(), mesh)
      >>> loss, g = jax.jit(f)(jnp.float32(2.0), jnp.ones((8,)))
      >>> float(loss), float(g)
      (4.0, 4.0)
    """
    from jax.sharding import PartitionSpec as P

    grad_fn = value_and_grad(loss_fn, has_aux=has_aux)

    def per_device(params, batch):
        out, grads = grad_fn(params, batch)          # this device's shard only
        return lax.pmean((out, grads), axis_name)    # the all-reduce

    # check_vma=False: inside the body the replicated params are plain per-device
    # values, so each device's gradient is its local gradient (with JAX's default
    # varying-axis typing, the gradient of a replicated value is already summed
    # over devices; see the README's data-parallel section).
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis_name)),
                         out_specs=(P(), P()), check_vma=False)


# ---------------------------------------------------------------- progress bar
class _SimpleBar:
    """A minimal text progress bar for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, file):
        self.total, self.desc, self.file = total, desc, file
        self.n, self.postfix, self.start = 0, "", time.perf_counter()
        self._shown = -1

    def update(self, n: int = 1):
        self.n += n
        frac = self.n / max(self.total, 1)
        tick = int(frac * 20)
        if tick != self._shown or self.n == self.total:
            self._shown = tick
            bar = "#" * tick + "." * (20 - tick)
            elapsed = time.perf_counter() - self.start
            end = "\n" if self.n >= self.total else "\r"
            print(f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.1f}s {self.postfix}",
                  end=end, file=self.file, flush=True)

    def set_postfix_str(self, s: str):
        self.postfix = s

    def close(self):
        if self.n < self.total:
            print(file=self.file, flush=True)


def progress(total: int, desc: str = "", *, file=None, use_tqdm: bool | None = None):
    """A progress bar with ``update(n)``, ``set_postfix_str(s)`` and ``close()``.

    Uses ``tqdm`` when it is installed (and ``use_tqdm`` is not False), otherwise a
    plain text bar on ``file`` (stderr by default).
    """
    file = sys.stderr if file is None else file
    if use_tqdm is not False:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, file=file, dynamic_ncols=True,
                        mininterval=0.25)
        except ImportError:
            pass
    return _SimpleBar(total, desc, file)


# ------------------------------------------------------------------- plotting
def plot_history(history: dict[str, Any], path: str, *, title: str = "training") -> str:
    """Writes the loss curve and accuracy curves to an image file.

    Args:
      history: ``{"step": [...], "loss": [...]}`` for the loss curve, and optionally
        ``{"epoch": [...], "train_acc": [...], "test_acc": [...]}`` for accuracy.
      path: output file. With matplotlib installed any format it knows (``.png``);
        without it an SVG is written (the suffix is changed to ``.svg``).
      title: figure title.

    Returns:
      The path actually written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = os.path.splitext(path)[0] + ".svg"
        _write_svg(history, path, title)
        return path
    has_acc = bool(history.get("epoch"))
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6))
    axes = np.atleast_1d(axes)
    axes[0].plot(history["step"], history["loss"], lw=1)
    axes[0].set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
    if has_acc:
        for key in ("train_acc", "test_acc"):
            if history.get(key):
                axes[1].plot(history["epoch"], history[key], marker="o", ms=3,
                             label=key.replace("_acc", ""))
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        axes[1].legend()
        axes[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _polyline(xs, ys, box, x_range, y_range, color):
    x0, y0, w, h = box
    (xa, xb), (ya, yb) = x_range, y_range
    pts = " ".join(f"{x0 + w * (x - xa) / ((xb - xa) or 1):.1f},"
                   f"{y0 + h - h * (y - ya) / ((yb - ya) or 1):.1f}" for x, y in zip(xs, ys))
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>'


def _write_svg(history, path, title):
    """A dependency-free SVG with the loss (log scale) and accuracy curves."""
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="820" height="320" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="10" y="18">{title}</text>']
    loss = np.log10(np.maximum(np.asarray(history["loss"], float), 1e-12))
    box = (40, 40, 340, 240)
    parts.append('<text x="40" y="34">log10 loss vs step</text>')
    parts.append(_polyline(history["step"], loss, box, (min(history["step"]),
                                                        max(history["step"])),
                           (loss.min(), loss.max()), "steelblue"))
    if history.get("epoch"):
        parts.append('<text x="440" y="34">accuracy vs epoch (blue train, red test)</text>')
        for key, color in (("train_acc", "steelblue"), ("test_acc", "firebrick")):
            if history.get(key):
                parts.append(_polyline(history["epoch"], history[key], (440, 40, 340, 240),
                                       (min(history["epoch"]), max(history["epoch"])),
                                       (0.0, 1.0), color))
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterable[np.ndarray]:
    """Index arrays of shuffled full batches covering ``range(n)`` (last partial dropped)."""
    order = rng.permutation(n)
    for i in range(n // batch_size):
        yield order[i * batch_size:(i + 1) * batch_size]
