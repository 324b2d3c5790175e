"""``run --seeds N``: a batch of plays of one configuration, measured while it plays.

What a run keeps of each play's outputs (``--record``):

- ``all``: every output of every play, the batch played at once and measured afterwards
  (``misalign.outputs.batch.measured``);
- ``every K``: nothing but the measurements (``misalign.model.measure``): the plays run in
  chunks of ``CHUNK``, each set up, predicted, played and reduced round by round, then
  dropped; each agent's distance to its target is kept every ``K`` rounds (and the last), in
  single precision. Memory is ``O(plays x (d + rounds / K))``;
- ``last``: the same without the per-round distances (the figure shows the final distances).

The default is chosen by size (``choose``): ``all`` while every output fits in ``ALL_BYTES``,
then ``every K`` with the least ``K`` whose distances fit in ``KEPT_BYTES``, then ``last``.
Plays are pure functions of their seeds (``misalign.model.philox``), so a chunk's play ``i``
is the single run of its seed, bit for bit, whatever the chunking; the few plays that did not
settle are played again alone, recorded, and classified from their outputs
(``misalign.model.observe.classify``). Plays whose prediction depends on the play itself
(language models and other black boxes, attacks, defences, helpers) are recorded whole.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from misalign.api import JSON_FLOAT, Game, check_device, predict, setup, simulate
from misalign.api import footprint as footprint_of
from misalign.config import BlackBoxConfig, ConfigError, HelperAgentConfig, PlayConfig
from misalign.model.measure import FLUSH, Measure, Measured
from misalign.model.observe import classify
from misalign.model.philox import as_seeds
from misalign.model.play import play
from misalign.model.theory import Prediction
from misalign.outputs.batch import RECORDED, recorded_rounds
from misalign.runtime.device import own_stream
from misalign.runtime.progress import progress_bar
from misalign.runtime.sizes import USABLE, available_memory, cores, require
from misalign.runtime.text import plural

ALL_BYTES = 256 * 2**20
"""``--record all`` by default while every output of the batch fits in this."""
KEPT_BYTES = 512 * 2**20
"""``every K`` by default while the kept distances fit in this (else ``last``)."""
CHUNK = 16384
"""Plays set up, played and measured together without ``--record all``."""
DEVICE_CHUNK = 65536
"""The same on a GPU (``--device cuda``): larger, so that each of the play's products fills
it (as many at once as its free memory holds, ``device_footprint``)."""
REPLAYED = 64 * 2**20
"""A chunk replays its unsettled plays, recorded, in groups whose outputs fit in this."""
FLOAT = 8


@dataclass(frozen=True)
class Record:
    """What a batch keeps of its plays' outputs.

    Attributes:
        mode: ``all``, ``every`` or ``last``.
        every: ``K`` of ``every K`` (1 for ``all``, 0 for ``last``).
    """

    mode: str
    every: int = 1

    def __str__(self) -> str:
        return f"every {self.every}" if self.mode == "every" else self.mode

    @classmethod
    def parse(cls, text: str) -> Record:
        """``all``, ``last`` or ``every K`` (also ``every=K``, ``every:K``).

        Raises:
            ConfigError: one line naming ``--record``.
        """
        text = text.strip().lower()
        if text in ("all", "last"):
            return cls(text, 1 if text == "all" else 0)
        match = re.fullmatch(r"every[\s:=]*(\d+)", text)
        if match and int(match[1]) >= 1:
            return cls("every", int(match[1]))
        raise ConfigError(f"--record {text!r}: all, last or 'every K' with K >= 1")


def streamable(config: PlayConfig) -> str | None:
    """Why the plays of ``config`` must be recorded whole (``None`` when they need not be):
    a prediction that depends on the play itself, or agents that read earlier turns."""
    if config.attack is not None:
        return "an attack"
    if config.defence is not None:
        return "a defence"
    for name, agent in config.agents.items():
        if isinstance(agent, BlackBoxConfig):
            return f"agents.{name} is a black box (its map is fitted)"
        if isinstance(agent, HelperAgentConfig):
            return f"agents.{name} is a helper"
    return None


def choose(
    config: PlayConfig, plays: int, asked: Record | None = None, streamed: bool = False
) -> Record:
    """The record of a batch of ``plays`` plays: ``asked``, checked, or chosen by size
    (``streamed``: never ``all`` unless the plays need it, as on a device).

    Raises:
        ConfigError: ``asked`` keeps less than every output of plays that need them all.
    """
    why = streamable(config)
    if asked is not None and asked.mode != "all" and why is not None:
        raise ConfigError(f"--record {asked}: {why}; such plays are recorded whole (all)")
    if asked is not None:
        return asked
    outputs = plays * _outputs(config)
    small = outputs <= min(ALL_BYTES, available_memory() / 4) and not streamed
    if why is not None or plays == 1 or small:
        return Record("all")
    targeted = len([a for a in config.agents.values() if not isinstance(a, HelperAgentConfig)])
    most = KEPT_BYTES // (plays * targeted * 4)  # rounds whose distances fit
    if most < 1:
        return Record("last", 0)
    least = max(1, -(-config.rounds // RECORDED))
    return Record("every", min(config.rounds, max(least, -(-config.rounds // most))))


@dataclass(frozen=True)
class Streamed:
    """A batch measured in chunks.

    Attributes:
        first: play 0 set up alone (the single run of the first seed: the report's play).
        prediction: its prediction.
        measured: every play's measurements beside its prediction.
        seeds: the plays' seeds.
        workers: the threads that ran the chunks.
        device: where the chunks played: ``numpy``, or a torch device as given (``cuda``,
            ``cuda:1``, ``cpu``).
    """

    first: Game
    prediction: Prediction
    measured: Measured
    seeds: np.ndarray
    workers: int
    device: str = "numpy"


def stream(
    config: PlayConfig,
    seeds: Sequence[int],
    record: Record,
    progress: bool = False,
    phases: dict[str, float] | None = None,
    workers: int | None = None,
    device=None,
) -> Streamed:
    """Set up, predict, play and measure ``config`` over ``seeds`` in chunks (``chunk_size``),
    keeping only the measurements (``record`` not ``all``).

    The chunks run on ``workers`` threads (numpy leaves Python's lock inside its array
    loops and linear algebra, so the threads run on as many cores); each chunk writes its own
    plays' slice of the measurements, so the numbers are the same bit for bit whatever the
    workers and whatever the order the chunks end in.

    Args:
        config: the configuration.
        seeds: the plays' seeds.
        record: what to keep.
        progress: a bar on stderr.
        phases: seconds spent per phase (``setup``, ``predict``, ``play``, ``replay``),
            summed over the workers, are added here when given.
        workers: threads, at most one a chunk (default: every core, as many chunks as the
            memory holds).
        device: a ``torch.device`` (``misalign.runtime.device.resolve``) on which each chunk
            is set up, played and measured, as float64 tensors equal to numpy's within
            rounding (amplified by the conditioning of a ``newton`` agent's ``S``); its
            prediction is numpy's, on the CPU thread, from the maps copied back; the report's
            play and the replays stay on numpy. ``None``: numpy throughout.

    Returns:
        The measurements, and the first play set up alone.

    Raises:
        ConfigError: one line: the batch does not fit in memory with ``workers`` chunks at
            once; on a device, plays that cannot run there (``misalign.api.check_device``),
            chunks that do not fit in a GPU's free memory, or a GPU out of memory.
    """
    what = f"a batch of {plural(len(seeds), 'play', spec=',')}"
    if device is not None:
        check_device(config)
    size = chunk_size(device)
    most = max(1, _chunks(len(seeds), size))
    asked = workers is not None
    workers = min(workers or threads(config, len(seeds), record, size), most)
    if device is not None:
        workers = _on_gpu(config, record, size, workers, device, asked)
    require(footprint(config, len(seeds), record, workers, size), what)
    first = setup(config, seeds=list(seeds[:1]))
    prediction = predict(first)
    names = first.schedule.agents
    targeted = [n for n in names if n in first.targets]
    recorded = recorded_rounds(config.rounds, record.every)
    seeds = as_seeds(seeds)
    measured = Measured.empty(len(seeds), names, targeted, recorded)
    for name in prediction.covariance:  # made here, filled by every chunk
        measured.variance[name] = np.full(len(seeds), np.nan)
    bar = progress_bar(len(seeds), "plays") if progress else None

    stop = threading.Event()

    def one(start: int) -> tuple[int, int, dict[str, float]]:
        plays = slice(start, min(start + size, len(seeds)))
        try:
            with own_stream(device):
                played, spent = _chunk(config, seeds[plays], plays, measured, stop, device)
        except RuntimeError as exc:  # torch's OutOfMemoryError is one
            if device is None or "out of memory" not in str(exc):
                raise
            raise ConfigError(
                f"--device {device}: out of memory with {plural(workers, 'chunk')} of "
                f"{size} plays at once; use fewer --workers"
            ) from None
        return plays.stop - plays.start, played, spent

    pool = ThreadPoolExecutor(workers, thread_name_prefix="misalign-chunk")
    try:
        starts = range(0, len(seeds), size)
        for done in as_completed([pool.submit(one, start) for start in starts]):
            count, played, spent = done.result()
            measured.rounds = max(measured.rounds, played)  # a chunk of diverged plays stops
            for phase, seconds in spent.items():
                if phases is not None:
                    phases[phase] = phases.get(phase, 0.0) + seconds
            if bar is not None:
                bar.advance(bar.task_ids[0], count)
    except BaseException:  # an error, Ctrl-C, SIGTERM: the running chunks stop within a round
        stop.set()
        raise
    finally:  # and the chunks not started never start
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.stop()
    where = "numpy" if device is None else str(device)
    return Streamed(first, prediction, measured, seeds, workers, where)


def footprint(
    config: PlayConfig, plays: int, record: Record, workers: int = 1, chunk: int | None = None
) -> dict[str, float]:
    """Estimated peak memory of ``stream``, in bytes, keyed by the setting that drives each
    part: per play its measurements (``seeds``: eleven numbers, three more per agent, and the
    JSON's per-play lists), the kept distances and each running chunk's replayed plays
    (``rounds``), one chunk's set-up and play (``misalign.api.footprint`` of a chunk's plays,
    one round kept) and those of the other chunks that run at once (``--workers``: at most
    one a chunk). ``chunk``: plays per chunk (``DEVICE_CHUNK`` on a GPU, where the chunk's
    maps and prediction still come to the CPU)."""
    agents = len(config.agents)
    kept = len(recorded_rounds(config.rounds, record.every)) * plays * agents * 4
    size = chunk or chunk_size()
    chunk = footprint_of(config.model_copy(update={"rounds": 2}), min(plays, size))
    chunk.pop("rounds", None)
    more = min(workers, _chunks(plays, size)) - 1  # chunks at once besides the first
    replayed = min(REPLAYED, min(plays, size) * _outputs(config))
    return {
        "seeds": plays * (11 + 3 * agents) * FLOAT + plays * (2 + 2 * agents) * JSON_FLOAT,
        "rounds": kept + (more + 1) * replayed,
        **chunk,
        **({"--workers": more * sum(chunk.values())} if more > 0 else {}),
    }


def threads(config: PlayConfig, plays: int, record: Record, chunk: int | None = None) -> int:
    """``stream``'s threads by default: every core, at most one a chunk of ``chunk`` plays,
    and no more chunks at once than fit in memory beside the batch's measurements (at least
    one: ``require`` then refuses a batch whose one chunk does not fit)."""
    size = chunk or chunk_size()
    one = sum(footprint(config, plays, record, 1, size).values())
    each = sum(footprint(config, plays, record, 2, size).values()) - one
    fitting = int((available_memory() * USABLE - one) // max(each, 1)) + 1
    return max(1, min(cores(), _chunks(plays, size), fitting))


def chunk_size(device=None) -> int:
    """Plays per chunk of a streamed batch: ``DEVICE_CHUNK`` on a GPU, else ``CHUNK`` (numpy,
    and torch's CPU build, whose arrays then stay in the same caches)."""
    return DEVICE_CHUNK if device is not None and device.type == "cuda" else CHUNK


def device_footprint(config: PlayConfig, record: Record, chunk: int) -> float:
    """Estimated peak bytes of one chunk of ``chunk`` plays on a device: per agent its prompt
    (``X``, ``y``), moments, preconditioner, map, fixed point and target; the temporaries of
    its largest draw (the Philox words and uniforms of the whole chunk at once: six times the
    normals); two rounds of outputs and the measurements' scratch; the kept distances
    (single precision, until the chunk ends). The prediction is on the host."""
    d, per = config.d, 0.0
    for agent in config.agents.values():  # analytic agents only (check_device)
        per += FLOAT * (agent.n * (d + 1) + 4 * d * d + 5 * d)
    per += 6 * FLOAT * max(a.n * d for a in config.agents.values())
    per += FLOAT * d * (2 * len(config.order) + 1) + FLUSH
    per += 4 * len(config.agents) * len(recorded_rounds(config.rounds, record.every))
    return chunk * per


def _on_gpu(
    config: PlayConfig, record: Record, chunk: int, workers: int, device, asked: bool
) -> int:
    """The chunks at once on a GPU: ``workers``, or fewer by default where they do not fit in
    its free memory (as torch reports it, against ``device_footprint``).

    Raises:
        ConfigError: one line: ``workers`` were asked and do not fit, or one chunk does not.
    """
    if device.type != "cuda":
        return workers
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    one = device_footprint(config, record, chunk)
    fitting = int(free * USABLE // one)
    if fitting >= workers or (fitting >= 1 and not asked):
        return min(workers, fitting)
    need = workers if asked else 1
    raise ConfigError(
        f"--device {device}: {plural(need, 'chunk')} of {chunk} plays at once need "
        f"{need * one / 2**30:.3g} GiB of its {free / 2**30:.3g} GiB free"
        + ("; use fewer --workers" if asked and fitting >= 1 else "")
    )


def _outputs(config: PlayConfig) -> int:
    """Bytes of one play's outputs, every turn of every round."""
    return config.rounds * len(config.order) * config.d * FLOAT


def _chunks(plays: int, chunk: int) -> int:
    """How many chunks of ``chunk`` plays a batch of ``plays`` plays runs in."""
    return -(-plays // chunk)


class Stopped(Exception):
    """A chunk stopped because its batch was stopped."""


def _chunk(
    config: PlayConfig,
    seeds: np.ndarray,
    plays: slice,
    measured: Measured,
    stop: threading.Event,
    device=None,
) -> tuple[int, dict[str, float]]:
    """One chunk: set up, predict, play without recording, reduce, and classify the plays
    that did not settle from a recorded replay of them alone (on numpy); ``stop`` set ends it
    at the next round (``Stopped``); ``device``: set up, play and reduce there.

    Returns:
        The rounds it played (fewer than asked when all its plays diverged), and the seconds
        spent per phase.
    """
    phases: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[phase] = now - clock
        clock = now

    sized = config.model_copy(update={"rounds": 2})  # sized unrecorded
    game = setup(sized, seeds=seeds, device=device)
    lap("setup")
    prediction = predict(game)
    measured.predicted(plays, prediction)
    lap("predict")
    targets = {n: game.targets[n] for n in measured.distance}
    reducer = Measure(measured, plays, config.rounds, prediction.fixed_point, targets)

    def reduced(t: int, outputs) -> None:
        if stop.is_set():
            raise Stopped
        reducer.round(t, outputs)

    trajectory = play(
        game.agents, game.schedule, config.rounds, game.start, record=False, on_round=reduced
    )
    played = trajectory.skipped + trajectory.rounds
    reducer.finish(trajectory.diverged_at, played)
    lap("play")
    rest = np.flatnonzero(measured.code[plays] < 0)
    group = max(1, REPLAYED // _outputs(config))
    for first in range(0, len(rest), group):
        some = rest[first : first + group]
        again = setup(config, seeds=seeds[some])
        measured.observe(plays.start + some, classify(simulate(again)))
    lap("replay")
    return played, phases
