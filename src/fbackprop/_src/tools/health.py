"""Gradient health: per-leaf statistics of a gradient pytree, flags, and a plot.

Vanishing gradients show up as leaves whose norm is orders of magnitude below
the largest leaf's; exploding ones as very large norms; dead units as exact
zeros. :func:`gradient_stats` is traceable (use it inside ``jax.jit``);
:func:`gradient_health` turns the numbers into a report with flags, a table and
an optional matplotlib plot of the per-leaf norms.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from .. import compat, plotting

_STAT_NAMES = ("norm", "mean", "std", "max_abs", "zero_fraction", "nonfinite")


def _leaf_stats(g) -> dict:
    g = jnp.asarray(g)
    ft = jnp.result_type(float)
    if g.size == 0:
        zero = jnp.zeros((), ft)
        return dict(norm=zero, mean=zero, std=zero, max_abs=zero, zero_fraction=zero,
                    nonfinite=zero)
    mag = jnp.abs(g).astype(ft)
    real = mag if jnp.issubdtype(g.dtype, jnp.complexfloating) else g.astype(ft)
    return dict(
        norm=jnp.sqrt(jnp.sum(mag * mag)),
        mean=jnp.mean(real),
        std=jnp.std(real),
        max_abs=jnp.max(mag),
        zero_fraction=jnp.mean((g == 0).astype(ft)),
        nonfinite=jnp.sum((~jnp.isfinite(g)).astype(ft)),
    )


def _is_grad_leaf(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and dtype != jax.dtypes.float0 and (
        jnp.issubdtype(dtype, jnp.inexact))


def _path_label(path) -> str:
    """``layer0/w`` for the path ``['layer0']['w']`` (``(root)`` for a bare array)."""
    if not path:
        return "(root)"
    try:
        return tree_util.keystr(path, simple=True, separator="/")
    except TypeError:  # older JAX: no simple form
        return tree_util.keystr(path)


def gradient_stats(grads) -> dict:
    """Per-leaf statistics of a gradient pytree; traceable (works under ``jax.jit``).

    Args:
      grads: a pytree of gradient arrays (integer and ``float0`` leaves are skipped).

    Returns:
      A dict mapping each leaf's path (e.g. ``"0/w"`` for ``grads[0]['w']``) to a
      dict of scalar arrays ``norm``, ``mean``, ``std``, ``max_abs``,
      ``zero_fraction`` and ``nonfinite`` (count of NaN/Inf elements). Pass it
      to :func:`gradient_health`.

    Example:
      >>> import fbackprop as fb, jax, jax.numpy as jnp
      >>> stats = jax.jit(fb.gradient_stats)({"w": jnp.ones((2, 2))})
      >>> float(stats["w"]["norm"])
      2.0
    """
    out = {}
    for path, leaf in tree_util.tree_flatten_with_path(grads)[0]:
        if not _is_grad_leaf(leaf) and not isinstance(leaf, (float, np.floating)):
            continue
        out[_path_label(path)] = _leaf_stats(leaf)
    return out


@dataclasses.dataclass(frozen=True)
class LeafHealth:
    """Statistics and flags of one gradient leaf."""
    path: str
    shape: tuple
    norm: float
    mean: float
    std: float
    max_abs: float
    zero_fraction: float
    nonfinite: int
    flags: tuple

    @property
    def ok(self) -> bool:
        return not self.flags


class HealthReport:
    """Per-leaf gradient statistics with flags; ``print`` it or ``plot`` it.

    Flags: ``"nonfinite"`` (NaN/Inf elements), ``"all-zero"`` (no gradient at all),
    ``"vanishing"`` (norm below ``vanishing_ratio`` x the largest leaf norm, or
    below ``vanishing_norm``), ``"exploding"`` (norm above ``exploding_norm``),
    ``"mostly-zero"`` (more than ``dead_fraction`` exact zeros, e.g. dead ReLUs).
    """

    def __init__(self, leaves: list[LeafHealth], thresholds: dict):
        self.leaves = leaves
        self.thresholds = thresholds

    @property
    def flagged(self) -> list[LeafHealth]:
        return [leaf for leaf in self.leaves if leaf.flags]

    @property
    def ok(self) -> bool:
        return not self.flagged

    def norms(self) -> dict:
        """Leaf path -> gradient norm."""
        return {leaf.path: leaf.norm for leaf in self.leaves}

    def __getitem__(self, path) -> LeafHealth:
        for leaf in self.leaves:
            if leaf.path == path:
                return leaf
        raise KeyError(f"no gradient leaf {path!r}; leaves are "
                       f"{[leaf.path for leaf in self.leaves]}")

    def table(self) -> str:
        head = ("leaf", "shape", "norm", "mean", "std", "max|g|", "zeros", "flags")
        rows = [(leaf.path, "x".join(map(str, leaf.shape)) or "scalar", f"{leaf.norm:.3e}",
                 f"{leaf.mean:.2e}", f"{leaf.std:.2e}", f"{leaf.max_abs:.2e}",
                 f"{100 * leaf.zero_fraction:.0f}%", ", ".join(leaf.flags))
                for leaf in self.leaves]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.leaves:
            norms = [leaf.norm for leaf in self.leaves if np.isfinite(leaf.norm)]
            positive = [n for n in norms if n > 0]
            if positive:
                lines.append(f"largest/smallest nonzero norm: "
                             f"{max(positive) / min(positive):.3g}x; "
                             f"{len(self.flagged)} of {len(self.leaves)} leaves flagged")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"HealthReport(\n{self.table()}\n)"

    def plot(self, ax=None, *, label: str | None = None, path: str | None = None,
             title: str | None = None, log: bool = True):
        """Plots the per-leaf gradient norms (needs matplotlib).

        Args:
          ax: a matplotlib ``Axes`` to draw on (e.g. to compare several reports);
            a new figure is made when omitted.
          label: legend label for this report's line.
          path: if given, the figure is saved there (PNG, SVG, PDF by suffix).
          title: the axes title.
          log: logarithmic y axis (vanishing gradients span decades).

        Returns:
          The ``Axes``.
        """
        return plot_gradient_norms({label or "gradient norm": self}, ax=ax, path=path,
                                   title=title, log=log)


def _flags(stats, biggest, thresholds) -> tuple:
    flags = []
    if stats["nonfinite"] > 0:
        flags.append("nonfinite")
    elif stats["norm"] == 0:
        flags.append("all-zero")
    else:
        if stats["norm"] < thresholds["vanishing_norm"] or (
                biggest > 0 and stats["norm"] < thresholds["vanishing_ratio"] * biggest):
            flags.append("vanishing")
        if stats["norm"] > thresholds["exploding_norm"]:
            flags.append("exploding")
        if stats["zero_fraction"] > thresholds["dead_fraction"]:
            flags.append("mostly-zero")
    return tuple(flags)


def gradient_health(grads, *, vanishing_ratio: float = 1e-3, vanishing_norm: float = 1e-10,
                    exploding_norm: float = 1e3, dead_fraction: float = 0.9) -> HealthReport:
    """A health report of a gradient pytree: per-leaf statistics and flags.

    Args:
      grads: a pytree of concrete gradient arrays (e.g. what ``fb.grad`` returned),
        or the output of :func:`gradient_stats` computed under ``jax.jit``.
      vanishing_ratio: flag leaves whose norm is below this fraction of the
        largest leaf norm.
      vanishing_norm: flag leaves whose norm is below this absolute value.
      exploding_norm: flag leaves whose norm is above this value.
      dead_fraction: flag leaves with more than this fraction of exact zeros.

    Returns:
      A :class:`HealthReport`.

    Example:
      >>> import fbackprop as fb, jax.numpy as jnp
      >>> report = fb.gradient_health({"w1": jnp.full(3, 1e-9), "w2": jnp.ones(3)})
      >>> report["w1"].flags
      ('vanishing',)
    """
    for name, v in (("vanishing_ratio", vanishing_ratio), ("vanishing_norm", vanishing_norm),
                    ("exploding_norm", exploding_norm), ("dead_fraction", dead_fraction)):
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"gradient_health: `{name}` must be a non-negative number, "
                             f"got {v!r}.")
    if _looks_like_stats(grads):
        stats, shapes = grads, {k: () for k in grads}
    else:
        leaves = tree_util.tree_flatten_with_path(grads)[0]
        if any(compat.is_tracer(x) for _, x in leaves):
            raise TypeError(
                "gradient_health needs concrete gradients, but got traced values (it was "
                "called inside jax.jit / vmap / grad). Return the gradients (or "
                "fb.gradient_stats(grads)) from the transformed function and call "
                "gradient_health on the result.")
        bad = [(tree_util.keystr(p), type(x).__name__) for p, x in leaves
               if getattr(x, "dtype", None) is None and not isinstance(x, (int, float))]
        if bad:
            raise TypeError(f"gradient_health: leaf {bad[0][0] or '(root)'} is a {bad[0][1]}, "
                            f"not an array; pass the gradient pytree returned by fb.grad.")
        stats = jax.device_get(jax.jit(gradient_stats)(grads))
        shapes = {_path_label(p): tuple(np.shape(x)) for p, x in leaves}
    if not stats:
        raise ValueError("gradient_health: the pytree has no floating-point gradient leaves.")
    stats = {k: {s: float(np.asarray(v[s])) for s in _STAT_NAMES} for k, v in stats.items()}
    thresholds = dict(vanishing_ratio=vanishing_ratio, vanishing_norm=vanishing_norm,
                      exploding_norm=exploding_norm, dead_fraction=dead_fraction)
    finite_norms = [s["norm"] for s in stats.values() if np.isfinite(s["norm"])]
    biggest = max(finite_norms, default=0.0)
    leaves = [LeafHealth(k, shapes.get(k, ()), s["norm"], s["mean"], s["std"], s["max_abs"],
                         s["zero_fraction"], int(s["nonfinite"]), _flags(s, biggest, thresholds))
              for k, s in stats.items()]
    return HealthReport(leaves, thresholds)


def _looks_like_stats(x) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(
        isinstance(v, Mapping) and set(_STAT_NAMES) <= set(v) for v in x.values())


def plot_gradient_norms(reports: Mapping[str, HealthReport] | HealthReport, ax=None, *,
                        path: str | None = None, title: str | None = None, log: bool = True):
    """Plots per-leaf gradient norms of one or several reports on one axes.

    Needs matplotlib (an optional dependency of fbackprop). Vanishing gradients
    show as a line falling by decades towards the first layers.

    Args:
      reports: a :class:`HealthReport`, or a mapping ``label -> HealthReport``
        (e.g. ``{"sigmoid": r1, "relu": r2}``) to compare.
      ax: matplotlib ``Axes`` to draw on; a new figure when omitted.
      path: save the figure to this file (its folder is created if missing).
      title: the axes title.
      log: logarithmic y axis.

    Returns:
      The ``Axes``.
    """
    if isinstance(reports, HealthReport):
        reports = {"gradient norm": reports}
    if not isinstance(reports, Mapping) or not reports or \
            not all(isinstance(r, HealthReport) for r in reports.values()):
        raise TypeError("plot_gradient_norms: pass a HealthReport or a mapping of labels to "
                        "HealthReports (from fb.gradient_health).")
    longest = max(len(r.leaves) for r in reports.values())
    fig, ax = plotting.axes(ax, "gradient norms", (max(6.0, 0.45 * longest + 2), 4.2))
    for label, report in reports.items():
        norms = [leaf.norm if leaf.norm > 0 else np.nan for leaf in report.leaves]
        ax.plot(range(len(norms)), norms, marker="o", label=label)
        for i, leaf in enumerate(report.leaves):
            if "vanishing" in leaf.flags or "exploding" in leaf.flags:
                ax.plot([i], [norms[i]], marker="o", markersize=12, markerfacecolor="none",
                        color="red", linestyle="none")
    first = next(iter(reports.values()))
    ax.set_xticks(range(len(first.leaves)))
    ax.set_xticklabels([leaf.path for leaf in first.leaves], rotation=60, ha="right",
                       fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("gradient norm")
    ax.set_title(title or "per-leaf gradient norms (red rings: flagged)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return plotting.finish(ax, fig, path)
