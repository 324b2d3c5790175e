"""Tests for misalign.experiments.attack_study."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from misalign.config import parse_config
from misalign.experiments.attack_study import ATTACKS, DEFENCES, plot_study, roc, run_study, summary

CONFIG = {
    "d": 3,
    "rounds": 60,
    "agents": {"A": {"n": 8, "spectrum": [1.0, 0.5, 2.0]}, "B": {"n": 7, "eta": 0.8}},
}


@settings(max_examples=50, deadline=None)
@given(
    honest=st.lists(st.integers(0, 5), min_size=1, max_size=30),
    attacked=st.lists(st.integers(0, 5), min_size=1, max_size=30),
)
def test_auc_is_the_area_under_the_roc_curve(honest, attacked):
    """Mann-Whitney AUC (ties half) = trapezoidal area under the ROC at every threshold."""
    fpr, tpr, auc = roc(np.array(honest, float), np.array(attacked, float))
    assert fpr[-1] == tpr[-1] == 1.0
    assert auc == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_study_measures_every_cell(tmp_path):
    config = parse_config(CONFIG)
    cells, skipped = run_study(config, seeds=12)
    assert not skipped and set(cells) == {(a, d) for a in ATTACKS for d in DEFENCES}
    result = summary(cells, skipped)
    rows = {(r["attack"], r["defence"]): r for r in result["rows"]}
    for attack in ("decoy", "gray-box decoy", "geometry", "per-turn"):
        assert rows[attack, "none"]["attacker_exact_rate"] == 1.0
    for attack in ("gray-box decoy", "geometry", "per-turn"):
        assert rows[attack, "monitor"]["detection_rate"] >= 0.9
        assert rows[attack, "predict"]["victim_distance_mean"] < 1e-8
    assert rows["honest", "none"]["attacker_exact_rate"] == 0.0
    assert "false_alarm_rate" in rows["honest", "monitor"]
    assert set(result["roc_auc"]) == set(ATTACKS) - {"honest"}
    path = plot_study(cells, config, tmp_path / "s.png")
    assert path.stat().st_size > 10_000
    assert Image.open(path).text["Description"].startswith("no defence: victim A (solid)")


def test_infeasible_attacks_are_skipped_with_the_reason():
    small = {**CONFIG, "agents": {**CONFIG["agents"], "B": {"n": 2}}}
    cells, skipped = run_study(parse_config(small), seeds=4)
    assert set(skipped) == {"decoy", "gray-box decoy", "geometry", "per-turn"}
    assert "n = 2 < d = 3" in skipped["decoy"]
    assert ("honest", "monitor") in cells


def test_a_batch_with_some_divergent_plays_finishes_with_strict_json():
    """A's inputs of variance 6 in every direction at ``eta = 1`` (``examples/diverging.toml``):
    the honest play diverges for every seed (``rho`` 1.7 to 9.3 over seeds 0 to 11); with
    variance 6 along one axis only, whether any of a few seeds diverges depends on the draw."""
    diverging = {
        "d": 3,
        "rounds": 300,
        "agents": {
            "A": {"n": 8, "spectrum": [6.0, 6.0, 6.0], "preconditioner": "identity"},
            "B": {"n": 8, "preconditioner": "identity", "eta": 0.5},
        },
    }
    cells, skipped = run_study(parse_config(diverging), seeds=5)
    result = summary(cells, skipped)
    json.dumps(result, allow_nan=False)  # no Infinity or NaN
    assert max(row["diverged"] for row in result["rows"]) > 0
