"""Tests for misalign.model.play."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.model.agent import AffineMap, Turn
from misalign.model.play import DIVERGED, Schedule, play


class MapAgent:
    """A stateless agent applying a fixed batch of affine maps."""

    gamma = None

    def __init__(self, name, f):
        self.name, self.f = name, f

    def start(self, batch):
        pass

    def respond(self, w, turn):
        return self.f(w)

    def affine(self):
        return self.f


def _random_maps(rng, names, batch, d, scale=0.4):
    return {
        n: MapAgent(
            n,
            AffineMap(scale * rng.standard_normal((batch, d, d)), rng.standard_normal((batch, d))),
        )
        for n in names
    }


def test_default_reads_the_previous_turn_cyclically():
    assert Schedule.build(["A", "B"]).turns == (("A", "B"), ("B", "A"))
    assert Schedule.build(["A", "C", "B"]).turns == (("A", "B"), ("C", "A"), ("B", "C"))
    assert Schedule.build(["A"]).turns == (("A", "A"),)
    assert Schedule.build(["A", "B", "C"], {"C": "A"}).turns == (("A", "C"), ("B", "A"), ("C", "A"))
    assert Schedule.build(["A", "B", "A"]).agents == ("A", "B")


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    order=st.sampled_from([["A", "B"], ["A", "B", "C"], ["B", "A", "B"], ["A"]]),
    d=st.integers(1, 4),
)
def test_batched_play_equals_a_naive_loop_per_play(seed, order, d):
    rng = np.random.default_rng(seed)
    batch, rounds = 5, 7
    schedule = Schedule.build(order)
    agents = _random_maps(rng, schedule.agents, batch, d)
    start = rng.standard_normal((batch, d))
    trajectory = play(agents, schedule, rounds, start)
    for b in range(batch):
        last = dict.fromkeys(schedule.agents, start[b])
        expected = []
        for _ in range(rounds):
            for name, reads in schedule.turns:
                f = agents[name].f
                last[name] = f.A[b] @ last[reads] + f.c[b]
                expected.append(last[name])
        np.testing.assert_allclose(
            trajectory.turns[:, b], np.array(expected), rtol=1e-12, atol=1e-12
        )
    for name in schedule.agents:
        assert trajectory.outputs(name).shape == (rounds, batch, d)


def test_two_agents_alternate_from_v0():
    """u_t = f_A(v_{t-1}), v_t = f_B(u_t) from v_0."""
    rng = np.random.default_rng(0)
    agents = _random_maps(rng, ["A", "B"], 1, 3)
    v0 = rng.standard_normal((1, 3))
    t = play(agents, Schedule.build(["A", "B"]), 2, v0)
    u1 = agents["A"].f(v0)
    v1 = agents["B"].f(u1)
    np.testing.assert_allclose(t.outputs("A")[0], u1)
    np.testing.assert_allclose(t.outputs("B")[1], agents["B"].f(agents["A"].f(v1)))


class Averager:
    """A stateful agent: answers the mean of everything its partner said so far."""

    name, gamma = "C", None

    def start(self, batch):
        self.calls = 0

    def respond(self, w, turn: Turn):
        self.calls += 1
        seen = turn.outputs(turn.reads)
        assert len(seen) == turn.round + (turn.position > 0)
        return (
            np.concatenate([seen, w[None]]).mean(axis=0)
            if turn.position == 0
            else seen.mean(axis=0)
        )

    def affine(self):
        return None


def test_stateful_agent_sees_the_history():
    rng = np.random.default_rng(1)
    agents = _random_maps(rng, ["A"], 2, 2) | {"C": Averager()}
    t = play(agents, Schedule.build(["A", "C"]), 4, np.zeros((2, 2)))
    assert agents["C"].calls == 4
    np.testing.assert_allclose(t.outputs("C")[-1], t.outputs("A").mean(axis=0))


def test_divergent_plays_are_flagged_and_the_play_stops_when_all_diverge():
    eye = np.eye(2)[None]
    grow = MapAgent("A", AffineMap(np.concatenate([10 * eye, 0.5 * eye]), np.ones((2, 2))))
    hold = MapAgent("B", AffineMap(np.concatenate([eye, eye]), np.zeros((2, 2))))
    t = play({"A": grow, "B": hold}, Schedule.build(["A", "B"]), 1000, np.zeros((2, 2)))
    assert t.diverged_at[1] == -1 and 90 < t.diverged_at[0] < 110
    assert t.rounds == 1000
    only = play({"A": grow, "B": hold}, Schedule.build(["A", "B"]), 1000, np.zeros((2, 2)))
    assert np.isfinite(only.turns[: only.diverged_at[0] * 2]).all()
    alone = MapAgent("A", AffineMap(10 * eye, np.ones((1, 2))))
    stopped = play({"A": alone}, Schedule.build(["A"]), 10**6, np.zeros((1, 2)))
    assert stopped.rounds == stopped.diverged_at[0] + 1 < 110
    assert np.abs(stopped.turns[stopped.diverged_at[0] - 1]).max() <= DIVERGED


def test_progress_bar_does_not_change_the_play():
    rng = np.random.default_rng(2)
    agents = _random_maps(rng, ["A", "B"], 3, 2)
    quiet = play(agents, Schedule.build(["A", "B"]), 20, np.zeros((3, 2)))
    shown = play(agents, Schedule.build(["A", "B"]), 20, np.zeros((3, 2)), progress=True)
    np.testing.assert_array_equal(quiet.turns, shown.turns)
