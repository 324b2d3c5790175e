"""What a batch of plays measured, reduced round by round while it runs.

``run --seeds`` reports and draws, per play, the final output of every agent, the round after
which every output stays within ``TOL`` (relative) of its predicted limit (the measured
counterpart of the theory's ``rounds_to_tol``), whether the play settled, and, at the recorded
rounds, each agent's distance to its own target. ``Measure`` computes these from each round's
outputs as the play produces them (``misalign.model.play.play``'s ``on_round``), so a batch
need not keep its outputs: memory is ``O(plays x d)`` plus the recorded distances (single
precision, ``O(plays x recorded rounds)``). Over a recorded trajectory it gives the same
numbers, bit for bit (``measure``).

The observed class of a play (``misalign.model.observe``) needs its whole play for cycles and
growth; here only the common case is settled at once: a finite play whose last ``SETTLED``
states are close to its last is a fixed point. The others are listed (``unsettled``) for a
caller that holds, or can replay, their outputs (``classify`` of those plays alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from misalign.model.observe import FIXED, SETTLED, Observed, classify, settled_rounds
from misalign.model.play import Trajectory
from misalign.model.theory import Prediction
from misalign.runtime import device

CLOSE = 1e-8
"""An output is at its predicted limit ``s*`` when within ``CLOSE * max(1, |s*|)``."""
FLUSH = 64
"""``Measure`` keeps each round's far flags (one byte per play) and folds this many rounds at
a time into ``last_far``."""


@dataclass
class Measured:
    """A batch's measurements beside its predictions, per play (``B`` plays) and per recorded
    round.

    Attributes:
        rounds: the rounds played.
        recorded: the rounds (1-based) whose distances are kept, ``(R,)``; empty when none.
        diverged_at: per play, the round its outputs left ``[-DIVERGED, DIVERGED]``, or -1.
        last_far: per play, the last round (0-based) at which some output was not within
            ``CLOSE`` of its predicted limit, -1 when none.
        distance: per agent with a target, its distance to it at the recorded rounds,
            ``(R, B)`` float32.
        final_distance: per agent with a target, its final output's distance to it, ``(B,)``.
        final_gap: per agent, the squared distance of its final output to its predicted limit.
        code: per play, its observed class (``misalign.model.observe.CLASSES``), -1 until
            classified.
        period: per play, 1 for a fixed point, ``p`` for a cycle, -1 otherwise.
        rho: per play, the predicted rate.
        converges: per play, whether the theory predicts convergence.
        residual: per agent with a target, the predicted distance of its limit to it.
        variance: per sampled agent, the trace of its predicted stationary covariance.
    """

    rounds: int
    recorded: np.ndarray
    diverged_at: np.ndarray
    last_far: np.ndarray
    distance: dict[str, np.ndarray]
    final_distance: dict[str, np.ndarray]
    final_gap: dict[str, np.ndarray]
    code: np.ndarray
    period: np.ndarray
    rho: np.ndarray
    converges: np.ndarray
    residual: dict[str, np.ndarray]
    variance: dict[str, np.ndarray]

    @classmethod
    def empty(cls, plays: int, names: Sequence[str], targeted: Sequence[str], recorded) -> Measured:
        """Room for ``plays`` plays of agents ``names`` (``targeted``: those with a target)
        with distances kept at the rounds ``recorded`` (1-based)."""
        recorded = np.asarray(recorded, dtype=np.int64)

        def per(agents) -> dict[str, np.ndarray]:
            return {n: np.full(plays, np.nan) for n in agents}

        return cls(
            rounds=0,
            recorded=recorded,
            diverged_at=np.full(plays, -1),
            last_far=np.full(plays, -1),
            distance={n: np.full((len(recorded), plays), np.nan, np.float32) for n in targeted},
            final_distance=per(targeted),
            final_gap=per(names),
            code=np.full(plays, -1),
            period=np.full(plays, -1),
            rho=np.full(plays, np.nan),
            converges=np.zeros(plays, dtype=bool),
            residual=per(targeted),
            variance={},
        )

    def predicted(self, plays: slice | np.ndarray, prediction: Prediction) -> None:
        """Take the predictions of ``plays`` (``rho``, convergence, residuals, variances)."""
        self.rho[plays], self.converges[plays] = prediction.rho, prediction.converges
        for name in self.residual:
            self.residual[name][plays] = np.linalg.norm(prediction.residual[name], axis=-1)
        for name, sigma in prediction.covariance.items():
            if name not in self.variance:
                self.variance[name] = np.full(len(self.rho), np.nan)
            self.variance[name][plays] = np.trace(sigma, axis1=-2, axis2=-1)

    @property
    def ok(self) -> np.ndarray:
        """Per play, whether it converges: by the theory (``rho < 1``) and with outputs that
        stayed finite."""
        return (self.diverged_at < 0) & self.converges

    def rounds_to_prediction(self) -> np.ndarray:
        """Per play, the round (from 1) after which every output stays within ``CLOSE`` of its
        predicted limit; -1 where it is not there at the end."""
        return np.where(self.last_far < self.rounds - 1, self.last_far + 2, -1)

    def unsettled(self) -> np.ndarray:
        """The plays not yet classified: diverged, or finite but not settled."""
        return np.flatnonzero(self.code < 0)

    def observe(self, plays: np.ndarray, observed: Observed) -> None:
        """Take the classes of ``plays`` from ``observed`` (``classify`` of those plays)."""
        self.code[plays], self.period[plays] = observed.code, observed.period

    def observed(self) -> Observed:
        """The observed classes (``Observed.counts`` gives the batch's); raises while some
        play is not classified."""
        if (self.code < 0).any():
            raise ValueError("some plays are not classified yet")
        return Observed(self.code, self.period, None, None, {}, {})


class Measure:
    """The reducer of one run of plays ``plays`` of a ``Measured`` batch: call ``round`` with
    each round's outputs, then ``finish``.

    Args:
        into: the batch's measurements.
        plays: which of its plays this run holds (a slice).
        rounds: the rounds the run will play.
        fixed_point: per agent, its predicted limit in each play, ``(b, d)`` (NaN or
            infinite where the theory predicts none: never close).
        targets: per agent with a target, ``(b, d)``.

    The outputs may be numpy arrays or torch tensors on a device (``misalign.runtime.device``):
    on a device, ``fixed_point`` and ``targets`` are taken there too, each round is reduced
    there, and only the kept distances and the last rounds' states come back.
    """

    def __init__(
        self,
        into: Measured,
        plays: slice,
        rounds: int,
        fixed_point: Mapping[str, np.ndarray],
        targets: Mapping[str, np.ndarray],
    ) -> None:
        self.into, self.plays, self.rounds = into, plays, rounds
        self.fixed_point = [(n, device.host(s)) for n, s in fixed_point.items()]
        self.targets = [(n, device.host(t)) for n, t in targets.items()]
        with np.errstate(over="ignore", invalid="ignore"):
            self.reach = [  # squared: |s - s*|^2 <= (CLOSE max(1, |s*|))^2
                (CLOSE * np.maximum(1.0, np.linalg.norm(s, axis=-1))) ** 2
                for _, s in self.fixed_point
            ]
        self.column = {int(r) - 1: k for k, r in enumerate(into.recorded)}
        self.last_far = into.last_far[plays]
        self._on: tuple | None = None  # the above on the outputs' device (``_placed``)
        self._distance: dict = {}  # kept distances on a device (``_kept``)
        self.last: list[dict[str, np.ndarray]] = []  # the last SETTLED rounds' outputs
        self._scratch: tuple[np.ndarray, ...] | None = None
        self._far: np.ndarray | None = None  # rounds since the last flush: far or not
        self._since = self._next = 0  # the first of those rounds, and the next round

    def round(self, t: int, outputs: Mapping[str, np.ndarray]) -> None:
        """Reduce round ``t``'s outputs (every agent's, ``(b, d)``); rounds come in order."""
        gap, square, close, near = self._buffers(outputs)
        far = self._far[t - self._since]
        fixed_point, reach, targets = self._placed(gap)
        xp = device.namespace(gap)
        with np.errstate(over="ignore", invalid="ignore"):
            for k, ((name, fixed), within) in enumerate(zip(fixed_point, reach, strict=True)):
                xp.subtract(outputs[name], fixed, out=gap)
                _squares(gap, out=square)
                xp.less_equal(square, within, out=near if k else close)  # NaN: far
                if k:
                    close &= near
            xp.logical_not(close, out=far)
            column = self.column.get(t)
            if column is not None:
                for name, target in targets:
                    xp.subtract(outputs[name], target, out=gap)
                    _squares(gap, out=square)
                    if device.is_numpy(square):
                        row = self.into.distance[name][column, self.plays]
                        np.sqrt(square, out=row, casting="same_kind")
                    else:  # float32, as kept, on the device until ``finish``
                        self._kept(name, square)[column] = square.sqrt()
        self._next = t + 1
        if self._next - self._since == len(self._far):
            self._flush()
        if t >= self.rounds - SETTLED:
            self.last.append({n: np.array(device.host(s)) for n, s in outputs.items()})

    def _kept(self, name: str, like):
        """Agent ``name``'s kept distances on ``like``'s device, ``(R, b)`` float32 (NaN until
        recorded, as in ``Measured``)."""
        if name not in self._distance:
            shape = (len(self.into.recorded), len(like))
            self._distance[name] = device.full(shape, np.nan, like, "float32")
        return self._distance[name]

    def _placed(self, like) -> tuple[list, list, list]:
        """The fixed points, their squared reach and the targets on ``like``'s device."""
        if device.is_numpy(like):
            return self.fixed_point, self.reach, self.targets
        if self._on is None:
            self._on = (
                [(n, device.on(s, like)) for n, s in self.fixed_point],
                [device.on(r, like) for r in self.reach],
                [(n, device.on(t, like)) for n, t in self.targets],
            )
        return self._on

    def _flush(self) -> None:
        """Fold the far flags of the rounds since the last flush into ``last_far``: per play,
        the last of them at which it was far (one pass instead of one per round)."""
        count = self._next - self._since
        if count == 0:
            return
        if device.is_numpy(self._far):
            flags = self._far[count - 1 :: -1]
            latest = count - 1 - np.argmax(flags, axis=0)
            anywhere = flags.any(axis=0)
        else:  # a device's flags: the last far round found there, one number per play back
            flags = self._far[:count].flip(0)
            latest = device.host(count - 1 - flags.byte().argmax(0))
            anywhere = device.host(flags.any(0))
        np.copyto(self.last_far, self._since + latest, where=anywhere)
        self._since += count

    def _buffers(self, outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """Scratch arrays for ``round``, made once."""
        if self._scratch is None:
            like = next(iter(outputs.values()))
            b, d = like.shape
            self._scratch = (
                device.empty((b, d), like),
                device.empty((b,), like),
                device.empty((b,), like, "bool"),
                device.empty((b,), like, "bool"),
            )
            self._far = device.empty((min(FLUSH, self.rounds), b), like, "bool")
        return self._scratch

    def finish(self, diverged_at: np.ndarray, rounds: int) -> None:
        """Close the run: ``diverged_at`` per play and the ``rounds`` it played (fewer than
        asked when every play diverged); its settled plays are classified as fixed points.
        The batch's ``rounds`` is its caller's to set: runs of one batch on threads would race
        for it (``misalign.workflows.batch.stream`` takes the longest run's)."""
        into, plays = self.into, self.plays
        if self._far is not None:
            self._flush()
        diverged_at = device.host(diverged_at)
        into.diverged_at[plays] = diverged_at
        for name, kept in self._distance.items():
            into.distance[name][:, plays] = device.host(kept)
        into.last_far[plays] = self.last_far
        if not self.last or rounds < self.rounds:
            return  # every play diverged: each is classified from its outputs (``classify``)
        final = self.last[-1]
        with np.errstate(over="ignore", invalid="ignore"):
            for name, target in self.targets:
                into.final_distance[name][plays] = np.linalg.norm(final[name] - target, axis=-1)
            for name, fixed in self.fixed_point:
                gap = final[name] - fixed
                into.final_gap[name][plays] = np.einsum("bi,bi->b", gap, gap)
        if len(self.last) < SETTLED:
            return  # too few rounds to have settled
        settled = (diverged_at < 0) & self._settled()
        code, period = into.code[plays], into.period[plays]
        code[settled], period[settled] = FIXED, 1
        into.code[plays], into.period[plays] = code, period

    def _settled(self) -> np.ndarray:
        """Whether each play's last ``SETTLED`` states are close to its last
        (``misalign.model.observe``'s rule, ``settled_rounds``)."""
        names = list(self.last[-1])
        blocks = [np.stack([state[n] for state in self.last]) for n in names]
        with np.errstate(over="ignore", invalid="ignore"):
            return settled_rounds(blocks) >= SETTLED


def _squares(gap, out) -> None:
    """``|gap|^2`` per row of ``gap`` ``(b, d)``, into ``out`` ``(b,)``."""
    if device.is_numpy(gap):
        np.einsum("bi,bi->b", gap, gap, out=out)
    else:
        device.namespace(gap).linalg.vecdot(gap, gap, out=out)


def measure(
    trajectory: Trajectory,
    prediction: Prediction,
    targets: Mapping[str, np.ndarray],
    recorded: Sequence[int] = (),
    classified: bool = True,
) -> Measured:
    """The measurements of a recorded batch: ``Measure`` over its rounds, then (``classified``)
    ``classify`` of the plays that did not settle.

    Args:
        trajectory: the recorded play.
        prediction: its prediction.
        targets: per agent with a target, ``(B, d)``.
        recorded: the rounds (1-based) whose distances are kept.
        classified: classify every play.

    Returns:
        The measurements.
    """
    recorded = [r for r in recorded if r <= trajectory.rounds]
    into = Measured.empty(
        len(trajectory.start), trajectory.schedule.agents, list(targets), recorded
    )
    into.predicted(slice(None), prediction)
    _reduce(
        trajectory, Measure(into, slice(None), trajectory.rounds, prediction.fixed_point, targets)
    )
    rest = into.unsettled()
    if classified and len(rest):
        into.observe(rest, classify(trajectory.select(rest)))
    return into


def rounds_to_prediction(
    fixed_point: Mapping[str, np.ndarray], trajectory: Trajectory
) -> np.ndarray:
    """Per play of a recorded batch, the round (from 1) after which every output stays within
    ``CLOSE`` of its predicted limit ``fixed_point[name]`` (``(B, d)``): the measured
    counterpart of the theory's ``rounds_to_tol``; -1 where it never does."""
    into = Measured.empty(len(trajectory.start), trajectory.schedule.agents, [], [])
    _reduce(trajectory, Measure(into, slice(None), trajectory.rounds, fixed_point, {}))
    return into.rounds_to_prediction()


def _reduce(trajectory: Trajectory, reducer: Measure) -> None:
    """Feed ``reducer`` every recorded round of ``trajectory``, then finish it."""
    names = trajectory.schedule.agents
    outputs = {name: trajectory.outputs(name) for name in names}
    for t in range(trajectory.rounds):
        reducer.round(t, {name: outputs[name][t] for name in names})
    reducer.finish(trajectory.diverged_at, trajectory.rounds)
    reducer.into.rounds = trajectory.rounds
