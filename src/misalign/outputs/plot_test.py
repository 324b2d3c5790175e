"""Tests for misalign.outputs.plot."""

import matplotlib

matplotlib.use("Agg")

from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps, image  # noqa: E402
from PIL import Image  # noqa: E402

from misalign.api import predict, setup, simulate  # noqa: E402
from misalign.config import load_config, parse_config  # noqa: E402
from misalign.model.play import sources  # noqa: E402
from misalign.outputs.network import (
    is_network,
    plot_network,
    read_weights,  # noqa: E402
)
from misalign.outputs.plot import draw_batch, draw_play, plot_batch, plot_play  # noqa: E402


def test_plot_writes_a_figure(tmp_path):
    game = setup(parse_config({"d": 2, "rounds": 30, "agents": {"A": {"n": 3}, "B": {"n": 4}}}))
    path = plot_play(game, simulate(game), predict(game), tmp_path / "t.png")
    pixels = image.imread(path)
    assert pixels.shape[0] > 300 and pixels.std() > 0.05  # a drawn figure, not a blank canvas


def test_plot_over_a_batch_draws_bands(tmp_path):
    config = parse_config({"d": 2, "rounds": 30, "agents": {"A": {"n": 3}, "B": {"n": 4}}})
    game = setup(config, seeds=range(10))
    path = plot_batch(game, simulate(game), predict(game), tmp_path / "b.png")
    assert image.imread(path).std() > 0.05


def test_a_batch_whose_rho_agree_to_the_last_bits_draws_its_histogram(tmp_path):
    """A Newton partner and a one-example prompt give every play the same rho up to
    rounding: numpy could not split that range into bins (found by the CLI fuzz test)."""
    agents = {"A": {"n": 1}, "B": {"n": 12, "preconditioner": "newton", "eta": 0.5}}
    game = setup(parse_config({"d": 4, "rounds": 30, "agents": agents}), seeds=range(3, 6))
    prediction = predict(game)
    assert np.ptp(prediction.rho) < 1e-12  # rho = 0.5 in every play, to the last bits
    path = plot_batch(game, simulate(game), prediction, tmp_path / "b.png")
    assert image.imread(path).std() > 0.05


def _slow_growth(rounds: int, seeds=(2, 4, 180, 5)):
    """A partner with a large step: play 2 has rho = 1.036 (the others converge slowly)."""
    agents = {"A": {"n": 12}, "B": {"n": 12, "preconditioner": "identity", "eta": 2.2}}
    game = setup(parse_config({"d": 2, "rounds": rounds, "agents": agents}), seeds=seeds)
    prediction = predict(game)
    assert list(prediction.converges) == [True, True, False, True]
    return game, simulate(game), prediction


def test_a_play_is_never_titled_diverging_while_its_outputs_stay_bounded():
    """rho = 1.036 over 12 rounds: the outputs stay bounded, and the figure says so, the
    theory's verdict beside it as a prediction; over 400 rounds they grow, and the theory's
    ``diverges`` is the title. A batch counts as diverging only the plays that grew."""
    game, trajectory, prediction = _slow_growth(12)
    title = draw_play(game, trajectory, prediction, play=2).axes[0].get_title()
    assert title == "observed: bounded, not settled; theory: no equilibrium (rho = 1.04)"
    batch = draw_batch(game, trajectory, prediction).axes[0].get_title()
    assert "diverge" not in batch and batch.endswith("; 1 bounded, not settled"), batch
    game, trajectory, prediction = _slow_growth(400)
    assert draw_play(game, trajectory, prediction, play=2).axes[0].get_title() == (
        "diverges (rho = 1.04)"
    )
    assert (
        draw_play(game, trajectory, prediction, play=0)
        .axes[0]
        .get_title()
        .startswith("converges (rho = ")
    )
    assert draw_batch(game, trajectory, prediction).axes[0].get_title().endswith("; 1 diverge")
    plt.close("all")


def test_nothing_finite_to_draw_is_said_not_raised(tmp_path):
    """A play whose every distance overflows draws a note, not a log-scale error."""
    game = setup(parse_config({"d": 2, "rounds": 5, "agents": {"A": {"n": 3}, "B": {"n": 4}}}))
    trajectory = simulate(game)
    trajectory.turns[...] = np.inf
    path = plot_play(game, trajectory, predict(game), tmp_path / "t.png")
    assert "converges" in Image.open(path).text["Description"]


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _network(path):
    """The network panel of a play drawn on its own axis: the axis, the drawn edges, and the
    play's game and prediction."""
    game = setup(load_config(path))
    prediction = predict(game)
    fig, ax = plt.subplots()
    plot_network(ax, game.schedule, prediction)
    edges = [p for p in ax.patches if p.get_gid() == "edge"]
    return fig, ax, edges, game, prediction


def test_a_network_play_has_its_network_panel(tmp_path):
    """Five agents in simultaneous rounds: the figure has a third panel, titled with the
    schedule and rho; two agents alternating keep the two panels of before."""
    game = setup(load_config(EXAMPLES / "debate.toml", ["rounds=20"]))
    assert is_network(game.schedule)
    text = Image.open(plot_play(game, simulate(game), predict(game), tmp_path / "n.png"))
    titles = text.text["Description"]
    assert "who reads whom: simultaneous (rho = " in titles
    game = setup(parse_config({"d": 2, "rounds": 5, "agents": {"A": {"n": 3}, "B": {"n": 4}}}))
    assert not is_network(game.schedule)
    path = plot_play(game, simulate(game), predict(game), tmp_path / "t.png")
    assert "who reads whom" not in Image.open(path).text["Description"]


def test_the_network_draws_one_edge_per_read_and_colours_nodes_by_residual():
    """debate.toml is a complete graph on 5 agents: 5 x 4 = 20 reads of positive weight, each
    one arrow; the nodes' colours rank like the predicted residuals |e_i|."""
    fig, ax, edges, game, prediction = _network(EXAMPLES / "debate.toml")
    pairs = {(j, i) for i, reads in game.schedule.turns for j, a in sources(reads) if a > 0}
    assert len(pairs) == 20 and len(edges) == 20 and set(read_weights(game.schedule)) == pairs
    (nodes,) = [c for c in ax.collections if c.get_gid() == "nodes"]
    names = game.schedule.agents
    residual = np.array([np.linalg.norm(prediction.residual[n][0]) for n in names])
    lut = colormaps["viridis"](np.linspace(0, 1, 256))
    colours = nodes.get_facecolors()
    shade = [int(np.argmin(np.abs(lut - c).sum(axis=1))) for c in colours]
    assert len(set(residual.round(6))) == len(names)  # distinct: the ranking is defined
    assert list(np.argsort(shade)) == list(np.argsort(residual))
    assert [t.get_text() for t in ax.texts if t.get_text() in names] == list(names)
    plt.close(fig)


def test_the_network_weights(tmp_path):
    """Weighted reads: one arrow per read of positive weight (a zero weight draws none), the
    weights the edges' labels; the figure names the schedule (a lone agent in simultaneous
    rounds, which would read itself, is refused by the configuration)."""
    agents = {
        "A": {"n": 3, "reads": {"B": 0.5, "C": 0.5}},
        "B": {"n": 4, "reads": {"A": 0.8, "C": 0.2}},
        "C": {"n": 5, "reads": {"A": 1.0, "B": 0.0}},
    }
    config = parse_config({"d": 2, "rounds": 5, "schedule": "simultaneous", "agents": agents})
    game = setup(config)
    fig, ax = plt.subplots()
    plot_network(ax, game.schedule, predict(game))
    assert len([p for p in ax.patches if p.get_gid() == "edge"]) == 5
    assert {"0.5", "0.8", "0.2", "1"} <= {t.get_text() for t in ax.texts}
    plt.close(fig)
    path = plot_play(game, simulate(game), predict(game), tmp_path / "w.png")
    assert image.imread(path).std() > 0.05
    assert is_network(game.schedule)
    assert "who reads whom: simultaneous" in Image.open(path).text["Description"]


def test_a_large_batch_draws_its_quantiles_over_a_stated_subset():
    """Over ``DRAWN`` converging plays, the figure draws every k-th (all converging, spread
    over the batch) and says how many of how many; its quantiles are the batch's within
    about 1% of a quantile level."""
    from misalign.outputs.figure import DRAWN, drawn_plays

    rng = np.random.default_rng(0)
    ok = rng.random(150_000) < 0.9
    drawn = drawn_plays(ok)
    assert len(drawn) <= DRAWN and ok[drawn].all() and drawn[-1] > 0.99 * len(ok) - 20
    values = rng.lognormal(size=len(ok))
    for q in (0.1, 0.5, 0.9):
        level = (values[ok] <= np.quantile(values[drawn], q)).mean()
        assert abs(level - q) < 0.01
    few = ok.copy()
    few[1000:] = False
    assert np.array_equal(drawn_plays(few), np.flatnonzero(few))
