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
from misalign.model.observe import CLASSES, COUNTED, CYCLE, FIXED, GROWING, classify
from misalign.model.play import Trajectory
from misalign.model.theory import Prediction
from misalign.outputs.figure import (
    FLOOR,
    MANY,
    draw_curve,
    draw_plateau,
    log_axes,
    new_figure,
    save_figure,
)
from misalign.outputs.network import is_network, plot_network
from misalign.outputs.report import converging


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


SEEN = {
    "fixed point": "a fixed point",
    "bounded": "bounded, not settled",
    "growing": "growing",
    "failed": "failed",
}
"""How a figure names an observed class (a cycle names its period)."""


def verdict(game: Game, trajectory: Trajectory, prediction: Prediction, play: int = 0) -> str:
    """A play's verdict for a figure's title, never one its outputs contradict.

    A play with black-box agents is titled by what its outputs did
    (``misalign.model.observe.classify``), the fitted maps' ``rho`` after it as a
    prediction; an analytic play by the theory's ``converges`` / ``diverges (rho = ...)``
    where the observed class agrees (a fixed point, growing), else by the observed class
    with the theory's verdict beside it as a prediction.

    Args:
        game: the game that was played; trajectory: its trajectory; prediction: its
            prediction; play: which play of the batch.

    Returns:
        The title.
    """
    observed = classify(trajectory)
    code, period = int(observed.code[play]), int(observed.period[play])
    seen = f"a cycle of period {period}" if code == CYCLE else SEEN[CLASSES[code]]
    rho, converges = float(prediction.rho[play]), bool(prediction.converges[play])
    predicted = "converges" if converges else "no equilibrium"
    if black_boxes(game.agents):
        return f"observed: {seen}; predicted from the fitted maps: {predicted} (rho = {rho:.3g})"
    if (converges and code == FIXED) or (not converges and code == GROWING):
        return f"{'converges' if converges else 'diverges'} (rho = {rho:.3g})"
    return f"observed: {seen}; theory: {predicted} (rho = {rho:.3g})"


def plot_batch(
    game: Game, trajectory: Trajectory, prediction: Prediction, path: str | Path
) -> Path:
    """Write ``draw_batch``'s figure of a batch of plays to ``path``.

    Returns:
        The path written.
    """
    return save_figure(draw_batch(game, trajectory, prediction), path)


def draw_batch(game: Game, trajectory: Trajectory, prediction: Prediction):
    """Draw a batch of plays (``run --seeds``) as the summary tells it: over the plays that
    converge, the median distance to own target per round with a 10-90% quantile band and
    the median predicted plateau dashed; beside it, the spread of ``rho`` over the plays.
    The other plays are counted in the title by what their outputs did (``diverge``: only
    plays that grew), not drawn; with black-box agents the title leads with every play's
    observed class, the drawn plays being those the fitted maps predict to converge. More
    than ``MANY`` agents: each
    agent's median over the plays, drawn across agents (``plot_many.batch_across_agents``).

    Args:
        game: the game that was played.
        trajectory: its trajectory.
        prediction: its prediction.

    Returns:
        The figure, not yet saved.
    """
    fig, (ax, spread) = new_figure(2, (10, 4.0))
    ok = converging(prediction, trajectory)
    if len(game.schedule.agents) > MANY:
        from misalign.outputs.plot_many import batch_across_agents

        what = batch_across_agents(ax, game, trajectory, prediction, ok)
    else:
        what = _batch_per_agent(ax, game, trajectory, prediction, ok)
    plays = len(ok)
    observed = classify(trajectory)
    fitted = bool(black_boxes(game.agents))
    if fitted:
        counts = [(CLASSES[c], int((observed.code == c).sum())) for c in range(len(CLASSES))]
        seen = ", ".join(f"{n} {COUNTED[kind]}" for kind, n in counts if n)
        title = f"observed: {seen}; drawn: the {int(ok.sum())} predicted to converge, {what}"
    else:
        rest = [(CLASSES[c], int(((observed.code == c) & ~ok).sum())) for c in range(len(CLASSES))]
        named = [
            f"{n} diverge" if kind == "growing" else f"{n} {COUNTED[kind]}" for kind, n in rest if n
        ]
        title = f"{int(ok.sum())} of {plays} plays converge: {what}"
        title += "".join(f"; {x}" for x in named)
    log_axes(ax, "distance to own target", title)
    rho = prediction.rho[np.isfinite(prediction.rho)]
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


def _batch_per_agent(
    ax, game: Game, trajectory: Trajectory, prediction: Prediction, ok: np.ndarray
) -> str:
    """Per agent, over the converging plays ``ok``: the median distance to own target per
    round, its 10-90% band and the median predicted plateau.

    Returns:
        What is drawn, for the title.
    """
    rounds = np.arange(1, trajectory.rounds + 1)
    targets = game.targets
    for k, name in enumerate(n for n in game.schedule.agents if n in targets):
        color = f"C{k}"
        distance = trajectory.distance(name, targets[name])[:, ok]
        if not ok.any():
            continue
        low, median, high = np.quantile(distance, [0.1, 0.5, 0.9], axis=1)
        draw_curve(ax, rounds, median, color, f"{name} median")
        ax.fill_between(
            rounds, np.maximum(low, FLOOR), np.maximum(high, FLOOR), color=color, alpha=0.2
        )
        plateau = float(np.median(np.linalg.norm(prediction.residual[name][ok], axis=-1)))
        draw_plateau(ax, plateau, color, f"{name} predicted median ({plateau:.3g})")
    return "median, 10-90% band"


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
