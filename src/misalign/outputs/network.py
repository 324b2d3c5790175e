"""The network panel: who reads whom, with what weight, beside a network's figures."""

from __future__ import annotations

import numpy as np

from misalign.model.play import Schedule, sources
from misalign.model.theory import Prediction
from misalign.outputs.figure import MANY


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
