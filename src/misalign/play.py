"""The play: agents take turns, each answering the last output of the agent it reads.

A round runs the schedule's turns in order; turn ``(i, j)`` replaces agent
``i``'s last output by ``f_i(s_j)``, ``s_j`` being agent ``j``'s last output
(docs/theory.md §2). Every agent's output starts at ``start`` (``v_0``).
Two agents alternating give ``u_t = f_A(v_{t-1})``, ``v_t = f_B(u_t)``.

The play runs a whole batch of independent plays as one array program: each
turn is one call per agent for all plays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from misalign.agent import Agent, Turn
from misalign.progress import progress_bar

DIVERGED = 1e100
"""An output with a coordinate beyond this magnitude marks its play as diverged."""


@dataclass(frozen=True)
class Schedule:
    """The turns of one round: ``turns[k] = (agent, reads)``.

    Attributes:
        turns: pairs ``(name of the agent taking the turn, name of the agent it reads)``.
    """

    turns: tuple[tuple[str, str], ...]

    @classmethod
    def build(cls, order: Sequence[str], reads: Mapping[str, str | None] | None = None) -> Schedule:
        """A schedule from the turn order and who reads whom.

        Args:
            order: agent names in turn order within a round (names may repeat).
            reads: per agent, whose output it takes; an agent that is absent or
                maps to ``None`` reads the agent of the previous turn, cyclically.

        Returns:
            The schedule.
        """
        reads = reads or {}
        return cls(
            tuple(
                (name, reads.get(name) or order[k - 1])  # k - 1 = -1 wraps to the last turn
                for k, name in enumerate(order)
            )
        )

    @property
    def agents(self) -> tuple[str, ...]:
        """Every agent that takes a turn, in order of first appearance."""
        return tuple(dict.fromkeys(name for name, _ in self.turns))

    def last_turn(self, name: str) -> int:
        """The position of ``name``'s last turn within a round."""
        return max(k for k, (agent, _) in enumerate(self.turns) if agent == name)


@dataclass(frozen=True)
class Trajectory:
    """Every output of a batch of plays.

    Attributes:
        schedule: the schedule that was played.
        start: the initial output of every agent, shape ``(B, d)``.
        turns: output of every turn, shape ``(rounds * len(schedule.turns), B, d)``.
        diverged_at: per play, the first round whose outputs left ``[-DIVERGED, DIVERGED]``
            (or were not finite), ``-1`` where the play stayed bounded.
    """

    schedule: Schedule
    start: np.ndarray
    turns: np.ndarray
    diverged_at: np.ndarray

    @property
    def rounds(self) -> int:
        """The number of rounds played (fewer than asked when every play diverged)."""
        return self.turns.shape[0] // len(self.schedule.turns)

    def select(self, plays) -> Trajectory:
        """The trajectory of some plays of the batch (any numpy index on the batch axis; a
        slice gives a view, no copy)."""
        return Trajectory(
            self.schedule, self.start[plays], self.turns[:, plays], self.diverged_at[plays]
        )

    def outputs(self, name: str) -> np.ndarray:
        """Agent ``name``'s output at the end of each round, shape ``(rounds, B, d)``."""
        per_round = self.turns.reshape(self.rounds, len(self.schedule.turns), *self.turns.shape[1:])
        return per_round[:, self.schedule.last_turn(name)]

    def distance(self, name: str, target: np.ndarray) -> np.ndarray:
        """``|output - target|`` per round and play, shape ``(rounds, B)`` (``inf`` or NaN
        where a play has diverged)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return np.linalg.norm(self.outputs(name) - target, axis=-1)


def play(
    agents: Mapping[str, Agent],
    schedule: Schedule,
    rounds: int,
    start: np.ndarray,
    progress: bool = False,
) -> Trajectory:
    """Play ``rounds`` rounds of ``schedule`` for a batch of independent plays.

    Args:
        agents: every agent named in the schedule.
        schedule: turn order and who reads whom.
        rounds: number of rounds.
        start: every agent's initial output, shape ``(B, d)``.
        progress: show a progress bar on stderr.

    Returns:
        The trajectory; it stops early once every play has diverged.
    """
    batch, d = start.shape
    per_round = len(schedule.turns)
    try:
        turns = np.empty((rounds * per_round, batch, d))
    except (MemoryError, ValueError):
        size = rounds * per_round * batch * d * 8 / 2**30
        raise MemoryError(f"recording {rounds} rounds needs {size:.3g} GiB") from None
    last = dict.fromkeys(schedule.agents, start)
    order = tuple(name for name, _ in schedule.turns)
    diverged_at = np.full(batch, -1)
    for name in schedule.agents:
        agents[name].start(batch)
    bar = progress_bar(rounds, "play") if progress else None
    t = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(rounds):
            for k, (name, reads) in enumerate(schedule.turns):
                row = t * per_round + k
                out = turns[row]
                turn = Turn(t, k, reads, past=turns[:row], order=order, out=out, start=start)
                answer = agents[name].respond(last[reads], turn)
                if answer is not out:
                    out[...] = answer
                last[name] = out
            block = turns[t * per_round : (t + 1) * per_round]
            if not (block.max() <= DIVERGED and block.min() >= -DIVERGED):  # NaN fails too
                bad = ~(np.abs(block) <= DIVERGED).all(axis=(0, 2))
                diverged_at[bad & (diverged_at < 0)] = t
                if (diverged_at >= 0).all():
                    break
            if bar is not None:
                bar.advance(bar.task_ids[0])
    if bar is not None:
        bar.stop()
    return Trajectory(schedule, start, turns[: (t + 1) * per_round], diverged_at)
