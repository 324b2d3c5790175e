"""Tests for misalign.outputs.figure: what every figure is made of."""

from PIL import Image

from misalign.outputs.figure import new_figure, save_figure

LONG = (
    "observed: a fixed point; predicted from the fitted maps: no equilibrium (rho = 1.05), "
    "and more words than two panels side by side can hold on one line"
)


def test_a_title_wider_than_its_axis_is_wrapped_and_the_png_says_it_whole(tmp_path):
    """A long title is broken into lines that fit its axis (not cut off at the figure's edge
    or written over its neighbour's); the PNG's Description keeps it on one line, as set."""
    fig, (left, right) = new_figure(2, (10, 4.0))
    left.set_title(LONG)
    left.set_ylabel(LONG)
    right.set_title("short")
    path = save_figure(fig, tmp_path / "f.png")
    wrapped = left.get_title()
    assert "\n" in wrapped and wrapped.replace("\n", " ") == LONG
    assert right.get_title() == "short"
    assert left.get_ylabel().replace("\n", " ") == LONG and "\n" in left.get_ylabel()
    renderer = fig.canvas.get_renderer()
    for axis in (left, right):
        width = axis.title.get_window_extent(renderer).width
        assert width <= axis.get_window_extent(renderer).width
    assert left.yaxis.label.get_window_extent(renderer).height <= (
        left.get_window_extent(renderer).height
    )
    assert Image.open(path).info["Description"] == f"{LONG} | short"
