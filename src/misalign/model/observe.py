"""What a play was observed to do, judged from its outputs alone (docs/theory.md §9).

The theory's verdict (``Prediction.converges``, ``rho``) is a prediction; for black-box agents
it comes from a fitted map and can be wrong. This module classifies the recorded play itself.
The state ``s_t`` of round ``t`` is every agent's output at the end of the round, stacked
(length ``N d``); two states ``a`` and ``b`` are *close* when
``|a - b| <= TOL max(1, |a|, |b|)`` (Euclidean norms). A play gets the first class that applies:

1. ``failed``: a NaN appeared before any output overflowed (a language-model agent that failed
   answers NaN from then on);
2. ``growing``: an output overflowed (beyond ``play.DIVERGED``, or infinite; a NaN the
   overflow causes, ``inf - inf``, in the same turn or later counts here);
3. ``fixed point`` (period 1): at least ``SETTLED`` states at the end are close to the last;
4. ``cycle`` of period ``p``: the smallest ``2 <= p <= min(PERIODS, rounds // 2)`` for which
   each of the last ``p`` states is close to the state ``p`` rounds before (two whole periods
   seen);
5. ``growing``: the largest norm ``|s_t|`` over the last half of the rounds exceeds ``GROWTH``
   times ``max(1, the largest over the first half)``, and the last norm is at least half the
   largest of the last half;
6. ``bounded``: none of these (finite, not settled, not periodic, not growing).

Every array is vectorised over the batch of plays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from misalign.model.play import DIVERGED, Trajectory

CLASSES = ("fixed point", "cycle", "bounded", "growing", "failed")
"""The classes, in the order of their codes (``Observed.code``)."""
FIXED, CYCLE, BOUNDED, GROWING, FAILED = range(len(CLASSES))
COUNTED = {
    "fixed point": "at a fixed point",
    "cycle": "cycling",
    "bounded": "bounded, not settled",
    "growing": "growing",
    "failed": "failed",
}
"""How a count of plays of each class reads (``3 at a fixed point``, ``2 cycling``): the
batch summary and the report page."""

TOL = 1e-6
"""Two states ``a``, ``b`` are close when ``|a - b| <= TOL max(1, |a|, |b|)``: relative to the
scale of the two rounds compared, absolute below 1."""
SETTLED = 3
"""A fixed point needs at least this many states at the end close to the last (2 comparisons)."""
PERIODS = 64
"""The longest period looked for (and at most half the rounds: two whole periods are seen)."""
GROWTH = 10.0
"""A finite play is growing when the largest norm of its last half exceeds ``GROWTH`` times
``max(1, the largest norm of its first half)`` and the last norm is at least half of it."""


@dataclass(frozen=True)
class Observed:
    """The observed class of each play of a batch, and its outputs over the rounds judged.

    Attributes:
        code: per play, the index of its class in ``CLASSES``, shape ``(B,)``.
        period: per play, 1 for a fixed point, ``p`` for a cycle, ``-1`` otherwise.
        first: per play, the first round of the tail judged (0-based), ``-1`` without one.
        last: per play, the last round of the tail (inclusive), ``-1`` without one.
        mean: per agent, its mean output over the tail, ``(B, d)``; NaN without a tail.
        spread: per agent, the RMS distance of its outputs over the tail from ``mean``,
            ``(B,)``; NaN without a tail.
    """

    code: np.ndarray
    period: np.ndarray
    first: np.ndarray
    last: np.ndarray
    mean: dict[str, np.ndarray]
    spread: dict[str, np.ndarray]

    def as_json(self, play: int) -> dict[str, Any]:
        """The JSON of one play: ``class``, ``period`` (a cycle's; ``null`` otherwise),
        ``tail`` (``[first, last]``, or ``null``) and ``agents.<name>`` (``mean``,
        ``spread``; ``null`` without a tail).

        Args:
            play: the play's index in the batch.

        Returns:
            The play's classification as plain Python values.
        """
        tail = None if self.first[play] < 0 else [int(self.first[play]), int(self.last[play])]
        return {
            "class": CLASSES[self.code[play]],
            "period": int(self.period[play]) if self.code[play] == CYCLE else None,
            "tail": tail,
            "agents": {
                name: {
                    "mean": None if tail is None else self.mean[name][play].tolist(),
                    "spread": None if tail is None else float(self.spread[name][play]),
                }
                for name in self.mean
            },
        }

    def counts(self) -> dict[str, Any]:
        """The batch in numbers: ``counts`` (plays per class, every class present) and
        ``periods`` (cycles per period, the period as a string key).

        Returns:
            ``{"counts": {class: n}, "periods": {"p": n}}``.
        """
        periods, cycles = np.unique(self.period[self.code == CYCLE], return_counts=True)
        return {
            "counts": {name: int((self.code == k).sum()) for k, name in enumerate(CLASSES)},
            "periods": {str(p): int(n) for p, n in zip(periods, cycles, strict=True)},
        }


def classify(trajectory: Trajectory) -> Observed:
    """Classify every play of a batch from its outputs alone (the module's rules).

    The tail is the rounds a play was judged on: for a fixed point the settled suffix (every
    state close to the last), for a cycle the largest whole number of periods within the
    suffix of matched states (``s_t`` close to ``s_{t-p}``), otherwise the last half of the
    finite rounds (``[n // 2, n - 1]`` for ``n`` finite rounds; none when ``n = 0``).

    Args:
        trajectory: the recorded play (it may be cut short when every play diverged).

    Returns:
        The classes, periods, tails and per-agent mean and spread over the tail.
    """
    rounds, batch = trajectory.rounds, trajectory.turns.shape[1]
    blocks = [trajectory.outputs(name) for name in trajectory.schedule.agents]
    stop = trajectory.diverged_at
    failed, overflowed = _failure(trajectory)
    with np.errstate(over="ignore", invalid="ignore"):  # diverged plays are classified apart
        size = sum(_squared(block) for block in blocks)  # |s_t|^2, shape (rounds, B)
        settled = settled_rounds(blocks, size)
        period = np.where(settled >= SETTLED, 1, -1)
        for p in range(2, min(PERIODS, rounds // 2) + 1):
            recent, before = slice(rounds - p, rounds), slice(rounds - 2 * p, rounds - p)
            periodic = _close(blocks, size, recent, before).all(axis=0)
            period = np.where((period < 0) & periodic, p, period)
        half = rounds // 2
        growing = np.zeros(batch, dtype=bool)
        if half:
            early, late = size[:half].max(axis=0), size[half:].max(axis=0)
            growing = (late > GROWTH**2 * np.maximum(1.0, early)) & (size[-1] >= late / 4)
    code = np.select(
        [failed, overflowed, period == 1, period > 1, growing],
        [FAILED, GROWING, FIXED, CYCLE, GROWING],
        BOUNDED,
    )
    period = np.where((code == FIXED) | (code == CYCLE), period, -1)
    finite = np.where(stop < 0, rounds, stop)
    first = np.where(finite > 0, finite // 2, -1)
    first = np.where(code == FIXED, rounds - settled, first)
    cycles = np.flatnonzero(code == CYCLE)
    first[cycles] = rounds - _whole_periods(blocks, size, period[cycles], cycles)
    last = np.where(first >= 0, finite - 1, -1)
    mean, spread = _tail_moments(trajectory, first, last)
    return Observed(code, period, first, last, mean, spread)


def settled_rounds(blocks: list[np.ndarray], size: np.ndarray | None = None) -> np.ndarray:
    """Per play, how many of the last states are close to the last (itself included): a
    fixed point has at least ``SETTLED``.

    Args:
        blocks: every agent's outputs, ``(rounds, B, d)`` each.
        size: ``|s_t|^2``, ``(rounds, B)`` (computed when ``None``).

    Returns:
        The counts, ``(B,)``.
    """
    rounds = len(blocks[0])
    size = sum(_squared(block) for block in blocks) if size is None else size
    return _trailing(_close(blocks, size, slice(None), slice(rounds - 1, rounds)))


def _failure(trajectory: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """Per play, whether it failed (a NaN came first) or overflowed (a value beyond
    ``DIVERGED`` or infinite came first, or in the same turn as the first NaN), judged turn by
    turn within the round where it diverged (``diverged_at``: every earlier value is finite
    and moderate)."""
    turns, stop = trajectory.turns, trajectory.diverged_at
    shape = (trajectory.rounds, len(trajectory.schedule.turns), *turns.shape[1:])
    failed, overflowed = np.zeros(len(stop), dtype=bool), np.zeros(len(stop), dtype=bool)
    bad = np.flatnonzero(stop >= 0)
    block = turns.reshape(shape)[stop[bad], :, bad]  # (plays, turns of the round, d)
    nan = _first(np.isnan(block).any(axis=-1))
    huge = _first((np.abs(block) > DIVERGED).any(axis=-1))  # NaN compares False
    failed[bad] = nan < huge
    overflowed[bad] = nan >= huge
    return failed, overflowed


def _first(mask: np.ndarray) -> np.ndarray:
    """Per row of ``mask`` (plays x turns), the first ``True`` turn; the row length if none."""
    return np.where(mask.any(axis=-1), mask.argmax(axis=-1), mask.shape[-1])


def _squared(x: np.ndarray) -> np.ndarray:
    """``|x|^2`` over the last axis."""
    return np.einsum("...i,...i->...", x, x)


def _close(blocks: list[np.ndarray], size: np.ndarray, later, earlier) -> np.ndarray:
    """Whether the states at the rounds ``later`` are close to those at ``earlier`` (indices of
    the (round, play) axes, broadcast against each other): ``|a - b|^2 <= TOL^2 max(1, |a|^2,
    |b|^2)``, the squared distance summed over the agents' blocks."""
    gap = sum(_squared(block[later] - block[earlier]) for block in blocks)
    return gap <= TOL**2 * np.maximum(1.0, np.maximum(size[later], size[earlier]))


def _trailing(ok: np.ndarray) -> np.ndarray:
    """Per play, how many of the last rounds are all ``True`` in ``ok`` (rounds x plays)."""
    return np.logical_and.accumulate(ok[::-1], axis=0).sum(axis=0)


def _whole_periods(
    blocks: list[np.ndarray], size: np.ndarray, period: np.ndarray, plays: np.ndarray
) -> np.ndarray:
    """For the cycles ``plays`` of periods ``period``, the rounds in the largest whole number
    of periods at the end of the matched suffix (the states ``s_t`` close to ``s_{t-p}``,
    and the ``p`` states they are compared with)."""
    rounds = size.shape[0]
    t = np.arange(rounds)[:, None]
    now, then = (t, plays[None]), (np.maximum(t - period, 0), plays[None])
    matched = _trailing(_close(blocks, size, now, then) & (t >= period))
    return (matched + period) // period * period


def _tail_moments(
    trajectory: Trajectory, first: np.ndarray, last: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per agent, the mean output over each play's tail ``[first, last]`` and the RMS distance
    of the outputs there from it (NaN where a play has no tail)."""
    t = np.arange(trajectory.rounds)[:, None]
    inside = ((t >= first) & (t <= last))[..., None]  # (rounds, B, 1)
    count = inside.sum(axis=0)  # (B, 1)
    mean, spread = {}, {}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for name in trajectory.schedule.agents:
            outputs = trajectory.outputs(name)
            mean[name] = np.where(inside, outputs, 0.0).sum(axis=0) / count
            gap = _squared(np.where(inside, outputs - mean[name], 0.0)).sum(axis=0)
            spread[name] = np.sqrt(gap / count[:, 0])
    return mean, spread
