"""The matplotlib plumbing every ``plot`` method of fbackprop shares (matplotlib is
an optional dependency: it is imported only when something is drawn)."""

from __future__ import annotations

import os


def axes(ax, what: str, figsize: tuple[float, float]):
    """``(figure or None, ax)``: ``ax`` itself, or the axes of a new figure.

    ``what`` completes the error message when matplotlib is missing ("Plotting
    <what> needs matplotlib").
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"Plotting {what} needs matplotlib, an optional dependency: "
                          f"pip install matplotlib") from err
    if ax is not None:
        return None, ax
    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot(1, 1, 1)


def finish(ax, fig, path: str | None):
    """Lays out the figure and saves it to ``path`` (its folder made) if given."""
    figure = fig or ax.figure
    figure.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=120)
    return ax
