"""The pieces every figure is made of: an off-screen figure, saving it with its titles, and
the log-scale curves and plateaus of distances."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

FLOOR = 1e-16
"""Distances below this are drawn at this value (a log axis has no zero)."""


MANY = 8
"""Up to this many agents a figure draws a line (and a legend entry) per agent, and the
network panel names each node inside it and labels each read with its weight."""


def new_figure(columns: int, size: tuple[float, float], rows: int = 1):
    """A figure with ``rows`` x ``columns`` axes, drawn off-screen (Agg): a bare
    ``matplotlib.figure.Figure``, without ``pyplot``'s import or its registry of open figures.

    Args:
        columns: axes per row.
        size: the figure's width and height in inches.
        rows: rows of axes (more than one: the axes come as a 2-D array).

    Returns:
        ``(figure, axes)``, as ``matplotlib.pyplot.subplots`` gives them.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, columns)


def save_figure(fig, path: str | Path) -> Path:
    """Add a legend to every axis that has labelled artists and none yet, wrap every title
    and axis label longer than its axis (``wrap_texts``), write the figure (a PNG carries
    its axes' titles, unwrapped, as its ``Description``, so tests can read what it says;
    untitled axes, such as a colour bar's, are left out)."""
    for axis in fig.axes:
        if axis.get_legend() is None and axis.get_legend_handles_labels()[0]:
            axis.legend(frameon=False, fontsize="small")
    path = Path(path)
    titles = " | ".join(title for axis in fig.axes if (title := axis.get_title()))
    wrap_texts(fig)
    metadata = {"Description": titles} if path.suffix.lower() == ".png" else None
    fig.savefig(path, dpi=120, metadata=metadata)
    return path


def wrap_texts(fig) -> None:
    """Break every axis title, and every axis label, longer than its axis into lines that
    fit (at spaces), so that a long verdict or label is not cut off at the figure's edge or
    written over its neighbour's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    for axis in fig.axes:
        box = axis.get_window_extent(renderer)
        for text, along in (
            (axis.title, "width"),
            (axis.xaxis.label, "width"),
            (axis.yaxis.label, "height"),  # drawn upright: its length is its height
        ):
            words = text.get_text()
            length = getattr(text.get_window_extent(renderer), along)
            room = getattr(box, along)
            if words and length > room:
                columns = max(20, int(len(words) * room / length * 0.95))
                text.set_text(
                    textwrap.fill(words, columns, break_long_words=False, break_on_hyphens=False)
                )


def draw_plateau(ax, level: float, color: str, label: str, style: str = "--") -> None:
    """A dashed horizontal line at a predicted distance (drawn at ``FLOOR`` when below it)."""
    ax.axhline(max(level, FLOOR), color=color, linestyle=style, linewidth=1, label=label)


def draw_curve(ax, rounds: np.ndarray, values: np.ndarray, color: str, label: str) -> None:
    """A curve over rounds, drawing only its finite values (a diverged play stops)."""
    shown = np.isfinite(values) & (np.abs(values) < 1e300)
    if shown.any():
        ax.plot(rounds[shown], np.maximum(values[shown], FLOOR), color=color, label=label)


def log_axes(ax, ylabel: str, title: str) -> None:
    """Label the axes; a log scale when there is something to draw, else a note saying so."""
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    if ax.lines:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no finite values to draw", ha="center", transform=ax.transAxes)


DRAWN = 20_000
"""The per-round quantiles of a batch are drawn over at most this many of its converging
plays: every ``k``-th in seed order (the plays are independent draws, so the quantiles of
20,000 are those of all within about 1% of a quantile level; the summary's are exact)."""


def drawn_plays(ok: np.ndarray) -> np.ndarray:
    """The converging plays a figure draws: all of them up to ``DRAWN``, else every ``k``-th."""
    plays = np.flatnonzero(ok)
    return plays[:: -(-len(plays) // DRAWN)] if len(plays) > DRAWN else plays
