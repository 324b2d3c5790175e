"""Figures: each agent's distance to its own target per round, theory drawn beside simulation;
for a batch, the converging plays' quantiles and the spread of ``rho``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from misalign.experiment import Game
from misalign.play import Trajectory
from misalign.report import converging
from misalign.theory import Prediction

FLOOR = 1e-16
"""Distances below this are drawn at this value (a log axis has no zero)."""


def new_figure(columns: int, size: tuple[float, float]):
    """A figure with ``columns`` axes side by side, drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=size, layout="constrained")


def save_figure(fig, path: str | Path) -> Path:
    """Add a legend to every axis that has labelled artists and none yet, write the figure
    (a PNG carries its axes' titles as its ``Description``, so tests can read what it says),
    close it."""
    import matplotlib.pyplot as plt

    for axis in fig.axes:
        if axis.get_legend() is None and axis.get_legend_handles_labels()[0]:
            axis.legend(frameon=False, fontsize="small")
    path = Path(path)
    titles = " | ".join(axis.get_title() for axis in fig.axes)
    metadata = {"Description": titles} if path.suffix.lower() == ".png" else None
    fig.savefig(path, dpi=120, metadata=metadata)
    plt.close(fig)
    return path


def plot_play(
    game: Game,
    trajectory: Trajectory,
    prediction: Prediction,
    path: str | Path,
    play: int = 0,
    also: Prediction | None = None,
) -> Path:
    """Plot one play: ``|s_t^i - w_i*|`` per round for every agent, with the predicted plateau
    ``|e_i|`` as a dashed line of the same colour (docs/theory.md §2), and the distance to
    the predicted equilibrium beside ``rho^t``. ``also``: a second prediction whose plateaus
    are drawn dotted (language-model agents: the prediction of their global fits, beside the
    local one).

    Args:
        game: the game that was played.
        trajectory: its trajectory.
        prediction: its prediction.
        path: where to write the figure (format from the suffix).
        play: which play of the batch to draw.

    Returns:
        The path written.
    """
    fig, (ax, gap) = new_figure(2, (10, 4.0))
    rounds = np.arange(1, trajectory.rounds + 1)
    targets = game.targets
    rho, converges = float(prediction.rho[play]), bool(prediction.converges[play])
    # the right panel: the distance to the prediction's equilibrium, else to the global fit's
    against, what = prediction, "predicted equilibrium"
    if not converges and also is not None and also.converges[play]:
        against, what = also, "the global fit's equilibrium"
    for k, name in enumerate(n for n in game.schedule.agents if n in targets):
        color = f"C{k}"
        _curve(ax, rounds, trajectory.distance(name, targets[name])[:, play], color, name)
        if also is not None and also.converges[play]:
            other = float(np.linalg.norm(also.residual[name][play]))
            _plateau(ax, other, color, f"{name} global fit ({other:.3g})", ":")
        if converges:
            plateau = float(np.linalg.norm(prediction.residual[name][play]))
            _plateau(ax, plateau, color, f"{name} predicted ({plateau:.3g})")
        if against.converges[play]:
            error = trajectory.distance(name, against.fixed_point[name])[:, play]
            _curve(gap, rounds, error, color, name)
    if converges and rho > 0:
        first = max(trajectory.distance(n, prediction.fixed_point[n])[0, play] for n in targets)
        gap.plot(rounds, np.maximum(first * rho ** (rounds - 1.0), FLOOR), "k:", label="rho^t")
    verdict = "converges" if converges else "diverges"
    _log_axes(ax, "distance to own target", f"{verdict} (rho = {rho:.3g})")
    if converges:
        title = "rate: simulation vs rho^t"
    elif against is also:
        title = f"none predicted; the global fit's (rho = {float(also.rho[play]):.3g})"
    else:
        title = "no equilibrium (rho >= 1)"
    _log_axes(gap, f"distance to {what}", title)
    return save_figure(fig, path)


def plot_batch(
    game: Game, trajectory: Trajectory, prediction: Prediction, path: str | Path
) -> Path:
    """Plot a batch of plays (``run --seeds``) as the summary tells it: over the plays that
    converge, the median distance to own target per round with a 10-90% quantile band and
    the median predicted plateau dashed; beside it, the spread of ``rho`` over the plays.
    Plays that diverge are counted in the title, not drawn.

    Returns:
        The path written.
    """
    fig, (ax, spread) = new_figure(2, (10, 4.0))
    rounds = np.arange(1, trajectory.rounds + 1)
    targets = game.targets
    ok = converging(prediction, trajectory)
    for k, name in enumerate(n for n in game.schedule.agents if n in targets):
        color = f"C{k}"
        distance = trajectory.distance(name, targets[name])[:, ok]
        if not ok.any():
            continue
        low, median, high = np.quantile(distance, [0.1, 0.5, 0.9], axis=1)
        _curve(ax, rounds, median, color, f"{name} median")
        ax.fill_between(
            rounds, np.maximum(low, FLOOR), np.maximum(high, FLOOR), color=color, alpha=0.2
        )
        plateau = float(np.median(np.linalg.norm(prediction.residual[name][ok], axis=-1)))
        _plateau(ax, plateau, color, f"{name} predicted median ({plateau:.3g})")
    plays, diverging = len(ok), int((~ok).sum())
    title = f"{int(ok.sum())} of {plays} plays converge: median, 10-90% band"
    _log_axes(ax, "distance to own target", title + (f"; {diverging} diverge" if diverging else ""))
    rho = prediction.rho[np.isfinite(prediction.rho)]
    spread.hist(rho, bins=min(50, max(5, plays // 5)), color="0.5")
    spread.axvline(1.0, color="C3", linestyle="--", linewidth=1, label="rho = 1")
    spread.set(
        xlabel="rho (per round)",
        ylabel="plays",
        title=f"rho over {plays} plays (median {np.median(rho):.3g})",
    )
    return save_figure(fig, path)


def _plateau(ax, level: float, color: str, label: str, style: str = "--") -> None:
    """A dashed horizontal line at a predicted distance (drawn at ``FLOOR`` when below it)."""
    ax.axhline(max(level, FLOOR), color=color, linestyle=style, linewidth=1, label=label)


def _curve(ax, rounds: np.ndarray, values: np.ndarray, color: str, label: str) -> None:
    """A curve over rounds, drawing only its finite values (a diverged play stops)."""
    shown = np.isfinite(values) & (np.abs(values) < 1e300)
    if shown.any():
        ax.plot(rounds[shown], np.maximum(values[shown], FLOOR), color=color, label=label)


def _log_axes(ax, ylabel: str, title: str) -> None:
    """Label the axes; a log scale when there is something to draw, else a note saying so."""
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    if ax.lines:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no finite values to draw", ha="center", transform=ax.transAxes)
