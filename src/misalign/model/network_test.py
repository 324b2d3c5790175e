"""Tests of networks: weighted reads and simultaneous rounds (docs/theory.md §2), the play
against the round map's fixed point and rate."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.api import predict, setup, simulate
from misalign.config import ConfigError, parse_config
from misalign.model.agent import AffineMap
from misalign.model.play import Schedule, play
from misalign.model.theory import predict as predict_maps
from misalign.model.theory import round_map
from misalign.model.theory_test import KINDS, blind_config


def _agent(rng, d, kinds=KINDS):
    kind = str(rng.choice(kinds))
    return {
        "n": int(rng.integers(max(1, d - 1), 3 * d + 5)),
        "spectrum": rng.uniform(0.2, 3.0, d).tolist(),
        "rotate": bool(rng.integers(2)),
        "preconditioner": kind,
        "eta": float(rng.uniform(0.1, 1.0 if kind == "newton" else 0.9)),
        "noise": float(rng.choice([0.0, 0.3])),
    }


def _mix(rng, others):
    """Random non-negative weights on a random non-empty subset of ``others``, summing to 1."""
    chosen = rng.choice(others, size=int(rng.integers(1, len(others) + 1)), replace=False)
    weights = rng.dirichlet(np.ones(len(chosen)))
    weights[-1] = 1 - weights[:-1].sum()
    return {str(n): float(a) for n, a in zip(chosen, weights, strict=True)}


def network(rng, d, names, reads, simultaneous, rounds=100, kinds=KINDS):
    """A play of random gradient agents; ``reads`` maps each agent to a name or weights."""
    agents = {
        name: _agent(rng, d, kinds) | ({"reads": reads[name]} if name in reads else {})
        for name in names
    }
    return parse_config(
        {
            "seed": int(rng.integers(10**6)),
            "d": d,
            "rounds": rounds,
            "agents": agents,
            "start": rng.standard_normal(d).tolist(),
        }
        | ({"schedule": "simultaneous"} if simultaneous else {})
    )


def ring(N):
    names = [f"a{k}" for k in range(N)]
    return names, {n: {names[k - 1]: 0.5, names[(k + 1) % N]: 0.5} for k, n in enumerate(names)}


def complete(N):
    names = [f"a{k}" for k in range(N)]
    return names, {}  # simultaneous default: the uniform mix of every other agent


def check(config, tol=1e-8):
    """The play's last outputs against the fixed point (relative to its size), and the rate
    measured from the play against ``rho``; ``False`` when the play is too slow to check."""
    game = setup(config)
    prediction = predict(game)
    rho = float(prediction.rho[0])
    if rho >= 0.99:
        return False
    rounds = int(np.ceil(np.log(1e-13) / np.log(max(rho, 1e-3)))) + 10
    trajectory = simulate(game, rounds=rounds)
    names = game.schedule.agents
    fixed = np.concatenate([prediction.fixed_point[n][0] for n in names])
    last = np.concatenate([trajectory.outputs(n)[-1, 0] for n in names])
    assert np.linalg.norm(last - fixed) <= tol * max(1.0, np.linalg.norm(fixed))
    for name in names:
        residual = prediction.fixed_point[name] - game.targets[name]
        np.testing.assert_allclose(prediction.residual[name], residual)
    history = np.concatenate([trajectory.outputs(n)[:, 0] for n in names], axis=1)
    history = np.concatenate([np.tile(game.start[0], len(names))[None], history])
    rate = measured_rate(history, max(np.linalg.norm(fixed), np.abs(history).max()))
    if rate is not None:
        assert rate == pytest.approx(rho, rel=RATE_TOL, abs=1e-6)
    return True


RATE_TOL = 1e-2
"""Relative tolerance of the measured rate."""


def measured_rate(history, scale):
    """The play's contraction per round, from its outputs alone (dynamic mode decomposition):
    the differences ``D_t = s_{t+1} - s_t`` follow ``D_{t+1} = R D_t`` exactly (no fixed point
    and no eigenvalue-1 part enter them), so on the rounds still far above rounding the largest
    eigenvalue of the least-squares ``R`` on their span (truncated where the snapshots stop
    resolving it) is the rate. Robust to the modes of equal modulus a network has (a cycle's
    ``lambda omega^k``) and to close ones, where a ratio of norms is not. ``None`` with fewer
    than 20 such rounds."""
    diffs = np.diff(history, axis=0)
    norms = np.linalg.norm(diffs, axis=1)
    live = np.flatnonzero(norms > 1e5 * 1e-12 * max(1.0, scale))
    if len(live) < 20 or live[0] != 0:
        return None
    last = live[-1] if (np.diff(live) == 1).all() else np.flatnonzero(np.diff(live) != 1)[0]
    weights = 1 / norms[:last]  # every snapshot weighs 1, the pair scaled alike
    X, Y = diffs[:last].T * weights, diffs[1 : last + 1].T * weights
    U, sigma, Vh = np.linalg.svd(X, full_matrices=False)
    keep = sigma > 1e-7 * sigma[0]
    U, sigma, Vh = U[:, keep], sigma[keep], Vh[keep]
    reduced = U.T @ Y @ Vh.T / sigma
    return float(np.abs(np.linalg.eigvals(reduced)).max())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.integers(1, 4),
    N=st.integers(2, 6),
    simultaneous=st.booleans(),
)
def test_weighted_networks_match_the_fixed_point_and_rate(seed, d, N, simultaneous):
    """Random mixing matrices, in order or simultaneous: the play reaches the round map's
    fixed point to 1e-8 of its size, at the rate rho."""
    rng = np.random.default_rng(seed)
    names = [f"a{k}" for k in range(N)]
    reads = {n: _mix(rng, [m for m in names if m != n]) for n in names if rng.integers(4)}
    check(network(rng, d, names, reads, simultaneous))


def test_most_random_networks_converge_so_the_sweep_tests_something():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(20):
        names = [f"a{k}" for k in range(4)]
        reads = {n: _mix(rng, [m for m in names if m != n]) for n in names}
        checked += check(network(rng, 3, names, reads, bool(rng.integers(2))))
    assert checked >= 12


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([ring, complete]))
def test_fifty_agent_ring_and_complete_graph_match_the_theory(seed, shape):
    rng = np.random.default_rng(seed)
    names, reads = shape(50)
    # preconditioners whose steps stay contracting (identity steps may not): rho < 0.99
    config = network(rng, 3, names, reads, True, kinds=["lsa-optimal", "newton"])
    game = setup(config)
    assert len(game.schedule.turns) == 50 and game.schedule.simultaneous
    assert all(len(reads) == (2 if shape is ring else 49) for _, reads in game.schedule.turns)
    assert check(config)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(1, 5))
def test_two_simultaneous_agents_have_the_alternating_fixed_point_at_the_square_root_rate(seed, d):
    """The simultaneous round map [[0, I - H_A], [I - H_B, 0]] squares to the block diagonal
    of the alternating round maps M_A, M_B: the same fixed point, rho the square root (two
    simultaneous rounds do the work of one alternating round)."""
    rng = np.random.default_rng(seed)
    config = network(rng, d, ["A", "B"], {}, simultaneous=False)
    together = config.model_copy(update={"schedule": "simultaneous"})
    alternating, simultaneous = setup(config), setup(together)
    assert simultaneous.schedule.turns == (("A", "B"), ("B", "A"))
    maps = {n: alternating.agents[n].affine() for n in ("A", "B")}
    R, r, _ = round_map(maps, simultaneous.schedule)
    R_alt, _, _ = round_map(maps, alternating.schedule)
    M_A, M_B = maps["A"].A @ maps["B"].A, maps["B"].A @ maps["A"].A
    np.testing.assert_allclose(R[:, :d, :d], 0)
    np.testing.assert_allclose(R[:, :d, d:], maps["A"].A)
    np.testing.assert_allclose(
        R @ R, np.block([[M_A, R[:, :d, d:] * 0], [R[:, d:, :d] * 0, M_B]]), atol=1e-12
    )
    np.testing.assert_allclose(r, np.concatenate([maps["A"].c, maps["B"].c], axis=1))
    p, q = predict(simultaneous), predict(alternating)
    assert p.rho[0] == pytest.approx(np.sqrt(q.rho[0]), rel=1e-6, abs=1e-9)
    assert np.linalg.eigvals(R_alt).shape == np.linalg.eigvals(R).shape
    if q.converges[0]:
        for name in ("A", "B"):
            scale = max(1.0, np.linalg.norm(q.fixed_point[name]))
            np.testing.assert_allclose(p.fixed_point[name], q.fixed_point[name], atol=1e-8 * scale)
        check(together)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(5, 7), null=st.integers(1, 2))
def test_unseen_directions_in_simultaneous_rounds(seed, d, null):
    """Prompts that share a null space: the simultaneous play still converges to the
    start-dependent limit the theory names."""
    config = blind_config(np.random.default_rng(seed), d, ["A", "B", "C"], null)
    config = config.model_copy(update={"schedule": "simultaneous"})
    game = setup(config)
    prediction = predict(game)
    rho = float(prediction.rho[0])
    if rho >= 0.99:
        return
    assert prediction.depends_on_start[0]
    check(config, tol=1e-8)


def test_a_batch_member_is_the_single_run_of_its_seed():
    rng = np.random.default_rng(4)
    names, _ = complete(5)
    reads = {n: _mix(rng, [m for m in names if m != n]) for n in names}
    for simultaneous in (True, False):
        config = network(rng, 3, names, reads, simultaneous, rounds=30)
        batch = setup(config, seeds=[7, 3, 11])
        together = simulate(batch)
        alone = simulate(setup(config.model_copy(update={"seed": 11})))
        np.testing.assert_allclose(together.turns[:, 2], alone.turns[:, 0], rtol=1e-13, atol=1e-15)
        prediction, single = predict(batch), predict(setup(config.model_copy(update={"seed": 11})))
        assert prediction.rho[2] == pytest.approx(single.rho[0], rel=1e-12)


def test_simultaneous_play_reads_the_previous_round():
    """A naive loop: every agent answers the previous round's mixed outputs at once."""
    rng = np.random.default_rng(5)
    batch, d, names = 3, 2, ["A", "B", "C"]
    mixes = {"A": {"B": 0.25, "C": 0.75}, "B": "C", "C": {"A": 0.5, "B": 0.5}}
    schedule = Schedule.build(names, mixes, simultaneous=True)
    maps = {
        n: AffineMap(0.4 * rng.standard_normal((batch, d, d)), rng.standard_normal((batch, d)))
        for n in names
    }

    class Map:
        def __init__(self, f):
            self.f = f

        def start(self, batch):
            pass

        def respond(self, w, turn):
            return self.f(w)

    start = rng.standard_normal((batch, d))
    t = play({n: Map(f) for n, f in maps.items()}, schedule, 6, start)
    s = dict.fromkeys(names, start)
    for k in range(6):
        inputs = {
            n: sum(
                a * s[m]
                for m, a in (mixes[n].items() if isinstance(mixes[n], dict) else [(mixes[n], 1.0)])
            )
            for n in names
        }
        s = {n: maps[n](inputs[n]) for n in names}
        for n in names:
            np.testing.assert_allclose(t.outputs(n)[k], s[n], rtol=1e-13, atol=1e-14)
    R, r, _ = round_map(maps, schedule)
    flat = np.concatenate([start] * 3, axis=1)
    for _ in range(6):
        flat = (R @ flat[..., None])[..., 0] + r
    np.testing.assert_allclose(flat, np.concatenate([s[n] for n in names], axis=1), rtol=1e-12)
    fixed = predict_maps(maps, schedule, {})
    assert fixed.rho.shape == (batch,)


def test_default_reads_of_simultaneous_rounds():
    assert Schedule.build(["A", "B"], simultaneous=True).turns == (("A", "B"), ("B", "A"))
    assert Schedule.build(["A"], simultaneous=True).turns == (("A", "A"),)
    three = Schedule.build(["A", "B", "C"], {"C": {"A": 1.0}}, simultaneous=True)
    assert three.turns == (
        ("A", (("B", 0.5), ("C", 0.5))),
        ("B", (("A", 0.5), ("C", 0.5))),
        ("C", "A"),
    )
    with pytest.raises(ValueError):
        Schedule.build(["A", "B", "A"], simultaneous=True)


BASE = {"d": 2, "rounds": 3, "agents": {"A": {"n": 2}, "B": {"n": 2}, "C": {"n": 2}}}


@pytest.mark.parametrize(
    "reads,message",
    [
        ({"B": 0.6, "C": 0.5}, "agents.A.reads: weights must sum to 1 (got 1.1)"),
        ({"B": 1.1, "C": -0.1}, "agents.A.reads.B: must be a weight in [0, 1] (got 1.1)"),
        ({"B": 0.5, "C": 0.4999}, "agents.A.reads: weights must sum to 1 (got 0.9999)"),
        ({"B": 1.5, "C": -0.5}, "agents.A.reads.B: must be a weight in [0, 1]"),
        ({"C": 1.5, "B": -0.5}, "agents.A.reads.C: must be a weight in [0, 1]"),
        ({"B": 0.5, "Z": 0.5}, "agents.A.reads.Z: names no agent: 'Z'"),
        ({"A": 0.5, "B": 0.5}, "agents.A.reads.A: an agent's weighted read cannot name itself"),
        ({}, "agents.A.reads: names no agent"),
        ({"B": "x"}, "agents.A.reads.B: input should be a valid number"),
        (3, "agents.A.reads: input should be a valid string"),
    ],
)
def test_bad_weighted_reads_are_one_line_naming_the_field(reads, message):
    data = {**BASE, "agents": {**BASE["agents"], "A": {"n": 2, "reads": reads}}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "play",
    [
        {},
        {"schedule": "simultaneous"},
        {"schedule": ["A", "B", "C", "A"]},
        {"agents": {"A": {"n": 2}}},
        {"agents": {"A": {"n": 2}, "B": {"n": 2}}},
    ],
)
def test_a_self_read_is_refused_by_the_command(tmp_path, play):
    """``reads = "A"`` on agent A, in alternating, simultaneous, repeated-turn, lone and
    two-agent plays: one line naming the field, exit 2, as docs/networks.md says."""
    import subprocess
    import sys

    import tomli_w

    data = {**BASE, **play}
    data["agents"] = {**data["agents"], "A": {"n": 2, "reads": "A"}}
    config = tmp_path / "self.toml"
    config.write_text(tomli_w.dumps(data))
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(config), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        "misalign: error: agents.A.reads: an agent cannot read itself (a lone agent does so "
        "without reads)"
    ), done.stderr
    assert not (tmp_path / "o").exists()


def test_weights_within_1e_9_of_one_are_accepted():
    data = {
        **BASE,
        "agents": {**BASE["agents"], "A": {"n": 2, "reads": {"B": 0.3, "C": 0.7 + 5e-10}}},
    }
    assert parse_config(data).agents["A"].reads == {"B": 0.3, "C": 0.7 + 5e-10}


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"schedule": "sim"}, "schedule: got 'sim'; input should be 'simultaneous'"),
        ({"schedule": ["A", 3]}, "schedule.1: input should be a valid string"),
        (
            {
                "schedule": "simultaneous",
                "agents": {"A": {"n": 2}, "B": {"n": 2}},
                "attack": {"agent": "A", "method": "decoy"},
            },
            "attack: needs strict alternation",
        ),
        (
            {
                "schedule": "simultaneous",
                "agents": {"A": {"n": 2}, "B": {"n": 2}},
                "defence": {"agent": "A", "method": "damping"},
            },
            "defence: needs strict alternation",
        ),
        (
            {
                "agents": {
                    "A": {"n": 2, "reads": {"B": 0.5, "C": 0.5}},
                    "B": {"n": 2},
                    "C": {"n": 2},
                },
                "attack": {"agent": "B", "method": "decoy"},
            },
            "attack: needs a two-agent play",
        ),
        (
            {
                "agents": {"A": {"n": 2, "reads": {"B": 1.0}}, "B": {"n": 2}},
                "defence": {"agent": "B", "method": "monitor"},
            },
            "defence: needs strict alternation",
        ),
        (
            {
                "schedule": "simultaneous",
                "agents": {"A": {"n": 2}, "H": {"kind": "helper", "serves": "A"}},
            },
            "agents.H: a helper needs turns in order, not simultaneous rounds",
        ),
        (
            {
                "agents": {
                    "A": {"n": 2, "reads": {"B": 0.5, "H": 0.5}},
                    "B": {"n": 2},
                    "H": {"kind": "helper", "serves": "A"},
                }
            },
            "agents.H: a helper needs single reads; agents.A.reads is weighted",
        ),
    ],
)
def test_features_that_need_one_partner_refuse_networks(extra, message):
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **extra})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_batch_needs_one_schedule_and_one_set_of_reads():
    config = parse_config(BASE)
    with pytest.raises(ValueError, match="a batch needs one"):
        setup([config, config.model_copy(update={"schedule": "simultaneous"})])
    mixed = parse_config(
        {**BASE, "agents": {**BASE["agents"], "A": {"n": 2, "reads": {"B": 0.5, "C": 0.5}}}}
    )
    with pytest.raises(ValueError, match="a batch needs one"):
        setup([config, mixed])


@pytest.mark.parametrize("simultaneous", [False, True])
def test_a_language_model_reads_a_weighted_mix(tmp_path, simultaneous):
    """A language-model agent (a fake server answering ``A w + c``) reading a weighted mix
    of two gradient agents: its prompt shows the one mixed vector, its fitted map is the
    server's, its local refit is confirmed at the mixed input of the predicted equilibrium,
    and the play ends there."""
    from misalign.api import fit
    from misalign.llm.agent import Session
    from misalign.llm.fake_server import FakeServer, affine

    d = 2
    A, c = np.array([[0.5, 0.2], [-0.1, 0.4]]), np.array([1.0, -0.5])
    with FakeServer(affine(A, c)) as server:
        data = {
            "seed": 1,
            "d": d,
            "rounds": 120,
            "agents": {
                "L": {
                    "kind": "llm",
                    "model": "fake",
                    "base_url": server.base_url,
                    "api_key_env": "",
                    "n": 8,
                    "reads": {"B": 0.25, "C": 0.75},
                },
                "B": {"n": 8, "reads": "L"},
                "C": {"n": 6, "reads": {"L": 0.5, "B": 0.5}},
            },
        } | ({"schedule": "simultaneous"} if simultaneous else {})
        session = Session(str(tmp_path / "s.sqlite"))
        try:
            game = setup(parse_config(data), seeds=range(2), session=session)
            fits = fit(game)
            trajectory = simulate(game)
            prediction = predict(game)
        finally:
            session.close()
    fitted = fits.agents["L"]
    # exact: the global prediction is checked at its mixed input and holds (no refit)
    assert fitted.local is None and fitted.iterations == 0 and fitted.confirmed.all()
    assert prediction.converges.all()
    for name in ("L", "B", "C"):
        final = trajectory.outputs(name)[-1]
        assert np.abs(final - prediction.fixed_point[name]).max() < 1e-6


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    order=st.sampled_from([["A", "B"], ["A", "B", "C"], ["B", "A", "B"], ["A", "C", "B", "C"]]),
    simultaneous=st.booleans(),
    weighted=st.booleans(),
)
def test_the_agents_that_feed_back_are_the_round_maps_live_columns(
    seed, order, simultaneous, weighted
):
    rng = np.random.default_rng(seed)
    names = sorted(set(order))
    if simultaneous:
        order = names
    reads = {}
    if weighted and len(names) > 2:
        reads = {n: _mix(rng, [m for m in names if m != n]) for n in names if rng.integers(2)}
    schedule = Schedule.build(order, reads, simultaneous)
    d = 2
    maps = {
        n: AffineMap(rng.standard_normal((1, d, d)), rng.standard_normal((1, d))) for n in names
    }
    R, _, _ = round_map(maps, schedule)
    live = [n for k, n in enumerate(schedule.agents) if (R[0, :, k * d : (k + 1) * d] != 0).any()]
    assert list(schedule.feeds_back) == live


def test_feeds_back_of_simple_schedules():
    assert Schedule.build(["A", "B"]).feeds_back == ("B",)
    assert Schedule.build(["A", "B"], simultaneous=True).feeds_back == ("A", "B")
    assert Schedule.build(["A", "B", "C"]).feeds_back == ("C",)
    assert Schedule.build(["A", "B", "C"], {"B": {"C": 0.5, "A": 0.5}}).feeds_back == ("C",)
    assert Schedule.build(["A", "B", "C"], {"A": {"B": 0.5, "C": 0.5}}).feeds_back == ("B", "C")
    # C's first turn reads B's start, but C's second turn overwrites it before anyone reads it
    lost = {"A": "C", "B": "A", "C": {"B": 0.5, "A": 0.5}}
    assert Schedule.build(["A", "C", "B", "C"], lost).feeds_back == ("C",)
    assert Schedule.build(["A", "B"], {"A": {"B": 0.0, "A": 1.0}}).feeds_back == ("A",)


def test_the_pooled_solution_is_least_squares_over_every_prompt():
    from misalign.outputs.report import network_report

    rng = np.random.default_rng(6)
    names, _ = complete(4)
    config = network(rng, 3, names, {}, True)
    game = setup(config)
    result = network_report(game, predict(game))
    prompts = [game.prompts[n][0] for n in names]
    X = np.vstack([p.X / np.sqrt(p.n) for p in prompts])
    y = np.concatenate([p.y / np.sqrt(p.n) for p in prompts])
    np.testing.assert_allclose(result["pooled"], np.linalg.lstsq(X, y, rcond=None)[0], atol=1e-10)
    assert result["feeds_back"] == names
    assert set(result["distance"]) == set(names) and result["spread"] >= 0


def test_a_debate_of_small_identity_steps_ends_at_the_pooled_least_squares():
    """With the same preconditioner for every agent (identity) and small steps, the
    complete-graph debate ends at the pooled least-squares solution, at a distance
    proportional to eta (docs/theory.md §2, small steps)."""
    from misalign.outputs.report import network_report

    names = [f"a{k}" for k in range(5)]
    distances = []
    for eta in (1e-3, 2e-3):
        agents = {n: {"n": 6, "preconditioner": "identity", "eta": eta} for n in names}
        config = parse_config(
            {"seed": 2, "d": 3, "rounds": 1, "schedule": "simultaneous", "agents": agents}
        )
        game = setup(config)
        prediction = predict(game)
        assert prediction.converges[0]
        result = network_report(game, prediction)
        distances.append(max(result["distance"].values()))
        assert result["spread"] <= max(result["distance"].values()) * 2
    assert distances[0] < 1e-2
    assert distances[1] == pytest.approx(2 * distances[0], rel=0.05)


@pytest.mark.parametrize("simultaneous", [False, True])
def test_sampled_network_spread_matches_monte_carlo(simultaneous):
    """docs/theory.md §6 on a weighted network: the mean goes to the fixed point, the spread
    to the Lyapunov solution of the round's noise (in simultaneous rounds each agent's noise
    stays in its own block); 10,000 plays."""
    from misalign.model.theory_test import _sampled

    data = {
        "seed": 5,
        "d": 2,
        "rounds": 60,
        "agents": {
            "A": {"n": 6, "sampling_std": 0.3, "noise": 0.1, "eta": 0.8, "reads": "C"},
            "B": {"n": 6, "sampling_std": 0.1, "eta": 0.8, "reads": {"A": 0.3, "C": 0.7}},
            "C": {"n": 6, "sampling_std": 0.2, "eta": 0.8, "reads": {"A": 0.5, "B": 0.5}},
        },
    } | ({"schedule": "simultaneous"} if simultaneous else {})
    game = _sampled(data, 10_000)
    prediction = predict(game)
    assert prediction.rho[0] < 0.8
    trajectory = simulate(game)
    for n in ("A", "B", "C"):
        mean, sigma = prediction.fixed_point[n][0], prediction.covariance[n][0]
        empirical = trajectory.outputs(n)[-1]
        sem = np.sqrt(np.diag(sigma) / len(empirical))
        assert (np.abs(empirical.mean(axis=0) - mean) < 5 * sem).all()
        np.testing.assert_allclose(
            np.cov(empirical.T), sigma, rtol=0.06, atol=0.06 * np.abs(sigma).max()
        )


def _unseen_network(rng, N, d):
    """Two agents reading each other, or a ring of three (each reads the next), simultaneous,
    ``n = 1 .. d - 1`` examples each: with ``sum n < d`` the round map has the eigenvalue -1 or
    the cube roots of unity on the directions no prompt sees, which the play never excites."""
    names = [f"a{k}" for k in range(N)]
    agents = {}
    for k, name in enumerate(names):
        kind = str(rng.choice(["identity", "newton", "lsa-optimal"]))
        agents[name] = {
            "n": int(rng.integers(1, d)) if rng.integers(2) else 1,  # often sum n < d
            "preconditioner": kind,
            "eta": float(rng.uniform(0.2, 0.9)),
        } | ({"reads": names[(k + 1) % N]} if N > 2 else {})
    data = {"seed": int(rng.integers(10**6)), "d": d, "rounds": 10, "schedule": "simultaneous"}
    start = rng.standard_normal(d).tolist()
    return parse_config(data | {"agents": agents, "start": start})


@pytest.mark.parametrize("N", [2, 3])
def test_modes_the_play_never_excites_leave_the_verdict_and_rate_to_the_play(N):
    """Seeded sweep over ``d = 2 .. 5``: the verdict and ``rho`` match the rate measured from the
    simulated play's differences (``measured_rate``), including where the whole round map has
    unexcited modes on the unit circle (``rho(R - P_1) = 1`` up to rounding, counted)."""
    rng = np.random.default_rng(N)
    on_circle = checked = 0
    for _ in range(80):
        config = _unseen_network(rng, N, int(rng.integers(2, 6)))
        game = setup(config)
        prediction = predict(game)
        rho = float(prediction.rho[0])
        R, _, _ = round_map(
            {n: game.agents[n].affine() for n in game.schedule.agents}, game.schedule
        )
        on_circle += abs(np.abs(np.linalg.eigvals(R[0])).max() - 1) < 1e-12
        names = game.schedule.agents
        with np.errstate(all="ignore"):
            trajectory = simulate(game, rounds=400)
        history = np.concatenate([trajectory.outputs(n)[:, 0] for n in names], axis=1)
        history = np.concatenate([np.tile(game.start[0], len(names))[None], history])
        rate = measured_rate(history, np.abs(history[np.isfinite(history)]).max())
        if rate is None or 0.98 <= rate <= 1.02:
            continue  # too slow to measure in 400 rounds, or blown up within 20
        assert bool(prediction.converges[0]) == (rate < 1)
        assert rate == pytest.approx(rho, rel=RATE_TOL, abs=1e-6)
        if prediction.converges[0]:
            check(config)
        checked += 1
    assert checked >= 30 and on_circle >= 8
