"""Tests for misalign.agents.attack: every attack lands the attacker exactly on target (1e-8) while
the
victim sits at the predicted biased point."""

import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from misalign.agents.attack import decoy_target
from misalign.api import predict, setup, simulate
from misalign.config import ConfigError, parse_config
from misalign.model.agent import AffineMap
from misalign.outputs.report import report

ATTACKS = [
    {"method": "decoy"},
    {"method": "decoy", "knowledge": "gray-box"},
    {"method": "geometry"},
    {"method": "per-turn"},
]


def attacked_config(rng, d, attack, preconditioner=None, noise=0.0, order=("A", "B")):
    """A random two-agent play in which B attacks A."""
    agents = {}
    for name in ("A", "B"):
        kind = preconditioner or str(rng.choice(["identity", "lsa-optimal"]))
        agents[name] = {
            "n": int(rng.integers(d + 1, 3 * d + 6)),
            "spectrum": rng.uniform(0.3, 2.0, d).tolist(),
            "rotate": bool(rng.integers(2)),
            "preconditioner": kind,
            "eta": float(rng.uniform(0.1, 0.5)),
            "steps_per_turn": int(rng.integers(1, 3)),
            "noise": noise,
        }
    return parse_config(
        {"seed": int(rng.integers(10**6)), "d": d, "rounds": 400, "agents": agents}
        | {"attack": {"agent": "B", **attack}, "schedule": list(order)}
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.integers(1, 5),
    attack=st.sampled_from(ATTACKS),
    noise=st.sampled_from([0.0, 0.2]),
    order=st.sampled_from([("A", "B"), ("B", "A")]),
)
def test_attacker_exact_victim_at_predicted_bias(seed, d, attack, noise, order):
    config = attacked_config(np.random.default_rng(seed), d, attack, noise=noise, order=order)
    game = setup(config)
    prediction = predict(game)
    assume(prediction.rho[0] < 0.95)  # the decoy is exact at a converging equilibrium
    trajectory = simulate(game)
    targets = game.targets
    # The attacker ends on its own target.
    assert trajectory.distance("B", targets["B"])[-1, 0] < 1e-8
    np.testing.assert_allclose(prediction.fixed_point["B"], targets["B"], atol=1e-8)
    # The victim sits at u* = f_A(w_B*), the theory's biased point.
    victim = game.agents["A"].affine()
    biased = victim(targets["B"])
    np.testing.assert_allclose(trajectory.outputs("A")[-1], biased, atol=1e-8)
    np.testing.assert_allclose(prediction.fixed_point["A"], biased, atol=1e-8)
    if noise == 0:  # e_A = -(I - H_A) delta
        delta = targets["A"] - targets["B"]
        e_A = -((np.eye(d) - victim.H) @ delta[..., None])[..., 0]
        np.testing.assert_allclose(trajectory.outputs("A")[-1] - targets["A"], e_A, atol=1e-8)


def test_decoy_target_is_the_model_formula():
    """w~ = H_B^{-1}((I - M_B) w_B* - (I - H_B) H_A w_A*) for a noise-free victim."""
    rng = np.random.default_rng(0)
    d = 4
    H_A, H_B = (np.eye(d) * 0.3 + 0.05 * rng.standard_normal((d, d)) for _ in range(2))
    w_A, w_B = rng.standard_normal(d), rng.standard_normal(d)
    victim = AffineMap((np.eye(d) - H_A)[None], (H_A @ w_A)[None])
    honest = AffineMap((np.eye(d) - H_B)[None], np.zeros((1, d)))
    M_B = (np.eye(d) - H_B) @ (np.eye(d) - H_A)
    expected = np.linalg.solve(H_B, (np.eye(d) - M_B) @ w_B - (np.eye(d) - H_B) @ H_A @ w_A)
    np.testing.assert_allclose(decoy_target(victim, honest, w_B[None])[0], expected, atol=1e-12)


def test_decoy_relabels_the_prompt_and_reports_one_sided():
    config = attacked_config(np.random.default_rng(3), 3, {"method": "decoy"})
    game = setup(config)
    honest = setup(config.model_copy(update={"attack": None}))
    B, B0 = game.prompts["B"][0], honest.prompts["B"][0]
    np.testing.assert_array_equal(B.X, B0.X)
    assert not np.allclose(B.y, B0.y) and np.array_equal(B.target, B0.target)
    data = report(game, predict(game), simulate(game))
    assert data["distance"]["B"] < 1e-8
    assert data["prediction"]["one_sided"] == "B"
    assert data["prediction"]["why"]["B"] == "attack: decoy (white-box)"
    assert data["attack"]["method"] == "decoy"


def test_gray_box_needs_d_plus_one_probe_turns_and_fits_the_victim_exactly():
    d = 4
    config = attacked_config(
        np.random.default_rng(5), d, {"method": "decoy", "knowledge": "gray-box"}
    )
    game = setup(config)
    trajectory = simulate(game)
    attacker = game.agents["B"]
    assert attacker.probe_turns == d + 1
    victim = game.agents["A"].affine()
    np.testing.assert_allclose(attacker.fitted.A, victim.A, atol=1e-9)
    np.testing.assert_allclose(attacker.fitted.c, victim.c, atol=1e-9)
    probes = trajectory.outputs("B")[:d, 0] - game.targets["B"][0]
    np.testing.assert_allclose(probes, np.eye(d))  # the probe directions it chose
    assert report(game, predict(game), trajectory)["attack"]["probe_turns"] == d + 1


@pytest.mark.parametrize(
    "attack,change,message",
    [
        (
            {"method": "decoy"},
            {"n": 2},
            "decoy needs an invertible H_B, got a singular one (n = 2 < d = 4)",
        ),
        ({"method": "per-turn"}, {"n": 3}, "per-turn needs an invertible H_B"),
        ({"method": "geometry"}, {"n": 3}, "geometry needs n_B >= d (n = 3, d = 4)"),
        (
            {"method": "geometry"},
            {"preconditioner": "newton", "eta": 0.5},
            "geometry with a newton agent needs eta = 1 (eta = 0.5)",
        ),
    ],
)
def test_failed_preconditions_name_the_condition(attack, change, message):
    config = attacked_config(np.random.default_rng(1), 4, attack)
    agents = dict(config.agents)
    agents["B"] = agents["B"].model_copy(update=change)
    with pytest.raises(ConfigError, match="^attack.method: " + re.escape(message)):
        setup(config.model_copy(update={"agents": agents}))


def test_geometry_attack_crafts_gamma_s_equal_identity():
    config = attacked_config(np.random.default_rng(2), 3, {"method": "geometry"}, "lsa-optimal")
    game = setup(config)
    B = game.prompts["B"][0]
    np.testing.assert_allclose(game.agents["B"].gamma[0] @ B.second_moment, np.eye(3), atol=1e-10)


def test_gray_box_only_for_decoy_and_attacker_must_exist():
    base = {"d": 2, "rounds": 3, "agents": {"A": {"n": 3}, "B": {"n": 3}}}
    with pytest.raises(ConfigError, match="^attack.knowledge: gray-box applies to the decoy"):
        parse_config(
            base | {"attack": {"agent": "B", "method": "per-turn", "knowledge": "gray-box"}}
        )
    with pytest.raises(ConfigError, match="^attack.agent: names no agent: 'C'"):
        parse_config(base | {"attack": {"agent": "C", "method": "decoy"}})
    three = {**base, "agents": {**base["agents"], "C": {"n": 2}}}
    with pytest.raises(ConfigError, match="^attack: needs a two-agent play"):
        parse_config(three | {"attack": {"agent": "B", "method": "decoy"}})


@pytest.mark.parametrize(
    "change",
    [{"schedule": ["A", "B", "A"]}, {"schedule": ["B", "B", "A"]}],
)
def test_attacks_need_strict_alternation(change):
    base = {"d": 2, "rounds": 3, "agents": {"A": {"n": 3}, "B": {"n": 3}}}
    with pytest.raises(ConfigError, match="^attack: needs strict alternation"):
        parse_config(base | change | {"attack": {"agent": "B", "method": "decoy"}})
    with pytest.raises(ConfigError, match="^defence: needs strict alternation"):
        parse_config(base | change | {"defence": {"agent": "A", "method": "monitor"}})


def test_the_decoy_needs_only_the_victims_answer_at_the_attackers_target():
    """w~ = H_B^{-1}((I - M_B) w_B* - (I - H_B) b_A) = H_B^{-1}(w_B* - (I - H_B) f_A(w_B*)):
    one probe at w_B* would do (a reviewer's observation, checked here)."""
    rng = np.random.default_rng(7)
    d = 4
    victim = AffineMap(
        np.eye(d)[None] - 0.4 * np.eye(d)[None] + 0.05 * rng.standard_normal((1, d, d)),
        rng.standard_normal((1, d)),
    )
    honest = AffineMap(
        0.5 * np.eye(d)[None] + 0.05 * rng.standard_normal((1, d, d)), np.zeros((1, d))
    )
    w_B = rng.standard_normal((1, d))
    one_point = np.linalg.solve(honest.H[0], w_B[0] - honest.A[0] @ victim(w_B)[0])
    np.testing.assert_allclose(decoy_target(victim, honest, w_B)[0], one_point, atol=1e-12)
