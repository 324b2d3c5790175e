"""Figures: each agent's distance to its own target per round, theory drawn beside simulation;
for a network of agents (3 or more, weighted reads or simultaneous rounds), who reads whom
beside them; for a batch, the converging plays' quantiles and the spread of ``rho``. A play of
more than ``MANY`` agents is drawn by ``misalign.outputs.plot_many`` (quantiles across agents, the
farthest named, a heat map of agent x round), where a line and a legend entry per agent
would not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from misalign.api import Game
from misalign.model.agent import black_boxes
from misalign.model.measure import Measured
from misalign.model.observe import CLASSES, COUNTED
from misalign.model.play import Trajectory
from misalign.model.theory import Prediction
from misalign.outputs.figure import (
    FLOOR,
    MANY,
    draw_curve,
    draw_plateau,
    drawn_plays,
    log_axes,
    new_figure,
    save_figure,
)
from misalign.outputs.network import is_network, plot_network
from misalign.outputs.verdict import verdict


def plot_play(
    game: Game,
    trajectory: Trajectory,
    prediction: Prediction,
    path: str | Path,
    play: int = 0,
    also: Prediction | None = None,
) -> Path:
    """Write ``draw_play``'s figure of one play to ``path`` (format from the suffix).

    Returns:
        The path written.
    """
    return save_figure(draw_play(game, trajectory, prediction, play, also), path)


def draw_play(
    game: Game,
    trajectory: Trajectory,
    prediction: Prediction,
    play: int = 0,
    also: Prediction | None = None,
):
    """Draw one play: ``|s_t^i - w_i*|`` per round for every agent, with the predicted plateau
    ``|e_i|`` as a dashed line of the same colour (docs/theory.md §2), and the distance to
    the predicted equilibrium beside ``rho^t``. ``also``: a second prediction whose plateaus
    are drawn dotted (language-model agents: the prediction of their global fits, beside the
    local one). A network (``is_network``) adds a third panel, ``plot_network``. More than
    ``MANY`` agents: ``misalign.outputs.plot_many.draw_many``.

    Args:
        game: the game that was played.
        trajectory: its trajectory.
        prediction: its prediction.
        play: which play of the batch to draw.
        also: the second prediction drawn dotted, or ``None``.

    Returns:
        The figure, not yet saved.
    """
    if len(game.schedule.agents) > MANY:
        from misalign.outputs.plot_many import draw_many

        return draw_many(game, trajectory, prediction, play, also)
    network = is_network(game.schedule)
    fig, axes = new_figure(3, (15, 4.4)) if network else new_figure(2, (10, 4.0))
    ax, gap = axes[:2]
    rounds = np.arange(1, trajectory.rounds + 1)
    targets = game.targets
    rho, converges = float(prediction.rho[play]), bool(prediction.converges[play])
    # the right panel: the distance to the prediction's equilibrium, else to the global fit's
    against, what = prediction, "predicted equilibrium"
    if not converges and also is not None and also.converges[play]:
        against, what = also, "the global fit's equilibrium"
    for k, name in enumerate(n for n in game.schedule.agents if n in targets):
        color = f"C{k}"
        draw_curve(ax, rounds, trajectory.distance(name, targets[name])[:, play], color, name)
        if also is not None and also.converges[play]:
            other = float(np.linalg.norm(also.residual[name][play]))
            draw_plateau(ax, other, color, f"{name} global fit ({other:.3g})", ":")
        if converges:
            plateau = float(np.linalg.norm(prediction.residual[name][play]))
            draw_plateau(ax, plateau, color, f"{name} predicted ({plateau:.3g})")
        if against.converges[play]:
            error = trajectory.distance(name, against.fixed_point[name])[:, play]
            draw_curve(gap, rounds, error, color, name)
    if converges and rho > 0:
        first = max(trajectory.distance(n, prediction.fixed_point[n])[0, play] for n in targets)
        gap.plot(rounds, np.maximum(first * rho ** (rounds - 1.0), FLOOR), "k:", label="rho^t")
    log_axes(ax, "distance to own target", verdict(game, trajectory, prediction, play))
    if converges:
        title = "rate: simulation vs rho^t"
    elif against is also:
        title = f"none predicted; the global fit's (rho = {float(also.rho[play]):.3g})"
    else:
        title = "no equilibrium (rho >= 1)"
    log_axes(gap, f"distance to {what}", title)
    if network:
        plot_network(axes[2], game.schedule, prediction, play)
    return fig


def plot_batch(
    game: Game, trajectory: Trajectory, prediction: Prediction, path: str | Path
) -> Path:
    """Write the figure of a recorded batch of plays to ``path`` (``plot_measured`` of its
    measurements, ``misalign.outputs.batch.measured``).

    Returns:
        The path written.
    """
    return save_figure(draw_batch(game, trajectory, prediction), path)


def draw_batch(game: Game, trajectory: Trajectory, prediction: Prediction):
    """``draw_measured`` of a recorded batch (its ``misalign.outputs.batch.measured``)."""
    from misalign.outputs.batch import measured

    fitted = bool(black_boxes(game.agents))
    return draw_measured(measured(game, prediction, trajectory), fitted)


def plot_measured(m: Measured, path: str | Path, fitted: bool = False) -> Path:
    """Write ``draw_measured``'s figure of a batch to ``path``.

    Returns:
        The path written.
    """
    return save_figure(draw_measured(m, fitted), path)


def draw_measured(m: Measured, fitted: bool = False):
    """Draw a batch of plays (``run --seeds``) as the summary tells it: over the plays that
    converge, the median distance to own target per recorded round with a 10-90% quantile
    band and the median predicted plateau dashed (a run that kept no round: the final
    distances' histogram); beside it, the spread of ``rho`` over the plays. The other plays
    are counted in the title by what their outputs did (``diverge``: only plays that grew),
    not drawn; with black-box agents (``fitted``) the title leads with every play's observed
    class, the drawn plays being those the fitted maps predict to converge. More than
    ``MANY`` agents: each agent's median over the plays, drawn across agents
    (``plot_many.batch_across_agents``).

    Args:
        m: the batch's measurements (``misalign.model.measure.Measured``).
        fitted: the plays have black-box agents (their prediction is of fitted maps).

    Returns:
        The figure, not yet saved.
    """
    fig, (ax, spread) = new_figure(2, (10, 4.0))
    ok = m.ok
    if not ok.any():
        what = "nothing to draw"
    elif not len(m.recorded):
        what = _final_distances(ax, m, ok)
    elif len(m.distance) > MANY:
        from misalign.outputs.plot_many import batch_across_agents

        what = batch_across_agents(ax, m, ok)
    else:
        what = _batch_per_agent(ax, m, ok)
    plays, code = len(ok), m.code
    if fitted:
        counts = [(CLASSES[c], int((code == c).sum())) for c in range(len(CLASSES))]
        seen = ", ".join(f"{n} {COUNTED[kind]}" for kind, n in counts if n)
        title = f"observed: {seen}; drawn: the {int(ok.sum())} predicted to converge"
    else:
        rest = [(CLASSES[c], int(((code == c) & ~ok).sum())) for c in range(len(CLASSES))]
        named = [
            f"{n} diverge" if kind == "growing" else f"{n} {COUNTED[kind]}" for kind, n in rest if n
        ]
        title = f"{int(ok.sum())} of {plays} plays converge" + "".join(f"; {x}" for x in named)
    if len(m.recorded):
        log_axes(ax, f"distance to own target: {what}", title)
        if len(m.recorded) > 1 and m.recorded[1] - m.recorded[0] > 1:
            ax.set_xlabel(f"round (every {int(m.recorded[1] - m.recorded[0])} rounds kept)")
    else:
        ax.set(xscale="log", xlabel="final distance to own target", ylabel="plays", title=title)
    rho = m.rho[np.isfinite(m.rho)]
    spread.hist(rho, bins=min(50, max(5, plays // 5)), range=_rho_range(rho), color="0.5")
    spread.axvline(1.0, color="C3", linestyle="--", linewidth=1, label="rho = 1")
    spread.set(
        xlabel="rho (per round)",
        ylabel="plays",
        title=f"{'fitted ' * fitted}rho over {plays} plays (median {np.median(rho):.3g})"
        if rho.size
        else f"rho over {plays} plays: none finite (no fitted map)",
    )
    return fig


def _batch_per_agent(ax, m: Measured, ok: np.ndarray) -> str:
    """Per agent, over the converging plays ``ok``: the median distance to own target per
    recorded round, its 10-90% band and the median predicted plateau.

    Returns:
        What is drawn, for the title.
    """
    drawn = drawn_plays(ok)
    for k, (name, distance) in enumerate(m.distance.items()):
        color = f"C{k}"
        low, median, high = np.quantile(distance[:, drawn], [0.1, 0.5, 0.9], axis=1)
        draw_curve(ax, m.recorded, median, color, f"{name} median")
        ax.fill_between(
            m.recorded, np.maximum(low, FLOOR), np.maximum(high, FLOOR), color=color, alpha=0.2
        )
        plateau = float(np.median(m.residual[name][ok]))
        draw_plateau(ax, plateau, color, f"{name} predicted median ({plateau:.3g})")
    return "median, 10-90%" + _of(drawn, ok)


def _of(drawn: np.ndarray, ok: np.ndarray) -> str:
    """`` (20,000 of 99,998 plays)`` where the figure draws a subset."""
    return f" ({len(drawn):,} of {int(ok.sum()):,} plays)" if len(drawn) < ok.sum() else ""


def _final_distances(ax, m: Measured, ok: np.ndarray) -> str:
    """Per agent, over the converging plays, the histogram of its final distance to own target
    (filled) beside that of its predicted distance (outlined, dashed): a run that kept no
    round's distances (``--record last``)."""
    for k, (name, final) in enumerate(m.final_distance.items()):
        values = np.maximum(final[ok], FLOOR)
        predicted = np.maximum(m.residual[name][ok], FLOOR)
        low, high = min(values.min(), predicted.min()), max(values.max(), predicted.max())
        bins = np.geomspace(low, max(high, low * 1.01), 40)
        ax.hist(values, bins=bins, color=f"C{k}", alpha=0.5, label=f"{name} simulated")
        ax.hist(
            predicted,
            bins=bins,
            histtype="step",
            linestyle="--",
            color=f"C{k}",
            label=f"{name} predicted",
        )
    ax.legend(fontsize=8)
    return "final"


def _rho_range(rho: np.ndarray) -> tuple[float, float] | None:
    """The histogram's range: the values' own, widened to at least 1e-6 (relative) where they
    agree to the last bits (a Newton partner gives every play the same ``rho`` up to rounding,
    and numpy cannot split so narrow a range into bins)."""
    if rho.size == 0:
        return None
    low, high = float(rho.min()), float(rho.max())
    width = max(high - low, 1e-6 * max(1.0, abs(high)))
    middle = (low + high) / 2
    return middle - width / 2, middle + width / 2
