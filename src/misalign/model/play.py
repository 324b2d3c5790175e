"""The play: agents take turns, each answering the last output of the agent it reads.

A round runs the schedule's turns in order; turn ``(i, j)`` replaces agent
``i``'s last output by ``f_i(s_j)``, ``s_j`` being agent ``j``'s last output
(docs/theory.md §2). Every agent's output starts at ``start`` (``v_0``).
Two agents alternating give ``u_t = f_A(v_{t-1})``, ``v_t = f_B(u_t)``.

Weighted reads: an agent may read a mix ``sum_j a_ij s_j`` of several agents' last outputs
(non-negative weights summing to 1). Simultaneous rounds: every agent answers the previous
round's outputs at once (``s_i <- f_i(sum_j a_ij s_j)`` for all ``i`` together, the
multi-agent debate pattern).

The play runs a whole batch of independent plays as one array program: each
turn is one call per agent for all plays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from misalign.model.agent import Agent, Turn
from misalign.runtime import device
from misalign.runtime.progress import progress_bar

DIVERGED = 1e100
"""An output with a coordinate beyond this magnitude marks its play as diverged."""


Mix = tuple[tuple[str, float], ...]
"""A weighted read: ``((agent, weight), ...)``, weights non-negative and summing to 1."""
Reads = str | Mix
"""Whom a turn reads: one agent's last output, or a weighted mix of several."""


def sources(reads: Reads) -> Mix:
    """The agents a turn reads and their weights (one agent: weight 1)."""
    return ((reads, 1.0),) if isinstance(reads, str) else reads


def mixed(reads: Reads, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The input a turn reads: ``outputs[reads]`` itself for one agent (no copy), else the
    weighted sum ``sum_j a_j outputs[j]``."""
    if isinstance(reads, str):
        return outputs[reads]
    (first, a), *rest = reads
    total = a * outputs[first]
    for name, a in rest:
        total += a * outputs[name]
    return total


@dataclass(frozen=True)
class Schedule:
    """The turns of one round: ``turns[k] = (agent, reads)``.

    Attributes:
        turns: pairs ``(name of the agent taking the turn, whom it reads)``: the name of
            one agent, or a weighted mix ``((agent, weight), ...)`` (``Mix``).
        simultaneous: every agent answers the previous round's outputs at once (one turn
            each, in any order: no turn sees another of the same round).
    """

    turns: tuple[tuple[str, Reads], ...]
    simultaneous: bool = False

    @classmethod
    def build(
        cls,
        order: Sequence[str],
        reads: Mapping[str, str | Mapping[str, float] | None] | None = None,
        simultaneous: bool = False,
    ) -> Schedule:
        """A schedule from the turn order and who reads whom.

        Args:
            order: agent names in turn order within a round (names may repeat; not when
                ``simultaneous``).
            reads: per agent, whose output it takes: a name, or weights per name (a mix;
                one name of weight 1 is that name). An agent that is absent or maps to
                ``None`` reads the agent of the previous turn, cyclically; in simultaneous
                rounds, the uniform mix of every other agent (a lone agent reads itself).
            simultaneous: every agent answers the previous round's outputs at once.

        Returns:
            The schedule.
        """
        reads = reads or {}
        if simultaneous and len(set(order)) != len(order):
            raise ValueError("simultaneous rounds take one turn per agent")

        def default(k: int, name: str) -> Reads:
            if not simultaneous:
                return order[k - 1]  # k - 1 = -1 wraps to the last turn
            others = [other for other in order if other != name]
            return given({other: 1 / len(others) for other in others} if others else name)

        def given(value: str | Mapping[str, float]) -> Reads:
            if isinstance(value, str):
                return value
            mix = tuple((name, float(a)) for name, a in value.items())
            return mix[0][0] if len(mix) == 1 and mix[0][1] == 1.0 else mix

        return cls(
            tuple(
                (name, default(k, name) if not reads.get(name) else given(reads[name]))
                for k, name in enumerate(order)
            ),
            simultaneous,
        )

    @property
    def feeds_back(self) -> tuple[str, ...]:
        """The agents whose output carries into the next round: some output at the end of the
        round depends on the value the agent's block had at its start (read, with a positive
        weight, through any chain of turns before the agent's own turn overwrites it; in
        simultaneous rounds, read by any turn). Their blocks are the columns of the round map
        that are not zero (``misalign.model.theory.unit_space``); the others only add zero
        eigenvalues. From the schedule alone: a damped agent's weight on its own last output
        (``misalign.agents.defence.Damped``) is not a read."""
        start = {name: {name} for name in self.agents}
        depends = dict(start)  # per block, the start-of-round blocks its current value uses
        for name, reads in self.turns:
            read = start if self.simultaneous else depends
            depends[name] = set().union(*(read[j] for j, a in sources(reads) if a > 0))
        fed = set().union(*depends.values())
        return tuple(name for name in self.agents if name in fed)

    @property
    def weighted(self) -> bool:
        """Whether some turn reads a weighted mix."""
        return any(not isinstance(reads, str) for _, reads in self.turns)

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
        skipped: the rounds played before the first recorded one (``play(record=False)``).
    """

    schedule: Schedule
    start: np.ndarray
    turns: np.ndarray
    diverged_at: np.ndarray
    skipped: int = 0

    @property
    def rounds(self) -> int:
        """The number of rounds recorded (fewer than asked when every play diverged; one
        when the play kept only its last round)."""
        return self.turns.shape[0] // len(self.schedule.turns)

    def select(self, plays) -> Trajectory:
        """The trajectory of some plays of the batch (any numpy index on the batch axis; a
        slice gives a view, no copy)."""
        return Trajectory(
            self.schedule,
            self.start[plays],
            self.turns[:, plays],
            self.diverged_at[plays],
            self.skipped,
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
    record: bool = True,
    on_round: Callable[[int, Mapping[str, np.ndarray]], None] | None = None,
) -> Trajectory:
    """Play ``rounds`` rounds of ``schedule`` for a batch of independent plays.

    Args:
        agents: every agent named in the schedule.
        schedule: turn order and who reads whom.
        rounds: number of rounds.
        start: every agent's initial output, shape ``(B, d)``: a numpy array, or a torch
            tensor for agents whose maps are tensors on its device (the play then runs there).
        progress: show a progress bar on stderr.
        record: keep every turn's output; otherwise only the last round's (two rounds'
            outputs are held at any time: agents that read earlier turns, ``Turn.past``,
            see none).
        on_round: called after each round ``t`` with every agent's output at its end,
            ``(B, d)`` each (views: copy what is kept).

    Returns:
        The trajectory (without ``record``, of the last round only: ``skipped`` counts the
        rounds before it); it stops early once every play has diverged.
    """
    batch, d = start.shape
    per_round = len(schedule.turns)
    kept = rounds if record else min(rounds, 2)
    try:
        turns = device.empty((kept * per_round, batch, d), start)
    except (MemoryError, ValueError, RuntimeError):  # torch: RuntimeError, out of memory
        size = kept * per_round * batch * d * 8 / 2**30
        raise MemoryError(f"recording {kept} rounds needs {size:.3g} GiB") from None
    last = dict.fromkeys(schedule.agents, start)
    order = tuple(name for name, _ in schedule.turns)
    # simultaneous rounds: every turn reads the previous round's outputs, which stay recorded
    # (a turn writes a new row); weighted reads are mixed at once, one product per round
    simultaneous, weights = schedule.simultaneous, None
    if simultaneous and schedule.weighted:
        weights = device.on(_weights(schedule), start)
    diverged_at = device.full((batch,), -1, start, "int64")
    for name in schedule.agents:
        agents[name].start(batch)
    bar = progress_bar(rounds, "play") if progress else None
    t = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(rounds):
            first = (t % kept) * per_round  # this round's rows (alternating when not recording)
            if simultaneous:
                before = dict(last)  # the previous round's outputs (recorded rows, not copies)
                if weights is not None and t > 0:
                    previous = turns[((t - 1) % kept) * per_round :][:per_round]
                    inputs = (weights @ previous.reshape(per_round, -1)).reshape(previous.shape)
            for k, (name, reads) in enumerate(schedule.turns):
                row = first + k
                out = turns[row]
                past = turns[:row] if record else turns[:0]
                turn = Turn(t, k, reads, past=past, order=order, out=out, start=start)
                if not simultaneous:
                    w = mixed(reads, last)
                elif weights is None or isinstance(reads, str) or t == 0:
                    w = mixed(reads, before)  # the first round: a mix of starts is the start
                else:
                    w = inputs[k]
                answer = agents[name].respond(w, turn)
                if answer is not out:
                    out[...] = answer
                last[name] = out
            block = turns[first : first + per_round]
            if on_round is not None:
                on_round(t, last)
            if not _bounded(block):
                bad = ~(abs(block) <= DIVERGED).all(-1).all(0)
                diverged_at[bad & (diverged_at < 0)] = t
                if (diverged_at >= 0).all():
                    break
            if bar is not None:
                bar.advance(bar.task_ids[0])
    if bar is not None:
        bar.stop()
    if record:
        return Trajectory(schedule, start, turns[: (t + 1) * per_round], diverged_at)
    first = (t % kept) * per_round
    return Trajectory(schedule, start, turns[first : first + per_round], diverged_at, skipped=t)


def _bounded(block) -> bool:
    """Whether every output of a round lies in ``[-DIVERGED, DIVERGED]`` (NaN does not): two
    reductions on numpy, one (and one wait) on a device."""
    if device.is_numpy(block):
        return bool(block.max() <= DIVERGED and block.min() >= -DIVERGED)
    low, high = device.namespace(block).aminmax(block)
    return bool((high <= DIVERGED) & (low >= -DIVERGED))


def _weights(schedule: Schedule) -> np.ndarray:
    """The mixing matrix ``a_kj`` of simultaneous rounds: turn ``k`` reads ``sum_j a_kj s_j``,
    columns in turn order (a simultaneous schedule lists each agent once)."""
    position = {name: k for k, (name, _) in enumerate(schedule.turns)}
    a = np.zeros((len(position), len(position)))
    for k, (_, reads) in enumerate(schedule.turns):
        for name, weight in sources(reads):
            a[k, position[name]] += weight
    return a
