"""Tests for misalign.model.measure: the measurements reduced round by round against the same
quantities computed from the whole recorded play, and the play that keeps no output against
the one that keeps every output."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.model.measure import CLOSE, FLUSH, Measure, Measured, measure, rounds_to_prediction
from misalign.model.observe import classify
from misalign.model.play import play
from misalign.runtime.device_test import torch_device

CONFIGS = {
    "pair": {"d": 3, "agents": {"A": {"n": 5}, "B": {"n": 4, "rotate": True, "eta": 1.4}}},
    "three": {
        "d": 2,
        "schedule": ["A", "B", "C"],
        "agents": {
            "A": {"n": 3, "noise": 0.2},
            "B": {"n": 2, "preconditioner": "identity", "eta": 1.9},
            "C": {"n": 4, "target": [1.0, -1.0]},
        },
    },
    "sampled": {
        "d": 2,
        "agents": {"A": {"n": 6, "sampling_std": 0.05}, "B": {"n": 6, "eta": 0.8}},
    },
    "debate": {
        "d": 2,
        "schedule": "simultaneous",
        "agents": {"A": {"n": 2}, "B": {"n": 3, "eta": 1.6}, "C": {"n": 2, "eta": 0.4}},
    },
}


def _game(name, rounds, seeds):
    config = parse_config({"rounds": rounds, **CONFIGS[name]})
    return setup(config, seeds=seeds)


def _distances(trajectory, name, target):
    with np.errstate(over="ignore", invalid="ignore"):
        return np.linalg.norm(trajectory.outputs(name) - target, axis=-1)


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(sorted(CONFIGS)),
    rounds=st.integers(1, 200),  # across Measure's folds of far flags (FLUSH = 64 rounds)
    first=st.integers(0, 2**40),
    every=st.integers(1, 7),
)
@example(name="three", rounds=50, first=0, every=1)  # a play past single precision
@example(name="pair", rounds=FLUSH * 2 + 3, first=5, every=3)  # two folds, then a part one
def test_measurements_are_those_of_the_whole_play(name, rounds, first, every):
    """Against the recorded play: the observed classes (``classify``), the last round away
    from the prediction (the definition, with norms), the kept distances and the final ones."""
    game = _game(name, rounds, range(first, first + 40))
    trajectory, prediction = simulate(game), predict(game)
    targets = {n: game.targets[n] for n in game.schedule.agents}
    recorded = list(range(every, rounds + 1, every))
    m = measure(trajectory, prediction, targets, recorded)
    observed = classify(trajectory)
    assert np.array_equal(m.code, observed.code) and np.array_equal(m.period, observed.period)
    close = np.ones((trajectory.rounds, 40), dtype=bool)
    for n, fixed in prediction.fixed_point.items():
        with np.errstate(over="ignore", invalid="ignore"):
            gap = np.linalg.norm(trajectory.outputs(n) - fixed, axis=-1)
            close &= gap <= CLOSE * np.maximum(1.0, np.linalg.norm(fixed, axis=-1))
    far = np.where(~close)
    last_far = np.full(40, -1)
    np.maximum.at(last_far, far[1], far[0])
    assert np.array_equal(m.last_far, last_far)
    expected = np.where(close[-1], last_far + 2, -1)
    assert np.array_equal(m.rounds_to_prediction(), expected)
    assert np.array_equal(rounds_to_prediction(prediction.fixed_point, trajectory), expected)
    for n in targets:
        whole = _distances(trajectory, n, targets[n])
        with np.errstate(over="ignore"):  # a diverged play's distance is inf in single precision
            kept = whole[np.array(recorded, dtype=int) - 1].astype(np.float32)
        np.testing.assert_array_equal(m.distance[n], kept)
        if trajectory.rounds == rounds:
            np.testing.assert_array_equal(m.final_distance[n], whole[-1])
    np.testing.assert_array_equal(m.rho, prediction.rho)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_play_that_keeps_nothing_measures_the_same(name):
    """``play(record=False, on_round=...)`` in chunks of plays gives the measurements of the
    recorded play bit for bit, and its last round is the recorded play's last."""
    game = _game(name, 50, range(100, 160))
    trajectory, prediction = simulate(game), predict(game)
    targets = {n: game.targets[n] for n in game.schedule.agents}
    recorded = [5, 10, 49, 50]
    whole = measure(trajectory, prediction, targets, recorded)
    into = Measured.empty(60, game.schedule.agents, list(targets), recorded)
    for start in (0, 25):
        plays = slice(start, start + 25 if start == 0 else 60)
        part = setup(game.configs[plays])
        guess = predict(part)
        into.predicted(plays, guess)
        reducer = Measure(into, plays, 50, guess.fixed_point, {n: part.targets[n] for n in targets})
        last = play(
            part.agents, part.schedule, 50, part.start, record=False, on_round=reducer.round
        )
        reducer.finish(last.diverged_at, last.skipped + last.rounds)
        full = trajectory.select(plays)
        if (full.diverged_at < 0).all():
            assert last.skipped == 49 and np.array_equal(last.turns, full.turns[-len(last.turns) :])
    rest = into.unsettled()
    into.observe(rest, classify(trajectory.select(rest)))
    for key in ("diverged_at", "last_far", "code", "period", "rho", "converges"):
        assert np.array_equal(getattr(into, key), getattr(whole, key)), key
    for key in ("distance", "final_distance", "final_gap", "residual"):
        for n, value in getattr(whole, key).items():
            np.testing.assert_array_equal(getattr(into, key)[n], value, err_msg=key)


def test_an_unclassified_batch_says_so():
    m = Measured.empty(3, ["A"], ["A"], [])
    with pytest.raises(ValueError, match="not classified"):
        m.observed()


@settings(max_examples=10, deadline=None)
@given(
    name=st.sampled_from(sorted(CONFIGS)),
    rounds=st.integers(1, 150),
    first=st.integers(0, 2**40),
    every=st.integers(1, 5),
)
def test_a_play_on_torch_measures_as_on_numpy(name, rounds, first, every):
    """The play set up, played and reduced on torch (``device=cpu``) against numpy's: the
    same classes, rounds and flags, the kept single-precision distances within a float32
    rounding, the final ones within ``1e-12`` of their scale."""
    torch = pytest.importorskip("torch")
    config = parse_config({"rounds": rounds, **CONFIGS[name]})
    seeds = range(first, first + 40)
    recorded = list(range(every, rounds + 1, every))
    found = []
    for on in (None, torch_device()):
        game = setup(config, seeds=seeds, device=on)
        prediction = predict(game)
        targets = {n: game.targets[n] for n in game.schedule.agents}
        into = Measured.empty(40, game.schedule.agents, list(targets), recorded)
        into.predicted(slice(None), prediction)
        reducer = Measure(into, slice(None), rounds, prediction.fixed_point, targets)
        played = play(game.agents, game.schedule, rounds, game.start, False, False, reducer.round)
        assert isinstance(played.turns, np.ndarray if on is None else torch.Tensor)
        reducer.finish(played.diverged_at, played.skipped + played.rounds)
        found.append(into)
    want, got = found
    for key in ("diverged_at", "last_far", "code", "period", "converges"):
        assert np.array_equal(getattr(got, key), getattr(want, key)), key
    for n in want.distance:
        np.testing.assert_allclose(got.distance[n], want.distance[n], rtol=2**-23, atol=0)
    for key in ("final_distance", "residual"):
        for n, value in getattr(want, key).items():
            scale = max(1.0, float(np.nanmax(np.abs(value), initial=0)))
            np.testing.assert_allclose(getattr(got, key)[n], value, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(got.rho, want.rho, rtol=1e-12, atol=1e-14)
