"""A play's verdict for a figure's title: what its outputs did first where the theory's verdict
could be contradicted (``misalign.model.observe``)."""

from __future__ import annotations

from misalign.api import Game
from misalign.model.agent import black_boxes
from misalign.model.observe import CLASSES, CYCLE, FIXED, GROWING, classify
from misalign.model.play import Trajectory
from misalign.model.theory import Prediction

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
