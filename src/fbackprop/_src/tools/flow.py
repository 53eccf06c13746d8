"""Gradient flow through time: per-step cotangent norms of values tagged in a scan.

Backprop through time multiplies the cotangent of the hidden state by one
Jacobian per step on its way back; :func:`gradient_flow` shows how its size
changes over the steps (falling by decades: vanishing gradients; growing:
exploding ones; exactly zero before a window boundary: truncated BPTT).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from .. import api, plotting
from .tags import run_intermediates


class GradientFlow(Mapping):
    """Per tag name, the norm of its cotangent at each step of the enclosing scan.

    A read-only mapping ``name -> numpy array of shape (steps,)``; entry ``t``
    is ``||d loss / d h_t||`` (Euclidean norm over every axis but the steps
    axis), indexed like the scan's ``xs``. :meth:`plot` draws them.

    Attributes:
      loops: per name, where the scan whose steps index the norms is.
    """

    def __init__(self, norms: Mapping[str, np.ndarray], loops: Mapping[str, str] | None = None):
        self._norms = {k: np.asarray(v, np.float64) for k, v in norms.items()}
        self.loops = dict(loops or {})

    def __getitem__(self, name):
        return self._norms[name]

    def __iter__(self):
        return iter(self._norms)

    def __len__(self):
        return len(self._norms)

    def __repr__(self):
        rows = [f"  {k}: {len(v)} steps, first {v[0]:.3g}, last {v[-1]:.3g}"
                for k, v in self._norms.items()]
        return "GradientFlow(\n" + "\n".join(rows) + "\n)"

    def plot(self, ax=None, *, path: str | None = None, title: str | None = None,
             labels: Mapping[str, str] | None = None, log: bool = True):
        """Plots one line per tag: cotangent norm against step (log scale).

        Steps whose cotangent is exactly zero (e.g. before a truncation window)
        leave a gap. Needs matplotlib (an optional dependency of fbackprop).

        Args:
          ax: matplotlib ``Axes`` to draw on (e.g. to put several flows on one
            plot); a new figure when omitted.
          path: save the figure to this file (its folder is created if missing).
          title: the axes title.
          labels: optional ``name -> legend label``.
          log: logarithmic y axis.

        Returns:
          The ``Axes``.
        """
        fig, ax = plotting.axes(ax, "the gradient flow", (7.0, 4.2))
        labels = labels or {}
        for name, norms in self._norms.items():
            ys = np.where(norms > 0, norms, np.nan) if log else norms
            ax.plot(np.arange(len(norms)), ys, label=labels.get(name, name))
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("||d loss / d h_t||")
        if title is not None or fig is not None:
            ax.set_title(title or "gradient flow through time")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        return plotting.finish(ax, fig, path)


def gradient_flow(fun: Callable, *args, names: str | Sequence[str] | None = None,
                  argnums: int | Sequence[int] = 0, has_aux: bool = False,
                  **kwargs) -> GradientFlow:
    """Per-step cotangent norms of values tagged inside a ``lax.scan`` body.

    Runs :func:`fbackprop.grad_and_intermediates` on ``fun(*args, **kwargs)``
    (compiled with ``jax.jit`` when every argument is an array) and reduces
    each tagged value's cotangent, one per step, to its norm.

    Args:
      fun: scalar-valued function, as for :func:`fbackprop.grad`, with values
        tagged by :func:`fbackprop.tag` inside a ``lax.scan`` / ``fori_loop``
        body (e.g. the hidden state of a recurrent net).
      *args: its positional arguments.
      names: the tag name or names to report (default: every tag inside a scan).
      argnums: which arguments are differentiated (as for ``fb.grad``; the
        gradients themselves are not returned).
      has_aux: whether ``fun`` returns ``(loss, aux)``.
      **kwargs: its keyword arguments.

    Returns:
      A :class:`GradientFlow`: ``name -> norms`` of shape ``(steps,)``. For a
      tag in nested scans the steps are the outermost scan's (the norm covers
      the inner steps too).

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> from jax import lax
      >>> def loss(w, xs):
      ...     def step(h, x):
      ...         h = fb.tag(jnp.tanh(w * h + x), "h")
      ...         return h, None
      ...     return lax.scan(step, 0.0, xs)[0] ** 2
      >>> flow = fb.gradient_flow(loss, 0.5, jnp.ones(4), names="h")
      >>> [round(float(n), 4) for n in flow["h"]]
      [0.002, 0.0179, 0.178, 1.7902]
    """
    api._check_callable(fun, "gradient_flow")
    from .. import compat
    if any(compat.is_tracer(x) for x in jax.tree_util.tree_leaves((args, kwargs))):
        raise TypeError(
            "gradient_flow returns concrete per-step norms (NumPy arrays, for plotting), but "
            "it was called with a traced value (inside jax.jit, jax.vmap or a gradient). "
            "Call it outside the transformation (it compiles its own run), or use "
            "fb.grad_and_intermediates under the transformation.")
    if names is not None:
        names = (names,) if isinstance(names, str) else tuple(names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"gradient_flow: `names` must be a string or a sequence of "
                            f"strings, got {names!r}.")
    api._normalize_argnums(argnums, len(args), "gradient_flow")
    found: list = []

    def run(*args, **kwargs):
        grads, inter, aux, tags = run_intermediates(fun, argnums, has_aux, names,
                                                    "gradient_flow", args, kwargs)
        found.append(tags)
        return inter

    leaves = jax.tree_util.tree_leaves((args, kwargs))
    if all(isinstance(x, (jax.Array, np.ndarray, np.generic, float, int)) for x in leaves):
        inter = jax.jit(lambda a, k: run(*a, **k))(args, kwargs)
    else:
        inter = run(*args, **kwargs)
    tags = found[0]
    # The tags inside a scan body are those whose perturbation is stacked over steps.
    loops = {e.name: e.steps[0][0] for e in tags.eps if e.steps}
    if names is None:
        selected = [n for n in inter if n in loops]
        if not selected:
            raise ValueError(
                "gradient_flow: the function has no tagged value inside a lax.scan / "
                "fori_loop body. Tag the value whose gradient flow through the steps you "
                "want to see, e.g. h = fb.tag(h, 'h') in the scan's body.")
    else:
        not_in_scan = [n for n in names if n not in loops]
        if not_in_scan:
            raise ValueError(
                f"gradient_flow: tag(s) {not_in_scan} are not inside a lax.scan / fori_loop "
                f"body, so they have no steps; use fb.grad_and_intermediates for them.")
        selected = list(names)
    norms = {}
    for name in selected:
        ct = np.asarray(inter[name], np.float64)
        norms[name] = np.sqrt(np.sum(ct.reshape(ct.shape[0], -1) ** 2, axis=1))
    return GradientFlow(norms, {n: loops[n] for n in selected})
