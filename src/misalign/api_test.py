"""Tests for misalign.api: the Python API."""

import re

import numpy as np
import pytest

from misalign.api import predict, setup, simulate
from misalign.config import ConfigError, parse_config
from misalign.outputs.report import report

CONFIG = {
    "seed": 3,
    "d": 3,
    "rounds": 60,
    "agents": {
        "A": {"n": 6, "spectrum": [1.0, 0.5, 2.0], "rotate": True, "noise": 0.1},
        "B": {"n": 5, "preconditioner": "identity", "eta": 0.4, "target": [0.0, 1.0, 0.0]},
    },
}


def test_same_config_same_play_bit_for_bit():
    config = parse_config(CONFIG)
    a, b = simulate(setup(config)), simulate(setup(config))
    assert a.turns.tobytes() == b.turns.tobytes()


def test_batch_member_equals_the_single_run_of_its_seed():
    config = parse_config(CONFIG)
    batch = setup(config, seeds=[7, 3, 11])
    together = simulate(batch)
    alone = simulate(setup(config.model_copy(update={"seed": 11})))
    np.testing.assert_allclose(together.turns[:, 2], alone.turns[:, 0], rtol=1e-13, atol=1e-15)
    assert predict(batch).rho.shape == (3,)


def test_batch_of_different_configs():
    configs = [parse_config(CONFIG | {"seed": s}) for s in (1, 2)]
    configs.append(parse_config({**CONFIG, "agents": {**CONFIG["agents"], "B": {"n": 9}}}))
    game = setup(configs)
    assert game.agents["B"].gamma.shape == (3, 3, 3)
    with pytest.raises(ValueError, match="a batch needs one d"):
        setup(
            [configs[0], parse_config({**CONFIG, "d": 2, "agents": {"A": {"n": 2}, "B": {"n": 2}}})]
        )


# Composed agents (attacker, defence, sampling): the review's cases, each checked against a
# simulation written here in plain numpy from the prompts the report exposes, not against the
# package's theory or play engine.

CASE = {  # the review's case: seed 11, d = 4
    "seed": 11,
    "d": 4,
    "rounds": 300,
    "agents": {
        "A": {"n": 12, "noise": 0.3, "rotate": True, "steps_per_turn": 2},
        "B": {"n": 10, "noise": 0.4, "eta": 0.6},
    },
}


def _config(attack=None, defence=None, **agents):
    data = {**CASE, "agents": {k: dict(v) for k, v in CASE["agents"].items()}}
    for name, extra in agents.items():
        data["agents"][name] |= extra
    if attack:
        data["attack"] = {"agent": "B", **attack}
    if defence:
        data["defence"] = {"agent": "A", **defence}
    return parse_config(data)


def _step(agent, k=1):
    """``w -> k`` gradient steps on the agent's prompt, from the report's ``X``, ``y``,
    ``gamma``."""
    X, y, G = (np.array(agent[key]) for key in ("X", "y", "gamma"))

    def f(w):
        for _ in range(k):
            w = w - G @ X.T @ (X @ w - y) / len(y)
        return w

    return f


def _run(config, seeds=(11,)):
    game = setup(config, seeds=list(seeds))
    trajectory = simulate(game)
    prediction = predict(game)
    return game, prediction, [report(game, prediction, trajectory, k) for k in range(len(seeds))]


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_decoy_against_a_predictive_victim_is_not_called_a_success(seed):
    """Case 1: the victim refuses, answers its own least-squares estimate; B then answers
    that constant, so B ends off target, as the verdict must say."""
    config = _config({"method": "decoy"}, {"method": "predict"}).model_copy(update={"seed": seed})
    _, _, (data,) = _run(config, [seed])
    assert data["defence"]["refused_at"] is not None
    A, B = data["agents"]["A"], data["agents"]["B"]
    w_hat = np.linalg.pinv(np.array(A["X"])) @ np.array(A["y"])  # A's constant answer
    v = _step(B)(w_hat)  # B's answer to it, on its relabelled prompt
    np.testing.assert_allclose(data["outputs"]["A"][-1], w_hat, atol=1e-12)
    np.testing.assert_allclose(data["outputs"]["B"][-1], v, atol=1e-12)
    np.testing.assert_allclose(data["prediction"]["B"], v, atol=1e-10)
    distance = np.linalg.norm(v - np.array(B["target"]))
    assert distance > 0.05 and data["prediction"]["distance"]["B"] == pytest.approx(distance)
    p = data["prediction"]
    assert p["on_target"]["B"] is False and p["one_sided"] != "B" and data["agreement"]["holds"]
    before = report(*(lambda g: (g, predict(g)))(setup(config)))  # theory: before any play
    assert "predictive victim keeps reading" in before["prediction"]["scope"]


def _gray_box_play(data, beta=1.0, scale=1.0):
    """The gray-box decoy against a (damped) victim, re-implemented: probes, a least-squares
    fit of the victim's answers, the decoy target, honest steps on the relabelled prompt."""
    A, B = data["agents"]["A"], data["agents"]["B"]
    f_A, k_A = _step(A, 2), None
    XB, GB, wB = np.array(B["X"]), np.array(B["gamma"]), np.array(B["target"])
    d, n = len(wB), len(XB)
    H_B = GB @ XB.T @ XB / n
    v, u, pairs, out = np.zeros(d), None, [], []
    for t in range(data["rounds_played"]):
        new = f_A(v)
        u = new if u is None else (1 - beta) * u + beta * new
        if pairs and len(pairs[-1]) == 1:
            pairs[-1].append(u)
        if t <= d:  # probe turns
            v = wB + scale * np.eye(d + 1)[t][:d]
            pairs.append([v])
        else:
            if k_A is None:
                P = np.array([p for p, _ in pairs])
                U = np.array([a for _, a in pairs])
                coef = np.linalg.lstsq(np.c_[P, np.ones(d + 1)], U, rcond=None)[0]
                A_fit, c_fit = coef[:d].T, coef[d]
                M = (np.eye(d) - H_B) @ A_fit
                w_t = np.linalg.solve(H_B, (np.eye(d) - M) @ wB - (np.eye(d) - H_B) @ c_fit)
                k_A = XB @ w_t
            v = u - GB @ XB.T @ (XB @ u - k_A) / n
        out.append((u.copy(), v.copy()))
    return out


def test_gray_box_decoy_against_damping_is_predicted_with_the_map_it_fitted():
    """Case 1 (gray box, damping): the damped victim is not memoryless, the fit is off and B
    misses its target; the prediction (of the decoy really fitted, with the damped map)
    says by how much."""
    config = _config({"method": "decoy", "knowledge": "gray-box"}, {"method": "damping"})
    _, _, (data,) = _run(config)
    mine = _gray_box_play(data, beta=0.5)
    np.testing.assert_allclose(data["outputs"]["A"][-1], mine[-1][0], atol=1e-9)
    np.testing.assert_allclose(data["outputs"]["B"][-1], mine[-1][1], atol=1e-9)
    np.testing.assert_allclose(data["prediction"]["B"], mine[-1][1], atol=1e-8)
    miss = np.linalg.norm(mine[-1][1] - np.array(data["agents"]["B"]["target"]))
    assert miss > 1e-3 and data["prediction"]["distance"]["B"] == pytest.approx(miss, rel=1e-6)
    assert data["prediction"]["on_target"]["B"] is False


def _noisy_limit(data, sigma_A=0.0, sigma_B=0.0, beta=1.0, plays=20000, rounds=400):
    """Many independent noisy plays of the two maps (A damped by ``beta``), vectorised over
    plays; returns A's and B's outputs at the last round, ``(plays, d)`` each."""
    A, B = data["agents"]["A"], data["agents"]["B"]
    f_A, f_B = _step(A, 2), _step(B)
    d = len(A["target"])
    rng = np.random.default_rng(0)
    u = np.zeros((plays, d))
    v = np.zeros((plays, d))
    for t in range(rounds):
        new = _batched(f_A, v) + sigma_A * rng.standard_normal((plays, d))
        u = new if t == 0 else (1 - beta) * u + beta * new
        v = _batched(f_B, u) + sigma_B * rng.standard_normal((plays, d))
    return u, v


def _batched(f, W):
    """An affine ``f`` applied to every row of ``W`` (read off ``f`` at 0 and the basis)."""
    d = W.shape[1]
    c = f(np.zeros(d))
    A = np.stack([f(e) - c for e in np.eye(d)], axis=1)
    return W @ A.T + c


@pytest.mark.parametrize(
    "attack,defence,noise",
    [
        ({"method": "decoy"}, None, {"B": {"sampling_std": 0.05}}),  # case 3
        (None, {"method": "damping"}, {"A": {"sampling_std": 0.05}}),  # case 4
    ],
)
def test_sampled_agents_keep_their_noise_under_attack_and_damping(attack, defence, noise):
    """Cases 3 and 4: a sampled attacker, a sampled damped victim; the predicted stationary
    covariance matches Monte Carlo of the same maps with the same noise."""
    config = _config(attack, defence, **noise)
    _, prediction, (data,) = _run(config)
    sigma_A = noise.get("A", {}).get("sampling_std", 0.0)
    sigma_B = noise.get("B", {}).get("sampling_std", 0.0)
    u, v = _noisy_limit(data, sigma_A, sigma_B, beta=0.5 if defence else 1.0)
    covariance = data["prediction"]["covariance"]
    assert covariance is not None
    for name, samples in (("A", u), ("B", v)):
        empirical = np.cov(samples.T)
        predicted = np.array(covariance[name])
        np.testing.assert_allclose(samples.mean(axis=0), data["prediction"][name], atol=3e-3)
        assert np.abs(empirical - predicted).max() <= 0.05 * np.abs(predicted).max()
    spread = np.array(data["outputs"]["B"][-100:]).std(axis=0)
    assert (spread > 1e-3).all()  # the play itself is noisy, not silently noise-free


def test_gray_box_decoy_against_a_sampled_victim_carries_its_fit_error():
    """Case 5: the probes are answered with noise, so the fitted decoy misses; the
    prediction is of the decoy really fitted, and B's time average sits where it says."""
    config = _config({"method": "decoy", "knowledge": "gray-box"}, A={"sampling_std": 0.01})
    config = config.model_copy(update={"rounds": 4000})
    game, prediction, (data,) = _run(config)
    attacker = game.agents["B"]
    A_fit, c_fit = attacker.fitted.A[0], attacker.fitted.c[0]
    B = data["agents"]["B"]
    XB, GB, wB = np.array(B["X"]), np.array(B["gamma"]), np.array(B["target"])
    d, n = len(wB), len(XB)
    H_B = GB @ XB.T @ XB / n
    M = (np.eye(d) - H_B) @ A_fit
    w_t = np.linalg.solve(H_B, (np.eye(d) - M) @ wB - (np.eye(d) - H_B) @ c_fit)
    f_A, f_B = _step(data["agents"]["A"], 2), (lambda u: u - GB @ XB.T @ (XB @ u - XB @ w_t) / n)
    v = np.zeros(d)
    for _ in range(5000):  # the mean play with the decoy it fitted
        v = f_B(f_A(v))
    np.testing.assert_allclose(data["prediction"]["B"], v, atol=1e-9)
    average = np.array(data["outputs"]["B"][1000:]).mean(axis=0)
    assert np.linalg.norm(average - v) < 0.01  # ~3000 noisy rounds around the mean
    miss = np.linalg.norm(v - wB)
    assert miss > 0.005 and data["prediction"]["distance"]["B"] == pytest.approx(miss)
    assert data["prediction"]["on_target"]["B"] is False


def test_more_gray_box_probes_average_a_sampled_victims_noise_out_of_the_fit():
    """Case 5, the remedy: each probe point answered m times shrinks the fit's error, and so
    B's miss, about as 1 / sqrt(m) (the prediction, checked above, carries the miss)."""
    d = CASE["d"]
    miss = {}
    for turns in (d + 1, 64 * (d + 1)):
        attack = {"method": "decoy", "knowledge": "gray-box", "probe_turns": turns}
        config = _config(attack, A={"sampling_std": 0.01}).model_copy(update={"rounds": 600})
        game = setup(config, seeds=range(20))
        simulate(game)
        prediction = predict(game)
        miss[turns] = np.linalg.norm(prediction.residual["B"], axis=-1).mean()
        assert game.agents["B"].probe_turns == turns
    assert miss[64 * (d + 1)] < 0.25 * miss[d + 1]  # 1/sqrt(64) = 0.125 in expectation


@pytest.mark.parametrize(
    "attack,message",
    [
        ({"method": "decoy", "knowledge": "gray-box", "probe_turns": 3}, "at least d + 1 = 5"),
        ({"method": "decoy", "probe_turns": 9}, "applies to the gray-box decoy only"),
    ],
)
def test_probe_turns_are_checked(attack, message):
    with pytest.raises(ConfigError, match=f"^attack.probe_turns: .*{re.escape(message)}"):
        _config(attack)


# A batch is sampled and built a group of plays at a time (issue 12): each play's prompts,
# preconditioners and turn maps are still those of its single run, bit for bit.

HUGE = [0, 1, 2**32 - 1, 2**32, 2**40 + 3, 2**63, 2**64 - 1]


def _exact(game, alone, play):
    """Play ``play`` of ``game`` equals the one play of ``alone``, bit for bit."""
    for name, agent in game.agents.items():
        f, g = agent.affine(), alone.agents[name].affine()
        assert np.array_equal(f.A[play], g.A[0]) and np.array_equal(f.c[play], g.c[0]), name
        assert np.array_equal(agent.gamma[play], alone.agents[name].gamma[0]), name
        for key in ("X", "y", "target", "covariance"):
            mine = getattr(game.prompts[name][play], key)
            assert np.array_equal(mine, getattr(alone.prompts[name][0], key)), (name, key)


@pytest.mark.parametrize(
    "data",
    [
        {"d": 10, "agents": {"A": {"n": 20}, "B": {"n": 20, "rotate": True}}},
        {
            "d": 6,
            "schedule": ["A", "B", "C"],
            "agents": {
                "A": {"n": 6, "spectrum": [1, 0.5, 2, 3, 1, 1], "rotate": True, "noise": 0.1},
                "B": {"n": 1, "preconditioner": "identity", "target": [0.3, 1, -2, 0.7, 0.1, 5]},
                "C": {"n": 5, "preconditioner": "newton", "eta": 0.7, "steps_per_turn": 2},
            },
        },
    ],
)
@pytest.mark.parametrize("chunk", [3, 4096])
def test_a_batch_is_each_seed_alone_bit_for_bit(data, chunk, monkeypatch):
    """Seeds of one or two words; one configuration over seeds, or a list of configurations
    sampled in chunks of 3 plays."""
    import misalign.api as experiment

    monkeypatch.setattr(experiment, "CHUNK", chunk)
    config = parse_config({"rounds": 5, **data})
    seeds = HUGE + list(range(5, 12))
    seeded = setup(config, seeds=seeds)
    listed = setup([config.model_copy(update={"seed": seed}) for seed in seeds])
    for play, seed in enumerate(seeds):
        alone = setup(config.model_copy(update={"seed": seed}))
        _exact(seeded, alone, play)
        _exact(listed, alone, play)


def test_seeds_past_64_bits_are_one_line():
    config = parse_config({"d": 2, "rounds": 3, "agents": {"A": {"n": 3}, "B": {"n": 3}}})
    with pytest.raises(ConfigError, match=r"^seed: the last play's seed 18446744073709551616 "):
        setup(config, seeds=[3, 2**64])
    with pytest.raises(ConfigError, match="seed"):
        parse_config({"seed": 2**64, "d": 2, "rounds": 3, "agents": {"A": {"n": 3}, "B": {"n": 3}}})


def test_a_batch_of_different_configs_is_each_alone_bit_for_bit(monkeypatch):
    """Plays that differ in n, rotation, spectrum, target, noise, preconditioner and eta."""
    import misalign.api as experiment

    monkeypatch.setattr(experiment, "CHUNK", 7)
    rng = np.random.default_rng(5)
    configs = []
    for k in range(24):
        A = {
            "n": int(rng.choice([1, 2, 4, 7])),
            "rotate": bool(rng.integers(2)),
            "noise": float(rng.choice([0.0, 0.2])),
            "eta": float(rng.uniform(0.2, 1)),
            "preconditioner": str(rng.choice(["identity", "lsa-optimal", "newton"])),
        }
        if rng.integers(2):
            A["spectrum"] = rng.uniform(0.5, 2, 3).tolist()
        if rng.integers(2):
            A["target"] = rng.standard_normal(3).tolist()
        B = {"n": 5, "eta": float(rng.uniform(0.2, 1))}
        seed = HUGE[k % len(HUGE)] - k if HUGE[k % len(HUGE)] >= k else k
        configs.append(
            parse_config({"seed": seed, "d": 3, "rounds": 5, "agents": {"A": A, "B": B}})
        )
    game = setup(configs)
    for play, config in enumerate(configs):
        _exact(game, setup(config), play)
