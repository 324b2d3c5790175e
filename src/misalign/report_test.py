"""Tests for misalign.report: the JSON contract."""

import json

import numpy as np
import pytest

from misalign.config import parse_config
from misalign.experiment import predict, setup, simulate
from misalign.experiment_test import CONFIG
from misalign.report import report


def test_report_round_trips_through_json_and_matches_the_arrays():
    game = setup(parse_config(CONFIG))
    prediction, trajectory = predict(game), simulate(game)
    text = json.dumps(report(game, prediction, trajectory))
    data = json.loads(text)
    assert json.dumps(data) == text
    for name in ("A", "B"):
        agent = data["agents"][name]
        p = game.prompts[name][0]
        np.testing.assert_array_equal(agent["X"], p.X)
        np.testing.assert_array_equal(agent["y"], p.y)
        np.testing.assert_array_equal(agent["gamma"], game.agents[name].gamma[0])
        assert len(data["outputs"][name]) == 60 and len(data["outputs"][name][0]) == 3
        final = np.linalg.norm(np.array(data["outputs"][name][-1]) - agent["target"])
        assert data["distance"][name] == pytest.approx(final)
        assert data["distance"][name] == pytest.approx(
            data["prediction"]["distance"][name], abs=1e-8
        )
    assert data["prediction"]["converges"] is True
    assert data["config"]["seed"] == 3 and data["diverged_at"] is None
