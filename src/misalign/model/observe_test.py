"""Tests for misalign.model.observe: every class against plays built independently of the rules, and
the vectorised classifier against a plain loop over plays that follows the rules as stated."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from misalign.api import predict, setup, simulate
from misalign.config import load_config
from misalign.model.agent import AffineMap
from misalign.model.observe import CLASSES, GROWTH, PERIODS, SETTLED, TOL, classify
from misalign.model.play import DIVERGED, Schedule, Trajectory, play

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


class MapAgent:
    """A stateless agent applying a fixed batch of affine maps."""

    def __init__(self, f):
        self.f = f

    def start(self, batch):
        pass

    def respond(self, w, turn):
        return self.f(w)


def _hand(*outputs: np.ndarray) -> Trajectory:
    """A trajectory from each agent's outputs per round, ``(rounds, B, d)``, the agents taking
    one turn each in order; ``diverged_at`` as ``play`` sets it."""
    schedule = Schedule.build([f"A{k}" for k in range(len(outputs))])
    rounds, batch, d = outputs[0].shape
    turns = np.stack(outputs, axis=1).reshape(rounds * len(outputs), batch, d)
    bad = ~(np.abs(turns) <= DIVERGED).all(axis=-1)  # (rows, B); NaN fails too
    diverged_at = np.where(bad.any(axis=0), bad.argmax(axis=0) // len(outputs), -1)
    return Trajectory(schedule, np.zeros((batch, d)), turns, diverged_at)


def _rotation(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _contraction(rng, batch: int, d: int, norm: float) -> AffineMap:
    """Random affine maps whose linear parts have spectral norm ``norm``."""
    A = rng.standard_normal((batch, d, d))
    A *= norm / np.linalg.norm(A, ord=2, axis=(-2, -1))[:, None, None]
    return AffineMap(A, rng.standard_normal((batch, d)))


def test_an_affine_contraction_is_a_fixed_point_at_its_closed_form():
    """Two alternating contractions (``|A| = 0.5``): the tail mean of each agent is the closed
    form ``v* = (I - A_B A_A)^{-1} (A_B c_A + c_B)``, ``u* = A_A v* + c_A``, within 1e-9."""
    rng = np.random.default_rng(0)
    batch, d = 8, 3
    f = {name: _contraction(rng, batch, d, 0.5) for name in ("A", "B")}
    start = rng.standard_normal((batch, d))
    agents = {name: MapAgent(m) for name, m in f.items()}
    observed = classify(play(agents, Schedule.build(["A", "B"]), 6000, start))
    A, B = f["A"], f["B"]
    v = np.linalg.solve(np.eye(d) - B.A @ A.A, B.A @ A.c[..., None] + B.c[..., None])[..., 0]
    u = (A.A @ v[..., None])[..., 0] + A.c
    assert [CLASSES[k] for k in observed.code] == ["fixed point"] * batch
    np.testing.assert_array_equal(observed.period, 1)
    np.testing.assert_allclose(observed.mean["A"], u, rtol=0, atol=1e-9)
    np.testing.assert_allclose(observed.mean["B"], v, rtol=0, atol=1e-9)
    assert (observed.first < 100).all() and (observed.last == 5999).all()
    assert (observed.spread["A"] < 1e-7).all()


@pytest.mark.parametrize("p", range(2, 10))
def test_a_rotation_by_2pi_over_p_is_a_cycle_of_period_p(p):
    """``x_t = c + r (cos 2 pi t / p, sin 2 pi t / p)`` over 40 rounds (exact: the angle is
    taken modulo ``p``): a cycle of period ``p`` judged on the whole periods at the end, mean
    the centre, spread the radius."""
    rounds, radius = 40, np.array([1.0, 3.0, 1e-3])
    angle = 2 * np.pi * (np.arange(rounds) % p) / p
    circle = np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    centre = np.array([0.5, -2.0])
    x = centre + radius[None, :, None] * circle[:, None]  # (rounds, 3, 2)
    observed = classify(_hand(x))
    whole = rounds // p * p
    assert [CLASSES[c] for c in observed.code] == ["cycle"] * 3
    np.testing.assert_array_equal(observed.period, p)
    np.testing.assert_array_equal(observed.first, rounds - whole)
    np.testing.assert_array_equal(observed.last, rounds - 1)
    np.testing.assert_allclose(observed.mean["A0"], np.broadcast_to(centre, (3, 2)), atol=1e-12)
    np.testing.assert_allclose(observed.spread["A0"], radius, rtol=1e-12)


def test_a_period_9_cycle_over_40_rounds_reads_as_a_cycle_in_json_and_in_the_counts():
    """Two agents on period-9 orbits (radii 1 and 2, the second a step behind), beside a
    period-2 play and a constant one: the JSON of the first, and the batch's counts."""
    angle = 2 * np.pi * (2 * np.arange(41) % 9) / 9
    x = np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    two = np.array([[1.0, 0.0], [0.0, 1.0]])[np.arange(41) % 2]
    a = np.stack([x[1:], x[1:], two[1:], np.ones((40, 2))], axis=1)
    b = np.stack([2 * x[:-1], 2 * x[:-1], two[:-1], np.ones((40, 2))], axis=1)
    observed = classify(_hand(a, b))
    data = observed.as_json(0)
    assert data["class"] == "cycle" and data["period"] == 9 and data["tail"] == [4, 39]
    assert set(data["agents"]) == {"A0", "A1"}
    assert data["agents"]["A1"]["spread"] == pytest.approx(2.0)
    assert observed.counts() == {
        "counts": {"fixed point": 1, "cycle": 3, "bounded": 0, "growing": 0, "failed": 0},
        "periods": {"2": 1, "9": 2},
    }


def test_an_expansion_is_growing_finite_or_overflowed():
    """``rho = 1.2`` (a scaled rotation): growing over 100 finite rounds, and by overflow over
    2000 rounds, judged on the last half of the finite rounds."""
    rng = np.random.default_rng(1)
    expand = AffineMap(np.broadcast_to(1.2 * _rotation(0.7), (4, 2, 2)), np.zeros((4, 2)))
    agents = {"A": MapAgent(expand)}
    start = rng.standard_normal((4, 2))
    short = play(agents, Schedule.build(["A"]), 100, start)
    assert (short.diverged_at < 0).all()
    observed = classify(short)
    assert [CLASSES[c] for c in observed.code] == ["growing"] * 4
    assert (observed.first == 50).all() and (observed.last == 99).all()
    long = play(agents, Schedule.build(["A"]), 2000, start)
    stop = long.diverged_at
    assert (stop > 0).all()
    observed = classify(long)
    assert [CLASSES[c] for c in observed.code] == ["growing"] * 4
    np.testing.assert_array_equal(observed.first, stop // 2)
    np.testing.assert_array_equal(observed.last, stop - 1)
    assert np.isfinite(observed.spread["A"]).all()


def test_growing_needs_a_tenfold_rise_that_lasts_to_the_end():
    """Noise of norm about 1 over the first half, then a rise to 100 in the last half, ending
    at 70, 51, 49 or 1 (growing while the last norm is at least half the largest), or a rise
    to only 9.9."""
    rounds = 20
    x = np.random.default_rng(4).uniform(0.5, 1.0, (rounds, 5, 1))
    x[15:-1] *= 100 / x[15:-1].max(axis=0)
    x[-1, :, 0] = [70.0, 51.0, 49.0, 1.0, 9.0]
    x[15:-1, 4] *= 9.9 / 100
    observed = classify(_hand(x))
    assert [CLASSES[c] for c in observed.code] == [
        "growing",
        "growing",
        "bounded",
        "bounded",
        "bounded",
    ]
    assert (observed.first == 10).all() and (observed.last == 19).all()


def test_nan_after_round_k_is_failed_and_the_tail_is_the_last_half_before_it():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (30, 4, 3))
    for play_, k in enumerate((0, 1, 7, 29)):
        x[k:, play_] = np.nan
    observed = classify(_hand(x, rng.uniform(-1, 1, (30, 4, 3))))
    assert [CLASSES[c] for c in observed.code] == ["failed"] * 4
    assert observed.as_json(0)["tail"] is None
    assert observed.as_json(0)["agents"]["A0"] == {"mean": None, "spread": None}
    for play_, k in list(enumerate((0, 1, 7, 29)))[1:]:
        assert observed.as_json(play_)["tail"] == [k // 2, k - 1]
        tail = x[k // 2 : k, play_]
        np.testing.assert_allclose(observed.mean["A0"][play_], tail.mean(axis=0), rtol=1e-14)
        spread = np.sqrt(((tail - tail.mean(axis=0)) ** 2).sum(axis=-1).mean())
        assert observed.spread["A0"][play_] == pytest.approx(spread, rel=1e-12)


def test_nan_caused_by_an_overflow_is_growing_a_nan_before_one_is_failed():
    """Within the round a play diverges: an infinite or huge value in an earlier turn (or the
    same turn) than the first NaN is an overflow; a NaN in an earlier turn is a failure."""
    x, y = np.ones((10, 5, 2)), np.ones((10, 5, 2))
    x[4:, 0], y[4:, 0] = np.inf, np.nan  # inf, then inf - inf in the next turn
    x[4:, 1] = [np.inf, np.nan]  # both in one turn (inf * 0)
    x[4:, 2], y[4:, 2] = np.nan, 1e101  # NaN first
    x[3, 3], x[4:, 3] = 1e101, np.nan  # huge one round, NaN the next
    x[4:, 4], y[4:, 4] = 5e99, np.nan  # within DIVERGED, then NaN: failed
    observed = classify(_hand(x, y))
    assert [CLASSES[c] for c in observed.code] == [
        "growing",
        "growing",
        "failed",
        "growing",
        "failed",
    ]


def test_a_quasi_periodic_rotation_and_bounded_noise_are_bounded():
    """A unit-radius rotation by an irrational multiple of 2 pi never repeats within
    ``TOL`` for periods up to 64; uniform noise neither settles nor grows."""
    rounds = 300
    angles = 2 * np.pi * np.array([(np.sqrt(5) - 1) / 2, np.sqrt(2) - 1, np.e - 2])
    t = np.arange(rounds)[:, None]
    x = np.stack([np.cos(angles * t), np.sin(angles * t)], axis=-1)
    observed = classify(_hand(x))
    assert [CLASSES[c] for c in observed.code] == ["bounded"] * 3
    np.testing.assert_array_equal(observed.period, -1)
    assert (observed.first == 150).all() and (observed.last == 299).all()
    np.testing.assert_allclose(observed.spread["A0"], 1.0, atol=0.02)
    noise = np.random.default_rng(3).uniform(-5, 5, (rounds, 40, 3))
    observed = classify(_hand(noise, noise[::-1]))
    assert (observed.code == CLASSES.index("bounded")).all()


def test_a_constant_play_is_a_fixed_point_covering_every_round():
    x = np.broadcast_to(np.array([1e3, -2.0, 0.0]), (12, 2, 3))
    observed = classify(_hand(x))
    assert observed.as_json(1) == {
        "class": "fixed point",
        "period": None,
        "tail": [0, 11],
        "agents": {"A0": {"mean": [1e3, -2.0, 0.0], "spread": 0.0}},
    }
    assert classify(_hand(x[:2])).as_json(0)["class"] == "bounded"  # fewer than 3 rounds
    assert classify(_hand(x[:3])).as_json(0)["class"] == "fixed point"


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    agents=st.integers(1, 2),
    d=st.integers(1, 4),
    norm=st.floats(0.05, 0.8),
)
def test_random_contractions_settle_on_their_closed_form(seed, agents, d, norm):
    """One agent reading itself (``s* = (I - A)^{-1} c``) or two alternating: a fixed point
    whose tail mean is the closed form within ``TOL`` of the scale."""
    rng = np.random.default_rng(seed)
    batch = 3
    f = [_contraction(rng, batch, d, norm) for _ in range(agents)]
    names = ["A", "B"][:agents]
    trajectory = play(
        {n: MapAgent(m) for n, m in zip(names, f, strict=True)},
        Schedule.build(names),
        400,
        rng.standard_normal((batch, d)),
    )
    observed = classify(trajectory)
    eye = np.eye(d)
    if agents == 1:
        limits = [np.linalg.solve(eye - f[0].A, f[0].c[..., None])[..., 0]]
    else:
        A, B = f
        v = np.linalg.solve(eye - B.A @ A.A, B.A @ A.c[..., None] + B.c[..., None])[..., 0]
        limits = [(A.A @ v[..., None])[..., 0] + A.c, v]
    assert (observed.code == CLASSES.index("fixed point")).all()
    scale = np.maximum(1, np.linalg.norm(np.concatenate(limits, axis=-1), axis=-1))
    for name, limit in zip(names, limits, strict=True):
        gap = np.linalg.norm(observed.mean[name] - limit, axis=-1)
        assert (gap <= 2 * TOL * scale).all()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    p=st.integers(2, 12),
    d=st.integers(2, 4),
    extra=st.integers(0, 30),
)
def test_random_rotations_cycle_with_their_period(seed, p, d, extra):
    """An affine map rotating a random plane by ``2 pi k / p`` (``k`` coprime to ``p``) around
    a random centre, fixing the rest: a cycle of period ``p`` over whole periods, its mean the
    centre plus the part of the start the rotation leaves alone, its spread the radius."""
    rng = np.random.default_rng(seed)
    k = int(rng.choice([k for k in range(1, p) if np.gcd(k, p) == 1]))
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    R = np.eye(d)
    R[:2, :2] = _rotation(2 * np.pi * k / p)
    A = Q @ R @ Q.T
    centre = rng.standard_normal(d) * 3
    f = AffineMap(A[None], (centre - A @ centre)[None])  # rotation around the centre
    start = rng.standard_normal((1, d))
    rounds = 2 * p + extra
    observed = classify(play({"A": MapAgent(f)}, Schedule.build(["A"]), rounds, start))
    offset = Q.T @ (start[0] - centre)  # in the rotation's basis
    radius = np.linalg.norm(offset[:2])
    assume(radius > 1e-3)  # a start that barely leaves the fixed space is settled
    assert CLASSES[observed.code[0]] == "cycle" and observed.period[0] == p
    assert observed.last[0] == rounds - 1 and (rounds - observed.first[0]) == rounds // p * p
    still = centre + Q[:, 2:] @ offset[2:]  # the part the rotation leaves alone
    np.testing.assert_allclose(observed.mean["A"][0], still, atol=1e-9 * max(1, radius))
    assert observed.spread["A"][0] == pytest.approx(radius, rel=1e-9)


def _reference(outputs: list[np.ndarray], turns: np.ndarray, rounds: int):
    """The module's rules for one play, as stated, with loops: ``outputs`` per agent
    ``(rounds, d)``, ``turns`` every turn's output ``(rows, d)``."""
    rows = [r for r in range(len(turns)) if not (np.abs(turns[r]) <= DIVERGED).all()]
    nan = next((r for r in range(len(turns)) if np.isnan(turns[r]).any()), None)
    huge = next((r for r in range(len(turns)) if (np.abs(turns[r]) > DIVERGED).any()), None)
    per_round = len(turns) // rounds
    finite = rows[0] // per_round if rows else rounds
    tail = (finite // 2, finite - 1) if finite else None
    states = [np.concatenate([o[t] for o in outputs]) for t in range(rounds)]

    def close(a, b):
        scale = max(1.0, np.linalg.norm(a), np.linalg.norm(b))
        return np.linalg.norm(a - b) <= TOL * scale

    if rows:
        kind = "failed" if nan is not None and (huge is None or nan < huge) else "growing"
        return _judged(outputs, kind, None, tail)
    settled = 0
    while settled < rounds and close(states[rounds - 1 - settled], states[-1]):
        settled += 1
    if settled >= SETTLED:
        return _judged(outputs, "fixed point", None, (rounds - settled, rounds - 1))
    for p in range(2, min(PERIODS, rounds // 2) + 1):
        if all(close(states[t], states[t - p]) for t in range(rounds - p, rounds)):
            matched = 0
            while matched < rounds - p and close(
                states[rounds - 1 - matched], states[rounds - 1 - matched - p]
            ):
                matched += 1
            whole = (matched + p) // p * p
            return _judged(outputs, "cycle", p, (rounds - whole, rounds - 1))
    norms = [np.linalg.norm(s) for s in states]
    half, kind = rounds // 2, "bounded"
    if half:
        late = max(norms[half:])
        if late > GROWTH * max(1.0, max(norms[:half])) and norms[-1] >= late / 2:
            kind = "growing"
    return _judged(outputs, kind, None, tail)


def _judged(outputs: list[np.ndarray], kind: str, period, tail):
    """``_reference``'s answer: the class, period, tail and per-agent mean over the tail."""
    if tail is None:
        return kind, period, None, None
    return kind, period, tail, [o[tail[0] : tail[1] + 1].mean(axis=0) for o in outputs]


def _sequence(rng, rounds: int, d: int) -> np.ndarray:
    """One play's outputs ``(rounds, d)``: a transient, then a constant, a repeating block, a
    geometric growth, a settling or noise; in 3 plays of 8, a NaN, an inf or a huge value
    from some round on."""
    shape = rng.integers(5)
    start = int(rng.integers(0, rounds // 2 + 1))
    x = rng.standard_normal((rounds, d)) * rng.choice([1e-3, 1.0, 1e4])
    if shape == 0:
        x[start:] = x[start]
    elif shape == 1:
        p = int(rng.integers(2, 10))
        base = x[start : start + p].copy()
        for t in range(start, rounds):
            x[t] = base[(t - start) % len(base)]
    elif shape == 2:
        x *= rng.uniform(1.05, 1.6) ** np.arange(rounds)[:, None]
    elif shape == 3:
        x[start:] = x[-1] + rng.choice([1e-9, 1e-5]) * 0.5 ** np.arange(rounds - start)[:, None]
    bad = rng.integers(8)
    if bad < 3:
        x[rng.integers(0, rounds) :] = [np.nan, np.inf, 3e100][bad]
    return x


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 70), agents=st.integers(1, 2))
def test_the_vectorised_classifier_follows_the_rules_play_by_play(seed, rounds, agents):
    """Against ``_reference``, a loop over plays that applies the rules as stated, on a batch
    mixing every class (settling, repeating, growing, noisy, failing and overflowing plays)."""
    rng = np.random.default_rng(seed)
    batch, d = 12, int(rng.integers(1, 4))
    outputs = [
        np.stack([_sequence(rng, rounds, d) for _ in range(batch)], axis=1) for _ in range(agents)
    ]
    trajectory = _hand(*outputs)
    observed = classify(trajectory)
    for b in range(batch):
        mine = [o[:, b] for o in outputs]
        kind, period, tail, means = _reference(mine, trajectory.turns[:, b], rounds)
        data = observed.as_json(b)
        assert (data["class"], data["period"]) == (kind, period), b
        assert data["tail"] == (None if tail is None else list(tail)), b
        for k, name in enumerate(data["agents"]):
            if means is None:
                assert data["agents"][name]["mean"] is None
            else:
                np.testing.assert_allclose(data["agents"][name]["mean"], means[k], rtol=1e-12)


def test_real_plays_agree_with_the_theory():
    """``two_agents.toml`` converges (``rho < 1``): a fixed point, every agent's tail mean at
    the predicted fixed point within 1e-6 relative; ``diverging.toml`` (``rho > 1``) grows.
    One play classified alone (as ``report`` does) is the same as in the batch."""
    game = setup(load_config(EXAMPLES / "two_agents.toml"), seeds=range(3, 9))
    prediction, trajectory = predict(game), simulate(game)
    assert prediction.converges.all()
    observed = classify(trajectory)
    assert (observed.code == CLASSES.index("fixed point")).all()
    for name in game.schedule.agents:
        fixed = prediction.fixed_point[name]
        gap = np.linalg.norm(observed.mean[name] - fixed, axis=-1)
        assert (gap <= 1e-6 * np.maximum(1, np.linalg.norm(fixed, axis=-1))).all()
    for b in range(6):
        alone = classify(trajectory.select(slice(b, b + 1)))
        for key in ("code", "period", "first", "last"):
            assert getattr(alone, key)[0] == getattr(observed, key)[b]
        for name in game.schedule.agents:
            np.testing.assert_allclose(alone.mean[name][0], observed.mean[name][b], rtol=1e-12)
            assert alone.spread[name][0] == pytest.approx(observed.spread[name][b], rel=1e-12)

    game = setup(load_config(EXAMPLES / "diverging.toml"), seeds=range(4))
    prediction, trajectory = predict(game), simulate(game)
    assert not prediction.converges.any() and (trajectory.diverged_at >= 0).all()
    observed = classify(trajectory)
    assert (observed.code == CLASSES.index("growing")).all()
    assert observed.counts() == {
        "counts": {"fixed point": 0, "cycle": 0, "bounded": 0, "growing": 4, "failed": 0},
        "periods": {},
    }
