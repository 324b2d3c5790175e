"""Figures of plays with more than ``MANY`` agents, where a line and a legend entry per agent
would not fit (the networks of docs/networks.md reach 50 agents): the distance to own target as
quantiles across the agents (median, 10-90% band) with the ``FARTHEST`` agents farthest
from their targets drawn and named; the same distances as a heat map of agent x round; the
distance to the predicted equilibrium of all agents together against ``rho^t``; and the
network panel (``misalign.outputs.network.plot_network``: smaller nodes, names beside them, reads
not
labelled). Every legend has a handful of entries."""

from __future__ import annotations

import numpy as np

from misalign.api import Game
from misalign.model.measure import Measured
from misalign.model.play import Trajectory
from misalign.model.theory import Prediction
from misalign.outputs.figure import (
    FLOOR,
    draw_curve,
    draw_plateau,
    drawn_plays,
    log_axes,
    new_figure,
)
from misalign.outputs.network import plot_network
from misalign.outputs.verdict import verdict
from misalign.runtime.text import plural

FARTHEST = 5
"""How many agents are drawn and named: those that end farthest from their own targets."""
TICKS = 25
"""The most agents the heat map names on its axis (every k-th past it)."""


def draw_many(
    game: Game,
    trajectory: Trajectory,
    prediction: Prediction,
    play: int = 0,
    also: Prediction | None = None,
):
    """Draw one play of many agents on four panels: distance to own target across agents
    (``across_agents``), the distance to the predicted equilibrium (``_rate``), a heat map of
    the distance to own target by agent and round (``_heat_map``) and who reads whom.

    Args:
        game: the game that was played.
        trajectory: its trajectory.
        prediction: its prediction.
        play: which play of the batch to draw.
        also: a second prediction (language-model agents: their global fits), whose median
            plateau is drawn dotted; ``None``: none.

    Returns:
        The figure, not yet saved.
    """
    fig, ((own, rate), (heat, net)) = new_figure(2, (15, 10), rows=2)
    targets = game.targets
    names = [name for name in game.schedule.agents if name in targets]
    distance = np.stack([trajectory.distance(n, targets[n])[:, play] for n in names])
    converges = bool(prediction.converges[play])
    plateaus = _plateaus(prediction, names, play) if converges else None
    others = _plateaus(also, names, play) if also is not None and also.converges[play] else None
    farthest = across_agents(own, names, distance, plateaus, others)
    said = verdict(game, trajectory, prediction, play)
    log_axes(
        own,
        "distance to own target",
        f"{said}: median over {len(names)} agents, 10-90% band",
    )
    _rate(rate, game, trajectory, prediction, play, also)
    _heat_map(heat, names, distance)
    rings = {name: f"C{k}" for k, name in enumerate(farthest)}
    plot_network(net, game.schedule, prediction, play, rings=rings)
    return fig


def across_agents(
    ax,
    names: list[str],
    distance: np.ndarray,
    plateaus: np.ndarray | None = None,
    others: np.ndarray | None = None,
    rounds: np.ndarray | None = None,
) -> list[str]:
    """Distances over rounds of many agents as a median line in a 10-90% band (over the
    agents whose distance is finite in that round), the ``FARTHEST`` agents that end
    farthest from their targets as named lines (their plateaus dashed, unlabelled), and the
    median predicted plateau dashed.

    Args:
        ax: the matplotlib axes.
        names: the agents, in the order of ``distance``'s rows.
        distance: ``(agents, rounds)``; ``inf`` or ``nan`` where a play overflowed.
        plateaus: each agent's predicted distance (``None``: no prediction).
        others: each agent's distance predicted by a second prediction (dotted median).
        rounds: the rounds of ``distance``'s columns (default ``1, 2, ...``).

    Returns:
        The agents drawn by name, farthest first.
    """
    rounds = np.arange(1, distance.shape[1] + 1) if rounds is None else rounds
    shown = np.where(np.isfinite(distance) & (np.abs(distance) < 1e300), distance, np.nan)
    alive = ~np.isnan(shown).all(axis=0)
    if alive.any():
        low, median, high = np.nanquantile(shown[:, alive], [0.1, 0.5, 0.9], axis=0)
        draw_curve(ax, rounds[alive], median, "k", f"median over {len(names)} agents")
        ax.fill_between(
            rounds[alive],
            np.maximum(low, FLOOR),
            np.maximum(high, FLOOR),
            color="0.6",
            alpha=0.35,
            lw=0,
            label="10-90% of the agents",
        )
    final = [row[np.isfinite(row)][-1] if np.isfinite(row).any() else -np.inf for row in shown]
    order = [k for k in np.argsort(final)[::-1] if np.isfinite(final[k])][:FARTHEST]
    for rank, k in enumerate(order):
        draw_curve(ax, rounds, distance[k], f"C{rank}", names[k])
        if plateaus is not None:
            draw_plateau(ax, float(plateaus[k]), f"C{rank}", "_nolegend_")
    if plateaus is not None:
        level = float(np.median(plateaus))
        draw_plateau(ax, level, "k", f"predicted, median ({level:.3g})")
    if others is not None:
        level = float(np.median(others))
        draw_plateau(ax, level, "k", f"global fits, median ({level:.3g})", ":")
    return [names[k] for k in order]


def batch_across_agents(ax, m: Measured, ok: np.ndarray) -> str:
    """A batch of plays of many agents: each agent's median distance to own target over the
    converging plays ``ok`` at the recorded rounds, drawn across the agents
    (``across_agents``) with the median of their median predicted plateaus.

    Args:
        ax: the matplotlib axes.
        m: the batch's measurements.
        ok: which plays converge.

    Returns:
        What is drawn, for the title.
    """
    names, drawn = list(m.distance), drawn_plays(ok)
    distance = np.stack([np.median(m.distance[n][:, drawn], axis=1) for n in names]).astype(float)
    plateaus = np.array([np.median(m.residual[n][ok]) for n in names])
    across_agents(ax, names, distance, plateaus, rounds=m.recorded)
    return f"median of {len(names)} agents' medians, 10-90%"


def _plateaus(prediction: Prediction, names: list[str], play: int) -> np.ndarray:
    """Each agent's predicted distance to its own target in ``play``."""
    return np.array([np.linalg.norm(prediction.residual[n][play]) for n in names])


def _rate(ax, game: Game, trajectory: Trajectory, prediction: Prediction, play, also) -> None:
    """The distance of all agents' outputs together to the predicted equilibrium (the global
    fit's where only it converges), the band of the agents' own distances to it, and
    ``rho^t`` from the first round."""
    against, what = prediction, "predicted equilibrium"
    if not prediction.converges[play] and also is not None and also.converges[play]:
        against, what = also, "the global fit's equilibrium"
    names = game.schedule.agents
    if against.converges[play]:
        rounds = np.arange(1, trajectory.rounds + 1)
        each = np.stack([trajectory.distance(n, against.fixed_point[n])[:, play] for n in names])
        with np.errstate(over="ignore", invalid="ignore"):
            together = np.sqrt((each**2).sum(axis=0))
        draw_curve(ax, rounds, together, "k", f"all {len(names)} agents, |s_t - s*|")
        finite = np.isfinite(each).all(axis=0)
        if finite.any():
            ax.fill_between(
                rounds[finite],
                np.maximum(each[:, finite].min(axis=0), FLOOR),
                np.maximum(each[:, finite].max(axis=0), FLOOR),
                color="0.6",
                alpha=0.35,
                lw=0,
                label="each agent: least to most",
            )
        rho = float(against.rho[play])
        if rho > 0 and np.isfinite(together[0]):
            law = np.maximum(together[0] * rho ** (rounds - 1.0), FLOOR)
            ax.plot(rounds, law, "k:", label="rho^t")
    if prediction.converges[play]:
        title = "rate: simulation vs rho^t"
    elif against is also:
        title = f"none predicted; the global fit's (rho = {float(also.rho[play]):.3g})"
    else:
        title = "no equilibrium (rho >= 1)"
    log_axes(ax, f"distance to {what}", title)


def _heat_map(ax, names: list[str], distance: np.ndarray) -> None:
    """The distance to own target by agent (rows, in schedule order) and round (columns),
    coloured by its logarithm; values that are not finite in grey. Past ``TICKS`` agents
    every k-th is named."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    shown = np.ma.masked_invalid(np.where(np.abs(distance) < 1e300, distance, np.nan))
    rounds = distance.shape[1]
    ax.set(
        xlabel="round",
        ylabel="agent",
        title=f"distance to own target by agent and round ({plural(len(names), 'agent')})",
    )
    if shown.count() == 0:
        ax.text(0.5, 0.5, "no finite values to draw", ha="center", transform=ax.transAxes)
        return
    cmap = colormaps["magma"].with_extremes(bad="0.75")
    low = max(float(shown.min()), FLOOR)
    image = ax.imshow(
        np.ma.maximum(shown, low),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=LogNorm(low, max(float(shown.max()), low * 10)),
        extent=(0.5, rounds + 0.5, len(names) - 0.5, -0.5),
    )
    step = int(np.ceil(len(names) / TICKS))
    ax.set_yticks(range(0, len(names), step), names[::step], fontsize=7)
    ax.figure.colorbar(image, ax=ax, shrink=0.9, label="distance to own target (log scale)")
