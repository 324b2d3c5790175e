"""Tests for misalign.experiments.lsa_study: trained-LSA plays land on the theory's equilibrium."""

import numpy as np

from misalign.agents.train import train
from misalign.config import TrainConfig
from misalign.experiments.lsa_study import GEOMETRIES, lsa_study_figure, play_config, run_lsa_study


def test_trained_plays_match_the_extracted_gamma_theory(tmp_path):
    checkpoints = {}
    for name, spectrum in GEOMETRIES.items():
        config = TrainConfig(d=4, n=20, spectrum=spectrum, steps=300, batch=256, eval_every=300)
        train(config, tmp_path / name)
        checkpoints[name] = tmp_path / name / "checkpoint.pt"
    rows = run_lsa_study(checkpoints, seeds=3, gaps=(0.0, 1.0, 3.0))
    for row in rows:
        for agent in ("A", "B"):
            assert row[agent]["max_relative_error"] < 1e-3  # the Done-when bound
            np.testing.assert_allclose(
                row[agent]["simulated"], row[agent]["predicted_extracted"], rtol=1e-6, atol=1e-9
            )
    residuals = [np.mean(r["B"]["simulated"]) for r in rows if r["geometry"] == "isotropic"]
    assert residuals[0] < 1e-9 and residuals[1] < residuals[2]  # grows with the gap
    assert len(lsa_study_figure(rows).axes) == len(GEOMETRIES)


def test_lsa_and_ideal_plays_share_their_prompts():
    spectrum = GEOMETRIES["anisotropic"]
    from misalign.api import setup

    trained = play_config("lsa", "unused.pt", spectrum, 1.0, 3)
    ideal = setup(play_config("gd", "unused.pt", spectrum, 1.0, 3))
    assert trained.agents["A"].target == ideal.configs[0].agents["A"].target


def test_the_figure_draws_simulation_as_markers_over_theory_lines():
    """The simulation was a line lying exactly on the theory's, which could not be seen."""
    rows = [
        {"geometry": "isotropic", "gap": gap}
        | {
            name: {
                "simulated": [gap, 1.1 * gap],
                "predicted_extracted": [gap, 1.1 * gap],
                "predicted_optimal": [0.9 * gap, gap],
            }
            for name in ("A", "B")
        }
        for gap in (0.0, 1.0, 2.0)
    ]
    (ax,) = lsa_study_figure(rows).axes
    assert len(ax.containers) == 2  # A and B: markers with standard-deviation error bars
    for container in ax.containers:
        markers = container.lines[0]
        assert container.has_yerr and container.get_label().endswith("trained LSA play")
        assert markers.get_linestyle() == "None" and markers.get_marker() == "o"
    theory = [line for line in ax.get_lines() if "theory" in line.get_label()]
    assert len(theory) == 4
    for line in theory:
        assert line.get_linestyle() in ("--", ":") and line.get_marker() == "None"
