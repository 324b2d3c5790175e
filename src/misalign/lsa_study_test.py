"""Tests for misalign.lsa_study: trained-LSA plays land on the theory's equilibrium."""

import numpy as np

from misalign.config import TrainConfig
from misalign.lsa_study import GEOMETRIES, play_config, plot_lsa_study, run_lsa_study
from misalign.train import train


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
    assert plot_lsa_study(rows, tmp_path / "s.png").stat().st_size > 10_000


def test_lsa_and_ideal_plays_share_their_prompts():
    spectrum = GEOMETRIES["anisotropic"]
    from misalign.experiment import setup

    trained = play_config("lsa", "unused.pt", spectrum, 1.0, 3)
    ideal = setup(play_config("gd", "unused.pt", spectrum, 1.0, 3))
    assert trained.agents["A"].target == ideal.configs[0].agents["A"].target
