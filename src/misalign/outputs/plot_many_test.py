"""Tests for misalign.outputs.plot_many: plays of 15, 20 and 50 agents (the networks of
docs/networks.md reach 50) drawn through the real command (the figure written, nothing on
stderr) and here (no warning while drawing; every legend inside its axes and the figure,
every title inside the figure, axes of a readable size, a handful of legend entries, a heat
map of agent x round, the network panel without per-read labels)."""

import matplotlib

matplotlib.use("Agg")

import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from PIL import Image  # noqa: E402

from misalign.api import predict, setup, simulate  # noqa: E402
from misalign.config import parse_config  # noqa: E402
from misalign.outputs.figure import MANY
from misalign.outputs.plot import draw_batch, draw_play, save_figure  # noqa: E402
from misalign.outputs.plot_many import FARTHEST  # noqa: E402


def network_toml(agents: int, shape: str) -> str:
    """A play of ``agents`` gradient agents (d = 3, targets sampled), as a TOML file's text.
    ``ring``: simultaneous rounds, each reading its two neighbours with weights 0.3 and 0.7
    (unequal: the small figure labels each read); ``complete``: simultaneous rounds, each
    reading the uniform mix of all the others; ``order``: turns in order, each reading the
    previous turn (a cycle)."""
    lines = ["seed = 1", "d = 3", "rounds = 60"]
    if shape != "order":
        lines.append('schedule = "simultaneous"')
    for k in range(agents):
        lines += [f"[agents.a{k}]", f"n = {6 + k % 5}"]
        if shape == "ring":
            lines.append(f"reads = {{ a{(k - 1) % agents} = 0.3, a{(k + 1) % agents} = 0.7 }}")
    return "\n".join(lines) + "\n"


CASES = [
    (15, "ring"),
    (20, "complete"),
    pytest.param(50, "complete", marks=pytest.mark.slow),
    pytest.param(50, "order", marks=pytest.mark.slow),
]


def _inside(inner, outer, slack: float = 1.0) -> bool:
    return (
        inner.x0 >= outer.x0 - slack
        and inner.y0 >= outer.y0 - slack
        and inner.x1 <= outer.x1 + slack
        and inner.y1 <= outer.y1 + slack
    )


def _readable(fig, path):
    """Save ``fig`` (``save_figure`` adds the legends) with no warning, then check what a
    reader sees: legends inside their axes and the figure, titles inside the figure, each
    titled axis at least 200 x 150 pixels, no legend of more than ``FARTHEST + 3`` entries."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_figure(fig, path)  # closes it: drawn again on a canvas of its own
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
    assert [str(w.message) for w in caught] == []
    renderer = canvas.get_renderer()
    titled = [ax for ax in fig.axes if ax.get_title()]
    for ax in titled:
        assert ax.bbox.width >= 200 and ax.bbox.height >= 150, ax.get_title()
        assert _inside(ax.title.get_window_extent(renderer), fig.bbox), ax.get_title()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert _inside(box, fig.bbox) and _inside(box, legend.axes.bbox)
        assert len(legend.get_texts()) <= FARTHEST + 3


@pytest.mark.parametrize(("agents", "shape"), CASES)
def test_a_play_of_many_agents_is_drawn_readably(tmp_path, agents, shape):
    game = setup(parse_config(_parsed(network_toml(agents, shape))))
    trajectory, prediction = simulate(game), predict(game)
    fig = draw_play(game, trajectory, prediction)
    own, rate, heat, net = (ax for ax in fig.axes if ax.get_title())
    _readable(fig, tmp_path / "play.png")
    assert f"median over {agents} agents" in own.get_title()
    labels = own.get_legend_handles_labels()[1]
    assert labels[:2] == [f"median over {agents} agents", "10-90% of the agents"]
    named = [label for label in labels if label in game.schedule.agents]
    assert len(named) == FARTHEST  # the farthest from their targets at the last round
    final = {n: trajectory.distance(n, game.targets[n])[-1, 0] for n in game.schedule.agents}
    assert sorted(named, key=final.get, reverse=True) == named
    assert min(final[n] for n in named) >= sorted(final.values())[-FARTHEST]
    (image,) = [a for a in heat.get_children() if isinstance(a, AxesImage)]
    assert image.get_array().shape == (agents, trajectory.rounds)
    texts = [t.get_text() for t in net.texts]
    assert set(game.schedule.agents) <= set(texts)  # every node named
    assert not any(t.replace(".", "").replace(", ", "").isdigit() for t in texts)  # no weights
    assert "who reads whom" in net.get_title()


@pytest.mark.parametrize(("agents", "shape"), CASES[:3])
def test_a_batch_of_many_agents_is_drawn_readably(tmp_path, agents, shape):
    game = setup(parse_config(_parsed(network_toml(agents, shape))), seeds=range(4))
    fig = draw_batch(game, simulate(game), predict(game))
    _readable(fig, tmp_path / "batch.png")
    label = fig.axes[0].get_ylabel().replace("\n", " ")  # wrapped to fit its axis
    assert f"median of {agents} agents' medians" in label


@pytest.mark.parametrize(("agents", "shape"), CASES[:3])
def test_the_command_writes_the_figure_of_many_agents_with_nothing_on_stderr(
    tmp_path, agents, shape
):
    config = tmp_path / "net.toml"
    config.write_text(network_toml(agents, shape))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and done.stderr == ""
    titles = Image.open(out / "trajectory.png").text["Description"]
    assert f"median over {agents} agents" in titles
    assert f"distance to own target by agent and round ({agents} agents)" in titles


def test_up_to_many_agents_keep_a_line_per_agent(tmp_path):
    """``MANY`` agents are drawn as before: a line and a legend entry per agent, each read
    labelled with its weight."""
    game = setup(parse_config(_parsed(network_toml(MANY, "ring"))))
    fig = draw_play(game, simulate(game), predict(game))
    own, _, net = (ax for ax in fig.axes if ax.get_title())
    assert [n for n in own.get_legend_handles_labels()[1] if n in game.schedule.agents] == list(
        game.schedule.agents
    )
    assert {"0.3", "0.7"} <= {t.get_text() for t in net.texts}
    save_figure(fig, tmp_path / "few.png")


def _parsed(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def test_the_heat_map_greys_what_overflowed(tmp_path):
    """A play whose outputs overflow: the heat map masks what is not finite, the panels
    still draw (nothing finite in the rate panel is said, not raised)."""
    game = setup(parse_config(_parsed(network_toml(12, "complete"))))
    trajectory = simulate(game)
    trajectory.turns[30 * len(game.schedule.turns) :] = np.inf  # from round 31 on
    fig = draw_play(game, trajectory, predict(game))
    heat = [ax for ax in fig.axes if "by agent and round" in ax.get_title()][0]
    (image,) = [a for a in heat.get_children() if isinstance(a, AxesImage)]
    assert image.get_array().mask[:, 30:].all() and not image.get_array().mask[:, :30].any()
    save_figure(fig, tmp_path / "inf.png")
