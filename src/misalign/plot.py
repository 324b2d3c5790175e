"""Figures: each agent's distance to its own target per round, theory drawn beside simulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from misalign.experiment import Game
from misalign.play import Trajectory
from misalign.theory import Prediction

FLOOR = 1e-16
"""Distances below this are drawn at this value (a log axis has no zero)."""


def plot_play(
    game: Game, trajectory: Trajectory, prediction: Prediction, path: str | Path, play: int = 0
) -> Path:
    """Plot ``|s_t^i - w_i*|`` per round for every agent, with the predicted plateau
    ``|e_i|`` as a dashed line of the same colour (MODEL.md section 2).

    Args:
        game: the game that was played.
        trajectory: its trajectory.
        prediction: its prediction.
        path: where to write the figure (format from the suffix).
        play: which play of the batch to draw.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(10, 4.0), layout="constrained")
    rounds = np.arange(1, trajectory.rounds + 1)
    targets = game.targets
    rho = float(prediction.rho[play])
    converges = bool(prediction.converges[play])
    for k, name in enumerate(n for n in game.schedule.agents if n in targets):
        color = f"C{k}"
        distance = trajectory.distance(name, targets[name])[:, play]
        shown = np.isfinite(distance) & (distance < 1e300)
        ax.plot(rounds[shown], np.maximum(distance[shown], FLOOR), color=color, label=name)
        if not converges:
            continue
        plateau = float(np.linalg.norm(prediction.residual[name][play]))
        ax.axhline(
            max(plateau, FLOOR),
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"{name} predicted ({plateau:.3g})",
        )
        error = trajectory.distance(name, prediction.fixed_point[name])[:, play]
        gap.plot(rounds, np.maximum(error, FLOOR), color=color, label=name)
    if converges and rho > 0:
        first = max(trajectory.distance(n, prediction.fixed_point[n])[0, play] for n in targets)
        gap.plot(rounds, np.maximum(first * rho ** (rounds - 1.0), FLOOR), "k:", label="rho^t")
    ax.set(
        yscale="log",
        xlabel="round",
        ylabel="distance to own target",
        title=f"{'converges' if converges else 'diverges'} (rho = {rho:.3g})",
    )
    gap.set(
        yscale="log",
        xlabel="round",
        ylabel="distance to predicted equilibrium",
        title="rate: simulation vs rho^t" if converges else "no equilibrium (rho >= 1)",
    )
    for axis in (ax, gap):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(frameon=False, fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
