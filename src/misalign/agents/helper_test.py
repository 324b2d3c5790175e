"""Tests for misalign.agents.helper: one round (white box), d + 2 rounds (secant), and the
misaligned partner's plateau removed."""

import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.api import predict, setup, simulate
from misalign.config import ConfigError, parse_config
from misalign.experiments.helper_study import rounds_to_target, study_config

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _three(schedule, mode, noise=0.0, seed=4):
    return parse_config(
        {
            "seed": seed,
            "d": 4,
            "rounds": 40,
            "schedule": schedule,
            "agents": {
                "A": {
                    "n": 40,
                    "spectrum": [1.0, 0.1, 0.01, 0.5],
                    "preconditioner": "identity",
                    "eta": 0.5,
                    "noise": noise,
                },
                "B": {"n": 20},
                "H": {"kind": "helper", "serves": "A", "mode": mode},
            },
        }
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 8), kappa=st.sampled_from([10.0, 1e3]))
def test_white_box_helper_lands_the_main_agent_in_one_round(seed, d, kappa):
    config = study_config("white-box helper", d, kappa, seed, rounds=3)
    game = setup(config)
    first = simulate(game).distance("A", game.targets["A"])[0, 0]
    assert first < 1e-8 * max(1.0, np.linalg.norm(game.targets["A"]))


def test_white_box_helper_is_the_newton_step():
    """v_t = u_t - H_A^{-1}(u_t - f_A(u_t)) = H_A^{-1} b_A, the prompt's own solution."""
    config = study_config("white-box helper", 3, 100.0, 1, rounds=4)
    config = config.model_copy(
        update={
            "agents": {**config.agents, "A": config.agents["A"].model_copy(update={"noise": 0.3})}
        }
    )
    game = setup(config)
    trajectory = simulate(game)
    own = game.prompts["A"][0].least_squares()
    np.testing.assert_allclose(trajectory.outputs("H")[:, 0], np.tile(own, (4, 1)), atol=1e-10)
    np.testing.assert_allclose(trajectory.outputs("A")[-1, 0], own, atol=1e-10)


@pytest.mark.parametrize("d", [2, 3, 7, 12, 20])
@pytest.mark.parametrize("kappa", [10.0, 100.0, 1000.0])
def test_secant_helper_takes_d_plus_2_to_d_plus_4_rounds(d, kappa):
    configs = [study_config("secant helper", d, kappa, seed, rounds=2 * d + 6) for seed in range(3)]
    rounds = rounds_to_target(configs, tol=1e-8)
    assert ((d + 2 <= rounds) & (rounds <= d + 4)).all(), rounds
    assert (rounds <= 2 * d + 4).all()


def test_plain_play_needs_thousands_of_rounds():
    for method in ("A alone", "plain alternation"):
        configs = [study_config(method, 3, 1000.0, seed, rounds=3000) for seed in range(3)]
        assert np.isinf(rounds_to_target(configs, tol=1e-8)).all()


@pytest.mark.parametrize("schedule", [["A", "B", "H"], ["A", "H", "B"], ["H", "A", "B"]])
@pytest.mark.parametrize("mode", ["white-box", "secant"])
@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_helper_removes_the_misaligned_plateau(schedule, mode, noise):
    """B -> H -> A, A -> H -> B -> A and H -> A -> B: A ends on its own solution; without the
    helper it sits at the predicted bias."""
    config = _three(schedule, mode, noise)
    game = setup(config)
    trajectory = simulate(game)
    own = game.prompts["A"][0].least_squares()
    assert np.linalg.norm(trajectory.outputs("A")[-1, 0] - own) < 1e-8
    np.testing.assert_allclose(predict(game).fixed_point["A"][0], own, atol=1e-8)
    alone = parse_config(
        {
            **config.model_dump(exclude_none=True),
            "schedule": ["A", "B"],
            "agents": {k: v for k, v in config.model_dump()["agents"].items() if k != "H"},
        }
    )
    plain = setup(alone)
    bias = simulate(plain).distance("A", plain.targets["A"])[-1, 0]
    predicted = np.linalg.norm(predict(plain).residual["A"][0])
    assert bias == pytest.approx(predicted, abs=1e-8) and bias > 0.1


def test_helper_placement_and_invertibility_are_checked():
    config = _three(["A", "B", "H"], "secant")
    detached = {**config.agents, "A": config.agents["A"].model_copy(update={"reads": "B"})}
    detached["B"] = config.agents["B"].model_copy(update={"reads": "A"})  # H reads, nobody listens
    with pytest.raises(ConfigError, match="^agents.H.serves: A must read H, or read an agent"):
        setup(config.model_copy(update={"agents": detached}))
    small = _three(["A", "B", "H"], "white-box")
    agents = {**small.agents, "A": small.agents["A"].model_copy(update={"n": 2})}
    with pytest.raises(ConfigError, match="^agents.H.serves: A's H is singular"):
        setup(small.model_copy(update={"agents": agents}))
    with pytest.raises(ConfigError, match="^agents.H.serves: names no agent with a prompt: 'Z'"):
        parse_config(
            {"d": 2, "rounds": 2, "agents": {"A": {"n": 3}, "H": {"kind": "helper", "serves": "Z"}}}
        )


def test_a_secant_helper_refuses_a_sampled_play():
    """Its fit would carry the noise, and the prediction (of an exact fit) would not hold."""
    data = tomllib.loads((EXAMPLES / "helper.toml").read_text())
    data["agents"]["A"]["sampling_std"] = 0.01
    with pytest.raises(ConfigError, match="^agents.H.mode: the secant helper fits a noise-free"):
        parse_config(data)
    data["agents"]["H"]["mode"] = "white-box"
    assert parse_config(data).agents["H"].mode == "white-box"
