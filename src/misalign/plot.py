"""Figures: each agent's distance to its own target per round, theory drawn beside simulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from misalign.experiment import Game
from misalign.play import Trajectory
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
    """Add a legend to every axis that has labelled artists and none yet, write the figure,
    close it."""
    import matplotlib.pyplot as plt

    for axis in fig.axes:
        if axis.get_legend() is None and axis.get_legend_handles_labels()[0]:
            axis.legend(frameon=False, fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_play(
    game: Game,
    trajectory: Trajectory,
    prediction: Prediction,
    path: str | Path,
    play: int | None = 0,
) -> Path:
    """Plot ``|s_t^i - w_i*|`` per round for every agent, with the predicted plateau
    ``|e_i|`` as a dashed line of the same colour (MODEL.md section 2), and the distance to
    the predicted equilibrium beside ``rho^t``.

    Args:
        game: the game that was played.
        trajectory: its trajectory.
        prediction: its prediction.
        path: where to write the figure (format from the suffix).
        play: which play of the batch to draw; ``None`` draws the mean over all plays
            with a band of one standard deviation (MODEL.md section 5).

    Returns:
        The path written.
    """
    plays = slice(None) if play is None else slice(play, play + 1)
    fig, (ax, gap) = new_figure(2, (10, 4.0))
    rounds = np.arange(1, trajectory.rounds + 1)
    targets = game.targets
    rho = float(prediction.rho[plays].max())
    converges = bool(prediction.converges[plays].all())
    for k, name in enumerate(n for n in game.schedule.agents if n in targets):
        color = f"C{k}"
        distance = trajectory.distance(name, targets[name])[:, plays]
        _curve(ax, rounds, distance, color, name)
        if not converges:
            continue
        plateau = float(np.linalg.norm(prediction.residual[name][plays], axis=-1).mean())
        ax.axhline(
            max(plateau, FLOOR),
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"{name} predicted ({plateau:.3g})",
        )
        error = trajectory.distance(name, prediction.fixed_point[name])[:, plays]
        _curve(gap, rounds, error, color, name)
    if converges and rho > 0 and play is not None:
        first = max(trajectory.distance(n, prediction.fixed_point[n])[0, play] for n in targets)
        gap.plot(rounds, np.maximum(first * rho ** (rounds - 1.0), FLOOR), "k:", label="rho^t")
    over = "" if play is not None else f", mean ± std over {trajectory.turns.shape[1]} plays"
    ax.set(
        yscale="log",
        xlabel="round",
        ylabel="distance to own target",
        title=f"{'converges' if converges else 'diverges'} (rho = {rho:.3g}){over}",
    )
    gap.set(
        yscale="log",
        xlabel="round",
        ylabel="distance to predicted equilibrium",
        title=("rate: simulation vs rho^t" if play is not None else "rate")
        if converges
        else "no equilibrium (rho >= 1)",
    )
    return save_figure(fig, path)


def _curve(ax, rounds: np.ndarray, values: np.ndarray, color: str, label: str) -> None:
    """One play's curve, or the mean of several with a one-standard-deviation band."""
    shown = np.isfinite(values).all(axis=1) & (np.abs(values) < 1e300).all(axis=1)
    values, rounds = values[shown], rounds[shown]
    mean = values.mean(axis=1)
    ax.plot(rounds, np.maximum(mean, FLOOR), color=color, label=label)
    if values.shape[1] > 1:
        std = values.std(axis=1)
        low, high = np.maximum(mean - std, FLOOR), np.maximum(mean + std, FLOOR)
        ax.fill_between(rounds, low, high, color=color, alpha=0.2)
