"""Tests for misalign.agents.defence."""

import numpy as np
import pytest

from misalign.api import setup, simulate
from misalign.config import parse_config

BASE = {
    "seed": 0,
    "d": 3,
    "rounds": 150,
    "agents": {
        "A": {"n": 10, "spectrum": [1.0, 0.5, 2.0]},
        "B": {"n": 9, "eta": 0.8},
    },
}


def _config(attack=None, defence=None, **changes):
    data = {**BASE, **changes}
    if attack:
        data["attack"] = {"agent": "B", **attack}
    if defence:
        data["defence"] = {"agent": "A", **defence}
    return parse_config(data)


def _final(config, seeds=range(1), name="A"):
    game = setup(config, seeds=seeds)
    return game, simulate(game).outputs(name)[-1]


@pytest.mark.parametrize("method", ["damping", "monitor"])
def test_damping_and_probing_leave_the_equilibrium_unchanged(method):
    _, plain = _final(_config())
    game, guarded = _final(_config(defence={"method": method}))
    np.testing.assert_allclose(guarded, plain, atol=1e-8)
    _, early_plain = _final(_config(rounds=3))
    _, early_guarded = _final(_config(rounds=3, defence={"method": method}))
    assert not np.allclose(early_plain, early_guarded)  # the transient does change


def test_monitor_rarely_flags_honest_partners():
    game = setup(_config(defence={"method": "monitor"}), seeds=range(200))
    simulate(game)
    assert (game.agents["A"].flagged_at >= 0).mean() <= 0.02


@pytest.mark.parametrize(
    "attack,score,within",
    [
        ({"method": "per-turn"}, "ignore", 5),
        ({"method": "geometry"}, "ignore", 5),
        ({"method": "decoy", "knowledge": "gray-box"}, "change", 6),
    ],
)
def test_monitor_flags_attacks(attack, score, within):
    game = setup(_config(attack=attack, defence={"method": "monitor"}), seeds=range(50))
    simulate(game)
    monitor = game.agents["A"]
    assert (monitor.scores[score] > 1).mean() >= 0.95
    assert np.median(monitor.flagged_at) <= within and (monitor.flagged_at >= 0).mean() >= 0.95


def test_monitor_fits_the_partner_map_in_either_turn_order():
    for schedule in (["A", "B"], ["B", "A"]):
        game = setup(_config(defence={"method": "monitor"}, schedule=schedule, rounds=8))
        simulate(game)
        partner = game.agents["B"].affine()
        np.testing.assert_allclose(game.agents["A"].fitted.A, partner.A, atol=1e-8)
        np.testing.assert_allclose(game.agents["A"].fitted.c, partner.c, atol=1e-8)


def test_an_honest_newton_partner_looks_like_an_attack():
    """A documented limit: H_B = I is what the geometry and per-turn attacks look like too."""
    newton = {**BASE["agents"]["B"], "preconditioner": "newton", "eta": 1.0}
    config = _config(defence={"method": "monitor"}, agents={**BASE["agents"], "B": newton})
    game = setup(config)
    simulate(game)
    assert game.agents["A"].flagged_at[0] >= 0


def test_predictive_victim_walks_away_from_an_attacker():
    game, final = _final(_config(attack={"method": "per-turn"}, defence={"method": "predict"}))
    assert game.agents["A"].refused_at[0] >= 0
    np.testing.assert_allclose(final[0], game.prompts["A"][0].least_squares(), atol=1e-12)
    np.testing.assert_allclose(final[0], game.targets["A"][0], atol=1e-10)  # noise-free, n >= d
