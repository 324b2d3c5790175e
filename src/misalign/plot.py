"""Figures: each agent's distance to its own target per round, theory drawn beside simulation;
for a network of agents (3 or more, weighted reads or simultaneous rounds), who reads whom
beside them; for a batch, the converging plays' quantiles and the spread of ``rho``. A play of
more than ``MANY`` agents is drawn by ``misalign.plot_many`` (quantiles across agents, the
farthest named, a heat map of agent x round), where a line and a legend entry per agent
would not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from misalign.experiment import Game
from misalign.play import Schedule, Trajectory, sources
from misalign.report import converging
from misalign.theory import Prediction

FLOOR = 1e-16
"""Distances below this are drawn at this value (a log axis has no zero)."""
MANY = 8
"""Up to this many agents a figure draws a line (and a legend entry) per agent, and the
network panel names each node inside it and labels each read with its weight."""


def new_figure(columns: int, size: tuple[float, float], rows: int = 1):
    """A figure with ``rows`` x ``columns`` axes, drawn off-screen (Agg).

    Args:
        columns: axes per row.
        size: the figure's width and height in inches.
        rows: rows of axes (more than one: the axes come as a 2-D array).

    Returns:
        ``(figure, axes)``, as ``matplotlib.pyplot.subplots`` gives them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=size, layout="constrained")


def save_figure(fig, path: str | Path) -> Path:
    """Add a legend to every axis that has labelled artists and none yet, write the figure
    (a PNG carries its axes' titles as its ``Description``, so tests can read what it says;
    untitled axes, such as a colour bar's, are left out), close it."""
    import matplotlib.pyplot as plt

    for axis in fig.axes:
        if axis.get_legend() is None and axis.get_legend_handles_labels()[0]:
            axis.legend(frameon=False, fontsize="small")
    path = Path(path)
    titles = " | ".join(title for axis in fig.axes if (title := axis.get_title()))
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
    ``MANY`` agents: ``misalign.plot_many.draw_many``.

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
        from misalign.plot_many import draw_many

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
    if network:
        plot_network(axes[2], game.schedule, prediction, play)
    return fig


def is_network(schedule: Schedule) -> bool:
    """Whether a play is drawn with its network panel: 3 or more agents, a weighted read, or
    simultaneous rounds (two agents alternating are drawn as before, without one)."""
    return len(schedule.agents) >= 3 or schedule.weighted or schedule.simultaneous


def read_weights(schedule: Schedule) -> dict[tuple[str, str], list[float]]:
    """Who reads whom: per pair ``(read, reader)`` with a positive weight, the weight of
    every turn of the reader that reads it (one per turn; an agent taking several turns a
    round may read the same agent more than once), in turn order."""
    edges: dict[tuple[str, str], list[float]] = {}
    for reader, reads in schedule.turns:
        for read, weight in sources(reads):
            if weight > 0:
                edges.setdefault((read, reader), []).append(float(weight))
    return edges


def plot_network(
    ax,
    schedule: Schedule,
    prediction: Prediction,
    play: int = 0,
    rings: dict[str, str] | None = None,
) -> None:
    """The network panel: agents as nodes on a circle (labelled by name; the first at the
    top, then clockwise in order of first turn), an arrow ``j -> i`` for each read of ``j``
    by ``i`` with a positive weight (width by weight; labelled with it, or the weight said
    once under the panel when every read has the same), each node coloured by its predicted
    residual ``|e_i|`` (colour bar; grey for an agent without a target or a play that does
    not converge) and ringed in the agent's colour of the trajectory panels. Titled with the
    schedule (simultaneous, or the turn order) and ``rho``. Arrows carry the gid ``"edge"``
    and the nodes are the axis's one collection (gid ``"nodes"``), so tests can count and
    read them.

    Past ``MANY`` agents the nodes shrink with their number, each name is written beside its
    node, and no read is labelled (the note says the weights' range); ``rings`` then gives
    the agents ringed in a colour (the others thinly in grey).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as Curve

    names = schedule.agents
    many = len(names) > MANY
    size = 1100.0 * min(1.0, MANY / len(names)) ** 2  # a node's area, in points^2
    angle = np.pi / 2 - 2 * np.pi * np.arange(len(names)) / len(names)
    position = {name: (np.cos(a), np.sin(a)) for name, a in zip(names, angle, strict=True)}
    converges = bool(prediction.converges[play])
    residual = {
        name: float(np.linalg.norm(prediction.residual[name][play]))
        for name in names
        if converges and name in prediction.residual
    }
    residual = {name: value for name, value in residual.items() if np.isfinite(value)}
    cmap = colormaps["viridis"]
    norm = None
    if residual:
        high = max(residual.values())
        norm = Normalize(0.0, high if high > 0 else 1.0)  # from 0: no residual is dark
    colors = [cmap(norm(residual[name])) if name in residual else "0.8" for name in names]
    xy = np.array([position[name] for name in names])
    # the ring: the agent's colour in the trajectory panels (agents with a target, in order)
    if rings is None:
        rings = {
            name: f"C{k}" for k, name in enumerate(n for n in names if n in prediction.residual)
        }
    edge_colors = [rings.get(name, "0.5" if many else "k") for name in names]
    widths = [(2.0 if name in rings else 0.5) if many else 3.0 for name in names]
    ax.scatter(
        *xy.T, s=size, c=colors, edgecolors=edge_colors, linewidths=widths, zorder=3, gid="nodes"
    )
    for name, (x, y) in position.items():
        if many:  # beside the node, on the far side from the centre
            ax.text(1.17 * x, 1.17 * y, name, ha="center", va="center", fontsize=6, zorder=4)
            continue
        shade = colors[names.index(name)]
        dark = (
            not isinstance(shade, str)
            and 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
        )
        ax.text(
            x,
            y,
            name,
            ha="center",
            va="center",
            zorder=4,
            fontweight="bold",
            color="w" if dark else "k",
        )
    edges = read_weights(schedule)
    every = {w for weights in edges.values() for w in weights}
    same = len(every) == 1
    shrink = np.sqrt(size) / 2 + 3.5  # from a node's centre to just outside it, in points
    for (read, reader), weights in edges.items():
        width = 0.6 + 3.0 * max(weights)
        style = {
            "arrowstyle": "-|>",
            "mutation_scale": (8 + 3 * max(weights)) * (0.6 if many else 1.0),
            "linewidth": width,
            "color": "0.35",
            "alpha": 0.8 if len(edges) <= 60 else max(0.1, 48 / len(edges)),
            "zorder": 2,
            "gid": "edge",
        }
        if read == reader:  # an agent reading itself: a loop outside its node
            along = np.array(position[read])
            centre, radius = along * 1.34, 0.17
            facing = np.degrees(np.arctan2(*along[::-1])) + 180  # from the loop to the node
            loop = Curve.arc(facing + 55, facing + 305)
            loop = Curve(centre + radius * loop.vertices, loop.codes)
            ax.add_patch(FancyArrowPatch(path=loop, **style))
            label_at = along * 1.62
        else:
            start, end = np.array(position[read]), np.array(position[reader])
            ax.add_patch(
                FancyArrowPatch(
                    start,
                    end,
                    connectionstyle="arc3,rad=0.12",
                    shrinkA=shrink,
                    shrinkB=shrink,
                    **style,
                )
            )
            dx, dy = end - start
            control = (start + end) / 2 + 0.12 * np.array([dy, -dx])  # arc3's control point
            t = 0.7  # the label near the reader: the weights it gives, around its node
            label_at = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * end
        if not same and not many:
            ax.text(
                *label_at,
                ", ".join(f"{w:.2g}" for w in weights),
                fontsize=7,
                ha="center",
                va="center",
                zorder=5,
                bbox={"boxstyle": "round,pad=0.1", "fc": "w", "ec": "none", "alpha": 0.8},
            )
    rho = float(prediction.rho[play])
    order = [name for name, _ in schedule.turns]
    if schedule.simultaneous:
        how = "simultaneous"
    elif len(order) > MANY:  # the first turns, the last, and how many
        how = f"{len(order)} turns {' > '.join(order[:3])} > ... > {order[-1]}"
    else:
        how = "turns " + " > ".join(order)
    ax.set_title(f"who reads whom: {how} (rho = {rho:.3g})")
    note = "arrow j -> i: i reads j; width by weight"
    if same:
        note += f" (every read {every.pop():.2g})"
    elif many and every:
        note += f" ({min(every):.2g} to {max(every):.2g}; not labelled past {MANY} agents)"
    if norm is None:
        note += "\nno equilibrium: nodes not coloured"
    ax.text(0.5, -0.02, note, ha="center", va="top", fontsize=8, transform=ax.transAxes)
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal")
    ax.set_axis_off()
    if norm is not None:
        bar = ax.figure.colorbar(ScalarMappable(norm, cmap), ax=ax, shrink=0.8)
        bar.set_label("predicted residual |e_i| (limit to own target)")


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
    Plays that diverge are counted in the title, not drawn. More than ``MANY`` agents: each
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
        from misalign.plot_many import batch_across_agents

        what = batch_across_agents(ax, game, trajectory, prediction, ok)
    else:
        what = _batch_per_agent(ax, game, trajectory, prediction, ok)
    plays, diverging = len(ok), int((~ok).sum())
    title = f"{int(ok.sum())} of {plays} plays converge: {what}"
    _log_axes(ax, "distance to own target", title + (f"; {diverging} diverge" if diverging else ""))
    rho = prediction.rho[np.isfinite(prediction.rho)]
    spread.hist(rho, bins=min(50, max(5, plays // 5)), range=_rho_range(rho), color="0.5")
    spread.axvline(1.0, color="C3", linestyle="--", linewidth=1, label="rho = 1")
    spread.set(
        xlabel="rho (per round)",
        ylabel="plays",
        title=f"rho over {plays} plays (median {np.median(rho):.3g})"
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
        _curve(ax, rounds, median, color, f"{name} median")
        ax.fill_between(
            rounds, np.maximum(low, FLOOR), np.maximum(high, FLOOR), color=color, alpha=0.2
        )
        plateau = float(np.median(np.linalg.norm(prediction.residual[name][ok], axis=-1)))
        _plateau(ax, plateau, color, f"{name} predicted median ({plateau:.3g})")
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
