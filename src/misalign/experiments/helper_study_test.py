"""Tests for misalign.experiments.helper_study."""

import numpy as np

from misalign.api import setup
from misalign.experiments.helper_study import METHODS, run_helper_study, study_config


def test_every_method_chases_the_same_target_on_the_same_prompt():
    games = [setup(study_config(m, 3, 100.0, 2, 1)) for m in METHODS]
    for game in games[1:]:
        np.testing.assert_array_equal(game.targets["A"], games[0].targets["A"])
        np.testing.assert_array_equal(game.prompts["A"][0].X, games[0].prompts["A"][0].X)


def test_condition_number_follows_kappa():
    game = setup([study_config("A alone", 4, k, 0, 1) for k in (10.0, 1000.0)])
    cond = np.linalg.cond(game.agents["A"].affine().H)
    assert 5 < cond[0] < 20 and 500 < cond[1] < 2000


def test_study_rows():
    rows = run_helper_study(dims=(2, 3), kappas=(10.0, 100.0), seeds=2, cap=5000)
    assert len(rows) == len(METHODS) * 4
    by = {(r["method"], r["d"], r["kappa"]): r for r in rows}
    assert by["white-box helper", 3, 100.0]["rounds_max"] == 1
    assert by["secant helper", 3, 100.0]["rounds_max"] == 5
    assert by["A alone", 3, 100.0]["rounds_median"] > 1000
