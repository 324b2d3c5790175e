"""Tests for misalign.plot."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import image  # noqa: E402
from PIL import Image  # noqa: E402

from misalign.config import parse_config  # noqa: E402
from misalign.experiment import predict, setup, simulate  # noqa: E402
from misalign.plot import plot_batch, plot_play  # noqa: E402


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


def test_nothing_finite_to_draw_is_said_not_raised(tmp_path):
    """A play whose every distance overflows draws a note, not a log-scale error."""
    game = setup(parse_config({"d": 2, "rounds": 5, "agents": {"A": {"n": 3}, "B": {"n": 4}}}))
    trajectory = simulate(game)
    trajectory.turns[...] = np.inf
    path = plot_play(game, trajectory, predict(game), tmp_path / "t.png")
    assert "converges" in Image.open(path).text["Description"]
